"""The attention tile body, written once for decode and prefill (as the Triton fused-attention
tutorial's ``_attn_fwd_inner``): ``attend_slots`` runs the key loop over packed slots for a block
of query rows, and its pieces read side by side with the torch reference:

============================  ==========================================================
here                          ``vllm_turboquant.reference``
============================  ==========================================================
``read_keys`` / values        ``_read_tokens`` (codes -> centroid values, norms, signs, γ)
``scores``                    ``_scores``: n (⟨Π q, ŷ⟩ + coef γ ⟨S Π q, s⟩)
``softmax_step``              ``_attend``'s softmax, streamed (online: running max and sum)
``accumulate``                ``_attend``'s Σ p_j w_j v_j with w = n_v (the rotated value space)
``exact_source``              ``ProtectedTokens.rows``: where an exact copy lives
============================  ==========================================================

Rows are query heads (decode: the GQA group of one sequence; prefill: tokens x group), each with
its position ``q_pos``; queries arrive rotated, c Π q = σ q̂ with c = scale·log2 e (``rotate_queries``: q̂
with max |q̂| < 2 √d whatever q, as hi + lo fp16 pieces, σ a float32 per row), so scores are in log2 units
once multiplied by σ --
``softmax_step`` does that in the FMA that subtracts the running max -- and ``exp2`` is the softmax's
exponential. The ⟨q, μ⟩ term of the
key estimate is the same for every key of a row (exact copies included), so softmax cancels it:
like the reference, attention over slots leaves it out.

Dots take ``OPERAND_DTYPE`` (fp16) operands and accumulate in fp32 (``mma``), and no operand can
overflow whatever the (finite) inputs: value weights are p · w / max(w) of the tile (in [0, 1]; w = n_v
for slots, a row's scale σ for exact rows) and the tile's max is multiplied back in fp32; an exact row
(a raw rotated vector) is divided by its power-of-two scale σ (``load_rows``) and σ multiplies its score
or weight in fp32. Scores are fp32-accurate (``scores``, ``exact_scores``): q̂, coef S q̂ (split once, by
``rotate_queries``) and the centroids (split per tile) go in as hi + lo fp16 pieces (``common.split_operand``),
since a score's rounding error grows with the key's norm -- and the absolute error is what softmax sees --
while a value's error stays relative to the output (p · w / max w and the centroids rounded once: 2**-11 of
the values' scale).

Protected tokens (``PROTECT``): a key at position k is read from its exact copy by a query at q
when k < S or k > q - W (``protected_mask``; ``exact_source`` says where the copy is): its rotated
key Π_k (k - μ) = σ k̂ is scored with norm 1 (σ for k̂) and no QJL term, its rotated value Π_v v = σ_v v̂
accumulated with weight 1 (σ_v for v̂). Only tiles that hold such keys for some row take that path
(a runtime branch), the others run exactly the unprotected body; only copies some row reads are loaded (others may be
stale, even NaN).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import (
    OPERAND_DTYPE,
    centroid_values,
    load_fp16,
    load_norm,
    precise_mma,
    read_signs,
    row_scale,
    split_operand,
)


@triton.jit
def mma(a, b):
    """a @ b on tensor cores: ``OPERAND_DTYPE`` operands, fp32 accumulation."""
    return tl.dot(a.to(OPERAND_DTYPE), b.to(OPERAND_DTYPE), out_dtype=tl.float32)


@triton.jit
def split_mma(a_hi, a_lo, b):
    """a @ b for a = a_hi + a_lo (``common.split_operand``) and b exact in ``OPERAND_DTYPE`` (signs ±1, 16-bit
    rows): two MMAs into one fp32 accumulator, the small term first -- as accurate as a float32 a."""
    return tl.dot(a_hi, b, tl.dot(a_lo, b, out_dtype=tl.float32), out_dtype=tl.float32)


@triton.jit
def scores(q_hi, q_lo, p_hi, p_lo, y_key, key_norm, signs, gamma, QJL_DIM: tl.constexpr):
    """reference._scores: n (⟨Π q, ŷ⟩ + coef γ ⟨S Π q, s⟩) for rows q = q_hi + q_lo [R, D] and coef S q = p_hi +
    p_lo [R, M] (hi + lo fp16 pieces, ``rotate_queries``) against keys [N, D] (ŷ float32, signs s ±1, γ) -> [R, N],
    to about fp32 accuracy: ⟨q, ŷ⟩ in three MMAs (ŷ split too), ⟨coef S q, s⟩ in two (the signs are exact).

    Not one fp16 pass: a score's rounding error is relative to the score, |error| ~ 2**-11 n ‖q‖ ‖ŷ‖ (more
    where the two terms cancel), and n is any stored norm (up to 65504²), so one pass moves large scores by
    many log2 units and flips near ties the float64 reference resolves. Split operands leave ~2**-22 of that.
    (``signs`` / ``gamma`` / ``p_hi`` / ``p_lo`` are unused placeholders when QJL_DIM == 0.)"""
    y_hi, y_lo = split_operand(y_key)
    s = precise_mma(q_hi, q_lo, tl.trans(y_hi), tl.trans(y_lo))
    if QJL_DIM > 0:
        s += gamma[None, :] * split_mma(p_hi, p_lo, tl.trans(signs))
    return s * key_norm[None, :]


@triton.jit
def load_pieces(hi_ptr, lo_ptr, row, row_ok, N: tl.constexpr, BLOCK: tl.constexpr):
    """Rows ``row`` [R] (``row_ok``) of an N-column operand stored as hi + lo fp16 pieces (``rotate_queries``:
    rotated queries, their sketch): (hi [R, BLOCK], lo [R, BLOCK]), 0 past N and in masked rows."""
    c = tl.arange(0, BLOCK)
    offsets = row[:, None] * N + c[None, :]
    mask = row_ok[:, None] & (c < N)[None, :]
    return tl.load(hi_ptr + offsets, mask=mask, other=0.0), tl.load(lo_ptr + offsets, mask=mask, other=0.0)


@triton.jit
def softmax_step(s, visible, m_i, l_i, sigma):
    """reference._attend's softmax, one tile at a time (online): scores σ s for s [R, N] and the rows' scales
    σ [R] > 0 (log2 units), masked to ``visible``; returns (weights p, rescale α of what came before, new running
    max, new running sum). A row with nothing visible yet keeps m = -inf and weights 0. σ costs nothing per
    score: max(σ s) = σ max(s), and σ s - m is one FMA, as s - m was."""
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1) * sigma)
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_ref)
    p = tl.exp2(s * sigma[:, None] - m_ref[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, axis=1)


@triton.jit
def weighted_mma(p, weights, values):
    """(p ⊙ w) · values for p [R, N] in [0, 1], weights w [N] >= 0 (any finite size), values [N, D], to about
    fp32 accuracy: the operand p · w / max(w) (in [0, 1]) as hi + lo fp16 pieces, max(w) applied in fp32;
    float32 values (centroid values) split too -- three MMAs (``precise_mma``) -- values exact in
    ``OPERAND_DTYPE`` (16-bit rows in their row scale, ``load_rows``) two (``split_mma``). One fp16 MMA of
    both moved SmolLM2 / Gemma-3 perplexity by -0.07 / +0.13 points against the reference (256 tokens,
    ``evals/results/ops/``), four times what float32 rounding does."""
    w_max = tl.max(weights, axis=0)
    w_max = tl.where(w_max > 0, w_max, 1.0)
    a_hi, a_lo = split_operand(p * (weights / w_max)[None, :])
    if values.dtype == tl.float32:
        v_hi, v_lo = split_operand(values)
        out = precise_mma(a_hi, a_lo, v_hi, v_lo)
    else:
        out = split_mma(a_hi, a_lo, values)
    return out * w_max


@triton.jit
def accumulate(acc, alpha, p, weights, values):
    """reference._attend's Σ_j p_j w_j v_j, streamed: α acc + (p ⊙ w) · values for p [R, N], weights w [N],
    values [N, D] (``weighted_mma``)."""
    return acc * alpha[:, None] + weighted_mma(p, weights, values)


@triton.jit
def causal_visible(pos, valid, q_pos, sliding_window):
    """Which keys at pos [N] (``valid`` ones) rows at q_pos [R] see: k <= q, and k > q - window when
    ``sliding_window`` > 0. [R, N]"""
    visible = valid[None, :] & (pos[None, :] <= q_pos[:, None])
    return visible & ((sliding_window <= 0) | (pos[None, :] > q_pos[:, None] - sliding_window))


@triton.jit
def protected_mask(pos, q_pos, sink, window):
    """Keys at pos [N] that rows at q_pos [R] read exactly (``protected.protected_mask``): k < S or k > q - W."""
    return (pos[None, :] < sink) | (pos[None, :] > q_pos[:, None] - window)


@triton.jit
def exact_source(pos, read, xbt_row, x_block_size, stride_xb, stride_xs, xcache_h, chunk_h, stride_ct, q_start, ctx,
                 HEAD_DIM: tl.constexpr, CHUNK_COPIES: tl.constexpr):
    """Where the exact copies of keys at pos [N] are -- the one place that knows. Returns pointers [N] to
    their key rows Π_k (k - μ) and value rows Π_v v (the next HEAD_DIM elements). Only the ``read`` keys
    are looked up: the copies of other positions may be stale.

    Today (``protected.ProtectedTokens``): a key before ``ctx`` has its copy at row
    ``block_table[b, pos // bs] * bs + pos % bs`` of the exact-copy cache [blocks, bs, H, 2 d] (``xbt_row``:
    the sequence's block-table row, ``xcache_h``: its KV head); with CHUNK_COPIES (prefill with
    ``compressed_chunk``) a key of the chunk itself has it at row ``q_start + pos - ctx`` of the chunk's
    copies (``chunk_h``: made from its K/V as ``write_cache`` makes them)."""
    in_cache = pos < ctx
    page = tl.load(xbt_row + pos // x_block_size, mask=read & in_cache, other=0)
    row = xcache_h + page.to(tl.int64) * stride_xb + (pos % x_block_size).to(tl.int64) * stride_xs
    if CHUNK_COPIES:
        row = tl.where(in_cache, row, chunk_h + (q_start + pos - ctx).to(tl.int64) * stride_ct)
    return row, row + HEAD_DIM


@triton.jit
def _scaled_rows(row_ptrs, read, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Exact rows x [N, BLOCK_D] at ``row_ptrs`` [N] (0 where not ``read``) in their row scale: (x / σ float32,
    σ [N] float32) (``common.row_scale``: any finite row)."""
    d = tl.arange(0, BLOCK_D)
    rows = tl.load(row_ptrs[:, None] + d[None, :], mask=read[:, None] & (d < HEAD_DIM)[None, :],
                   other=0.0).to(tl.float32)
    sigma, inv = row_scale(rows)
    return rows * inv[:, None], sigma


@triton.jit
def load_rows(row_ptrs, read, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Exact rows x [N, BLOCK_D] at ``row_ptrs`` [N] (0 where not ``read``) as dot operands in their row scale:
    (x̂ [N, BLOCK_D] ``OPERAND_DTYPE``, σ [N] float32) with x = σ x̂ (``common.row_scale``: any finite row)."""
    x, sigma = _scaled_rows(row_ptrs, read, HEAD_DIM, BLOCK_D)
    return x.to(OPERAND_DTYPE), sigma


@triton.jit
def exact_scores(q_hi, q_lo, row_ptrs, read, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """⟨Π q, Π_k (k - μ)⟩ [R, N] of rows q = q_hi + q_lo against the exact key rows at ``row_ptrs`` [N] (0 where
    not ``read``), fp32-accurate as ``scores``: a 16-bit row divided by its power-of-two σ is exact in fp16 (but
    for fp16 subnormals: 2**-25 of the row's max) -- two passes, the query's pieces; a float32 row is split too
    (three)."""
    x, sigma = _scaled_rows(row_ptrs, read, HEAD_DIM, BLOCK_D)
    x_hi, x_lo = split_operand(tl.trans(x))
    if row_ptrs.dtype.element_ty.primitive_bitwidth > 16:
        s = precise_mma(q_hi, q_lo, x_hi, x_lo)
    else:
        s = split_mma(q_hi, q_lo, x_hi)
    return s * sigma[None, :]


@triton.jit
def read_keys(slot, valid, key_table, key_cent, HEAD_DIM: tl.constexpr, KEY_BITS: tl.constexpr,
              QJL_DIM: tl.constexpr, OFF_KEY_CODES: tl.constexpr, OFF_KEY_SIGNS: tl.constexpr,
              OFF_KEY_NORM: tl.constexpr, OFF_KEY_GAMMA: tl.constexpr, BLOCK_D: tl.constexpr,
              BLOCK_QJL: tl.constexpr, KEY_WORD: tl.constexpr, SIGN_WORD: tl.constexpr,
              SLOT_ALIGN: tl.constexpr, LOOKUP: tl.constexpr):
    """The key fields of slots [N] (``reference._read_tokens``): centroid values ŷ [N, D] (float32), norms n [N],
    and with a sketch the signs s [N, M] and γ [N] (else placeholders)."""
    y_key = centroid_values(slot, valid, key_table, key_cent, OFF_KEY_CODES, KEY_BITS, HEAD_DIM, BLOCK_D, KEY_WORD,
                            LOOKUP)
    key_norm = load_norm(slot + OFF_KEY_NORM, valid, SLOT_ALIGN)
    signs, gamma = y_key, key_norm
    if QJL_DIM > 0:
        signs = read_signs(slot, valid, OFF_KEY_SIGNS, QJL_DIM, BLOCK_QJL, SIGN_WORD)
        gamma = load_fp16(slot + OFF_KEY_GAMMA, valid, SLOT_ALIGN)
    return y_key, key_norm, signs, gamma


@triton.jit
def attend_slots(
    acc, l_i, m_i,  # the rows' running state: Σ p w v [R, BLOCK_D], Σ p [R], max [R] (log2 units)
    # rows: q̂ [R, D], coef S q̂ [R, M] as hi + lo fp16 pieces, σ [R] (σ q̂ = Π q · scale·log2e); positions [R],
    # min q_pos
    q_hi, q_lo, p_hi, p_lo, q_sigma, q_pos, q_pos_min,
    k_first, k_lo, k_hi,  # tiles start at k_first, step BLOCK_N; keys k_lo <= k < k_hi are read
    cache_h, bt_row, block_size, stride_cb, stride_cs,  # the KV head's slots, the sequence's block-table row
    key_table, key_cent, value_table, value_cent, sliding_window,
    xcache_h, xbt_row, x_block_size, stride_xb, stride_xs, sink, window,  # protected tokens: see exact_source
    chunk_h, stride_ct, q_start, ctx,
    PROTECT: tl.constexpr, CHUNK_COPIES: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, KEY_BITS: tl.constexpr, VALUE_BITS: tl.constexpr, QJL_DIM: tl.constexpr,
    OFF_KEY_CODES: tl.constexpr, OFF_KEY_SIGNS: tl.constexpr, OFF_KEY_NORM: tl.constexpr,
    OFF_KEY_GAMMA: tl.constexpr, OFF_VALUE_CODES: tl.constexpr, OFF_VALUE_NORM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_QJL: tl.constexpr, KEY_WORD: tl.constexpr, SIGN_WORD: tl.constexpr,
    VALUE_WORD: tl.constexpr, SLOT_ALIGN: tl.constexpr, LOOKUP: tl.constexpr,
):
    """The key loop over packed slots: ``reference._read_tokens`` + ``_scores`` + ``_attend`` for R rows
    and the keys in [k_lo, k_hi), tile by tile. Returns the updated (acc, l_i, m_i)."""
    # keys past win_lo are in some row's window (q - W, q]: (q_pos_min - W, k_hi) for W > 0, none for W = 0
    win_lo = tl.where(window > 0, q_pos_min - window, k_hi)
    for k0 in range(k_first, k_hi, BLOCK_N):
        pos = k0 + tl.arange(0, BLOCK_N)
        valid = (pos >= k_lo) & (pos < k_hi)
        page = tl.load(bt_row + pos // block_size, mask=valid, other=0)
        slot = cache_h + page.to(tl.int64) * stride_cb + (pos % block_size).to(tl.int64) * stride_cs
        visible = causal_visible(pos, valid, q_pos, sliding_window)

        y_key, key_norm, signs, gamma = read_keys(slot, valid, key_table, key_cent, HEAD_DIM, KEY_BITS, QJL_DIM,
                                                  OFF_KEY_CODES, OFF_KEY_SIGNS, OFF_KEY_NORM, OFF_KEY_GAMMA,
                                                  BLOCK_D, BLOCK_QJL, KEY_WORD, SIGN_WORD, SLOT_ALIGN, LOOKUP)
        s = scores(q_hi, q_lo, p_hi, p_lo, y_key, key_norm, signs, gamma, QJL_DIM)
        exact_tile = False
        if PROTECT:  # does any row read a key of this tile exactly?
            exact_tile = (k0 < sink) | (k0 + BLOCK_N - 1 > win_lo)
        if exact_tile:
            read = valid & ((pos < sink) | (pos > win_lo))  # protected for some row
            key_row, value_row = exact_source(pos, read, xbt_row, x_block_size, stride_xb, stride_xs, xcache_h,
                                              chunk_h, stride_ct, q_start, ctx, HEAD_DIM, CHUNK_COPIES)
            use = read[None, :] & protected_mask(pos, q_pos, sink, window)  # [R, N]
            s = tl.where(use, exact_scores(q_hi, q_lo, key_row, read, HEAD_DIM, BLOCK_D), s)
            p, alpha, m_i, l_i = softmax_step(s, visible, m_i, l_i, q_sigma)
            y_value = centroid_values(slot, valid, value_table, value_cent, OFF_VALUE_CODES, VALUE_BITS, HEAD_DIM,
                                      BLOCK_D, VALUE_WORD, LOOKUP)
            acc = accumulate(acc, alpha, tl.where(use, 0.0, p), load_norm(slot + OFF_VALUE_NORM, valid, SLOT_ALIGN),
                             y_value)
            if value_row.dtype.element_ty.primitive_bitwidth > 16:  # float32 copies: split (three MMAs)
                x_value, x_value_sigma = _scaled_rows(value_row, read, HEAD_DIM, BLOCK_D)
            else:  # 16-bit copies in their row scale: exact operands (two MMAs)
                x_value, x_value_sigma = load_rows(value_row, read, HEAD_DIM, BLOCK_D)
            acc += weighted_mma(tl.where(use, p, 0.0), x_value_sigma, x_value)
        else:
            p, alpha, m_i, l_i = softmax_step(s, visible, m_i, l_i, q_sigma)
            y_value = centroid_values(slot, valid, value_table, value_cent, OFF_VALUE_CODES, VALUE_BITS, HEAD_DIM,
                                      BLOCK_D, VALUE_WORD, LOOKUP)
            acc = accumulate(acc, alpha, p, load_norm(slot + OFF_VALUE_NORM, valid, SLOT_ALIGN), y_value)
    return acc, l_i, m_i
