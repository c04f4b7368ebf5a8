"""Causal (chunked) prefill attention over a compressed paged prefix.

Grid (sequence, KV head, query tile). A program takes TOK consecutive new tokens of
one sequence and all G query heads of the KV head's group, flattened into
R = TOK * G rows (row r = token r // G, head r % G), so every slot or fresh key it
reads serves the whole group. Two key loops share one online softmax:

1. the prefix, read from slots (with ``compressed_chunk`` the chunk itself too),
   scored like decode: n ⊙ (q̃ · ŷᵀ + coef · γ ⊙ (p · sᵀ)) + ⟨q, μ⟩;
2. the chunk's own tokens, exact: q · kᵀ from the key tensor.

Values of both loops are accumulated in the rotated value space: slot values as
n_v · c_v[idx], fresh values pre-rotated once per row by ``rotate_rows`` (Π_v v).
The tile is un-rotated once at the end, o = Π_vᵀ acc / l. Causality and the
sliding window are per-row masks; loops only visit keys some row can see.

Protected tokens (``PROTECT``, see ``vllm_turboquant.protected``): key k is protected for the
query at q when k < S or k > q - W, so loop 1 builds a [R, N] ``use`` mask per tile. A prefix
key with a pool copy (``entry_of_slot`` >= 0) and, with ``compressed_chunk``, every chunk key
(its own exact row, ``protected.exact_rows`` computed by the host once per call and rounded to
the pool's dtype, as the pool holds it) has an exact row; where ``use``, the score is
q̃ · Π_k (k - μ) + ⟨q, μ⟩ instead of the packed one, and values are accumulated as
(w ⊙ use) · Π_v v + (w ⊙ ¬use ⊙ n_v) · c_v[idx]. Loop 2 (fresh chunk K/V) is unchanged.
S = W = 0 (or no ``protected``) compiles all of it out.

The cache is ``[num_blocks, block_size, H, slot_bytes]`` with any strides for the
first three dims: the slot of (block, offset, KV head) is read at ``block * stride_cb
+ offset * stride_cs + head * stride_ch`` (64-bit).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..presets import Preset
from ..protected import exact_rows
from .common import (DEFAULT_LOOKUP, attention_setup, dot_precision, load_codes, load_fp16, load_table, lookup,
                     next_pow2, pool_args, protection, unrotate_store)
from .decode import LOG2E
from .rotate import rotate_rows


@triton.jit
def _online_softmax(s, visible, m_i, l_i):
    """One online-softmax step on scores s [R, N] (log2 units): returns (weights, alpha, m_new, l_new)."""
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_ref)
    w = tl.exp2(s - m_ref[:, None])
    return w, alpha, m_new, l_i * alpha + tl.sum(w, axis=1)


@triton.jit
def _prefill_kernel(
    cache_ptr, block_table_ptr, query_start_ptr, seq_lens_ptr,
    query_ptr, key_ptr, value_rot_ptr,  # query (T, Hq, D); key (T, H, D); Π_v value (T, H, D) f32
    q_rot_ptr, q_proj_ptr, q_mu_ptr,  # (T, Hq, D), (T, Hq, M), (T, Hq) float32
    key_cent_ptr, value_cent_ptr, value_rot_mat_ptr, out_ptr,
    # protected tokens (PROTECT): pool (P, H, 2, D) + entry_of_slot; the chunk's own rows (T, H, 2, D)
    pool_ptr, entry_ptr, stride_pp, stride_ph, stride_pkv, sink, window,
    chunk_rows_ptr, stride_xt, stride_xh, stride_xkv,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_ot, stride_oh,
    stride_bt, stride_cb, stride_cs, stride_ch, num_kv_heads, block_size, score_scale, qjl_coef, sliding_window,
    G: tl.constexpr, TOK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    COMPRESSED_CHUNK: tl.constexpr, PROTECT: tl.constexpr,
    HEAD_DIM: tl.constexpr, KEY_BITS: tl.constexpr, VALUE_BITS: tl.constexpr, QJL_DIM: tl.constexpr,
    OFF_KEY_CODES: tl.constexpr, OFF_KEY_SIGNS: tl.constexpr, OFF_KEY_NORM: tl.constexpr,
    OFF_KEY_GAMMA: tl.constexpr, OFF_VALUE_CODES: tl.constexpr, OFF_VALUE_NORM: tl.constexpr,
    SLOT_BYTES: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_QJL: tl.constexpr, BLOCK_OUT: tl.constexpr,
    LOOKUP: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    i0 = tl.program_id(2) * TOK
    q_start = tl.load(query_start_ptr + b)
    q_len = tl.load(query_start_ptr + b + 1) - q_start
    if i0 >= q_len:
        return
    ctx = tl.load(seq_lens_ptr + b) - q_len  # cached tokens before this chunk
    num_q_heads = num_kv_heads * G

    r = tl.arange(0, BLOCK_R)
    i = i0 + r // G
    r_ok = (r < TOK * G) & (i < q_len)
    q_pos = ctx + i  # [R]
    hq = h * G + r % G
    t = (q_start + i).to(tl.int64)  # packed token index of each row
    row = t * num_q_heads + hq
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    last_pos = ctx + tl.minimum(i0 + TOK, q_len) - 1
    lo = tl.where(sliding_window > 0, tl.maximum(ctx + i0 - sliding_window + 1, 0), 0)

    m_i = tl.full((BLOCK_R,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_R,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)

    # -- 1. keys from slots: the prefix (and the chunk when COMPRESSED_CHUNK) ----------
    q = tl.load(q_rot_ptr + row[:, None] * HEAD_DIM + d[None, :], mask=r_ok[:, None] & d_ok[None, :], other=0.0)
    q_mu = tl.load(q_mu_ptr + row, mask=r_ok, other=0.0)
    if QJL_DIM > 0:
        mq = tl.arange(0, BLOCK_QJL)
        q_proj = tl.load(q_proj_ptr + row[:, None] * QJL_DIM + mq[None, :],
                         mask=r_ok[:, None] & (mq < QJL_DIM)[None, :], other=0.0)
    key_cent = key_cent_ptr + h * (1 << KEY_BITS)
    value_cent = value_cent_ptr + h * (1 << VALUE_BITS)
    key_table = load_table(key_cent, KEY_BITS)
    value_table = load_table(value_cent, VALUE_BITS)
    cache_h = cache_ptr + h.to(tl.int64) * stride_ch  # this KV head's slots
    pool_h = pool_ptr + h.to(tl.int64) * stride_ph  # this KV head's exact copies
    chunk_h = chunk_rows_ptr + h.to(tl.int64) * stride_xh
    slot_hi = ctx
    if COMPRESSED_CHUNK:
        slot_hi = last_pos + 1
    for k0 in range(lo, slot_hi, BLOCK_N):
        pos = k0 + tl.arange(0, BLOCK_N)
        valid = pos < slot_hi
        page = tl.load(block_table_ptr + b.to(tl.int64) * stride_bt + pos // block_size, mask=valid, other=0)
        slot = cache_h + page.to(tl.int64) * stride_cb + (pos % block_size).to(tl.int64) * stride_cs

        y_key = lookup(key_table, key_cent, load_codes(slot, valid, OFF_KEY_CODES, KEY_BITS, HEAD_DIM, BLOCK_D),
                       KEY_BITS, LOOKUP)
        if BLOCK_D != HEAD_DIM:
            y_key = tl.where(d_ok[None, :], y_key, 0.0)
        s = tl.dot(q, tl.trans(y_key), input_precision=DOT_PRECISION)  # [R, N]
        if QJL_DIM > 0:
            signs = (2 * load_codes(slot, valid, OFF_KEY_SIGNS, 1, QJL_DIM, BLOCK_QJL) - 1).to(tl.float32)
            gamma = load_fp16(slot + OFF_KEY_GAMMA, valid)
            s += (qjl_coef * gamma)[None, :] * tl.dot(q_proj, tl.trans(signs), input_precision=DOT_PRECISION)
        s = (s * load_fp16(slot + OFF_KEY_NORM, valid)[None, :] + q_mu[:, None]) * score_scale
        if PROTECT:
            # Exact rows: a prefix key's pool copy (if any), a chunk key's own row (always). Which rows
            # read them depends on each query's window: use [R, N].
            in_prefix = pos < ctx
            entry = tl.load(entry_ptr + page.to(tl.int64) * block_size + pos % block_size, mask=valid & in_prefix,
                            other=-1)
            has = valid & ((entry >= 0) | ~in_prefix)
            kt = (q_start + pos - ctx).to(tl.int64)
            exact_k = tl.where(in_prefix, pool_h + entry.to(tl.int64) * stride_pp, chunk_h + kt * stride_xt)
            exact_v = tl.where(in_prefix, pool_h + entry.to(tl.int64) * stride_pp + stride_pkv,
                               chunk_h + kt * stride_xt + stride_xkv)
            exact_mask = has[:, None] & d_ok[None, :]
            k_exact = tl.load(exact_k[:, None] + d[None, :], mask=exact_mask, other=0.0).to(tl.float32)
            s_exact = (tl.dot(q, tl.trans(k_exact), input_precision=DOT_PRECISION) + q_mu[:, None]) * score_scale
            use = has[None, :] & ((pos[None, :] < sink) | (pos[None, :] > q_pos[:, None] - window))
            s = tl.where(use, s_exact, s)
        visible = valid[None, :] & (pos[None, :] <= q_pos[:, None])
        visible &= (sliding_window <= 0) | (pos[None, :] > q_pos[:, None] - sliding_window)
        w, alpha, m_i, l_i = _online_softmax(s, visible, m_i, l_i)

        y_value = lookup(value_table, value_cent,
                         load_codes(slot, valid, OFF_VALUE_CODES, VALUE_BITS, HEAD_DIM, BLOCK_D), VALUE_BITS, LOOKUP)
        if PROTECT:
            v_exact = tl.load(exact_v[:, None] + d[None, :], mask=exact_mask, other=0.0).to(tl.float32)
            w_exact = tl.where(use, w, 0.0)
            w = tl.where(use, 0.0, w) * load_fp16(slot + OFF_VALUE_NORM, valid)[None, :]
            acc = (acc * alpha[:, None] + tl.dot(w, y_value, input_precision=DOT_PRECISION)
                   + tl.dot(w_exact, v_exact, input_precision=DOT_PRECISION))
        else:
            w = w * load_fp16(slot + OFF_VALUE_NORM, valid)[None, :]
            acc = acc * alpha[:, None] + tl.dot(w, y_value, input_precision=DOT_PRECISION)

    # -- 2. the chunk's own keys, exact ------------------------------------------------
    if not COMPRESSED_CHUNK:
        q = tl.load(query_ptr + t[:, None] * stride_qt + hq[:, None] * stride_qh + d[None, :],
                    mask=r_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        for k0 in range(tl.maximum(ctx, lo), last_pos + 1, BLOCK_N):
            pos = k0 + tl.arange(0, BLOCK_N)
            valid = pos <= last_pos
            kt = (q_start + pos - ctx).to(tl.int64)
            kv_mask = valid[:, None] & d_ok[None, :]
            k = tl.load(key_ptr + kt[:, None] * stride_kt + h * stride_kh + d[None, :], mask=kv_mask,
                        other=0.0).to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * score_scale
            visible = valid[None, :] & (pos[None, :] <= q_pos[:, None])
            visible &= (sliding_window <= 0) | (pos[None, :] > q_pos[:, None] - sliding_window)
            w, alpha, m_i, l_i = _online_softmax(s, visible, m_i, l_i)
            v = tl.load(value_rot_ptr + (kt[:, None] * num_kv_heads + h) * HEAD_DIM + d[None, :], mask=kv_mask,
                        other=0.0)
            acc = acc * alpha[:, None] + tl.dot(w, v, input_precision=DOT_PRECISION)

    acc = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    unrotate_store(acc, value_rot_mat_ptr + h * HEAD_DIM * HEAD_DIM, out_ptr + t * stride_ot + hq * stride_oh,
                   r_ok, HEAD_DIM, BLOCK_D, BLOCK_OUT, DOT_PRECISION)


def prefill_config(head_dim: int, group: int) -> dict[str, int]:
    """Rows per program (BLOCK_R = tokens x group), key tile and warps per head size."""
    rows = 64 if head_dim <= 128 else 32
    return dict(BLOCK_R=max(rows, next_pow2(group)), BLOCK_N=64 if head_dim <= 64 else 32,
                num_warps=4 if head_dim <= 128 else 8)


def prefill(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cache: torch.Tensor,
            block_table: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
            tables, preset: Preset | str, scale: float, sliding_window: int | None = None,
            compressed_chunk: bool = False, *, protected=None, max_query_len: int | None = None,
            out: torch.Tensor | None = None, lookup_mode: str = DEFAULT_LOOKUP) -> torch.Tensor:
    """Causal attention of packed new tokens over their compressed prefix (``reference.prefill`` semantics).

    query (T, Hq, d), key/value (T, H, d): new tokens, sequence b owning rows
    query_start_loc[b]:query_start_loc[b+1] at positions seq_lens[b] - q_len ... seq_lens[b] - 1
    (already written to the cache). cache uint8 [num_blocks, block_size, H, slot_bytes], any
    strides for the first three dims but stride 1 in the last (vLLM's [num_blocks, H,
    block_size, slot_bytes] cache is passed as ``kv_cache.permute(0, 2, 1, 3)``).
    ``protected`` (a ``ProtectedTokens``): protected prefix keys with an exact copy are read
    from the pool and, with ``compressed_chunk``, protected chunk keys from their own exact rows
    (``protected.exact_rows``, computed here once per call); S = W = 0 or None compiles that out.
    ``max_query_len`` avoids a host sync when known. Returns ``out`` (default float32
    (T, Hq, d)); rows of ``out`` that no sequence owns are left untouched.
    """
    T, Hq, D = query.shape
    preset, layout, kw, (stride_cb, stride_cs, stride_ch), H, G = attention_setup(query, cache, tables, preset)
    protect = protection(protected, H, D, cache.device)
    if out is None:
        out = torch.empty(T, Hq, D, dtype=torch.float32, device=query.device)
    B = seq_lens.shape[0]
    if T == 0 or B == 0:
        return out
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    q_rot, q_proj, q_mu = rotate_rows(query, tables.key_rotation, tables.qjl if layout.has_qjl else None,
                                      tables.key_mean)
    value_rot = q_rot if compressed_chunk else rotate_rows(value, tables.value_rotation)[0]
    key = key if key.stride(-1) == 1 else key.contiguous()
    query = query if query.stride(-1) == 1 else query.contiguous()
    if protect:  # the chunk's exact rows, rounded to the pool's dtype as the pool holds them
        rows = exact_rows(key, value, tables, protected.pool.dtype) if compressed_chunk else protected.pool
        protect_args = (*pool_args(protected, cache), rows, rows.stride(0), rows.stride(1), rows.stride(2))
    else:
        protect_args = (*pool_args(None, cache), cache, 0, 0, 0)
    cfg = prefill_config(D, G)
    tok = cfg["BLOCK_R"] // G
    _prefill_kernel[(B, H, triton.cdiv(max_query_len, tok))](
        cache, block_table, query_start_loc, seq_lens, query, key, value_rot,
        q_rot, q_proj if q_proj is not None else q_rot, q_mu,
        tables.key_centroids, tables.value_centroids, tables.value_rotation, out, *protect_args,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), out.stride(0), out.stride(1),
        block_table.stride(0), stride_cb, stride_cs, stride_ch, H, cache.shape[1], scale * LOG2E,
        preset.qjl_coefficient(D), sliding_window or 0,
        G=G, TOK=tok, COMPRESSED_CHUNK=compressed_chunk, PROTECT=protect, **kw, BLOCK_OUT=min(kw["BLOCK_D"], 64),
        LOOKUP=lookup_mode, DOT_PRECISION=dot_precision(query.device), **cfg,
    )
    return out
