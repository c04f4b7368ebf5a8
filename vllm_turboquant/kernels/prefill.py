"""Causal (chunked) prefill attention over a compressed paged prefix.

Grid (sequence, KV head, query tile). A program takes TOK consecutive new tokens of one
sequence and all G query heads of the KV head's group, flattened into R = TOK * G rows (row
r = token r // G, head r % G), so every slot or fresh key it reads serves the whole group.
Two key loops share one online softmax:

1. the prefix, read from slots (with ``compressed_chunk`` the chunk itself too): the tile body
   decode runs (``tile.attend_slots``), with a causal / sliding-window mask per row;
2. without ``compressed_chunk``, the chunk's own tokens, exact: a FlashAttention loop on the
   fresh K and the pre-rotated fresh V (Π_v v = σ_v v̂, ``rotate_rows``), fp16 operands (a float32
   q or K as two fp16 pieces: fp32-accurate scores), fp32 accumulation. Its scores are
   ⟨q, k⟩ - ⟨q, μ⟩ = ⟨Π q, Π (k - μ)⟩: the key mean that slot scores leave out (``tile``) is left
   out here too, so both loops score on the same scale and merge in the running (max, sum) -- the
   log-sum-exp merge happens in registers. Raw vectors are operands in their rows' power-of-two
   scales (``common.row_scale``), as exact rows are in the tile body: q and each key tile divided
   in registers, the key scales multiply the scores and the query's the softmax
   (``tile.softmax_step``), v̂ is weighted by σ_v like a slot by its norm, so any finite K / V / q
   is safe.

Values of both loops are accumulated in the rotated value space; the tile is un-rotated once at
the end, o = Π_vᵀ acc / l (fp32-accurate). Loops only visit keys some row can see.

Protected tokens (``PROTECT``, see ``vllm_turboquant.protected``): loop 1 reads a key from its exact
copy where the row's query protects it (``tile.exact_source``) -- prefix keys from the exact-copy
cache, and with ``compressed_chunk`` the chunk's own keys from copies made from its K/V exactly as
``write_cache`` makes them (``store.chunk_copies``).
Loop 2 (the chunk's fresh K/V, exact anyway) is unchanged. S = W = 0 (or no ``protected``)
compiles all of it out.

The cache is ``[num_blocks, block_size, H, slot_bytes]`` with any strides for the first three
dims: the slot of (block, offset, KV head) is read at ``block * stride_cb + offset * stride_cs +
head * stride_ch`` (64-bit).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..layout import CacheFormat
from .common import (
    DEFAULT_LOOKUP,
    OPERAND_TORCH_DTYPE,
    attention_setup,
    launch_config,
    load_table,
    next_pow2,
    precise_mma,
    row_scale,
    split_operand,
    unrotate_store,
)
from .rotate import rotate_queries, rotate_rows
from .store import chunk_copies
from .tile import accumulate, attend_slots, causal_visible, load_pieces, mma, softmax_step, split_mma


@triton.jit
def _attend_fresh(acc, l_i, m_i, q, q_sigma, q_mu, q_pos, k_lo, k_hi, ctx, q_start, key_h, stride_kt, value_rot_h,
                  value_sigma_h, stride_vt, stride_st, sliding_window, WIDE_QUERY: tl.constexpr,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Loop 2: the chunk's own keys at positions [k_lo, k_hi) (rows q_start + pos - ctx of the packed key /
    rotated value tensors), exact, on the rows' running softmax. Rows q / s (float32) and ⟨q, μ⟩ / s, with
    σ = s·scale·log2e (``q_sigma``): the row scale of ``rotate_queries``. Values: v̂ (fp16) and σ_v at
    ``value_sigma_h``.

    A 16-bit q / s or k / σ_k is exact in fp16 (a power-of-two scale of a bf16 / fp16 vector); a float32 one
    (WIDE_QUERY; the key pointer's type) goes in as hi + lo pieces (``tile.scores`` says why), so the scores are
    float32-accurate as the reference's, at no cost for 16-bit models (the choice is made at compile time)."""
    WIDE_KEY: tl.constexpr = key_h.dtype.element_ty.primitive_bitwidth > 16
    q_hi, q_lo = split_operand(q)
    d = tl.arange(0, BLOCK_D)
    for k0 in range(k_lo, k_hi, BLOCK_N):
        pos = k0 + tl.arange(0, BLOCK_N)
        valid = pos < k_hi
        kt = (q_start + pos - ctx).to(tl.int64)
        kv_mask = valid[:, None] & (d < HEAD_DIM)[None, :]
        k = tl.load(key_h + kt[:, None] * stride_kt + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        k_sigma, k_inv = row_scale(k)  # k = k_sigma k̂, k̂ an fp16 operand (or two) whatever k
        key_hi, key_lo = split_operand(tl.trans(k * k_inv[:, None]))
        if WIDE_KEY:
            s = precise_mma(q_hi, q_lo, key_hi, key_lo)
        elif WIDE_QUERY:
            s = split_mma(q_hi, q_lo, key_hi)
        else:
            s = mma(q_hi, key_hi)
        s = s * k_sigma[None, :] - q_mu[:, None]
        p, alpha, m_i, l_i = softmax_step(s, causal_visible(pos, valid, q_pos, sliding_window), m_i, l_i, q_sigma)
        v = tl.load(value_rot_h + kt[:, None] * stride_vt + d[None, :], mask=kv_mask, other=0.0)
        acc = accumulate(acc, alpha, p, tl.load(value_sigma_h + kt * stride_st, mask=valid, other=0.0), v)
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["stride_bt", "stride_xbt"])
def _prefill_kernel(
    cache_ptr, block_table_ptr, query_start_ptr, seq_lens_ptr,
    query_ptr, key_ptr, value_rot_ptr, value_sigma_ptr,  # query (T, Hq, D); key (T, H, D); Π_v v = σ_v v̂: (T, H, D)
    # fp16, (T, H) f32
    # q̂ (T, Hq, D), coef S q̂ (T, Hq, M): hi + lo fp16 pieces; σ, ⟨q, μ⟩ / s (T, Hq) f32
    q_rot_ptr, q_rot_lo_ptr, q_proj_ptr, q_proj_lo_ptr, q_sigma_ptr, q_mu_ptr,
    key_cent_ptr, value_cent_ptr, value_rot_mat_ptr, out_ptr,
    xcache_ptr, xbt_ptr, stride_xbt, x_block_size, stride_xb, stride_xs, stride_xh, sink, window,  # PROTECT
    chunk_copies_ptr, stride_ct, stride_cth,  # the chunk's own copies (T, H, 2 D) (PROTECT and COMPRESSED_CHUNK)
    stride_qt, stride_qh, stride_kt, stride_kh, stride_ot, stride_oh,
    stride_bt, stride_cb, stride_cs, stride_ch, num_kv_heads, block_size, sliding_window,
    G: tl.constexpr, TOK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    COMPRESSED_CHUNK: tl.constexpr, PROTECT: tl.constexpr,
    HEAD_DIM: tl.constexpr, KEY_BITS: tl.constexpr, VALUE_BITS: tl.constexpr, QJL_DIM: tl.constexpr,
    OFF_KEY_CODES: tl.constexpr, OFF_KEY_SIGNS: tl.constexpr, OFF_KEY_NORM: tl.constexpr,
    OFF_KEY_GAMMA: tl.constexpr, OFF_VALUE_CODES: tl.constexpr, OFF_VALUE_NORM: tl.constexpr,
    SLOT_BYTES: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_QJL: tl.constexpr, BLOCK_OUT: tl.constexpr,
    KEY_WORD: tl.constexpr, SIGN_WORD: tl.constexpr, VALUE_WORD: tl.constexpr, SLOT_ALIGN: tl.constexpr,
    LOOKUP: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    i0 = tl.program_id(2) * TOK
    q_start = tl.load(query_start_ptr + b)
    q_len = tl.load(query_start_ptr + b + 1) - q_start
    if i0 >= q_len:
        return
    ctx = tl.load(seq_lens_ptr + b) - q_len  # cached tokens before this chunk

    r = tl.arange(0, BLOCK_R)
    i = i0 + r // G
    r_ok = (r < TOK * G) & (i < q_len)
    q_pos = ctx + i  # [R]
    hq = h * G + r % G
    t = (q_start + i).to(tl.int64)  # packed token index of each row
    row = t * num_kv_heads * G + hq
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    last_pos = ctx + tl.minimum(i0 + TOK, q_len) - 1
    lo = tl.where(sliding_window > 0, tl.maximum(ctx + i0 - sliding_window + 1, 0), 0)

    # -- 1. keys from slots: the prefix (and the chunk when COMPRESSED_CHUNK) ----------
    q_hi, q_lo = load_pieces(q_rot_ptr, q_rot_lo_ptr, row, r_ok, HEAD_DIM, BLOCK_D)
    p_hi, p_lo = q_hi, q_lo
    if QJL_DIM > 0:
        p_hi, p_lo = load_pieces(q_proj_ptr, q_proj_lo_ptr, row, r_ok, QJL_DIM, BLOCK_QJL)
    q_sigma = tl.load(q_sigma_ptr + row, mask=r_ok, other=1.0)
    key_cent = key_cent_ptr + h * (1 << KEY_BITS)
    value_cent = value_cent_ptr + h * (1 << VALUE_BITS)
    slot_hi = ctx
    if COMPRESSED_CHUNK:
        slot_hi = last_pos + 1
    acc, l_i, m_i = attend_slots(
        tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32), tl.zeros((BLOCK_R,), dtype=tl.float32),
        tl.full((BLOCK_R,), float("-inf"), dtype=tl.float32),
        q_hi, q_lo, p_hi, p_lo, q_sigma, q_pos, ctx + i0, lo, lo, slot_hi,
        cache_ptr + h.to(tl.int64) * stride_ch, block_table_ptr + b.to(tl.int64) * stride_bt, block_size,
        stride_cb, stride_cs, load_table(key_cent, KEY_BITS), key_cent, load_table(value_cent, VALUE_BITS),
        value_cent, sliding_window,
        xcache_ptr + h.to(tl.int64) * stride_xh, xbt_ptr + b.to(tl.int64) * stride_xbt, x_block_size, stride_xb,
        stride_xs, sink, window, chunk_copies_ptr + h.to(tl.int64) * stride_cth, stride_ct, q_start, ctx,
        PROTECT, COMPRESSED_CHUNK, BLOCK_N, HEAD_DIM, KEY_BITS, VALUE_BITS, QJL_DIM,
        OFF_KEY_CODES, OFF_KEY_SIGNS, OFF_KEY_NORM, OFF_KEY_GAMMA, OFF_VALUE_CODES, OFF_VALUE_NORM,
        BLOCK_D, BLOCK_QJL, KEY_WORD, SIGN_WORD, VALUE_WORD, SLOT_ALIGN, LOOKUP,
    )

    # -- 2. the chunk's own keys, exact ------------------------------------------------
    if not COMPRESSED_CHUNK:
        q = tl.load(query_ptr + t[:, None] * stride_qt + hq[:, None] * stride_qh + d[None, :],
                    mask=r_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        _, q_inv = row_scale(q)  # 1 / s: the power of two rotate_queries divided the row by (σ = s·scale·log2e)
        acc, l_i, m_i = _attend_fresh(acc, l_i, m_i, q * q_inv[:, None], q_sigma,
                                      tl.load(q_mu_ptr + row, mask=r_ok, other=0.0), q_pos,
                                      tl.maximum(ctx, lo), last_pos + 1, ctx, q_start, key_ptr + h * stride_kh,
                                      stride_kt, value_rot_ptr + h * HEAD_DIM, value_sigma_ptr + h,
                                      num_kv_heads * HEAD_DIM, num_kv_heads, sliding_window,
                                      query_ptr.dtype.element_ty.primitive_bitwidth > 16, HEAD_DIM, BLOCK_D, BLOCK_N)

    acc = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    unrotate_store(acc, value_rot_mat_ptr + h * HEAD_DIM * HEAD_DIM, out_ptr + t * stride_ot + hq * stride_oh,
                   r_ok, HEAD_DIM, BLOCK_D, BLOCK_OUT)


def prefill_config(head_dim: int, group: int) -> dict[str, int]:
    """Rows per program (BLOCK_R = tokens x group), key tile, warps and stages per head size. Chosen from
    ``benchmarks/kernel_report.py`` on sm_90 with the fp32-accurate value products: no spills without protected
    tokens (but 4 B with QJL at d = 128), at most 32 B with them; the earlier (64, 32) tiles spilled 56-488 B."""
    rows, keys = (32, 64) if head_dim <= 64 else (32, 32) if head_dim <= 128 else (16, 16)
    return dict(BLOCK_R=max(rows, next_pow2(group)), BLOCK_N=keys, num_warps=8, num_stages=2)


def prefill(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cache: torch.Tensor,
            block_table: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
            tables, fmt: CacheFormat | str, scale: float, sliding_window: int | None = None,
            compressed_chunk: bool = False, *, protected=None, max_query_len: int | None = None,
            out: torch.Tensor | None = None, lookup_mode: str = DEFAULT_LOOKUP, config: dict | None = None
            ) -> torch.Tensor:
    """Causal attention of packed new tokens over their compressed prefix (``ops.AttentionOps.prefill``
    semantics).

    Beyond the contract: ``max_query_len`` (a host int; avoids reading query_start_loc back), ``out``
    (default a new float32 (T, Hq, d); rows no sequence owns are left untouched), ``lookup_mode`` and
    ``config`` (overrides of ``prefill_config``).
    """
    T, Hq, D = query.shape
    B = seq_lens.shape[0]
    if query_start_loc.shape != (B + 1,) or key.shape[0] != T or value.shape[0] != T or block_table.shape[0] < B:
        raise ValueError(f"prefill of {B} sequences and {T} query rows needs query_start_loc ({B + 1},), key and "
                         f"value of {T} rows and >= {B} block-table rows; got {tuple(query_start_loc.shape)}, "
                         f"{key.shape[0]}, {value.shape[0]}, {block_table.shape[0]}")
    a = attention_setup(query, cache, tables, fmt, protected, B, lookup_mode)
    fmt, H, G, protect = a.fmt, a.num_kv_heads, a.group, a.constants["PROTECT"]
    if out is None:
        out = torch.empty(T, Hq, D, dtype=torch.float32, device=query.device)
    if T == 0 or B == 0:
        return out
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    q_rot, q_sigma, q_proj, q_mu = rotate_queries(query, tables, fmt, scale, mean=True)
    q_proj = q_rot if q_proj is None else q_proj  # (unused without a sketch)
    if compressed_chunk:
        value_rot, value_sigma = q_rot[0], q_sigma  # unused
    else:
        value_rot, value_sigma, _, _ = rotate_rows(value, tables.value_rotation, dtype=OPERAND_TORCH_DTYPE)
    key = key if key.stride(-1) == 1 else key.contiguous()
    query = query if query.stride(-1) == 1 else query.contiguous()
    copies = chunk_copies(key, value, tables, fmt, protected) if protect and compressed_chunk else None
    cfg = launch_config("prefill", prefill_config(D, G), config)
    tok = cfg["BLOCK_R"] // G
    _prefill_kernel[(B, H, triton.cdiv(max_query_len, tok))](
        cache, block_table, query_start_loc, seq_lens, query, key, value_rot, value_sigma,
        q_rot[0], q_rot[1], q_proj[0], q_proj[1], q_sigma, q_mu,
        tables.key_centroids, tables.value_centroids, tables.value_rotation, out,
        *a.protected,
        *((copies, copies.stride(0), copies.stride(1)) if copies is not None else (cache, 0, 0)),
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), out.stride(0), out.stride(1),
        block_table.stride(0), *a.strides, H, cache.shape[1],
        sliding_window or 0,
        G=G, TOK=tok, COMPRESSED_CHUNK=compressed_chunk, **a.constants, BLOCK_OUT=min(a.constants["BLOCK_D"], 64),
        **cfg,
    )
    return out
