"""The state of one engine: its preset, settings, model facts and codebook registry, in one object.

vLLM builds one ``EngineState`` per engine (per worker process) the first time a packed attention
layer is constructed (``engine_for``), while the engine's ``VllmConfig`` is current. Every packed
layer of the engine holds the same object, so a run-level decision -- which calibration file, which
registry, whether prefill reads the packed cache -- is taken once and seen by all layers.

``customize_spec`` (vLLM asks it for the page layout) runs in the worker's spec query, where no config
is current: ``current_engine`` then returns the engine of this process that is being set up (the
single live one; with several live engines in one process, e.g. sequential in-process engines whose
configs are still referenced, the most recently created, which is the one vLLM is sizing).
"""

from __future__ import annotations

import itertools
import logging
import threading
import weakref
from dataclasses import dataclass, replace

from ..layout import cache_format
from ..presets import PRESETS, Preset
from ..registry import CodebookRegistry, load_registry
from .settings import Settings, load_settings

logger = logging.getLogger("vllm.vllm_turboquant")


@dataclass(frozen=True)
class ModelFacts:
    """What the registry and the protected tokens need to know about the model and this worker."""

    model: str
    num_layers: int
    total_kv_heads: int
    dtype_bytes: int
    max_model_len: int
    tp_rank: int = 0
    tp_size: int = 1


class EngineState:
    """One engine's TurboQuant state (see the module docstring). Attributes: ``preset``, ``settings``
    (replaced as a whole by ``set_compressed_prefill``), ``facts``, ``sink`` / ``window``."""

    def __init__(self, preset: Preset, settings: Settings, facts: ModelFacts):
        self.preset, self.settings, self.facts = preset, settings, facts
        self.sink, self.window = settings.protected(preset)
        self._registries: dict[int, CodebookRegistry] = {}
        self._calibration: tuple[str | None] | None = None  # decided once
        self._lock = threading.Lock()
        self.serial = next(_SERIAL)

    def calibration_file(self) -> str | None:
        """The calibration file this engine loads: its own, the automatic one (made at the first call if
        missing), or None (data-oblivious codebooks). Decided once per engine: a failed automatic calibration
        (one warning, ``calibrate.ensure_auto_calibration``) is not tried again by later layers, and the
        other workers of the engine (same ``_engine_id``) take the first one's failure."""
        with self._lock:
            if self._calibration is None:
                setting = self.settings.calibration
                if setting == "none":
                    path = None
                elif setting == "auto":
                    from ..calibrate import ensure_auto_calibration

                    made = ensure_auto_calibration(self.facts.model, self.preset, self.settings.seed,
                                                   timeout=self.settings.calibration_timeout,
                                                   engine_id=_engine_id())
                    path = None if made is None else str(made)
                else:
                    path = setting
                self._calibration = (path,)
            return self._calibration[0]

    def registry(self, head_dim: int) -> CodebookRegistry:
        """The engine's codebook registry for ``head_dim`` (built or loaded once, checked against the model)."""
        calibration = self.calibration_file()
        with self._lock:
            if head_dim not in self._registries:
                f = self.facts
                if calibration:
                    reg = load_registry(calibration, preset=self.preset.name, head_dim=head_dim,
                                        num_layers=f.num_layers, num_kv_heads=f.total_kv_heads)
                else:
                    reg = CodebookRegistry.default(self.preset, head_dim, f.num_layers, f.total_kv_heads,
                                                   seed=self.settings.seed, model=f.model)
                self._registries[head_dim] = reg
            return self._registries[head_dim]

    def slot_bytes(self, head_dim: int) -> int:
        return cache_format(self.preset, head_dim).layout.slot_bytes


_SERIAL = itertools.count()
_ENGINES: dict[tuple[int, str], EngineState] = {}  # (id(VllmConfig), preset) -> state, dropped with the config
_LOCK = threading.Lock()


def _current_config():
    from vllm.config import get_current_vllm_config_or_none

    return get_current_vllm_config_or_none()


def _engine_id() -> str | None:
    """What the workers of one engine share and no other engine has: the ``instance_id`` vLLM gives the
    engine's ``VllmConfig`` when it is made (a nanosecond timestamp) and ships to every worker; None when
    no config is current."""
    cfg = _current_config()
    instance = getattr(cfg, "instance_id", None) if cfg is not None else None
    return f"{instance}" if instance else None


def model_facts(vllm_config) -> ModelFacts:
    """The model facts of a run, and this worker's tensor-parallel position."""
    from vllm.distributed import parallel_state as ps

    mc = vllm_config.model_config
    tp = (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()) \
        if ps.model_parallel_is_initialized() else (0, 1)
    return ModelFacts(model=str(mc.model), num_layers=int(mc.hf_text_config.num_hidden_layers),
                      total_kv_heads=int(mc.get_total_num_kv_heads()), dtype_bytes=mc.dtype.itemsize,
                      max_model_len=int(mc.max_model_len), tp_rank=tp[0], tp_size=tp[1])


def engine_for(vllm_config, preset: str | None = None) -> EngineState | None:
    """The engine state of ``vllm_config`` for ``preset`` (default: the run's kv-cache dtype), made on the
    first call; None when that is not one of our presets. Raises ValueError for bad options."""
    name = preset or (vllm_config.cache_config.cache_dtype if vllm_config.cache_config is not None else None)
    if name not in PRESETS:
        return None
    key = (id(vllm_config), name)
    with _LOCK:
        state = _ENGINES.get(key)
        if state is None:
            settings = load_settings(getattr(vllm_config, "additional_config", None))
            state = EngineState(PRESETS[name], settings, model_facts(vllm_config))
            if state.sink + state.window:
                from .exact import check_supported

                check_supported(vllm_config)
            _ENGINES[key] = state
            weakref.finalize(vllm_config, _ENGINES.pop, key, None)
        return state


def current_engine() -> EngineState:
    """The engine being set up in this process (see the module docstring). Raises RuntimeError if none."""
    cfg = _current_config()
    if cfg is not None:
        state = engine_for(cfg)
        if state is not None:
            return state
    with _LOCK:
        live = sorted(_ENGINES.values(), key=lambda s: s.serial)
    if not live:
        raise RuntimeError("vllm-turboquant: a packed KV-cache spec was requested before any TurboQuant "
                           "attention layer was built in this process")
    return live[-1]


def engines_of(llm) -> list[EngineState]:
    """The engine states behind an in-process ``LLM`` (one per distinct state its layers hold)."""
    from .inprocess import attention_layers

    states = {id(impl.packed.engine): impl.packed.engine for _, impl in attention_layers(llm)
              if getattr(impl, "packed", None) is not None}
    return list(states.values())


def set_compressed_prefill(llm, value: bool) -> int:
    """Switch an in-process engine between compressed prefill (prefill reads the packed cache, as decode
    does) and vLLM's usual semantics, for every later step; returns the number of packed layers switched.

    The layers read the switch at every forward, so this computes what a second engine started with
    ``compressed_prefill`` = ``value`` would, without a second start."""
    states = engines_of(llm)
    for state in states:
        state.settings = replace(state.settings, compressed_prefill=bool(value))
    from .inprocess import attention_layers

    return sum(1 for _, impl in attention_layers(llm) if getattr(impl, "packed", None) is not None)
