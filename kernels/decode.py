"""Paged decode attention straight from packed TurboQuant slots (split-K / flash-decoding).

Three launches per step:

1. ``rotate_rows`` (pre-kernel): q̃ = Π q, p = S q̃ and ⟨q, μ⟩, once per query head.
2. ``_decode_split_kernel``, grid (batch, KV head, split): one program owns one KV
   head of one sequence and a contiguous run of its tokens, and serves *all G query
   heads of the GQA group* as the rows of a [G, BLOCK_N] score tile. Each slot of
   its run is therefore loaded exactly once per step and KV head: the splits of a
   sequence partition its token range, and no other program touches that head.
   Per tile of BLOCK_N tokens::

       scores = n ⊙ (q̃ · ŷᵀ + coef · γ ⊙ (p · sᵀ)) + ⟨q, μ⟩      (QJL term only if QJL_DIM > 0)
       acc    = α · acc + (softmax weights ⊙ n_v) · c_v[idx_v]    (rotated value space)

   Codes are unpacked from bytes and decoded through the per-head codebook held in
   registers; both products are tensor-core ``tl.dot``s over the group's rows.
3. ``_decode_reduce_kernel``, grid (batch, KV head): merges the splits' (max, sum, acc)
   and un-rotates once per query head, o = Π_vᵀ acc / l.

Protected tokens (``PROTECT``, see ``vllm_turboquant.protected``): a key at position k is
protected for the query (at seq_len - 1) when k < S or k > seq_len - 1 - W. The split kernel
loads ``entry_of_slot`` for each tile's slots; a protected key with a copy (entry >= 0) is
read from its pool row inside the same online softmax: the rotated key Π_k (k - μ) replaces
ŷ with norm 1 and no QJL term, the rotated value Π_v v replaces c_v[idx_v] with norm 1.
S = W = 0 (or no ``protected``) compiles that code out, so the plain path is unchanged.

The number of splits is fixed per launch (a function of batch and head counts, not
of the sequence lengths), so the launch shape is CUDA-graph friendly; splits that
fall past a short sequence write an empty partial.

The cache is ``[num_blocks, block_size, H, slot_bytes]`` with any strides for the
first three dims: the slot of (block, offset, KV head) is read at ``block * stride_cb
+ offset * stride_cs + head * stride_ch`` (64-bit). vLLM's [num_blocks, H, block_size,
slot_bytes] cache, permuted, makes a KV head's tokens adjacent within a block.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..presets import Preset
from .common import (DEFAULT_LOOKUP, attention_setup, dot_precision, load_codes, load_fp16, load_table, lookup,
                     next_pow2, pool_args, protection, unrotate_store)
from .rotate import rotate_rows

LOG2E = 1.4426950408889634


@triton.jit
def _decode_split_kernel(
    cache_ptr, block_table_ptr, seq_lens_ptr,
    q_rot_ptr, q_proj_ptr, q_mu_ptr,  # (B, Hq, D), (B, Hq, M), (B, Hq) float32
    key_cent_ptr, value_cent_ptr,  # (H, 2**KEY_BITS), (H, 2**VALUE_BITS)
    part_acc_ptr, part_max_ptr, part_sum_ptr,  # (B, Hq, SPLITS, D), (B, Hq, SPLITS), (B, Hq, SPLITS)
    pool_ptr, entry_ptr, stride_pp, stride_ph, stride_pkv, sink, window,  # protected tokens (PROTECT)
    stride_bt, stride_cb, stride_cs, stride_ch, num_kv_heads, block_size, score_scale, qjl_coef, sliding_window,
    PROTECT: tl.constexpr, G: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, KEY_BITS: tl.constexpr, VALUE_BITS: tl.constexpr, QJL_DIM: tl.constexpr,
    OFF_KEY_CODES: tl.constexpr, OFF_KEY_SIGNS: tl.constexpr, OFF_KEY_NORM: tl.constexpr,
    OFF_KEY_GAMMA: tl.constexpr, OFF_VALUE_CODES: tl.constexpr, OFF_VALUE_NORM: tl.constexpr,
    SLOT_BYTES: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_QJL: tl.constexpr,
    LOOKUP: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    # the query sits at seq_len - 1 and sees the last sliding_window tokens (0 = all)
    lo = tl.where(sliding_window > 0, tl.maximum(seq_len - sliding_window, 0), 0)
    tile_lo = lo // BLOCK_N
    per_split = tl.cdiv(tl.cdiv(seq_len, BLOCK_N) - tile_lo, NUM_SPLITS)
    tile_start = tile_lo + split * per_split
    tile_stop = tl.minimum(tile_start + per_split, tl.cdiv(seq_len, BLOCK_N))

    g = tl.arange(0, BLOCK_G)
    g_ok = g < G
    d = tl.arange(0, BLOCK_D)
    row = b.to(tl.int64) * num_kv_heads * G + h * G + g  # query-head rows of this group
    q = tl.load(q_rot_ptr + row[:, None] * HEAD_DIM + d[None, :],
                mask=g_ok[:, None] & (d < HEAD_DIM)[None, :], other=0.0)  # [G, D]
    q_mu = tl.load(q_mu_ptr + row, mask=g_ok, other=0.0)
    if QJL_DIM > 0:
        mq = tl.arange(0, BLOCK_QJL)
        q_proj = tl.load(q_proj_ptr + row[:, None] * QJL_DIM + mq[None, :],
                         mask=g_ok[:, None] & (mq < QJL_DIM)[None, :], other=0.0)  # [G, M]
    key_cent = key_cent_ptr + h * (1 << KEY_BITS)
    value_cent = value_cent_ptr + h * (1 << VALUE_BITS)
    key_table = load_table(key_cent, KEY_BITS)
    value_table = load_table(value_cent, VALUE_BITS)
    cache_h = cache_ptr + h.to(tl.int64) * stride_ch  # this KV head's slots
    pool_h = pool_ptr + h.to(tl.int64) * stride_ph  # this KV head's exact copies

    m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    for tile in range(tile_start, tile_stop):
        pos = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        valid = (pos >= lo) & (pos < seq_len)
        page = tl.load(block_table_ptr + b.to(tl.int64) * stride_bt + pos // block_size, mask=valid, other=0)
        slot = cache_h + page.to(tl.int64) * stride_cb + (pos % block_size).to(tl.int64) * stride_cs

        y_key = lookup(key_table, key_cent, load_codes(slot, valid, OFF_KEY_CODES, KEY_BITS, HEAD_DIM, BLOCK_D),
                       KEY_BITS, LOOKUP)  # [N, D]
        if BLOCK_D != HEAD_DIM:
            y_key = tl.where((d < HEAD_DIM)[None, :], y_key, 0.0)
        key_norm = load_fp16(slot + OFF_KEY_NORM, valid)
        if PROTECT:  # protected keys with an exact copy: its rotated row, norm 1, no QJL term
            entry = tl.load(entry_ptr + page.to(tl.int64) * block_size + pos % block_size, mask=valid, other=-1)
            use = valid & (entry >= 0) & ((pos < sink) | (pos > seq_len - 1 - window))  # [N]
            exact = pool_h + entry.to(tl.int64) * stride_pp  # [N] rows (Π_k (k - μ), Π_v v)
            exact_mask = use[:, None] & (d < HEAD_DIM)[None, :]
            y_key = tl.where(use[:, None], tl.load(exact[:, None] + d[None, :], mask=exact_mask,
                                                   other=0.0).to(tl.float32), y_key)
            key_norm = tl.where(use, 1.0, key_norm)
        s = tl.dot(q, tl.trans(y_key), input_precision=DOT_PRECISION)  # [G, N]
        if QJL_DIM > 0:
            bits = load_codes(slot, valid, OFF_KEY_SIGNS, 1, QJL_DIM, BLOCK_QJL)
            signs = (2 * bits - 1).to(tl.float32)  # padding columns meet q_proj == 0
            gamma = load_fp16(slot + OFF_KEY_GAMMA, valid)
            if PROTECT:
                gamma = tl.where(use, 0.0, gamma)
            s += (qjl_coef * gamma)[None, :] * tl.dot(q_proj, tl.trans(signs), input_precision=DOT_PRECISION)
        s = (s * key_norm[None, :] + q_mu[:, None]) * score_scale  # log2 units
        s = tl.where(valid[None, :], s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing visible yet: keep exp2 finite
        alpha = tl.exp2(m_i - m_ref)
        w = tl.exp2(s - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(w, axis=1)
        m_i = m_new

        y_value = lookup(value_table, value_cent,
                         load_codes(slot, valid, OFF_VALUE_CODES, VALUE_BITS, HEAD_DIM, BLOCK_D), VALUE_BITS, LOOKUP)
        value_norm = load_fp16(slot + OFF_VALUE_NORM, valid)
        if PROTECT:
            y_value = tl.where(use[:, None], tl.load(exact[:, None] + stride_pkv + d[None, :], mask=exact_mask,
                                                     other=0.0).to(tl.float32), y_value)
            value_norm = tl.where(use, 1.0, value_norm)
        w = w * value_norm[None, :]
        acc = acc * alpha[:, None] + tl.dot(w, y_value, input_precision=DOT_PRECISION)

    part = row * NUM_SPLITS + split
    tl.store(part_acc_ptr + part[:, None] * BLOCK_D + d[None, :], acc, mask=g_ok[:, None])
    tl.store(part_max_ptr + part, m_i, mask=g_ok)
    tl.store(part_sum_ptr + part, l_i, mask=g_ok)


@triton.jit
def _decode_reduce_kernel(
    part_acc_ptr, part_max_ptr, part_sum_ptr, value_rot_ptr, out_ptr,
    stride_ob, stride_oh, num_kv_heads,
    G: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_SPLITS: tl.constexpr, BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_OUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    g = tl.arange(0, BLOCK_G)
    g_ok = g < G
    sp = tl.arange(0, BLOCK_SPLITS)
    row = b.to(tl.int64) * num_kv_heads * G + h * G + g
    part = row[:, None] * NUM_SPLITS + sp[None, :]  # [G, SPLITS]
    ok = g_ok[:, None] & (sp < NUM_SPLITS)[None, :]
    m = tl.load(part_max_ptr + part, mask=ok, other=float("-inf"))
    m_all = tl.max(m, axis=1)
    m_ref = tl.where(m_all == float("-inf"), 0.0, m_all)
    l_all = tl.sum(tl.exp2(m - m_ref[:, None]) * tl.load(part_sum_ptr + part, mask=ok, other=0.0), axis=1)

    d = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    for split in range(NUM_SPLITS):
        p = row * NUM_SPLITS + split
        w = tl.exp2(tl.load(part_max_ptr + p, mask=g_ok, other=float("-inf")) - m_ref)
        acc += w[:, None] * tl.load(part_acc_ptr + p[:, None] * BLOCK_D + d[None, :], mask=g_ok[:, None], other=0.0)
    acc = acc / tl.where(l_all > 0, l_all, 1.0)[:, None]  # an empty sequence keeps acc == 0

    out_rows = out_ptr + b.to(tl.int64) * stride_ob + (h * G + g) * stride_oh
    unrotate_store(acc, value_rot_ptr + h * HEAD_DIM * HEAD_DIM, out_rows, g_ok, HEAD_DIM, BLOCK_D, BLOCK_OUT,
                   DOT_PRECISION)


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def default_num_splits(batch: int, num_kv_heads: int, device: torch.device) -> int:
    """Splits per sequence: enough (batch x KV head x split) programs for ~2 waves, at most 64.

    Depends only on shapes, so a captured CUDA graph keeps its launch grid.
    """
    if device.type != "cuda":
        return 1
    sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(64, triton.cdiv(2 * sms, max(1, batch * num_kv_heads))))


def decode_config(head_dim: int) -> dict[str, int]:
    """Tile sizes per head size: BLOCK_N tokens per tile and warps for the split kernel."""
    if head_dim <= 64:
        return dict(BLOCK_N=64, num_warps=4)
    if head_dim <= 128:
        return dict(BLOCK_N=64, num_warps=4)
    return dict(BLOCK_N=32, num_warps=8)


def paged_decode(query: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                 tables, preset: Preset | str, scale: float, sliding_window: int | None = None,
                 num_splits: int | None = None, *, protected=None, out: torch.Tensor | None = None,
                 lookup_mode: str = DEFAULT_LOOKUP) -> torch.Tensor:
    """One new query per sequence against its cached tokens (same semantics as ``reference.paged_decode``).

    query (B, Hq, d); cache uint8 [num_blocks, block_size, H, slot_bytes], any strides for
    the first three dims but stride 1 in the last (vLLM's [num_blocks, H, block_size,
    slot_bytes] cache is passed as ``kv_cache.permute(0, 2, 1, 3)``); block_table
    (B, max_blocks) int; seq_lens (B,) cached tokens, the query's own included.
    ``protected`` (a ``ProtectedTokens``): protected keys with an exact copy are read from
    the pool (S = W = 0 or None compiles that out).
    Returns ``out`` (default float32 (B, Hq, d)); empty sequences give zeros.
    """
    B, Hq, D = query.shape
    preset, layout, kw, (stride_cb, stride_cs, stride_ch), H, G = attention_setup(query, cache, tables, preset)
    protect = protection(protected, H, D, cache.device)
    if out is None:
        out = torch.empty(B, Hq, D, dtype=torch.float32, device=query.device)
    if B == 0:
        return out
    splits = num_splits or default_num_splits(B, H, query.device)
    q_rot, q_proj, q_mu = rotate_rows(query, tables.key_rotation, tables.qjl if layout.has_qjl else None,
                                      tables.key_mean)
    part_acc = torch.empty(B, Hq, splits, kw["BLOCK_D"], dtype=torch.float32, device=query.device)
    part_max = torch.empty(B, Hq, splits, dtype=torch.float32, device=query.device)
    part_sum = torch.empty_like(part_max)
    prec = dot_precision(query.device)
    block_g = max(16, next_pow2(G))
    _decode_split_kernel[(B, H, splits)](
        cache, block_table, seq_lens, q_rot, q_proj if q_proj is not None else q_rot, q_mu,
        tables.key_centroids, tables.value_centroids, part_acc, part_max, part_sum,
        *pool_args(protected if protect else None, cache),
        block_table.stride(0), stride_cb, stride_cs, stride_ch, H, cache.shape[1], scale * LOG2E,
        preset.qjl_coefficient(D),
        sliding_window or 0,
        PROTECT=protect, G=G, NUM_SPLITS=splits, BLOCK_G=block_g, **kw, LOOKUP=lookup_mode, DOT_PRECISION=prec,
        **decode_config(D),
    )
    _decode_reduce_kernel[(B, H)](
        part_acc, part_max, part_sum, tables.value_rotation, out,
        out.stride(0), out.stride(1), H,
        G=G, NUM_SPLITS=splits, BLOCK_SPLITS=next_pow2(splits), BLOCK_G=block_g,
        HEAD_DIM=D, BLOCK_D=kw["BLOCK_D"], BLOCK_OUT=min(kw["BLOCK_D"], 64), DOT_PRECISION=prec,
        num_warps=4,
    )
    return out
