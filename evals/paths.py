"""Where results live (``evals/results/<suite>/<model>.md``) and how a report shows a path: never absolute.

A report is committed and read on other machines, so every path it records is shown relative to the repository
(inside it), as ``~/...`` (under the home folder) or as the placeholder ``<NAME>`` (anywhere else: another
machine's scratch folder means nothing here): ``display_path`` for one path, ``portable_text`` for the absolute
paths inside a command line or an error message, ``portable_record`` for a worker's result record (model folder,
calibration file, engine arguments, errors).
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "evals" / "results"

# an absolute path inside free text: a "/" that does not continue a word, a relative path, "~" or a URL
_ABSOLUTE = re.compile(r"(?<![\w.~/:<])/[^\s'\"`,;()\[\]<>|]+")


def default_out(suite: str, model: str) -> Path:
    """The report a run writes unless ``--out`` says otherwise."""
    return RESULTS_DIR / suite / f"{model}.md"


def display_path(path: str | os.PathLike) -> str:
    """``path`` as a report shows it: repository-relative, ``~/...``, or ``<NAME>``; relative paths unchanged."""
    text = os.fspath(path)
    p = Path(os.path.expanduser(text))
    if not p.is_absolute():
        return text
    for candidate in (p, p.resolve()):
        for root, prefix in ((REPO, ""), (REPO.resolve(), ""), (Path.home(), "~/"), (Path.home().resolve(), "~/")):
            try:
                rel = candidate.relative_to(root)
            except ValueError:
                continue
            return prefix + rel.as_posix() if rel.parts else (prefix.rstrip("/") or ".")
    return f"<{p.name or 'root'}>"


def portable_text(text: str) -> str:
    """``text`` with every absolute path in it replaced by its ``display_path``."""
    return _ABSOLUTE.sub(lambda m: display_path(m.group(0)), text)


def portable_record(rec: dict[str, Any]) -> dict[str, Any]:
    """A copy of a worker's result record with no absolute path: the model folder, calibration file, the plugin's
    calibration option and the error messages go through ``display_path`` / ``portable_text``."""
    out = copy.deepcopy(rec)
    for key in ("model_path", "calibration_file"):
        if isinstance(out.get(key), str):
            out[key] = display_path(out[key])
    options = ((out.get("engine_args") or {}).get("additional_config") or {}).get("turboquant") or {}
    if isinstance(options.get("calibration"), str):
        options["calibration"] = display_path(options["calibration"])
    out["errors"] = [portable_text(e) for e in out.get("errors", [])]
    return out
