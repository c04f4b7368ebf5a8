"""Run-time options of the vLLM backend, from environment variables or
``--additional-config '{"turboquant": {...}}'`` (the latter wins).

| option | env var | default | meaning |
|---|---|---|---|
| compressed_prefill | VLLM_TURBOQUANT_COMPRESSED_PREFILL | false | prefill reads every key/value back from the packed cache, as decode does |
| calibration | VLLM_TURBOQUANT_CALIBRATION | auto | ``auto``: presets that ask for it are calibrated once per model at the first start (``calibrate.py``); ``none``: data-oblivious codebooks; else a calibration file (``python -m vllm_turboquant.calibrate``) to load and validate at start |
| seed | VLLM_TURBOQUANT_SEED | 0 | seed of the data-oblivious rotations and QJL matrices |
| ops | VLLM_TURBOQUANT_OPS | auto | ``torch`` (reference path), ``triton`` (kernels), ``auto`` (triton on CUDA, torch on CPU) |
| sink | VLLM_TURBOQUANT_SINK | the preset's | first S tokens of every sequence attended exactly (``protected.py``) |
| window | VLLM_TURBOQUANT_WINDOW | the preset's | the W most recent tokens (the query's own included) attended exactly |
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from typing import Any, Mapping

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")
OPS_CHOICES = ("auto", "torch", "triton")


@dataclass(frozen=True)
class Settings:
    compressed_prefill: bool = False
    calibration: str = "auto"
    seed: int = 0
    ops: str = "auto"
    sink: int | None = None
    window: int | None = None

    def calibration_file(self, model: str, preset) -> str | None:
        """The calibration file a run loads: its own, the automatic one (made now if missing), or None."""
        if self.calibration == "none":
            return None
        if self.calibration == "auto":
            from .calibrate import ensure_auto_calibration

            path = ensure_auto_calibration(model, preset, self.seed)
            return None if path is None else str(path)
        return self.calibration

    def protected(self, preset) -> tuple[int, int]:
        """(S, W) for a preset: these settings where given, else the preset's defaults."""
        return (preset.sink if self.sink is None else self.sink,
                preset.window if self.window is None else self.window)


def _parse(name: str, raw: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
        raise ValueError(f"turboquant option {name}={raw!r}: expected one of true/false/1/0")
    if kind is int:
        try:
            return int(raw)
        except (TypeError, ValueError):
            raise ValueError(f"turboquant option {name}={raw!r}: expected an integer") from None
    return None if raw in (None, "") else str(raw)


def load_settings(additional_config: Mapping[str, Any] | None = None,
                  environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from the environment, overridden by ``additional_config["turboquant"]``."""
    environ = os.environ if environ is None else environ
    section = dict((additional_config or {}).get("turboquant", {}) or {})
    known = {f.name: f for f in fields(Settings)}
    unknown = sorted(set(section) - set(known))
    if unknown:
        raise ValueError(f"unknown turboquant option(s) {unknown}; accepted: {sorted(known)}")
    values = {}
    for name, f in known.items():
        kind = {"bool": bool, "int": int, "int | None": int}.get(str(f.type), str)
        env = environ.get(f"VLLM_TURBOQUANT_{name.upper()}")
        if name in section:
            values[name] = _parse(name, section[name], kind)
        elif env is not None:
            values[name] = _parse(name, env, kind)
    settings = Settings(**values)
    for name in ("sink", "window"):
        v = getattr(settings, name)
        if v is not None and v < 0:
            raise ValueError(f"turboquant option {name}={v}: expected an integer >= 0")
    if settings.calibration in (None, ""):
        settings = replace(settings, calibration=Settings.calibration)
    if settings.calibration.lower() in ("auto", "none"):
        settings = replace(settings, calibration=settings.calibration.lower())
    if settings.ops not in OPS_CHOICES:
        raise ValueError(f"turboquant option ops={settings.ops!r}; accepted: {', '.join(OPS_CHOICES)}")
    return settings
