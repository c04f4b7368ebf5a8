"""Fused cache write: centre, normalise, rotate, quantise, sketch and pack new K/V into slots.

Grid (token tile, KV head). A program encodes BLOCK_T new tokens of one KV head, keys then
values, with one helper (``_encode``)::

    key:   k - μ -> n = ‖k - μ‖, y = Π (k - μ) / n -> idx = #{b < y} -> [r = y - c[idx], γ = ‖r‖, sign(S r)]
    value: v     -> n_v,         y_v = Π_v v / n_v -> idx_v

The rotation of the unit vectors is a [BLOCK_T, d] x [d, d] product taken BLOCK_C output coordinates
at a time (Π never sits in registers whole and is read once per tile of tokens, not once per token),
fp32-accurate by default (``common.fp32_dot``: three fp16 MMAs), so codes match the float64 reference
except within rounding of a cell boundary. Each chunk of coordinates is bucketed and
packed (``common.store_codes``, exactly ``layout.pack_bits``) as soon as it is computed; with a
QJL sketch the chunk's residual also feeds S r ([BLOCK_T, m], one more dot) and γ². Norms and γ
are rounded to fp16 like the reference. Tokens with slot_mapping < 0 are skipped.

Protected tokens (``PROTECT``, see ``vllm_turboquant.protected``): a token with
``exact_slot_mapping[t] >= 0`` also gets its exact copy Π_k (k - μ) | Π_v v at that flat slot of the
exact-copy cache: the same rotated chunks before normalising, rounded to the copy cache's dtype (the
reference computes in float64, so copies agree within one rounding), whether or not the token has a
packed slot. Without ``PROTECT`` that code is compiled out.

The cache is ``[num_blocks, block_size, H, slot_bytes]`` with any strides for the first three
dims (vLLM's block-head-token cache, permuted): slot index i = block * block_size + offset lives
at ``block * stride_cb + offset * stride_cs + head * stride_ch``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..layout import CacheFormat, cache_format
from .common import (
    DEFAULT_LOOKUP,
    bucketize,
    cache_strides,
    check_lookup,
    check_protected,
    check_tables,
    fp32_dot,
    launch_config,
    load_table,
    lookup,
    next_pow2,
    round_to,
    row_scale,
    slot_alignment,
    slot_constants,
    store_codes,
    store_fp16,
    store_norm,
)


@triton.jit
def _encode(x_rows, t_ok, slot, has_slot, copy_rows, has_copy, mean_ptr, rot_ptr, bnd_ptr, cent_ptr, qjl_ptr,
            HAS_MEAN: tl.constexpr, BITS: tl.constexpr, QJL_DIM: tl.constexpr, OFF_CODES: tl.constexpr,
            OFF_NORM: tl.constexpr, OFF_SIGNS: tl.constexpr, OFF_GAMMA: tl.constexpr, HEAD_DIM: tl.constexpr,
            BLOCK_D: tl.constexpr, BLOCK_QJL: tl.constexpr, BLOCK_C: tl.constexpr, WORD: tl.constexpr,
            SIGN_WORD: tl.constexpr, SLOT_ALIGN: tl.constexpr, PROTECT: tl.constexpr, LOOKUP: tl.constexpr,
            PASSES: tl.constexpr):
    """Encode one head's vectors of a token tile (``reference.encode``): rows at ``x_rows`` [T] (``t_ok``),
    into the slots at ``slot`` [T] (``has_slot``) and, with PROTECT, the exact copies at ``copy_rows`` [T]
    (``has_copy``)."""
    d = tl.arange(0, BLOCK_D)
    x = tl.load(x_rows[:, None] + d[None, :], mask=t_ok[:, None] & (d < HEAD_DIM)[None, :], other=0.0)
    x = x.to(tl.float32)
    if HAS_MEAN:
        x -= tl.load(mean_ptr + d, mask=d < HEAD_DIM, other=0.0)[None, :]
    sigma, inv = row_scale(x)  # x / σ: max |.| in [1, 2), so Σ x² neither overflows nor underflows
    x = x * inv[:, None]
    n = tl.sqrt(tl.sum(x * x, axis=1))  # ‖x‖ / σ [T]
    x = x * tl.where(n > 0, 1.0 / tl.where(n > 0, n, 1.0), 0.0)[:, None]  # unit; n = 0: y = 0 (the reference)
    n = n * sigma  # ‖x‖ (inf past float32's range: stored saturated)
    store_norm(slot + OFF_NORM, n, has_slot, SLOT_ALIGN)
    if QJL_DIM > 0:
        table = load_table(cent_ptr, BITS)
        m = tl.arange(0, BLOCK_QJL)
        proj = tl.zeros((x.shape[0], BLOCK_QJL), dtype=tl.float32)
        r2 = tl.zeros((x.shape[0],), dtype=tl.float32)
    for c0 in range(0, BLOCK_D, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < HEAD_DIM
        rot_t = tl.load(rot_ptr + c[None, :] * HEAD_DIM + d[:, None],  # [D, C] = Π[c, :]ᵀ
                        mask=(d < HEAD_DIM)[:, None] & c_ok[None, :], other=0.0)
        y = fp32_dot(x, rot_t, PASSES)  # Π (x - μ) / n, coordinates c
        if PROTECT:
            tl.store(copy_rows[:, None] + c[None, :], round_to(y * n[:, None], copy_rows.dtype.element_ty),
                     mask=has_copy[:, None] & c_ok[None, :])
        codes = bucketize(y, bnd_ptr, BITS)
        store_codes(slot, has_slot, codes, OFF_CODES, BITS, HEAD_DIM, c0, WORD)
        if QJL_DIM > 0:
            r = tl.where(c_ok[None, :], y - lookup(table, cent_ptr, codes, BITS, LOOKUP), 0.0)
            r2 += tl.sum(r * r, axis=1)
            s_t = tl.load(qjl_ptr + m[None, :] * HEAD_DIM + c[:, None],  # [C, M] = S[:, c]ᵀ
                          mask=c_ok[:, None] & (m < QJL_DIM)[None, :], other=0.0)
            proj += fp32_dot(r, s_t, PASSES)
    if QJL_DIM > 0:
        store_fp16(slot + OFF_GAMMA, tl.sqrt(r2), has_slot, SLOT_ALIGN)
        store_codes(slot, has_slot, (proj >= 0).to(tl.int32), OFF_SIGNS, 1, QJL_DIM, 0, SIGN_WORD)


@triton.jit
def _store_kernel(
    cache_ptr, slot_mapping_ptr, key_ptr, value_ptr,
    key_rot_ptr, value_rot_ptr, qjl_ptr, key_bnd_ptr, key_cent_ptr, value_bnd_ptr, key_mean_ptr,
    xcache_ptr, exact_slots_ptr, num_exact, x_block_size, stride_xb, stride_xs, stride_xh,  # PROTECT
    num_tokens, stride_kn, stride_kh, stride_vn, stride_vh, stride_cb, stride_cs, stride_ch, block_size,
    HEAD_DIM: tl.constexpr, KEY_BITS: tl.constexpr, VALUE_BITS: tl.constexpr, QJL_DIM: tl.constexpr,
    OFF_KEY_CODES: tl.constexpr, OFF_KEY_SIGNS: tl.constexpr, OFF_KEY_NORM: tl.constexpr,
    OFF_KEY_GAMMA: tl.constexpr, OFF_VALUE_CODES: tl.constexpr, OFF_VALUE_NORM: tl.constexpr,
    SLOT_BYTES: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_QJL: tl.constexpr, KEY_WORD: tl.constexpr,
    SIGN_WORD: tl.constexpr, VALUE_WORD: tl.constexpr, SLOT_ALIGN: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, LOOKUP: tl.constexpr, PROTECT: tl.constexpr,
    PASSES: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.program_id(1)
    t_ok = t < num_tokens
    t64 = t.to(tl.int64)
    slot_index = tl.load(slot_mapping_ptr + t, mask=t_ok, other=-1).to(tl.int64)
    has_slot = slot_index >= 0
    slot = (cache_ptr + (slot_index // block_size) * stride_cb + (slot_index % block_size) * stride_cs
            + h.to(tl.int64) * stride_ch)
    exact = tl.zeros((BLOCK_T,), dtype=tl.int64) - 1
    if PROTECT:  # the exact copy, whether or not the token has a packed slot (as the reference)
        exact = tl.load(exact_slots_ptr + t, mask=t < num_exact, other=-1).to(tl.int64)
    row = xcache_ptr + (exact // x_block_size) * stride_xb + (exact % x_block_size) * stride_xs + h * stride_xh
    has_row = exact >= 0

    _encode(key_ptr + t64 * stride_kn + h * stride_kh, t_ok, slot, has_slot, row, has_row,
            key_mean_ptr + h * HEAD_DIM, key_rot_ptr + h * HEAD_DIM * HEAD_DIM,
            key_bnd_ptr + h * ((1 << KEY_BITS) - 1), key_cent_ptr + h * (1 << KEY_BITS),
            qjl_ptr + h * QJL_DIM * HEAD_DIM, True, KEY_BITS, QJL_DIM, OFF_KEY_CODES, OFF_KEY_NORM, OFF_KEY_SIGNS,
            OFF_KEY_GAMMA, HEAD_DIM, BLOCK_D, BLOCK_QJL, BLOCK_C, KEY_WORD, SIGN_WORD, SLOT_ALIGN, PROTECT, LOOKUP,
            PASSES)
    _encode(value_ptr + t64 * stride_vn + h * stride_vh, t_ok, slot, has_slot, row + HEAD_DIM, has_row,
            key_mean_ptr, value_rot_ptr + h * HEAD_DIM * HEAD_DIM,
            value_bnd_ptr + h * ((1 << VALUE_BITS) - 1), key_cent_ptr, qjl_ptr, False, VALUE_BITS, 0,
            OFF_VALUE_CODES, OFF_VALUE_NORM, 0, 0, HEAD_DIM, BLOCK_D, BLOCK_QJL, BLOCK_C, VALUE_WORD, SIGN_WORD,
            SLOT_ALIGN, PROTECT, LOOKUP, PASSES)


def store_config(head_dim: int) -> dict[str, int]:
    """Tokens per program (BLOCK_T, at least 16: a tl.dot operand), rotation columns per chunk (BLOCK_C), warps
    and stages. Small: the fp32-accurate rotation (three fp16 MMAs) keeps its split operands in registers."""
    return dict(BLOCK_T=16, BLOCK_C=min(32, next_pow2(head_dim)), num_warps=4 if head_dim <= 128 else 8,
                num_stages=1)


def store(cache: torch.Tensor, slot_mapping: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
          tables, fmt: CacheFormat | str, protected=None, exact_slot_mapping: torch.Tensor | None = None, *,
          lookup_mode: str = DEFAULT_LOOKUP, precision: str = "fp32", config: dict | None = None) -> None:
    """Encode N new tokens into the paged cache in place (``ops.AttentionOps.write_cache`` semantics).

    Beyond the contract: ``lookup_mode``, ``precision`` of the rotation dots ("fp32": fp32-accurate, three
    fp16 MMAs, the default; "fp16": one, ~5e-4 relative, flipping codes near cell boundaries -- for
    measurements) and ``config`` (overrides of ``store_config``).
    """
    N, H, D = key.shape
    fmt = cache_format(fmt, D)
    layout = fmt.layout
    stride_cb, stride_cs, stride_ch = cache_strides(cache, H, layout.slot_bytes)
    check_tables(tables, cache.device)
    if N == 0:
        return
    exact = exact_slot_mapping
    protect = protected is not None and exact is not None and exact.numel() > 0 and protected.cache.numel() > 0
    if protect:
        check_protected(protected, H, D, cache.device)
        if exact.device != cache.device or exact.dtype not in (torch.int32, torch.int64) or exact.dim() != 1:
            raise ValueError(f"exact_slot_mapping must be 1-d int32/int64 on {cache.device}, got {exact.dtype} "
                             f"{tuple(exact.shape)} on {exact.device}")
        x = protected.cache
        copy_args = (x, exact, min(exact.shape[0], N), x.shape[1], x.stride(0), x.stride(1), x.stride(2))
    else:
        copy_args = (cache, slot_mapping, 0, 1, 0, 0, 0)
    key = key if key.stride(-1) == 1 else key.contiguous()
    value = value if value.stride(-1) == 1 else value.contiguous()
    cfg = launch_config("store", store_config(D), config)
    _store_kernel[(triton.cdiv(N, cfg["BLOCK_T"]), H)](
        cache, slot_mapping, key, value,
        tables.key_rotation, tables.value_rotation, tables.qjl if layout.has_qjl else tables.key_rotation,
        tables.key_boundaries, tables.key_centroids, tables.value_boundaries, tables.key_mean, *copy_args,
        N, key.stride(0), key.stride(1), value.stride(0), value.stride(1), stride_cb, stride_cs, stride_ch,
        cache.shape[1],
        **slot_constants(fmt, slot_alignment(cache)), LOOKUP=check_lookup(lookup_mode), PROTECT=protect,
        PASSES={"fp32": 3, "fp16": 1}[precision], **cfg,
    )


def chunk_copies(key: torch.Tensor, value: torch.Tensor, tables, fmt: CacheFormat, protected) -> torch.Tensor:
    """The exact copies (N, H, 2 d) of new tokens, in ``protected.cache``'s dtype, bit for bit as ``store``
    writes them (the same kernel; no packed slot is written)."""
    N, H, D = key.shape
    copies = torch.empty(N, 1, H, 2 * D, dtype=protected.cache.dtype, device=key.device)
    dummy = torch.empty(1, 1, H, fmt.layout.slot_bytes, dtype=torch.uint8, device=key.device)
    skip = torch.full((N,), -1, dtype=torch.int64, device=key.device)
    store(dummy, skip, key, value, tables, fmt, type(protected)(protected.sink, protected.window, copies,
                                                                protected.block_table),
          torch.arange(N, device=key.device))
    return copies.view(N, H, 2 * D)
