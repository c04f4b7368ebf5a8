"""Slot layout: the bytes-per-token table of the presets (README, "Presets") and bit-exact pack/unpack
round trips."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_turboquant import layout
from vllm_turboquant.presets import PRESETS

# Bytes per token per KV head (K and V, codes + fp16 metadata), as README's presets table states them.
PRESET_BYTES = {
    "turboquant4": (68, 132, 260), "turboquant3": (52, 100, 196), "turboquant2": (36, 68, 132),
    "turboquant4_qjl": (70, 134, 262), "turboquant3_qjl": (54, 102, 198), "turboquant2_qjl": (38, 70, 134),
}


@pytest.mark.parametrize("name", list(PRESET_BYTES))
def test_slot_bytes_match_design(name):
    for d, expected in zip((64, 128, 256), PRESET_BYTES[name], strict=True):
        lay = layout.slot_layout(name, d)
        assert lay.payload_bytes == expected
        assert lay.slot_bytes == expected and lay.pad_bytes == 0


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("d", [64, 72, 80, 88, 96, 112, 128, 192, 256])
def test_fields_in_design_order_aligned_and_packed_tight(name, d):
    lay = layout.slot_layout(name, d)
    order = [(lay.key_codes, lay.key_code_bytes), (lay.key_signs, lay.sign_bytes), (lay.key_norm, 2),
             (lay.key_gamma, 2 if lay.has_qjl else 0), (lay.value_codes, lay.value_code_bytes),
             (lay.value_norm, 2)]
    pos = data = 0
    for offset, size in order:
        assert offset == pos and offset % layout.SLOT_ALIGN == 0
        pos = offset + size + (size % 2)  # at most one alignment byte after an odd-sized field
        data += size
    assert pos == lay.slot_bytes and data == lay.payload_bytes
    assert lay.pad_bytes == (0 if d % 16 == 0 else lay.slot_bytes - data)
    assert lay.constexprs()["SLOT_BYTES"] == lay.slot_bytes


@pytest.mark.parametrize("d", [0, 60, 100, 1024, "128"])
def test_unsupported_head_dim_is_refused_by_name(d):
    with pytest.raises(ValueError, match=f"unsupported head_dim {d!r}"):
        layout.slot_layout("turboquant3", d)


def test_bit_order_is_little_endian():
    # 3-bit: codes 0..7 -> bits 0-2 hold 0, bits 3-5 hold 1, ... as one 24-bit LE integer.
    codes = torch.arange(8)
    word = sum(int(c) << (3 * j) for j, c in enumerate(codes))
    assert layout.pack_bits(codes, 3).tolist() == list(word.to_bytes(3, "little"))
    # 1-bit signs: first coordinate is the lowest bit of the first byte.
    signs = torch.tensor([1, -1, -1, -1, -1, -1, -1, -1, -1, 1, -1, -1, -1, -1, -1, -1.0])
    assert layout.pack_signs(signs).tolist() == [0b00000001, 0b00000010]


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 4), lead=st.lists(st.integers(1, 4), max_size=3), groups=st.integers(1, 6),
       seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_round_trip(bits, lead, groups, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2 ** bits, (*lead, 8 * groups), generator=g)
    packed = layout.pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (*lead, groups * bits)
    assert torch.equal(layout.unpack_bits(packed, bits, 8 * groups), codes)


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(list(PRESETS)), d=st.sampled_from([64, 72, 88, 128, 256]), n=st.integers(1, 5),
       seed=st.integers(0, 2**31 - 1))
def test_slot_round_trip(name, d, n, seed):
    g = torch.Generator().manual_seed(seed)
    lay = layout.slot_layout(name, d)
    f16 = lambda t: t.to(torch.float16).float()
    fields = layout.SlotFields(
        key_codes=torch.randint(0, 2 ** lay.key_bits, (n, 2, d), generator=g),
        key_norm=layout.stored_norm(torch.rand(n, 2, generator=g) * 100),
        key_signs=torch.randint(0, 2, (n, 2, lay.qjl_dim), generator=g).float() * 2 - 1,
        key_gamma=f16(torch.rand(n, 2, generator=g)) if lay.has_qjl else torch.zeros(n, 2),
        value_codes=torch.randint(0, 2 ** lay.value_bits, (n, 2, d), generator=g),
        value_norm=layout.stored_norm(torch.rand(n, 2, generator=g) * 10),
    )
    slots = layout.pack_slots(fields, lay)
    assert slots.shape == (n, 2, lay.slot_bytes)
    back = layout.unpack_slots(slots, lay)
    for name_ in ("key_codes", "key_norm", "key_signs", "key_gamma", "value_codes", "value_norm"):
        assert torch.equal(getattr(back, name_), getattr(fields, name_)), name_


def test_unpack_refuses_wrong_slot_size():
    lay = layout.slot_layout("turboquant3", 64)
    with pytest.raises(ValueError, match="52"):
        layout.unpack_slots(torch.zeros(3, 50, dtype=torch.uint8), lay)


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(1, 4), H=st.integers(1, 3), lead=st.integers(1, 4), groups=st.integers(1, 5),
       seed=st.integers(0, 2**31 - 1))
def test_unpack_lookup_equals_unpack_then_table(bits, H, lead, groups, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2 ** bits, (lead, H, 8 * groups), generator=g)
    values = torch.randn(H, 2 ** bits, generator=g)
    packed = layout.pack_bits(codes, bits)
    expected = values[torch.arange(H)[:, None], codes]
    assert torch.equal(layout.unpack_lookup(packed, bits, 8 * groups, values), expected)
