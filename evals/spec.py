"""The runner's dtype specs: the ``Spec`` grammar (``parse_spec``) and the cache bytes a spec costs.

A spec is one ``--kv-cache-dtype`` entry of ``python -m evals.run``: ``BASE(+FLAG)*`` (see ``Spec``). This module
reads ``vllm_turboquant.presets`` and ``vllm_turboquant.layout`` only; it never imports vLLM or the plugin.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

_SW = re.compile(r"s(\d+)w(\d+)")
_ADHOC = re.compile(r"tq:k([1-4])v([1-4])")
_QJL = re.compile(r"qjl(\d+(?:\.\d+)?|\.\d+)(\*?)")
_EDGE = re.compile(r"edge(\d+)")
_OPS = re.compile(r"ops(torch|triton|cpu)")
_FLAGS = ("calibrated", "nocal", "nocenter", "autocal", "exactprefill", "lsq")
ADHOC_PREFIX = "adhoc_"  # vLLM kv-cache dtype names of ad-hoc presets (``adhoc_preset``)
PLAIN_PRESETS = ("turboquant2", "turboquant3", "turboquant4")


@dataclasses.dataclass(frozen=True)
class Spec:
    """One ``--kv-cache-dtype`` entry of the runner, parsed (``parse_spec``).

    Grammar (flags in any order after the base; each at most once)::

        SPEC  := BASE ( "+" FLAG )*
        BASE  := auto | fp8... | PRESET          (a name of vllm_turboquant.presets.PRESETS)
               | "tq:k" KBITS "v" VBITS          (ad-hoc encoder: Lloyd-Max key / value code bits, 1..4)
        FLAG  := "qjl" RATIO [ "*" ]             (tq: bases only: QJL sketch m = RATIO * head_dim on top of
                                                  the key codes; lambda = 1 (paper), "*" = lambda*)
               | "s" S "w" W                     (protected tokens: first S + last W exact; TurboQuant only)
               | "calibrated"                    (codebooks + key means fitted on the Shakespeare *train* split,
                                                  cached; TurboQuant only)
               | "nocal"                         (data-oblivious codebooks: calibration=none; TurboQuant only)
               | "nocenter"                      (with +calibrated: fit the codebooks to uncentred keys, key
                                                  means zero -- what centring adds, measured apart)
               | "autocal"                       (tq: bases only: the fit the automatic calibration makes for
                                                  a plain preset -- built-in text, same tokens and seed -- so a
                                                  candidate encoder is compared as it would be served)
               | "edge" N                        (first N and last N attention layers kept at bf16 through
                                                  vLLM's kv_cache_dtype_skip_layers; TurboQuant only)
               | "exactprefill"                  (the plugin's compressed_prefill = false for the whole run:
                                                  a prompt chunk attends to its own fresh K/V, vLLM's usual
                                                  semantics; without it a spec runs as served, every token
                                                  read back from the cache; TurboQuant only)
               | "lsq"                           (tq: bases only, no QJL: least-squares scales in the norm fields,
                                                  ``Preset.lsq_scale``; runs on the torch ops, the only ones
                                                  that encode it)
               | "ops" IMPL                      (IMPL = torch | triton | cpu: the attention ops the worker's
                                                  engine runs (VLLM_TURBOQUANT_OPS); triton without CUDA runs
                                                  under the interpreter (TRITON_INTERPRET=1); TurboQuant only)

    Examples: ``tq:k4v2``, ``tq:k2v3+qjl1*`` (= turboquant3_qjl with lambda*), ``tq:k3v3+qjl0.5*+s4w64``,
    ``turboquant3+calibrated+s0w0``, ``turboquant3+edge1``, ``turboquant3+nocal``,
    ``turboquant3+exactprefill``, ``turboquant3+opstriton``. An ad-hoc ``tq:``
    preset has no protected tokens and no calibration by default (like the ``_qjl`` rows); give ``+sSwW``
    to compare at a plain preset's S / W. Without ``+calibrated`` / ``+nocal`` a spec runs as served:
    the plain presets with their automatic calibration (on the package's built-in text).
    """

    spec: str
    dtype: str                 # the vLLM kv-cache dtype name (an ad-hoc preset's generated name for tq:)
    preset: Any = None         # vllm_turboquant.presets.Preset for TurboQuant dtypes, else None
    adhoc: bool = False        # preset is not in PRESETS: the worker registers it
    calibrated: bool = False   # +calibrated (Shakespeare train split)
    protected: tuple[int, int] | None = None  # +sSwW; None = the preset's defaults
    edge: int = 0              # +edgeN
    nocal: bool = False        # +nocal (calibration=none)
    center: bool = True        # False: +nocenter (calibrated codebooks without key centring)
    autocal: bool = False      # +autocal (tq: only): calibrated on the built-in text, as a plain preset is served
    exact_prefill: bool = False  # +exactprefill: compressed_prefill = false for the whole run
    ops: str | None = None     # +opsIMPL: the worker's VLLM_TURBOQUANT_OPS; None = the environment's

    @property
    def turboquant(self) -> bool:
        return self.preset is not None


def parse_spec(spec: str) -> Spec:
    """Parse one runner dtype spec (grammar: ``Spec``); ValueError names what is wrong."""
    from vllm_turboquant.presets import PRESETS, Preset

    base, *flags = spec.split("+")
    seen: set[str] = set()
    qjl: tuple[float, bool] | None = None
    qjl_flag, protected, edge, ops = "", None, 0, None
    for flag in flags:
        kind = (flag if flag in _FLAGS else
                "sSwW" if _SW.fullmatch(flag) else
                "qjl" if _QJL.fullmatch(flag) else "edge" if _EDGE.fullmatch(flag) else
                "ops" if _OPS.fullmatch(flag) else None)
        if kind is None:
            raise ValueError(f"unknown dtype suffix {flag!r} in {spec!r}; accepted: +calibrated, +nocal, "
                             "+nocenter (with +calibrated), +autocal (tq: specs), +sSwW "
                             "(protected tokens, e.g. +s4w64), +edgeN (first/last N layers bf16), "
                             "+qjlR / +qjlR* (tq: specs: QJL sketch m = R*d, lambda 1 / lambda*), "
                             "+exactprefill (compressed_prefill = false for the whole run), "
                             "+lsq (tq: specs: least-squares scales), "
                             "+opsIMPL (IMPL: torch, triton, cpu)")
        if kind in seen:
            raise ValueError(f"{spec!r}: suffix +{kind} given twice")
        seen.add(kind)
        if kind == "sSwW":
            m = _SW.fullmatch(flag)
            protected = (int(m.group(1)), int(m.group(2)))
        elif kind == "qjl":
            m = _QJL.fullmatch(flag)
            qjl, qjl_flag = (float(m.group(1)), bool(m.group(2))), flag
        elif kind == "edge":
            edge = int(_EDGE.fullmatch(flag).group(1))
            if edge < 1:
                raise ValueError(f"{spec!r}: +edgeN needs N >= 1")
        elif kind == "ops":
            ops = _OPS.fullmatch(flag).group(1)
    calibrated, nocal, autocal = ("calibrated" in seen, "nocal" in seen, "autocal" in seen)
    center = "nocenter" not in seen
    exact, lsq = "exactprefill" in seen, "lsq" in seen
    if not center and not calibrated:
        raise ValueError(f"{spec!r}: +nocenter changes a +calibrated fit; give both")
    if calibrated + nocal + autocal > 1:
        raise ValueError(f"{spec!r}: +calibrated, +nocal and +autocal exclude each other")
    m = _ADHOC.fullmatch(base)
    if m:
        kb, vb = int(m.group(1)), int(m.group(2))
        ratio, optimal = qjl or (0.0, False)
        if qjl is not None and ratio <= 0:
            raise ValueError(f"{spec!r}: +qjlR needs R > 0")
        if lsq and (ratio or ops not in (None, "torch")):
            raise ValueError(f"{spec!r}: +lsq needs a spec without +qjlR, on the torch ops (the only ones "
                             "that encode least-squares scales)")
        name = (f"{ADHOC_PREFIX}k{kb}v{vb}" + (f"_qjl{ratio:g}{'opt' if optimal else ''}" if ratio else "")
                + ("_lsq" if lsq else ""))
        preset = Preset(name, kb, vb, qjl_ratio=ratio, qjl_scale="optimal" if optimal else "unbiased",
                        lsq_scale=lsq, description=f"ad-hoc (evals.run): {base}" + (f"+{qjl_flag}" if ratio else "")
                        + ("+lsq" if lsq else ""))
        return Spec(spec, name, preset, True, calibrated, protected, edge, nocal, center, autocal, exact,
                    "torch" if lsq else ops)
    if base.startswith("tq:"):
        raise ValueError(f"{spec!r}: an ad-hoc base is tq:kKvV with K, V in 1..4 (e.g. tq:k4v2)")
    if qjl is not None or autocal or lsq:
        raise ValueError(f"{spec!r}: +qjlR, +lsq and +autocal apply to ad-hoc tq:kKvV bases only (a plain preset "
                         "is auto-calibrated as served; named presets are fixed)")
    preset = PRESETS.get(base)
    if preset is None and (calibrated or protected or edge or nocal or exact or ops):
        raise ValueError(f"{spec!r}: +calibrated / +nocal / +sSwW / +edgeN / +exactprefill / +opsIMPL need a "
                         "TurboQuant preset or a tq: spec")
    return Spec(spec, base, preset, False, calibrated, protected, edge, nocal, center, exact_prefill=exact, ops=ops)


def split_dtype(spec: str) -> tuple[str, bool]:
    """``"turboquant3+calibrated"`` -> ("turboquant3", True): (vLLM kv-cache dtype, calibrated); see ``Spec``."""
    s = parse_spec(spec)
    return s.dtype, s.calibrated


def spec_protected(spec: str) -> tuple[int, int] | None:
    """``"turboquant3+s4w64"`` -> (4, 64): sink and window for this run; None = the preset's defaults."""
    return parse_spec(spec).protected


def effective_protected(spec: str) -> tuple[int, int] | None:
    """(S, W) a spec runs with (its suffix, else the preset's defaults); None for non-TurboQuant dtypes."""
    s = parse_spec(spec)
    if not s.turboquant:
        return None
    return s.protected or (s.preset.sink, s.preset.window)


def prefill_mode(spec: str | Spec) -> str:
    """How a spec's prefill attention reads its prompt: ``"compressed"`` (as served: every token read back
    from the cache, as decode does; also what vLLM's stock CPU attention does for ``auto`` / ``fp8``) or
    ``"exact"`` (``+exactprefill``: a prompt chunk attends to its own fresh K/V)."""
    s = parse_spec(spec) if isinstance(spec, str) else spec
    return "exact" if s.exact_prefill else "compressed"


def is_turboquant(dtype: str) -> bool:
    from vllm_turboquant.presets import PRESETS

    return dtype in PRESETS or dtype.startswith(ADHOC_PREFIX)


def skip_layers(edge: int, num_layers: int) -> list[str]:
    """vLLM's ``kv_cache_dtype_skip_layers`` for the first and last ``edge`` layers."""
    return [str(i) for i in sorted(set(range(edge)) | set(range(max(num_layers - edge, 0), num_layers)))]


def spec_bytes(spec: str | Spec, head_dim: int, num_layers: int | None = None,
               model_dtype: str = "bfloat16") -> dict[str, Any]:
    """Bytes per token per KV head of a spec: ``slot`` (a quantised layer's slot), ``bytes`` (averaged
    over layers when +edgeN keeps layers at bf16), the nearest plain preset and the ratio to its slot."""
    from vllm_turboquant.layout import slot_layout
    from vllm_turboquant.presets import PRESETS

    s = parse_spec(spec) if isinstance(spec, str) else spec
    if not s.turboquant:
        b = bytes_per_token_head(s.dtype, head_dim, model_dtype)
        return {"slot": b, "bytes": b, "plain": None, "plain_bytes": None, "ratio_to_plain": None}
    slot = slot_layout(s.preset, head_dim).slot_bytes
    avg: float = slot
    if s.edge:
        if not num_layers:
            raise ValueError(f"{s.spec}: +edgeN needs the model's layer count")
        kept = len(skip_layers(s.edge, num_layers))
        bf16 = bytes_per_token_head("auto", head_dim, model_dtype)
        avg = round(((num_layers - kept) * slot + kept * bf16) / num_layers, 2)
    plains = {n: slot_layout(PRESETS[n], head_dim).slot_bytes for n in PLAIN_PRESETS if n in PRESETS}
    plain = min(plains, key=lambda n: (abs(plains[n] - slot), -plains[n])) if plains else None
    return {"slot": slot, "bytes": avg, "plain": plain, "plain_bytes": plains.get(plain),
            "ratio_to_plain": round(avg / plains[plain], 4) if plain else None}


def encoding(preset) -> str:
    """``K3 / V3``, ``K2+QJL m=d λ=1 / V3``: the encoder of a preset in a table cell."""
    if preset is None:
        return "—"
    k = f"K{preset.key_bits}"
    if preset.qjl_ratio:
        r = preset.qjl_ratio
        m = "d" if r == 1 else f"{r:g}d" if r > 1 else f"d/{1 / r:g}" if (1 / r).is_integer() else f"{r:g}d"
        k += f"+QJL m={m} " + ("λ=1" if preset.qjl_scale == "unbiased" else "λ*")
    return f"{k} / V{preset.value_bits}" + (" (LSQ scales)" if getattr(preset, "lsq_scale", False) else "")


def spec_filename(spec: str) -> str:
    """A file stem for a spec (``*`` -> ``opt``, ``:`` -> ``-``); plain specs are unchanged."""
    return spec.replace("*", "opt").replace(":", "-")


def bytes_per_token_head(dtype: str, head_dim: int, model_dtype: str = "bfloat16") -> int:
    """Cache bytes per token per KV head, key and value together."""
    if dtype == "auto":
        return 2 * head_dim * (4 if "float32" in model_dtype else 2)
    if dtype.startswith("fp8"):
        return 2 * head_dim
    from vllm_turboquant.layout import slot_layout

    return slot_layout(dtype, head_dim).slot_bytes

