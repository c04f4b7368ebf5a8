"""Where vllm-turboquant keeps files it derives or fetches (never in git)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """The cache folder (``$VLLM_TURBOQUANT_CACHE``, else ``~/.cache/vllm-turboquant``), created on use."""
    root = os.environ.get("VLLM_TURBOQUANT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vllm-turboquant"
    )
    path = Path(root, *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
