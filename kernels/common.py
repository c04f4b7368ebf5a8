"""Triton helpers shared by every TurboQuant kernel: reading and writing the packed slot fields.

A slot is a run of ``SLOT_BYTES`` uint8 (see ``vllm_turboquant.layout``); every
field offset and bit width arrives as a ``tl.constexpr`` from
``SlotLayout.constexprs()``, so nothing here knows where a field lives.

* ``load_codes`` / ``store_codes``: b-bit little-endian code fields (b = 1 for QJL signs).
* ``load_fp16`` / ``store_fp16``: fp16 scalars, byte by byte (fields need not be 2-byte aligned).
* ``lookup``: codebook decode. The table (2**b fp32 entries) is held in registers and
  indexed with ``tl.gather``; ``LOOKUP="load"`` falls back to a gather load from the
  (L1-resident) table in global memory.
* ``unrotate_store``: out = Πᵀ x for a tile of rotated rows, written in column chunks.

Host side: ``kernel_layout`` (constexpr kwargs for a preset and head size),
``cache_strides`` (checks a paged cache and returns its block / token / head strides),
``next_pow2``, ``dot_precision``, ``protection`` / ``check_protected`` (check a
``ProtectedTokens``; whether the kernels compile the protected-token path in).

Paged caches are uint8 ``[num_blocks, block_size, H, slot_bytes]`` with *any* strides
for the first three dims (the last must be 1): vLLM allocates ``[num_blocks, H,
block_size, slot_bytes]`` and the backend passes ``kv_cache.permute(0, 2, 1, 3)``.
Kernels address the slot of (block, offset, head) as
``cache + block * stride_cb + offset * stride_cs + head * stride_ch`` in 64-bit
arithmetic; the field offsets inside a slot still come from ``SlotLayout``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..layout import SlotLayout, slot_layout
from ..presets import Preset, get_preset

#: How codebook entries are looked up: "gather" (register table + tl.gather) or "load".
DEFAULT_LOOKUP = "gather"


# ---------------------------------------------------------------------------
# Host helpers
# ---------------------------------------------------------------------------

def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def kernel_layout(preset: Preset | str, head_dim: int) -> tuple[SlotLayout, dict[str, int]]:
    """The slot layout and its constexpr kwargs (plus padded block sizes BLOCK_D / BLOCK_QJL)."""
    layout = slot_layout(get_preset(preset), head_dim)
    kw = layout.constexprs()
    kw["BLOCK_D"] = next_pow2(head_dim)
    kw["BLOCK_QJL"] = max(16, next_pow2(layout.qjl_dim))
    return layout, kw


def dot_precision(device: torch.device) -> str:
    """fp32 tl.dot precision: 3xTF32 (fp32-accurate on tensor cores) where TF32 exists."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8:
        return "tf32x3"
    return "ieee"


def cache_strides(cache: torch.Tensor, num_kv_heads: int | None, slot_bytes: int) -> tuple[int, int, int]:
    """Check a paged cache and return its (block, token, head) strides in bytes.

    ``cache`` must be uint8 ``[num_blocks, block_size, H, slot_bytes]`` (H == num_kv_heads
    unless that is None) whose last dim is contiguous (stride 1); the other strides are
    free (vLLM's ``[num_blocks, H, block_size, slot_bytes]`` cache permuted to this order
    is the usual case). Raises ValueError otherwise.
    """
    heads = "H" if num_kv_heads is None else str(num_kv_heads)
    want = f"uint8 [num_blocks, block_size, {heads}, {slot_bytes}] with stride 1 in the last dim"
    if (cache.dtype != torch.uint8 or cache.dim() != 4 or cache.shape[3] != slot_bytes
            or (num_kv_heads is not None and cache.shape[2] != num_kv_heads)):
        raise ValueError(f"cache must be {want}, got {cache.dtype} {tuple(cache.shape)}")
    if cache.stride(3) != 1 and cache.shape[3] > 1:
        raise ValueError(f"cache must be {want}: got strides {tuple(cache.stride())} "
                         "(the bytes of a slot must be contiguous)")
    return cache.stride(0), cache.stride(1), cache.stride(2)


def attention_setup(query: torch.Tensor, cache: torch.Tensor, tables, preset):
    """The argument checks the attention kernels share.

    Returns (preset, layout, constexpr kwargs, cache strides (block, token, head), H, G)."""
    preset = get_preset(preset)
    _, Hq, D = query.shape
    layout, kw = kernel_layout(preset, D)
    strides = cache_strides(cache, None, layout.slot_bytes)
    H = cache.shape[2]
    if H == 0 or Hq % H:
        raise ValueError(f"Hq={Hq} query heads must be a multiple of the cache's H={H} KV heads")
    check_tables(tables, cache.device)
    return preset, layout, kw, strides, H, Hq // H


def protection(protected, num_kv_heads: int, head_dim: int, device: torch.device) -> bool:
    """Whether protected tokens are on (``protected`` given and S + W > 0), after ``check_protected``.

    When this is False the kernels compile the protected-token code out."""
    if protected is None or protected.sink + protected.window == 0:
        return False
    check_protected(protected, num_kv_heads, head_dim, device)
    return True


def pool_args(protected, dummy: torch.Tensor) -> tuple:
    """(pool, entry_of_slot, pool strides (row, head, K/V), sink, window) kernel arguments; dummies when None."""
    if protected is None:
        return dummy, dummy, 0, 0, 0, 0, 0
    pool = protected.pool
    return (pool, protected.entry_of_slot, pool.stride(0), pool.stride(1), pool.stride(2),
            protected.sink, protected.window)


def check_protected(protected, num_kv_heads: int, head_dim: int, device: torch.device) -> None:
    """The pool must be [P, num_kv_heads, 2, head_dim] float (bf16 / fp16 / fp32) with stride 1
    in the last dim, and ``entry_of_slot`` a 1-d int32 / int64 tensor, both on ``device``; ValueError otherwise."""
    pool, table = protected.pool, protected.entry_of_slot
    want = f"[P, {num_kv_heads}, 2, {head_dim}] float with stride 1 in the last dim"
    if (pool.dim() != 4 or tuple(pool.shape[1:]) != (num_kv_heads, 2, head_dim) or not pool.is_floating_point()
            or (pool.stride(3) != 1 and head_dim > 1)):
        raise ValueError(f"protected.pool must be {want}, got {pool.dtype} {tuple(pool.shape)} "
                         f"strides {tuple(pool.stride())}")
    if table.dtype not in (torch.int32, torch.int64) or table.dim() != 1:
        raise ValueError(f"protected.entry_of_slot must be a 1-d int32 tensor, got {table.dtype} "
                         f"{tuple(table.shape)}")
    if pool.device != device or table.device != device:
        raise ValueError(f"protected tokens live on {pool.device} / {table.device}, the cache on {device}")


def check_tables(tables, device: torch.device) -> None:
    if tables.key_rotation.device != device:
        raise ValueError(f"LayerTables live on {tables.key_rotation.device}, the cache on {device}: "
                         "move them with tables.to(device)")


# ---------------------------------------------------------------------------
# Device helpers
# ---------------------------------------------------------------------------

@triton.jit
def load_codes(slot_ptrs, mask, OFFSET: tl.constexpr, BITS: tl.constexpr, N: tl.constexpr,
               BLOCK: tl.constexpr):
    """Codes [S, BLOCK] int32 of the BITS-bit field at OFFSET of slots ``slot_ptrs`` [S].

    Coordinate j sits at bits [j*BITS, (j+1)*BITS) of the field; j >= N and masked
    slots read as 0. A 3-bit code may straddle two bytes, so it reads a second byte.
    """
    j = tl.arange(0, BLOCK)
    bit = j * BITS
    ok = mask[:, None] & (j < N)[None, :]
    ptrs = slot_ptrs[:, None] + (OFFSET + bit // 8)[None, :]
    word = tl.load(ptrs, mask=ok, other=0).to(tl.int32)
    if (8 % BITS) != 0:
        straddles = (bit % 8 + BITS) > 8
        hi = tl.load(ptrs + 1, mask=ok & straddles[None, :], other=0).to(tl.int32)
        word = word | (hi << 8)
    return (word >> (bit % 8)[None, :]) & ((1 << BITS) - 1)


@triton.jit
def store_codes(field_ptr, codes, BITS: tl.constexpr, N, BLOCK: tl.constexpr):
    """Pack codes [BLOCK] (< 2**BITS) into the field at ``field_ptr``; only the first N (a multiple of 8)."""
    groups = tl.reshape(codes.to(tl.int64), (BLOCK // 8, 8))
    word = tl.sum(groups << (tl.arange(0, 8) * BITS)[None, :], axis=1)  # disjoint bits: sum == or
    k = tl.arange(0, 4)  # a group of 8 codes fills BITS <= 4 bytes
    byte = (word[:, None] >> (k * 8)[None, :]) & 0xFF
    g = tl.arange(0, BLOCK // 8)
    ptrs = field_ptr + (g * BITS)[:, None] + k[None, :]
    tl.store(ptrs, byte.to(tl.uint8), mask=(g < N // 8)[:, None] & (k < BITS)[None, :])


@triton.jit
def load_fp16(ptrs, mask):
    """fp16 fields at byte pointers ``ptrs`` (any alignment) as float32; masked -> 0."""
    lo = tl.load(ptrs, mask=mask, other=0).to(tl.uint16)
    hi = tl.load(ptrs + 1, mask=mask, other=0).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def store_fp16(ptr, x):
    """Store float32 scalar x as fp16 (round to nearest even) at byte pointer ``ptr``."""
    bits = x.to(tl.float16).to(tl.uint16, bitcast=True)
    tl.store(ptr, (bits & 0xFF).to(tl.uint8))
    tl.store(ptr + 1, (bits >> 8).to(tl.uint8))


@triton.jit
def load_table(table_ptr, BITS: tl.constexpr):
    """One head's codebook, 2**BITS float32 entries, into registers."""
    return tl.load(table_ptr + tl.arange(0, 1 << BITS))


@triton.jit
def lookup(table, table_ptr, codes, BITS: tl.constexpr, LOOKUP: tl.constexpr):
    """Centroids table[codes] for codes [S, D]; ``table`` is ``load_table(table_ptr, BITS)``."""
    if LOOKUP == "gather":
        rows = tl.broadcast_to(table[None, :], (codes.shape[0], 1 << BITS))
        return tl.gather(rows, codes, axis=1)
    else:
        return tl.load(table_ptr + codes)


@triton.jit
def bucketize(y, bnd_ptr, BITS: tl.constexpr):
    """Codes [D] int32 = number of the 2**BITS - 1 boundaries strictly below y [D]."""
    k = tl.arange(0, 1 << BITS)
    bnd = tl.load(bnd_ptr + k, mask=k < (1 << BITS) - 1, other=float("inf"))
    return tl.sum((bnd[None, :] < y[:, None]).to(tl.int32), axis=1)


@triton.jit
def unrotate_store(x, rot_ptr, out_rows, row_mask, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_OUT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """out[r, :] = Πᵀ x[r, :] for x [R, BLOCK_D] rotated rows; Π (HEAD_DIM, HEAD_DIM) at rot_ptr.

    ``out_rows`` [R] points at each output row; written BLOCK_OUT columns at a time
    so Π never has to sit in registers whole.
    """
    e = tl.arange(0, BLOCK_D)
    for c0 in tl.static_range(0, BLOCK_D, BLOCK_OUT):
        c = c0 + tl.arange(0, BLOCK_OUT)
        rot = tl.load(rot_ptr + e[:, None] * HEAD_DIM + c[None, :],
                      mask=(e < HEAD_DIM)[:, None] & (c < HEAD_DIM)[None, :], other=0.0)
        y = tl.dot(x, rot, input_precision=DOT_PRECISION)
        out_ptrs = out_rows[:, None] + c[None, :]
        tl.store(out_ptrs, y.to(out_ptrs.dtype.element_ty), mask=row_mask[:, None] & (c < HEAD_DIM)[None, :])
