"""TurboQuant presets: the names ``--kv-cache-dtype`` accepts.

A preset is one frozen record. Adding a preset is adding one row to
``PRESETS``; the layout, the reference and the kernels derive everything else
from the record and the head size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

QJLScale = Literal["unbiased", "optimal"]


@dataclass(frozen=True)
class Preset:
    """How one KV head's key and value vectors are encoded.

    key_bits / value_bits: Lloyd-Max code bits per coordinate (1..4).
    qjl_ratio: QJL sketch size as a fraction of head_dim (m = qjl_ratio * d);
        0 means no sketch.
    qjl_scale: "unbiased" (lambda = 1, the paper) or "optimal" (the
        variance-optimal lambda* = 1 / (1 + pi d / (2 m))).
    sink / window: protected tokens (``protected.py``): the first ``sink`` and the
        ``window`` most recent tokens of a sequence are attended exactly. Defaults;
        the run's settings may override them. 0 / 0 is plain TurboQuant.
    auto_calibrate: with the default ``calibration = "auto"`` setting, fit per-head codebooks
        and key means to the model once, at its first engine start (``calibrate.py``).
    lsq_scale: store, in each key's and value's norm field, the least-squares scale of its codes,
        s = ‖x‖ ⟨y, c⟩ / ⟨c, c⟩ (y the rotated unit vector, c its centroids: the s minimising
        ‖x − s Πᵀ c‖), in place of ‖x‖. Same bytes, same decoder; an accuracy lever under evaluation,
        implemented by the torch reference ops only (``ops.LSQ_SCALE_OPS``). Needs qjl_ratio = 0 (the
        QJL residual is defined against the norm-scaled reconstruction).
    """

    name: str
    key_bits: int
    value_bits: int
    qjl_ratio: float = 0.0
    qjl_scale: QJLScale = "unbiased"
    sink: int = 0
    window: int = 0
    auto_calibrate: bool = False
    description: str = ""
    lsq_scale: bool = False

    def __post_init__(self) -> None:
        for field, bits in (("key_bits", self.key_bits), ("value_bits", self.value_bits)):
            if bits not in (1, 2, 3, 4):
                raise ValueError(f"preset {self.name!r}: {field}={bits}, accepted: 1, 2, 3, 4")
        if self.sink < 0 or self.window < 0:
            raise ValueError(f"preset {self.name!r}: sink={self.sink}, window={self.window}, accepted: >= 0")
        if not 0.0 <= self.qjl_ratio <= 4.0:
            raise ValueError(f"preset {self.name!r}: qjl_ratio={self.qjl_ratio}, accepted: 0..4")
        if self.lsq_scale and self.qjl_ratio:
            raise ValueError(f"preset {self.name!r}: lsq_scale=True needs qjl_ratio=0 (got {self.qjl_ratio})")
        if self.qjl_scale not in ("unbiased", "optimal"):
            raise ValueError(
                f"preset {self.name!r}: qjl_scale={self.qjl_scale!r}, accepted: 'unbiased', 'optimal'"
            )

    def qjl_dim(self, head_dim: int) -> int:
        """QJL sketch size m for this head size (a multiple of 8, or 0)."""
        m = int(round(self.qjl_ratio * head_dim))
        return 8 * ((m + 7) // 8)

    def qjl_lambda(self, head_dim: int) -> float:
        """The weight lambda of the QJL correction term (0 without a sketch)."""
        return qjl_lambda(head_dim, self.qjl_dim(head_dim), self.qjl_scale)

    def qjl_coefficient(self, head_dim: int) -> float:
        """lambda * sqrt(pi/2) / m: multiplies gamma * <S q~, s> in the score."""
        return qjl_coefficient(head_dim, self.qjl_dim(head_dim), self.qjl_scale)

    @property
    def encoding_tag(self) -> str:
        """``k4v2``, ``k2v3q1u``: the fields that shape a calibration file (bits, QJL ratio and scale)."""
        tag = f"k{self.key_bits}v{self.value_bits}"
        return tag + (f"q{self.qjl_ratio:g}{self.qjl_scale[0]}" if self.qjl_ratio else "")

    @property
    def bits_per_coordinate(self) -> float:
        """Nominal bits per coordinate, keys and values averaged (sketch included)."""
        return (self.key_bits + self.value_bits + self.qjl_ratio) / 2.0


def qjl_lambda(head_dim: int, m: int, scale: QJLScale) -> float:
    """lambda = 1 (unbiased) or the variance-optimal 1 / (1 + pi d / (2 m)); 0 when m = 0."""
    if m == 0:
        return 0.0
    return 1.0 if scale == "unbiased" else 1.0 / (1.0 + math.pi * head_dim / (2.0 * m))


def qjl_coefficient(head_dim: int, m: int, scale: QJLScale) -> float:
    """lambda * sqrt(pi/2) / m, the factor of gamma * <S q~, s> in a score estimate."""
    return 0.0 if m == 0 else qjl_lambda(head_dim, m, scale) * math.sqrt(math.pi / 2.0) / m


def _row(name: str, key_bits: int, value_bits: int, **kw) -> tuple[str, Preset]:
    return name, Preset(name, key_bits, value_bits, **kw)


PRESETS: dict[str, Preset] = dict(
    [
        # Recommended settings: Lloyd-Max codes for keys and values; the first 4 tokens and the 64
        # (2-bit: 128) most recent ones attended exactly (protected.py); codebooks and key means
        # calibrated to the model at its first start (calibrate.py). What each budget holds is the
        # measured frontier (docs/results.md, "Preset frontier").
        _row("turboquant4", 4, 4, sink=4, window=64, auto_calibrate=True,
             description="4-bit Lloyd-Max keys and values"),
        # 3 bits on average: keys get 4 (softmax exponentiates their error), values 2 (K4V2 beats K3V3
        # by 12.7 points on Gemma-3 and is within 1 on SmolLM2).
        _row("turboquant3", 4, 2, sink=4, window=64, auto_calibrate=True,
             description="4-bit Lloyd-Max keys, 2-bit values"),
        # 2 bits on average: keys 3, values 1, by the same rule (K3V1 +7.3% vs K2V2 +36.6% on Gemma-3,
        # +13.3% vs +6.6% on SmolLM2: the worst case over the two models).
        _row("turboquant2", 3, 1, sink=4, window=128, auto_calibrate=True,
             description="3-bit Lloyd-Max keys, 1-bit values"),
        # The paper's TurboQuant_prod exactly: (b-1)-bit keys + 1-bit QJL (m = d, lambda = 1).
        _row("turboquant4_qjl", 3, 4, qjl_ratio=1.0, description="paper: 3-bit keys + QJL, 4-bit values"),
        _row("turboquant3_qjl", 2, 3, qjl_ratio=1.0, description="paper: 2-bit keys + QJL, 3-bit values"),
        _row("turboquant2_qjl", 1, 2, qjl_ratio=1.0, description="paper: 1-bit keys + QJL, 2-bit values"),
    ]
)


def preset_names() -> list[str]:
    """Every accepted preset name, in table order."""
    return list(PRESETS)


def get_preset(name: str | Preset) -> Preset:
    """Look up a preset by name; an unknown name raises ValueError listing the accepted ones."""
    if isinstance(name, Preset):
        return name
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown TurboQuant preset {name!r}; accepted: {', '.join(PRESETS)}"
        ) from None


def register_preset(preset: Preset) -> Preset:
    """Add a preset that is not one of the shipped rows (e.g. an evaluation candidate) to ``PRESETS``.

    Registering the same record twice is a no-op; a name already taken by a different record raises
    ValueError. To serve it, use ``vllm_turboquant.backend.register_preset``, which also tells vLLM."""
    if not isinstance(preset, Preset):
        raise TypeError(f"register_preset takes a Preset, got {type(preset).__name__}")
    known = PRESETS.get(preset.name)
    if known is not None and known != preset:
        raise ValueError(f"preset name {preset.name!r} is taken by {known}")
    PRESETS[preset.name] = preset
    return preset
