"""The packed slot layout: the one source of truth for where every field lives.

One slot holds one token of one KV head::

    [ key codes | key QJL signs | key n (√, fp16) | key gamma (fp16) | value codes | value n_v (√, fp16) | pad ]

Fields that a preset does not use (signs and gamma without a QJL sketch) take
zero bytes. Every field starts 2-byte aligned (padding only appears when a
code field has an odd byte count, i.e. head_dim not a multiple of 16).
Codes are bit-packed little-endian: coordinate j of a b-bit field
occupies bits [j*b, (j+1)*b) of the field read as one little-endian integer
(so 3-bit codes put 8 coordinates in 3 bytes). Sign bits use the same rule with
b = 1, bit set meaning +1.

Norms (key n, value n_v) are stored as the fp16 of their square root (``encode_norm`` /
``decode_norm``): 2 bytes as a plain fp16 norm would take, but the range reaches 65504² ≈ 4.29e9
instead of 65504, so a norm that bf16 carries never becomes an fp16 inf (and attention a NaN).
QJL γ (the norm of a unit vector's residual, at most 2) is a plain fp16.

The torch reference, the CPU serving path and the Triton kernels all read
their offsets from ``SlotLayout``; nothing else computes a byte offset.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch

from .presets import Preset, get_preset

#: Slots are padded to this many bytes so that fp16 fields stay aligned.
SLOT_ALIGN = 2
#: Head sizes the layout supports: codes of 8 coordinates fill whole bytes.
HEAD_DIM_MULTIPLE = 8
MAX_HEAD_DIM = 512


@dataclass(frozen=True)
class SlotLayout:
    """Byte offsets (from the slot start) and sizes of every field of one slot."""

    head_dim: int
    key_bits: int
    value_bits: int
    qjl_dim: int
    key_codes: int
    key_signs: int
    key_norm: int
    key_gamma: int
    value_codes: int
    value_norm: int
    payload_bytes: int  # data bytes, alignment padding excluded
    slot_bytes: int  # payload + padding

    @property
    def key_code_bytes(self) -> int:
        return self.head_dim * self.key_bits // 8

    @property
    def value_code_bytes(self) -> int:
        return self.head_dim * self.value_bits // 8

    @property
    def sign_bytes(self) -> int:
        return self.qjl_dim // 8

    @property
    def pad_bytes(self) -> int:
        """Alignment padding inside the slot (0 whenever head_dim is a multiple of 16)."""
        return self.slot_bytes - self.payload_bytes

    @property
    def has_qjl(self) -> bool:
        return self.qjl_dim > 0

    def constexprs(self) -> dict[str, int]:
        """The layout as keyword arguments for a Triton kernel (all tl.constexpr)."""
        return {
            "HEAD_DIM": self.head_dim,
            "KEY_BITS": self.key_bits,
            "VALUE_BITS": self.value_bits,
            "QJL_DIM": self.qjl_dim,
            "OFF_KEY_CODES": self.key_codes,
            "OFF_KEY_SIGNS": self.key_signs,
            "OFF_KEY_NORM": self.key_norm,
            "OFF_KEY_GAMMA": self.key_gamma,
            "OFF_VALUE_CODES": self.value_codes,
            "OFF_VALUE_NORM": self.value_norm,
            "SLOT_BYTES": self.slot_bytes,
        }


def check_head_dim(head_dim: int) -> None:
    """Raise ValueError unless head_dim is one the packed layout supports."""
    if not (isinstance(head_dim, int) and 0 < head_dim <= MAX_HEAD_DIM and head_dim % HEAD_DIM_MULTIPLE == 0):
        raise ValueError(
            f"unsupported head_dim {head_dim!r}: TurboQuant needs a multiple of "
            f"{HEAD_DIM_MULTIPLE} up to {MAX_HEAD_DIM} (e.g. 64, 80, 96, 112, 128, 192, 256)"
        )


def slot_layout(preset: Preset | str, head_dim: int) -> SlotLayout:
    """Compute the slot layout of ``preset`` at ``head_dim``."""
    preset = get_preset(preset)
    check_head_dim(head_dim)
    d, m = head_dim, preset.qjl_dim(head_dim)
    offset = data = 0

    def field(nbytes: int) -> int:  # fields start SLOT_ALIGN-aligned, so fp16 reads never straddle
        nonlocal offset, data
        start, data = offset, data + nbytes
        offset = -(-(offset + nbytes) // SLOT_ALIGN) * SLOT_ALIGN
        return start

    key_codes = field(d * preset.key_bits // 8)
    key_signs = field(m // 8)
    key_norm = field(2)
    key_gamma = field(2 if m else 0)
    value_codes = field(d * preset.value_bits // 8)
    value_norm = field(2)
    payload, slot = data, offset
    return SlotLayout(
        head_dim=d, key_bits=preset.key_bits, value_bits=preset.value_bits, qjl_dim=m,
        key_codes=key_codes, key_signs=key_signs, key_norm=key_norm, key_gamma=key_gamma,
        value_codes=value_codes, value_norm=value_norm, payload_bytes=payload, slot_bytes=slot,
    )



@dataclass(frozen=True)
class CacheFormat:
    """How one layer's paged cache is encoded: the preset and its slot layout at the layer's head
    size, resolved once per layer (``cache_format``) and handed to the ops.

    qjl_coefficient: λ √(π/2) / m, the factor of γ ⟨S Π q, s⟩ in a score (``presets.qjl_coefficient``;
    0 without a sketch)."""

    preset: Preset
    layout: SlotLayout
    qjl_coefficient: float

    @property
    def head_dim(self) -> int:
        return self.layout.head_dim

    def kernel_constants(self) -> dict[str, int]:
        """The layout as Triton constexpr keyword arguments, plus the power-of-two tile widths
        BLOCK_D (>= head_dim) and BLOCK_QJL (>= m, at least 16: a ``tl.dot`` operand's minimum)."""
        def pow2(n: int) -> int:
            return 1 if n <= 1 else 1 << (n - 1).bit_length()

        return {**self.layout.constexprs(), "BLOCK_D": pow2(self.layout.head_dim),
                "BLOCK_QJL": max(16, pow2(self.layout.qjl_dim))}


@cache
def _cache_format(preset: Preset, head_dim: int) -> CacheFormat:
    return CacheFormat(preset, slot_layout(preset, head_dim), preset.qjl_coefficient(head_dim))


def cache_format(preset: Preset | str | CacheFormat, head_dim: int) -> CacheFormat:
    """The ``CacheFormat`` of ``preset`` (a record, a name in ``PRESETS``, or a format, returned as is
    after checking its head size) at ``head_dim``. Raises ValueError for an unknown name or head size."""
    if isinstance(preset, CacheFormat):
        if preset.head_dim != head_dim:
            raise ValueError(f"cache format for head_dim {preset.head_dim} used with head_dim {head_dim}")
        return preset
    return _cache_format(get_preset(preset), head_dim)

# ---------------------------------------------------------------------------
# Bit packing (vectorised torch; any leading shape)
# ---------------------------------------------------------------------------

def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes (..., n) with values in [0, 2**bits) into uint8 (..., n*bits/8).

    n must be a multiple of 8. Little-endian: code j sits at bits [j*bits, (j+1)*bits).
    """
    n = codes.shape[-1]
    if n % 8:
        raise ValueError(f"pack_bits needs a multiple of 8 codes, got {n}")
    groups = codes.to(torch.int64).reshape(*codes.shape[:-1], n // 8, 8)
    shifts = torch.arange(8, device=codes.device, dtype=torch.int64) * bits
    word = (groups << shifts).sum(-1, keepdim=True)  # (..., n/8, 1), < 2**(8*bits)
    byte_shifts = torch.arange(bits, device=codes.device, dtype=torch.int64) * 8
    packed = (word >> byte_shifts) & 0xFF  # (..., n/8, bits)
    return packed.to(torch.uint8).reshape(*codes.shape[:-1], n * bits // 8)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: uint8 (..., n*bits/8) -> int64 codes (..., n)."""
    groups = packed.to(torch.int64).reshape(*packed.shape[:-1], n // 8, bits)
    byte_shifts = torch.arange(bits, device=packed.device, dtype=torch.int64) * 8
    word = (groups << byte_shifts).sum(-1, keepdim=True)
    shifts = torch.arange(8, device=packed.device, dtype=torch.int64) * bits
    codes = (word >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], n)


def _word_bits(bits: int) -> int:
    """Bits of the words ``unpack_lookup`` reads: a byte for 1, 2 and 4 bits, 12 bits (4 codes) for 3 bits."""
    if bits == 3:
        return 12
    if bits in (1, 2, 4):
        return 8
    raise ValueError(f"unpack_lookup handles 1-4 bit codes, got {bits}")


def word_table(values: torch.Tensor, bits: int) -> torch.Tensor:
    """The table ``unpack_lookup`` gathers from: row (h << word_bits) + w holds the values (under
    per-head values (H, 2**bits)) of the codes packed in word w. Build it once to reuse it."""
    word_bits = _word_bits(bits)
    per = word_bits // bits
    words = torch.arange(2 ** word_bits, device=values.device)
    codes = (words[:, None] >> (torch.arange(per, device=values.device) * bits)) & ((1 << bits) - 1)
    return values[:, codes].reshape(values.shape[0] << word_bits, per)


def unpack_lookup(packed: torch.Tensor, bits: int, n: int, values: torch.Tensor | None,
                  head_axis: int = -2, table: torch.Tensor | None = None) -> torch.Tensor:
    """Decode packed codes straight to per-head table values: the same result as
    ``values[h, unpack_bits(packed, bits, n)]``, in one gather instead of bit arithmetic per code.

    packed: uint8 (..., H, n*bits/8), or with the head axis at ``head_axis`` (e.g. -3 for
    head-major (..., H, L, n*bits/8)); values: (H, 2**bits), or None with ``table`` =
    ``word_table(values, bits)`` prebuilt. Returns (..., n) in the values' dtype, heads where they were.
    """
    word_bits = _word_bits(bits)
    if table is None:
        table = word_table(values, bits)
    if bits == 3:  # 3 bytes = 8 codes = two 12-bit words
        b = packed.reshape(*packed.shape[:-1], -1, 3).to(torch.int32)
        x = b[..., 0] | b[..., 1] << 8 | b[..., 2] << 16
        words = torch.stack([x & 0xFFF, x >> 12], -1).flatten(-2)
    else:
        words = packed.to(torch.int32)
    H = table.shape[0] >> word_bits
    head = (torch.arange(H, device=packed.device, dtype=torch.int32) << word_bits).reshape(H, *[1] * (-head_axis - 1))
    return table.index_select(0, (words + head).flatten()).reshape(*packed.shape[:-1], n)


def pack_signs(signs: torch.Tensor) -> torch.Tensor:
    """Pack a +-1 tensor (..., m) into uint8 bits (bit set = +1)."""
    return pack_bits((signs > 0).to(torch.int64), 1)


def unpack_signs(packed: torch.Tensor, m: int) -> torch.Tensor:
    """Inverse of :func:`pack_signs`: float32 (..., m) of +-1."""
    return unpack_bits(packed, 1, m).to(torch.float32) * 2.0 - 1.0


def _fp16_bytes(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).contiguous().view(torch.uint8).reshape(*x.shape, 2)


def _fp16_from(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).squeeze(-1).to(torch.float32)


def read_fp16(slots: torch.Tensor, offset: int) -> torch.Tensor:
    """The fp16 field at ``offset`` of slots (..., slot_bytes), as float32 (...)."""
    return _fp16_from(slots[..., offset:offset + 2])


# ---------------------------------------------------------------------------
# Norm fields: fp16 of the square root (the one definition; kernels mirror it)
# ---------------------------------------------------------------------------

#: The largest finite fp16, the largest stored √n.
FP16_MAX = 65504.0
#: The largest norm a field holds: larger norms are stored as this (saturation).
NORM_MAX = FP16_MAX * FP16_MAX  # 4_290_774_016
#: Bound on the relative error of a stored norm in fp16's normal range (√n >= 2**-14, n >= 2**-28):
#: √n is rounded to 11 significant bits (relative error <= 2**-11, plus 2**-24 from the float32 step),
#: and squaring doubles it. A plain fp16 norm had 2**-11, but overflowed to inf above 65504.
NORM_REL_ERROR = (1 + 2.0**-11 + 2.0**-24) ** 2 - 1


def encode_norm(n: torch.Tensor) -> torch.Tensor:
    """The stored form of norms n >= 0 (any float dtype, any shape): fp16 of √n.

    √n is taken in float64, rounded to float32, saturated at 65504 (the largest finite fp16) and rounded to
    fp16 to nearest even -- the cast torch makes from float64 to float16. So:

    * n <= NORM_MAX (65504² ≈ 4.29e9): decoded within a relative ``NORM_REL_ERROR`` (≈ 2**-10) when
      n >= 2**-28; below that √n is an fp16 subnormal, absolute error of the decoded n <= 2**-24 √n + 2**-50;
    * n > NORM_MAX: stored as NORM_MAX (relative error 1 - NORM_MAX / n, finite);
    * n < 2**-50 (√n below half the smallest fp16 subnormal), n = 0 included: an exact zero.

    ``decode_norm(encode_norm(x))`` is idempotent: a decoded norm encodes to the same field."""
    return n.to(torch.float64).sqrt().to(torch.float32).clamp(max=FP16_MAX).to(torch.float16)


def decode_norm(stored: torch.Tensor) -> torch.Tensor:
    """Norms (float32) from their stored form (``encode_norm``, fp16 or its float32 value): s².
    Exact: s has 11 significant bits, s² at most 22, within float32's 24 (and 2**-48 <= s² <= NORM_MAX)."""
    s = stored.to(torch.float32)
    return s * s


def stored_norm(n: torch.Tensor) -> torch.Tensor:
    """n as a packed slot holds it: ``decode_norm(encode_norm(n))``, float32."""
    return decode_norm(encode_norm(n))


def _norm_bytes(n: torch.Tensor) -> torch.Tensor:
    return encode_norm(n).contiguous().view(torch.uint8).reshape(*n.shape, 2)


def read_norm(slots: torch.Tensor, offset: int) -> torch.Tensor:
    """The norm field at ``offset`` (``key_norm`` / ``value_norm``) of slots (..., slot_bytes), decoded:
    float32 (...)."""
    return decode_norm(slots[..., offset:offset + 2].contiguous().view(torch.float16).squeeze(-1))


@dataclass(frozen=True)
class SlotFields:
    """The decoded fields of a batch of slots; leading shape (...) is the slots'.

    key_codes (..., d) int64, key_norm (...) float32, key_signs (..., m) float32
    of +-1 (m may be 0), key_gamma (...) float32 (zeros without a sketch),
    value_codes (..., d) int64, value_norm (...) float32. Norms are the decoded values
    (``decode_norm``); ``pack_slots`` stores ``encode_norm`` of them, so a norm that already went
    through ``stored_norm`` round-trips exactly.
    """

    key_codes: torch.Tensor
    key_norm: torch.Tensor
    key_signs: torch.Tensor
    key_gamma: torch.Tensor
    value_codes: torch.Tensor
    value_norm: torch.Tensor


def pack_slots(fields: SlotFields, layout: SlotLayout) -> torch.Tensor:
    """Pack fields into uint8 slots (..., slot_bytes); padding bytes are zero."""
    lead = fields.key_codes.shape[:-1]
    slots = torch.zeros(*lead, layout.slot_bytes, dtype=torch.uint8, device=fields.key_codes.device)

    def put(offset: int, data: torch.Tensor) -> None:
        slots[..., offset:offset + data.shape[-1]] = data

    put(layout.key_codes, pack_bits(fields.key_codes, layout.key_bits))
    put(layout.key_norm, _norm_bytes(fields.key_norm))
    if layout.has_qjl:
        put(layout.key_signs, pack_signs(fields.key_signs))
        put(layout.key_gamma, _fp16_bytes(fields.key_gamma))
    put(layout.value_codes, pack_bits(fields.value_codes, layout.value_bits))
    put(layout.value_norm, _norm_bytes(fields.value_norm))
    return slots


def unpack_slots(slots: torch.Tensor, layout: SlotLayout) -> SlotFields:
    """Decode uint8 slots (..., slot_bytes) into their fields."""
    if slots.shape[-1] != layout.slot_bytes:
        raise ValueError(f"slots have {slots.shape[-1]} bytes, layout expects {layout.slot_bytes}")
    d, m = layout.head_dim, layout.qjl_dim

    def raw(offset: int, nbytes: int) -> torch.Tensor:
        return slots[..., offset:offset + nbytes]

    lead = slots.shape[:-1]
    if layout.has_qjl:
        signs = unpack_signs(raw(layout.key_signs, layout.sign_bytes), m)
        gamma = _fp16_from(raw(layout.key_gamma, 2))
    else:
        signs = torch.zeros(*lead, 0, dtype=torch.float32, device=slots.device)
        gamma = torch.zeros(lead, dtype=torch.float32, device=slots.device)
    return SlotFields(
        key_codes=unpack_bits(raw(layout.key_codes, layout.key_code_bytes), layout.key_bits, d),
        key_norm=read_norm(slots, layout.key_norm),
        key_signs=signs,
        key_gamma=gamma,
        value_codes=unpack_bits(raw(layout.value_codes, layout.value_code_bytes), layout.value_bits, d),
        value_norm=read_norm(slots, layout.value_norm),
    )
