"""The packed slot layout: the one source of truth for where every field lives.

One slot holds one token of one KV head::

    [ key codes | key QJL signs | key n (fp16) | key gamma (fp16) | value codes | value n_v (fp16) | pad ]

Fields that a preset does not use (signs and gamma without a QJL sketch) take
zero bytes. Every field starts 2-byte aligned (padding only appears when a
code field has an odd byte count, i.e. head_dim not a multiple of 16). Codes are bit-packed little-endian: coordinate j of a b-bit field
occupies bits [j*b, (j+1)*b) of the field read as one little-endian integer
(so 3-bit codes put 8 coordinates in 3 bytes). Sign bits use the same rule with
b = 1, bit set meaning +1.

The torch reference, the CPU serving path and the Triton kernels all read
their offsets from ``SlotLayout``; nothing else computes a byte offset.
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class SlotFields:
    """The decoded fields of a batch of slots; leading shape (...) is the slots'.

    key_codes (..., d) int64, key_norm (...) float32, key_signs (..., m) float32
    of +-1 (m may be 0), key_gamma (...) float32 (zeros without a sketch),
    value_codes (..., d) int64, value_norm (...) float32.
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
    put(layout.key_norm, _fp16_bytes(fields.key_norm))
    if layout.has_qjl:
        put(layout.key_signs, pack_signs(fields.key_signs))
        put(layout.key_gamma, _fp16_bytes(fields.key_gamma))
    put(layout.value_codes, pack_bits(fields.value_codes, layout.value_bits))
    put(layout.value_norm, _fp16_bytes(fields.value_norm))
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
        key_norm=_fp16_from(raw(layout.key_norm, 2)),
        key_signs=signs,
        key_gamma=gamma,
        value_codes=unpack_bits(raw(layout.value_codes, layout.value_code_bytes), layout.value_bits, d),
        value_norm=_fp16_from(raw(layout.value_norm, 2)),
    )
