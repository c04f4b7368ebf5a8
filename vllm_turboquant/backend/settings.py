"""Run-time options of the backend: plain data, parsed and checked in one place.

Options come from environment variables or ``--additional-config '{"turboquant": {...}}'`` (which wins):

| option | env var | default | meaning |
|---|---|---|---|
| compressed_prefill | VLLM_TURBOQUANT_COMPRESSED_PREFILL | true | prefill reads every key and value back from the
  packed cache, as decode does; ``false``: a prompt chunk of two or more tokens attends to its own fresh K/V, and a
  one-token step (vLLM schedules it as a decode, whether or not it is a prompt token) reads the cache |
| calibration | VLLM_TURBOQUANT_CALIBRATION | auto | ``auto``: presets that ask for it are calibrated once per
  model at the first start (``calibrate.py``) -- only a model whose size is known on this machine and at most 8 GiB
  of weights (a local folder, or a hub ID whose weights are in the local Hugging Face cache, looked up offline);
  any other, a hub ID of unknown size included, is served with data-oblivious codebooks after one warning;
  ``none``: data-oblivious codebooks; else a calibration file (``python -m vllm_turboquant.calibrate``) to load
  and check at start |
| seed | VLLM_TURBOQUANT_SEED | 0 | seed of the data-oblivious rotations and QJL matrices |
| calibration_timeout | VLLM_TURBOQUANT_CALIBRATION_TIMEOUT | 600 | seconds an automatic calibration may take
  (and wait for another process's); past it the engine serves data-oblivious codebooks |
| ops | VLLM_TURBOQUANT_OPS | auto | the attention-ops implementation (``ops.py``): ``torch`` (reference),
  ``triton`` (kernels; CUDA, or the interpreter with ``TRITON_INTERPRET=1``), ``cpu`` (compiled CPU ops),
  ``auto`` (triton on CUDA; on the CPU the compiled ops when built, else torch) |
| sink | VLLM_TURBOQUANT_SINK | the preset's | first S tokens of every sequence attended exactly (``protected.py``) |
| window | VLLM_TURBOQUANT_WINDOW | the preset's | the W most recent tokens (the query's own included) attended
  exactly |

``load_settings`` raises ValueError naming the option, the bad value and the accepted values;
``check_usable`` refuses what parses but cannot run on the platform (``ops=triton`` without a Triton
driver, ``ops=cpu`` off the CPU). Both run before the engine loads weights: in ``vllm-turboquant serve``
before vLLM's CLI starts (``cli.py``) and, for every way of building an engine (``LLM(...)`` included),
when vLLM validates its config (``plugin.check_engine_config``). Nothing here acts on a setting: the
engine state (``engine.py``) decides what a run does with it.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from ..ops import OPS_CHOICES, check_preset

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
#: The section of ``--additional-config`` that holds these options.
SECTION = "turboquant"


@dataclass(frozen=True)
class Settings:
    compressed_prefill: bool = True
    calibration: str = "auto"
    seed: int = 0
    ops: str = "auto"
    sink: int | None = None
    window: int | None = None
    calibration_timeout: float = 600.0

    def protected(self, preset) -> tuple[int, int]:
        """(S, W) for a preset: these settings where given, else the preset's defaults."""
        return (preset.sink if self.sink is None else self.sink,
                preset.window if self.window is None else self.window)


_KINDS = {"compressed_prefill": bool, "calibration": str, "seed": int, "ops": str, "sink": int, "window": int,
          "calibration_timeout": float}
_ACCEPTED = {"compressed_prefill": "true or false", "calibration": "'auto', 'none' or a calibration file path",
             "seed": "an integer", "ops": ", ".join(repr(c) for c in OPS_CHOICES),
             "sink": "an integer >= 0", "window": "an integer >= 0",
             "calibration_timeout": "a number of seconds > 0"}


def _parse(name: str, raw: Any, source: str) -> Any:
    """One option's value from JSON (``source`` = additional-config) or an environment string."""
    kind = _KINDS[name]

    def bad() -> ValueError:
        return ValueError(f"turboquant option {name}={raw!r} (from {source}): accepted: {_ACCEPTED[name]}")

    if kind is bool:
        if isinstance(raw, bool):
            return raw
        if not isinstance(raw, str) or raw.strip().lower() not in _TRUE + _FALSE:
            raise bad()
        return raw.strip().lower() in _TRUE
    if kind is int:
        if isinstance(raw, bool):
            raise bad()
        if isinstance(raw, int):
            value = raw
        elif isinstance(raw, str) and raw.strip().lstrip("+-").isdigit():
            value = int(raw.strip())
        else:  # 4.7, "4.7", "abc", None: never truncated or guessed
            raise bad()
        if name in ("sink", "window") and value < 0:
            raise bad()
        return value
    if kind is float:
        if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
            raise bad()
        try:
            value = float(raw)  # a JSON number, or an environment string ("30", "2.5")
        except ValueError:
            raise bad() from None
        if not math.isfinite(value) or value <= 0:
            raise bad()
        return value
    if not isinstance(raw, str) or not raw.strip():
        raise bad()
    value = raw.strip()
    if name == "ops":
        if value.lower() not in OPS_CHOICES:
            raise bad()
        return value.lower()
    if name == "calibration" and value.lower() in ("auto", "none"):
        return value.lower()
    return value


def load_settings(additional_config: Mapping[str, Any] | None = None,
                  environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from the environment, overridden by ``additional_config["turboquant"]``.

    Raises ValueError when the section is not an object, names an unknown option, or a value has the
    wrong type or range (the message names the option, the value and the accepted values). Checks
    the calibration file exists when one is named."""
    environ = os.environ if environ is None else environ
    if additional_config is not None and not isinstance(additional_config, Mapping):
        raise ValueError(f"--additional-config must be a JSON object, got {additional_config!r}")
    section = (additional_config or {}).get(SECTION, {})
    if section is None:
        section = {}
    if not isinstance(section, Mapping):
        raise ValueError(f"--additional-config {SECTION!r} must be an object of options, got {section!r}; "
                         f"accepted keys: {', '.join(_KINDS)}")
    unknown = sorted(set(section) - set(_KINDS))
    if unknown:
        raise ValueError(f"unknown turboquant option(s) {unknown}; accepted: {', '.join(_KINDS)}")
    values = {}
    for f in fields(Settings):
        env = environ.get(f"VLLM_TURBOQUANT_{f.name.upper()}")
        if f.name in section:
            values[f.name] = _parse(f.name, section[f.name], "--additional-config")
        elif env not in (None, ""):
            values[f.name] = _parse(f.name, env, f"VLLM_TURBOQUANT_{f.name.upper()}")
    settings = Settings(**values)
    if settings.calibration not in ("auto", "none") and not os.path.isfile(settings.calibration):
        raise ValueError(f"turboquant option calibration={settings.calibration!r}: no such file; accepted: "
                         f"{_ACCEPTED['calibration']} (make one with python -m vllm_turboquant.calibrate)")
    return settings


def option_source(name: str, additional_config: Mapping[str, Any] | None = None,
                  environ: Mapping[str, str] | None = None) -> str:
    """Where option ``name`` was set: ``--additional-config``, its environment variable, or ``default``."""
    environ = os.environ if environ is None else environ
    section = (additional_config or {}).get(SECTION) if isinstance(additional_config, Mapping) else None
    if isinstance(section, Mapping) and name in section:
        return "--additional-config"
    env = f"VLLM_TURBOQUANT_{name.upper()}"
    return env if environ.get(env) not in (None, "") else "default"


def _interpreting(environ: Mapping[str, str]) -> bool:
    return environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUE


def check_usable(settings: Settings, device_type: str, source: str = "the settings",
                 environ: Mapping[str, str] | None = None, preset=None) -> None:
    """Raise ValueError when ``settings`` cannot run on a ``device_type`` ("cpu", "cuda", ...) platform,
    naming the option, why, and what to use instead:

    * ``ops=triton`` needs Triton, and on a platform other than CUDA its interpreter (``TRITON_INTERPRET=1``):
      the CPU build has no Triton driver, so the first request would kill the engine ("0 active drivers");
    * ``ops=cpu`` (the compiled CPU ops) reads host memory: only on the CPU platform, and only when the
      compiled library loads (``cpu_ops.available``);
    * a ``preset`` (when given) the ops cannot encode (``ops.check_preset``: ``lsq_scale`` needs ``ops=torch``);
    * where the Triton kernels run (``ops=triton``, or ``auto`` on CUDA), a malformed
      ``VLLM_TURBOQUANT_TRITON_CONFIG`` (``kernels.common.check_launch_overrides``).

    ``source`` names where the option came from (``option_source``)."""
    environ = os.environ if environ is None else environ
    ops = settings.ops
    others = "use ops='auto' (the default), 'torch'" + (" or 'cpu'" if device_type == "cpu" else "")
    if ops == "triton":
        if importlib.util.find_spec("triton") is None:
            raise ValueError(f"turboquant option ops='triton' (from {source}): Triton is not installed; "
                             f"install it or {others}")
        if device_type != "cuda" and not _interpreting(environ):
            raise ValueError(f"turboquant option ops='triton' (from {source}): the Triton kernels need a CUDA "
                             f"driver and this is the {device_type} platform (Triton has 0 active drivers here; the "
                             f"first request would fail). Set TRITON_INTERPRET=1 to run them under Triton's "
                             f"interpreter (slow: tests only), or {others}")
    elif ops == "cpu" and device_type != "cpu":
        raise ValueError(f"turboquant option ops='cpu' (from {source}): the compiled CPU ops run on the CPU "
                         f"platform only, this is {device_type}; use ops='auto' (the default), 'triton' or 'torch'")
    elif ops == "cpu":
        from .. import cpu_ops

        if not cpu_ops.available():
            raise ValueError(f"turboquant option ops='cpu' (from {source}): the compiled CPU ops do not load "
                             f"({cpu_ops.unavailable_reason()}). To fix: {cpu_ops.BUILD_HINT}; or use ops='torch' (the "
                             "reference, ~10x slower)")
    if ops == "triton" or (ops == "auto" and device_type == "cuda"):
        from ..kernels.common import check_launch_overrides

        check_launch_overrides(environ.get("VLLM_TURBOQUANT_TRITON_CONFIG"))
    if preset is not None:
        try:
            check_preset(ops, preset)   # strict for 'auto': say which ops to ask for
        except ValueError as exc:
            raise ValueError(f"turboquant option ops={ops!r} (from {source}): {exc}") from None
