"""The calibration a spec is served with: ``+calibrated`` / ``+autocal`` files (cached per model, preset and
text), ``+nocal``, or a plain preset's automatic calibration (``vllm_turboquant.calibrate``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from evals.spec import Spec

CALIBRATION_TOKENS = 4096


def calibration_file(model: str, preset: str, model_path: str, center_keys: bool = True,
                     text: str = "shakespeare_train") -> Path:
    """The cached calibration file for (model, preset, key centring, text); made on first use (in this
    process). ``text``: "shakespeare_train" (``+calibrated``) or "builtin" (``+autocal``: the automatic
    calibration's text, token count and seed)."""
    from vllm_turboquant.cache import cache_dir
    from vllm_turboquant.calibrate import AUTO_TOKENS, builtin_text, calibrate_to_file

    tokens = AUTO_TOKENS if text == "builtin" else CALIBRATION_TOKENS
    stem = (f"{model}-{preset}-{tokens}" + ("" if center_keys else "-nocenter")
            + ("-builtin" if text == "builtin" else ""))
    path = cache_dir("evals", "calibration") / f"{stem}-v2.safetensors"
    if path.exists():
        return path
    if text == "builtin":
        body = builtin_text()
    else:
        from evals.assets import ensure_text_file

        body = ensure_text_file(text).read_text(encoding="utf-8", errors="ignore")
    return calibrate_to_file(model_path, body, path, preset, tokens=tokens, center_keys=center_keys)


def served_calibration(spec: Spec, model: str, model_path: str) -> tuple[str | None, dict[str, Any], float | None]:
    """(the plugin's ``calibration`` option for this spec, None = leave the default; what the result record
    notes: ``calibration_file`` and ``calibration: "auto"``; seconds spent calibrating, None = none).

    A calibration the spec needs is made here (timed) when it is not cached yet."""
    notes: dict[str, Any] = {}
    if spec.calibrated or spec.autocal:
        t = time.perf_counter()
        option = str(calibration_file(model, spec.dtype, model_path, spec.center,
                                      "builtin" if spec.autocal else "shakespeare_train"))
        seconds = time.perf_counter() - t
        notes["calibration_file"] = option
        return option, notes, seconds
    if spec.nocal:
        return "none", notes, None
    if spec.turboquant and spec.preset.auto_calibrate:
        # as served: the automatic calibration (made here, timed, if this model has none cached yet)
        from vllm_turboquant.calibrate import ensure_auto_calibration

        t = time.perf_counter()
        auto = ensure_auto_calibration(model_path, spec.preset)
        seconds = time.perf_counter() - t
        notes["calibration"] = "auto"
        if auto is not None:
            notes["calibration_file"] = str(auto)
        return (str(auto) if auto is not None else None), notes, seconds
    return None, notes, None
