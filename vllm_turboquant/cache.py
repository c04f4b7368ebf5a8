"""Where vllm-turboquant keeps files it derives or fetches (never in git), and how it writes them.

The folder is ``$VLLM_TURBOQUANT_CACHE``, else ``$XDG_CACHE_HOME/vllm-turboquant`` (``~/.cache/...``).
It may be shared (a model cache several users read) or read-only (a container with a read-only root):
files are written atomically (``replace_atomically``: a temporary name, then ``os.replace``) with the
mode a new file gets from the umask, never more than 0644 (``file_mode``), so others can read them;
callers that can do without a file (the automatic calibration) handle an ``OSError`` from here.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

#: The widest mode a cache file gets (the umask can only narrow it).
FILE_MODE = 0o644


def cache_root() -> Path:
    """The cache folder (not created)."""
    root = os.environ.get("VLLM_TURBOQUANT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vllm-turboquant"
    )
    return Path(root)


def cache_dir(*parts: str, create: bool = True) -> Path:
    """A folder under the cache folder, created on use unless ``create`` is False (raises OSError
    when it cannot be made, e.g. on a read-only file system)."""
    path = cache_root().joinpath(*parts)
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def umask() -> int:
    """This process's umask, read without changing it where Linux tells it (/proc), else by setting and
    restoring it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode of a new cache file: 0644 narrowed by the umask (0644 under the usual 022, 0640 under 027)."""
    return FILE_MODE & ~umask()


def replace_atomically(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Write ``path`` through ``write(tmp)`` into a temporary name next to it, give it ``file_mode()``
    and rename it into place, so a reader never sees a partial file under the final name. On any failure
    the temporary file is removed and the exception propagates. Returns ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(tmp)
        os.chmod(tmp, file_mode())  # some writers (safetensors) create files 0600
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    return path
