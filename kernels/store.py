"""Fused cache write: centre, normalise, rotate, quantise, sketch and pack new K/V into slots.

One program per (new token, KV head) owns exactly one slot and writes all of it::

    key:   k - μ -> n = ‖k‖, y = Π k / n -> idx = #{b < y} -> [r = y - c[idx], γ = ‖r‖, sign(S r)]
    value: v     -> n_v,     y_v = Π_v v / n_v -> idx_v

Π y is a matrix-vector product taken BLOCK_C input columns at a time (Π never
sits in registers whole); the code vector stays in registers and is packed
8 coordinates at a time, exactly as ``layout.pack_bits``. Norms and γ are
rounded to fp16 like the reference. Tokens with slot_mapping < 0 are skipped.

Protected tokens (``PROTECT``, see ``vllm_turboquant.protected``): a token with
``entries[t] >= 0`` also gets its exact copy, pool row ``entries[t]`` = (Π_k (k - μ),
Π_v v), computed in fp32 and rounded to the pool's dtype (the reference computes in
float64, so rows agree within one rounding). Without ``PROTECT`` that code is compiled out.

The cache is ``[num_blocks, block_size, H, slot_bytes]`` with any strides for the
first three dims (vLLM's block-head-token cache, permuted): slot index i = block *
block_size + offset lives at ``block * stride_cb + offset * stride_cs + head * stride_ch``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..presets import Preset, get_preset
from .common import (DEFAULT_LOOKUP, bucketize, cache_strides, check_protected, check_tables, kernel_layout,
                     load_table, lookup, store_codes, store_fp16)


@triton.jit
def _rotate(x_ptr, mean_ptr, rot_ptr, div, HAS_MEAN: tl.constexpr, HEAD_DIM: tl.constexpr,
            BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr):
    """Π (x - μ) / div [BLOCK_D] (fp32) for one head's vector, reading Π BLOCK_C columns at a time."""
    d = tl.arange(0, BLOCK_D)
    y = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for c0 in range(0, BLOCK_D, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < HEAD_DIM
        xc = tl.load(x_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
        if HAS_MEAN:
            xc -= tl.load(mean_ptr + c, mask=c_ok, other=0.0)
        rot = tl.load(rot_ptr + d[:, None] * HEAD_DIM + c[None, :], mask=(d < HEAD_DIM)[:, None] & c_ok[None, :],
                      other=0.0)  # [D, C] = Π[:, c]
        y += tl.sum(rot * (xc / div)[None, :], axis=1)
    return y


@triton.jit
def _rotate_unit(x_ptr, mean_ptr, rot_ptr, HAS_MEAN: tl.constexpr, HEAD_DIM: tl.constexpr,
                 BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr):
    """(y, n): n = ‖x - μ‖ and y = Π (x - μ) / n (zeros when n = 0) for one head's vector."""
    d = tl.arange(0, BLOCK_D)
    x = tl.load(x_ptr + d, mask=d < HEAD_DIM, other=0.0).to(tl.float32)
    if HAS_MEAN:
        x -= tl.load(mean_ptr + d, mask=d < HEAD_DIM, other=0.0)
    n = tl.sqrt(tl.sum(x * x, axis=0))
    return _rotate(x_ptr, mean_ptr, rot_ptr, tl.where(n > 0, n, 1.0), HAS_MEAN, HEAD_DIM, BLOCK_D, BLOCK_C), n


@triton.jit
def _store_pool_row(row_ptr, x_ptr, mean_ptr, rot_ptr, HAS_MEAN: tl.constexpr, HEAD_DIM: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr):
    """row = Π (x - μ) (unnormalised, fp32, rounded to the row's dtype) for one head's vector."""
    d = tl.arange(0, BLOCK_D)
    y = _rotate(x_ptr, mean_ptr, rot_ptr, 1.0, HAS_MEAN, HEAD_DIM, BLOCK_D, BLOCK_C)
    tl.store(row_ptr + d, y.to(row_ptr.dtype.element_ty), mask=d < HEAD_DIM)


@triton.jit
def _store_kernel(
    cache_ptr, slot_mapping_ptr, key_ptr, value_ptr,
    key_rot_ptr, value_rot_ptr, qjl_ptr, key_bnd_ptr, key_cent_ptr, value_bnd_ptr, key_mean_ptr,
    pool_ptr, entries_ptr, num_entries, stride_pp, stride_ph, stride_pkv,  # protected tokens (PROTECT)
    stride_kn, stride_kh, stride_vn, stride_vh, stride_cb, stride_cs, stride_ch, block_size,
    HEAD_DIM: tl.constexpr, KEY_BITS: tl.constexpr, VALUE_BITS: tl.constexpr, QJL_DIM: tl.constexpr,
    OFF_KEY_CODES: tl.constexpr, OFF_KEY_SIGNS: tl.constexpr, OFF_KEY_NORM: tl.constexpr,
    OFF_KEY_GAMMA: tl.constexpr, OFF_VALUE_CODES: tl.constexpr, OFF_VALUE_NORM: tl.constexpr,
    SLOT_BYTES: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_QJL: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, LOOKUP: tl.constexpr, PROTECT: tl.constexpr,
):
    t = tl.program_id(0)
    h = tl.program_id(1)
    if PROTECT:  # the exact copy, whether or not the token has a packed slot (as the reference)
        entry = tl.load(entries_ptr + t, mask=t < num_entries, other=-1).to(tl.int64)
        if entry >= 0:
            row = pool_ptr + entry * stride_pp + h.to(tl.int64) * stride_ph
            _store_pool_row(row, key_ptr + t.to(tl.int64) * stride_kn + h * stride_kh, key_mean_ptr + h * HEAD_DIM,
                            key_rot_ptr + h * HEAD_DIM * HEAD_DIM, True, HEAD_DIM, BLOCK_D, BLOCK_C)
            _store_pool_row(row + stride_pkv, value_ptr + t.to(tl.int64) * stride_vn + h * stride_vh, key_mean_ptr,
                            value_rot_ptr + h * HEAD_DIM * HEAD_DIM, False, HEAD_DIM, BLOCK_D, BLOCK_C)
    slot_index = tl.load(slot_mapping_ptr + t).to(tl.int64)
    if slot_index < 0:
        return
    slot = (cache_ptr + (slot_index // block_size) * stride_cb + (slot_index % block_size) * stride_cs
            + h.to(tl.int64) * stride_ch)
    d = tl.arange(0, BLOCK_D)

    # -- key --------------------------------------------------------------
    y, n = _rotate_unit(key_ptr + t.to(tl.int64) * stride_kn + h * stride_kh, key_mean_ptr + h * HEAD_DIM,
                        key_rot_ptr + h * HEAD_DIM * HEAD_DIM, True, HEAD_DIM, BLOCK_D, BLOCK_C)
    codes = bucketize(y, key_bnd_ptr + h * ((1 << KEY_BITS) - 1), KEY_BITS)
    store_codes(slot + OFF_KEY_CODES, codes, KEY_BITS, HEAD_DIM, BLOCK_D)
    store_fp16(slot + OFF_KEY_NORM, n)
    if QJL_DIM > 0:
        cent_ptr = key_cent_ptr + h * (1 << KEY_BITS)
        y_hat = lookup(load_table(cent_ptr, KEY_BITS), cent_ptr, codes[None, :], KEY_BITS, LOOKUP)
        r = tl.where(d < HEAD_DIM, y - tl.reshape(y_hat, (BLOCK_D,)), 0.0)
        store_fp16(slot + OFF_KEY_GAMMA, tl.sqrt(tl.sum(r * r, axis=0)))
        qjl = qjl_ptr + h * QJL_DIM * HEAD_DIM
        for m0 in range(0, BLOCK_QJL, BLOCK_S):
            m = m0 + tl.arange(0, BLOCK_S)
            s = tl.load(qjl + m[:, None] * HEAD_DIM + d[None, :],
                        mask=(m < QJL_DIM)[:, None] & (d < HEAD_DIM)[None, :], other=0.0)  # [S, D]
            proj = tl.sum(s * r[None, :], axis=1)
            store_codes(slot + OFF_KEY_SIGNS + m0 // 8, (proj >= 0).to(tl.int32), 1, QJL_DIM - m0, BLOCK_S)

    # -- value ------------------------------------------------------------
    y, n = _rotate_unit(value_ptr + t.to(tl.int64) * stride_vn + h * stride_vh, key_mean_ptr,
                        value_rot_ptr + h * HEAD_DIM * HEAD_DIM, False, HEAD_DIM, BLOCK_D, BLOCK_C)
    codes = bucketize(y, value_bnd_ptr + h * ((1 << VALUE_BITS) - 1), VALUE_BITS)
    store_codes(slot + OFF_VALUE_CODES, codes, VALUE_BITS, HEAD_DIM, BLOCK_D)
    store_fp16(slot + OFF_VALUE_NORM, n)


def store(cache: torch.Tensor, slot_mapping: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
          tables, preset: Preset | str, protected=None, entries: torch.Tensor | None = None, *,
          lookup_mode: str = DEFAULT_LOOKUP) -> None:
    """Encode N new tokens into the paged cache in place (same semantics as ``reference.write_cache``).

    cache: uint8 [num_blocks, block_size, H, slot_bytes], any strides for the first three
    dims but stride 1 in the last (vLLM's [num_blocks, H, block_size, slot_bytes] cache
    is passed as ``kv_cache.permute(0, 2, 1, 3)``); ValueError otherwise.
    slot_mapping (N,) flat slot index (block * block_size + offset), negative = skip;
    key/value (N, H, d), any float dtype. With ``protected`` (a ``ProtectedTokens``) and
    ``entries`` (N,) int, token i's exact copy also goes to ``protected.pool[entries[i]]``
    (-1 = none; as in the reference, also for tokens whose slot is skipped).
    """
    preset = get_preset(preset)
    N, H, D = key.shape
    layout, kw = kernel_layout(preset, D)
    stride_cb, stride_cs, stride_ch = cache_strides(cache, H, layout.slot_bytes)
    check_tables(tables, cache.device)
    if N == 0:
        return
    protect = (protected is not None and entries is not None and entries.numel() > 0
               and protected.pool.shape[0] > 0)
    if protect:
        check_protected(protected, H, D, cache.device)
        if entries.device != cache.device or entries.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"entries must be int32/int64 on {cache.device}, got {entries.dtype} on {entries.device}")
        pool = protected.pool
        pool_args = (pool, entries, min(entries.shape[0], N), pool.stride(0), pool.stride(1), pool.stride(2))
    else:
        pool_args = (cache, slot_mapping, 0, 0, 0, 0)
    key = key if key.stride(-1) == 1 else key.contiguous()
    value = value if value.stride(-1) == 1 else value.contiguous()
    block_d = kw["BLOCK_D"]
    _store_kernel[(N, H)](
        cache, slot_mapping, key, value,
        tables.key_rotation, tables.value_rotation, tables.qjl if layout.has_qjl else tables.key_rotation,
        tables.key_boundaries, tables.key_centroids, tables.value_boundaries, tables.key_mean, *pool_args,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1), stride_cb, stride_cs, stride_ch,
        cache.shape[1],
        **kw, BLOCK_C=min(block_d, 8192 // block_d), BLOCK_S=max(8, min(kw["BLOCK_QJL"], 8192 // block_d)),
        LOOKUP=lookup_mode, PROTECT=protect, num_warps=4 if block_d <= 128 else 8,
    )
