"""The slot-field helpers of ``kernels.common`` against ``layout``: word-wise code unpacking and
packing for every bit width and word size, fp16 fields at any alignment, and the word widths
``slot_constants`` picks from a layout and a cache's alignment. Exact (integer) comparisons."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from support import DEVICE, strided_like  # noqa: E402
from vllm_turboquant.kernels.common import (  # noqa: E402
    field_word_bits,
    load_codes,
    load_fp16,
    slot_alignment,
    slot_constants,
    store_codes,
    store_fp16,
)
from vllm_turboquant.layout import cache_format, pack_bits, unpack_bits  # noqa: E402


@triton.jit
def _codes_kernel(slots_ptr, codes_ptr, out_ptr, stride_s, num_slots, OFFSET: tl.constexpr, BITS: tl.constexpr,
                  N: tl.constexpr, BLOCK: tl.constexpr, WORD: tl.constexpr, CHUNK: tl.constexpr):
    """Unpack the field of every slot into out (int32 [S, BLOCK]); pack codes (int32 [S, BLOCK]) into the
    field, CHUNK coordinates at a time."""
    s = tl.arange(0, 16)
    ok = s < num_slots
    slot = slots_ptr + s * stride_s
    j = tl.arange(0, BLOCK)
    codes = load_codes(slot, ok, OFFSET, BITS, N, BLOCK, WORD)
    tl.store(out_ptr + s[:, None] * BLOCK + j[None, :], codes, mask=ok[:, None])
    for c0 in range(0, BLOCK, CHUNK):
        c = c0 + tl.arange(0, CHUNK)
        new = tl.load(codes_ptr + s[:, None] * BLOCK + c[None, :], mask=ok[:, None], other=0)
        store_codes(slot, ok, new, OFFSET + 256, BITS, N, c0, WORD)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("n,word", [(64, 32), (80, 16), (96, 8), (128, 32), (48, 16)])
def test_codes_round_trip_words(bits, n, word):
    """load_codes == layout.unpack_bits and store_codes == layout.pack_bits, for a field at a word-aligned
    offset followed by other bytes (a word may run past the field, never past what it reads)."""
    g = torch.Generator().manual_seed(bits * 1000 + n)
    S, nbytes, offset, block = 13, n * bits // 8, 8, triton.next_power_of_2(n)
    word = min(word, block if (word % bits) else block * bits)
    slots = torch.randint(0, 256, (S, 512), generator=g, dtype=torch.uint8)
    codes = torch.randint(0, 2 ** bits, (S, n), generator=g)
    padded = torch.zeros(S, block, dtype=torch.int32)
    padded[:, :n] = codes.int()
    before = slots.clone()
    slots, padded = slots.to(DEVICE), padded.to(DEVICE)
    out = torch.full((S, block), -7, dtype=torch.int32, device=DEVICE)
    _codes_kernel[(1,)](slots, padded, out, slots.stride(0), S, OFFSET=offset, BITS=bits, N=n, BLOCK=block, WORD=word,
                        CHUNK=min(32, block))
    slots, out = slots.cpu(), out.cpu()
    assert torch.equal(out[:, :n].long(), unpack_bits(before[:, offset:offset + nbytes], bits, n))
    assert not out[:, n:].any(), "coordinates past N must read 0"
    assert torch.equal(slots[:, offset + 256:offset + 256 + nbytes], pack_bits(codes, bits))
    untouched = torch.ones(512, dtype=torch.bool)
    untouched[offset + 256:offset + 256 + nbytes] = False
    assert torch.equal(slots[:, untouched], before[:, untouched]), "store_codes wrote outside its field"


@triton.jit
def _fp16_kernel(src_ptr, dst_ptr, out_ptr, stride_s, num_slots, ALIGN: tl.constexpr):
    s = tl.arange(0, 16)
    ok = s < num_slots
    x = load_fp16(src_ptr + s * stride_s, ok, ALIGN)
    tl.store(out_ptr + s, x, mask=ok)
    store_fp16(dst_ptr + s * stride_s, x * 2.0, ok, ALIGN)


@pytest.mark.parametrize("align", [1, 2])
def test_fp16_fields(align):
    S, stride = 11, 6
    vals = torch.randn(S, dtype=torch.float32) * 100
    src = torch.zeros(S * stride + 8, dtype=torch.uint8)
    base = 1 if align == 1 else 2
    view = src[base:base + S * stride].view(S, stride)
    view[:, :2] = vals.half().view(torch.uint8).reshape(S, 2)
    dst = torch.zeros_like(src)
    out = torch.zeros(S)
    src_d, dst_d, out_d = src.to(DEVICE), dst.to(DEVICE), out.to(DEVICE)
    _fp16_kernel[(1,)](src_d[base:], dst_d[base:], out_d, stride, S, ALIGN=align)
    assert torch.equal(out_d.cpu(), vals.half().float())
    got = dst_d.cpu()[base:base + S * stride].view(S, stride)[:, :2].contiguous().view(torch.float16).squeeze(-1)
    assert torch.equal(got, (vals.half().float() * 2).half())


def test_word_widths_follow_layout_and_alignment():
    """Words are as wide as the field's offset, the slot bases and the slot's end allow."""
    fmt = cache_format("turboquant3", 128)  # key codes at 0 (64 B), value codes at 66 (32 B), 100-byte slots
    vllm_cache = torch.zeros(4, 2, 16, fmt.layout.slot_bytes, dtype=torch.uint8).permute(0, 2, 1, 3)
    assert slot_alignment(vllm_cache) == 4
    kw = slot_constants(fmt, 4)
    assert (kw["KEY_WORD"], kw["VALUE_WORD"], kw["SLOT_ALIGN"]) == (32, 16, 4)
    padded = strided_like(torch.zeros(4, 16, 2, fmt.layout.slot_bytes, dtype=torch.uint8), "padded")
    assert slot_alignment(padded) == 1  # a view starting 3 bytes into its slots
    assert (slot_constants(fmt, 1)["KEY_WORD"], slot_constants(fmt, 1)["VALUE_WORD"]) == (8, 8)
    qjl = cache_format("turboquant4_qjl", 128)  # 3-bit keys (48 B) then signs (16 B) at 48: 134-byte slots
    kw = slot_constants(qjl, slot_alignment(torch.zeros(2, 16, 2, qjl.layout.slot_bytes, dtype=torch.uint8)))
    assert (kw["SLOT_ALIGN"], kw["KEY_WORD"], kw["SIGN_WORD"]) == (2, 16, 16)
    # a field whose last word would end past the slot reads narrower words
    assert field_word_bits(offset=96, nbytes=2, bits=1, block=16, align=4, slot_bytes=98) == 16
    assert field_word_bits(offset=0, nbytes=2, bits=1, block=16, align=4, slot_bytes=4) == 16  # 16 codes at most
