"""Paged decode attention straight from packed TurboQuant slots (split-K / flash-decoding).

Three launches per step:

1. ``rotate_queries`` (pre-kernel): c Π q = σ q̂ and p = coef S q̂ (c = scale·log2 e, coef the QJL
   coefficient; q̂, p in their row's power-of-two scale as hi + lo fp16 pieces, so that scores are
   fp32-accurate; σ float32), once per query head.
2. ``_decode_split_kernel``, grid (batch, KV head, split): one program owns one KV head of one
   sequence and a contiguous run of its key tiles, and serves *all G query heads of the GQA
   group* as the rows of its tiles (``tile.attend_slots``, the tile body decode and prefill
   share). Each slot is therefore loaded exactly once per step and KV head: the splits of a
   sequence partition its tiles, and no other program touches that head.
3. ``_decode_reduce_kernel``, grid (batch, KV head): merges the splits' (max, sum, acc) and
   un-rotates once per query head, o = Π_vᵀ acc / l.

The split count is a *runtime* argument (not a constexpr): one compiled split kernel and one
reduce kernel serve every batch size. ``choose_num_splits`` picks it from batch x KV heads x
context: enough programs to fill the GPU a few times over, but no split shorter than
``MIN_SPLIT_TOKENS`` of the longest possible context. The context is a host-side bound
(``max_seq_len`` when the caller knows it, else the block table's width x block size), never
read from the device, so a captured CUDA graph keeps a grid that is right for any sequence
lengths it replays with: each split finds its tiles from the device-side ``seq_lens``, and a
split past a short sequence writes an empty partial.

Protected tokens (``PROTECT``, see ``vllm_turboquant.protected``): a key at position k is
protected for the query (at seq_len - 1) when k < S or k > seq_len - 1 - W, and read from its exact
copy inside the same online softmax (``tile``). S = W = 0 (or no ``protected``) compiles that code out.

The cache is ``[num_blocks, block_size, H, slot_bytes]`` with any strides for the first three
dims: the slot of (block, offset, KV head) is read at ``block * stride_cb + offset * stride_cs +
head * stride_ch`` (64-bit). vLLM's [num_blocks, H, block_size, slot_bytes] cache, permuted,
makes a KV head's tokens adjacent within a block.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..layout import CacheFormat
from .common import DEFAULT_LOOKUP, attention_setup, launch_config, load_table, next_pow2, unrotate_store
from .rotate import rotate_queries
from .tile import attend_slots, load_pieces

#: Most splits per sequence (the reduce kernel reads them as one tile).
MAX_SPLITS = 64
#: A split reads at least this many tokens of the longest possible context.
MIN_SPLIT_TOKENS = 256
#: Programs per SM a launch aims for (programs are memory-bound: more of them hide latency).
WAVES = 4


@triton.jit(do_not_specialize=["num_splits", "stride_bt", "stride_xbt"])
def _decode_split_kernel(
    cache_ptr, block_table_ptr, seq_lens_ptr,
    # q̂ (B, Hq, D), coef S q̂ (B, Hq, M): hi + lo fp16 pieces; σ (B, Hq) f32: σ q̂ = Π q · scale·log2e
    q_rot_ptr, q_rot_lo_ptr, q_proj_ptr, q_proj_lo_ptr, q_sigma_ptr,
    key_cent_ptr, value_cent_ptr,  # (H, 2**KEY_BITS), (H, 2**VALUE_BITS)
    part_acc_ptr, part_max_ptr, part_sum_ptr,  # (B, Hq, num_splits, BLOCK_D), (B, Hq, num_splits) x 2
    xcache_ptr, xbt_ptr, stride_xbt, x_block_size, stride_xb, stride_xs, stride_xh, sink, window,  # PROTECT
    stride_bt, stride_cb, stride_cs, stride_ch, num_kv_heads, block_size, num_splits, sliding_window,
    PROTECT: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, KEY_BITS: tl.constexpr, VALUE_BITS: tl.constexpr, QJL_DIM: tl.constexpr,
    OFF_KEY_CODES: tl.constexpr, OFF_KEY_SIGNS: tl.constexpr, OFF_KEY_NORM: tl.constexpr,
    OFF_KEY_GAMMA: tl.constexpr, OFF_VALUE_CODES: tl.constexpr, OFF_VALUE_NORM: tl.constexpr,
    SLOT_BYTES: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_QJL: tl.constexpr, KEY_WORD: tl.constexpr,
    SIGN_WORD: tl.constexpr, VALUE_WORD: tl.constexpr, SLOT_ALIGN: tl.constexpr, LOOKUP: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    # the query sits at seq_len - 1 and sees the last sliding_window tokens (0 = all)
    lo = tl.where(sliding_window > 0, tl.maximum(seq_len - sliding_window, 0), 0)
    tile_lo = lo // BLOCK_N
    per_split = tl.cdiv(tl.cdiv(seq_len, BLOCK_N) - tile_lo, num_splits)
    k_first = (tile_lo + split * per_split) * BLOCK_N
    k_stop = tl.minimum(k_first + per_split * BLOCK_N, seq_len)

    g = tl.arange(0, BLOCK_G)
    g_ok = g < G
    d = tl.arange(0, BLOCK_D)
    row = b.to(tl.int64) * num_kv_heads * G + h * G + g  # query-head rows of this group
    q_hi, q_lo = load_pieces(q_rot_ptr, q_rot_lo_ptr, row, g_ok, HEAD_DIM, BLOCK_D)  # [G, D]
    p_hi, p_lo = q_hi, q_lo
    if QJL_DIM > 0:
        p_hi, p_lo = load_pieces(q_proj_ptr, q_proj_lo_ptr, row, g_ok, QJL_DIM, BLOCK_QJL)  # [G, M]
    q_sigma = tl.load(q_sigma_ptr + row, mask=g_ok, other=1.0)
    key_cent = key_cent_ptr + h * (1 << KEY_BITS)
    value_cent = value_cent_ptr + h * (1 << VALUE_BITS)
    q_pos = tl.zeros((BLOCK_G,), dtype=tl.int32) + (seq_len - 1)

    acc, l_i, m_i = attend_slots(
        tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32), tl.zeros((BLOCK_G,), dtype=tl.float32),
        tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32),
        q_hi, q_lo, p_hi, p_lo, q_sigma, q_pos, seq_len - 1, k_first, tl.maximum(k_first, lo), k_stop,
        cache_ptr + h.to(tl.int64) * stride_ch, block_table_ptr + b.to(tl.int64) * stride_bt, block_size,
        stride_cb, stride_cs, load_table(key_cent, KEY_BITS), key_cent, load_table(value_cent, VALUE_BITS),
        value_cent, sliding_window,
        xcache_ptr + h.to(tl.int64) * stride_xh, xbt_ptr + b.to(tl.int64) * stride_xbt, x_block_size, stride_xb,
        stride_xs, sink, window, xcache_ptr, 0, 0, seq_len,  # every key is cached: no chunk copies
        PROTECT, False, BLOCK_N, HEAD_DIM, KEY_BITS, VALUE_BITS, QJL_DIM,
        OFF_KEY_CODES, OFF_KEY_SIGNS, OFF_KEY_NORM, OFF_KEY_GAMMA, OFF_VALUE_CODES, OFF_VALUE_NORM,
        BLOCK_D, BLOCK_QJL, KEY_WORD, SIGN_WORD, VALUE_WORD, SLOT_ALIGN, LOOKUP,
    )

    part = row * num_splits + split
    tl.store(part_acc_ptr + part[:, None] * BLOCK_D + d[None, :], acc, mask=g_ok[:, None])
    tl.store(part_max_ptr + part, m_i, mask=g_ok)
    tl.store(part_sum_ptr + part, l_i, mask=g_ok)


@triton.jit(do_not_specialize=["num_splits"])
def _decode_reduce_kernel(
    part_acc_ptr, part_max_ptr, part_sum_ptr, value_rot_ptr, out_ptr,
    stride_ob, stride_oh, num_kv_heads, num_splits,
    G: tl.constexpr, MAX_SPLITS: tl.constexpr, BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_OUT: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    g = tl.arange(0, BLOCK_G)
    g_ok = g < G
    sp = tl.arange(0, MAX_SPLITS)
    row = b.to(tl.int64) * num_kv_heads * G + h * G + g
    part = row[:, None] * num_splits + sp[None, :]  # [G, SPLITS]
    ok = g_ok[:, None] & (sp < num_splits)[None, :]
    m = tl.load(part_max_ptr + part, mask=ok, other=float("-inf"))
    m_all = tl.max(m, axis=1)
    m_ref = tl.where(m_all == float("-inf"), 0.0, m_all)
    l_all = tl.sum(tl.exp2(m - m_ref[:, None]) * tl.load(part_sum_ptr + part, mask=ok, other=0.0), axis=1)

    d = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    for split in range(num_splits):
        p = row * num_splits + split
        w = tl.exp2(tl.load(part_max_ptr + p, mask=g_ok, other=float("-inf")) - m_ref)
        acc += w[:, None] * tl.load(part_acc_ptr + p[:, None] * BLOCK_D + d[None, :], mask=g_ok[:, None], other=0.0)
    acc = acc / tl.where(l_all > 0, l_all, 1.0)[:, None]  # an empty sequence keeps acc == 0

    out_rows = out_ptr + b.to(tl.int64) * stride_ob + (h * G + g) * stride_oh
    unrotate_store(acc, value_rot_ptr + h * HEAD_DIM * HEAD_DIM, out_rows, g_ok, HEAD_DIM, BLOCK_D, BLOCK_OUT)


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def device_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 elsewhere (the interpreter)."""
    if device.type != "cuda":
        return 1
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def choose_num_splits(batch: int, num_kv_heads: int, context: int, num_sms: int) -> int:
    """Splits per sequence for a decode launch, from host-side shapes only (CUDA-graph safe).

    Enough (sequence, KV head, split) programs for ``WAVES`` per SM, no more than the longest
    possible ``context`` can give ``MIN_SPLIT_TOKENS`` each (short contexts launch no empty splits),
    at most ``MAX_SPLITS``, at least 1."""
    wanted = triton.cdiv(WAVES * max(1, num_sms), max(1, batch * num_kv_heads))
    useful = triton.cdiv(max(1, context), MIN_SPLIT_TOKENS)
    return max(1, min(MAX_SPLITS, wanted, useful))


def default_num_splits(batch: int, num_kv_heads: int, device: torch.device, context: int = 1 << 20) -> int:
    """``choose_num_splits`` on ``device`` (its SM count); ``context`` defaults to 'long'."""
    return choose_num_splits(batch, num_kv_heads, context, device_sms(device))


def decode_config(head_dim: int) -> dict[str, int]:
    """Tile sizes per head size: BLOCK_N tokens per tile, warps and pipeline stages for the split kernel."""
    if head_dim <= 128:  # sm_90: 128 registers, no spills (benchmarks/kernel_report.py)
        return dict(BLOCK_N=64, num_warps=8, num_stages=2)
    return dict(BLOCK_N=32, num_warps=8, num_stages=2)


def paged_decode(query: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                 tables, fmt: CacheFormat | str, scale: float, sliding_window: int | None = None,
                 num_splits: int | None = None, *, protected=None, out: torch.Tensor | None = None,
                 max_seq_len: int | None = None, lookup_mode: str = DEFAULT_LOOKUP,
                 config: dict | None = None) -> torch.Tensor:
    """One new query per sequence against its cached tokens (``ops.AttentionOps.paged_decode`` semantics).

    Beyond the contract: ``num_splits`` (default ``choose_num_splits`` from batch, KV heads and
    ``max_seq_len`` -- a host int bound on seq_lens, e.g. vLLM's ``max_seq_len``; default the block
    table's width x block size), ``out`` (default a new float32 (B, Hq, d)), ``lookup_mode`` ("gather"
    or "load") and ``config`` (overrides of ``decode_config``: BLOCK_N, num_warps, num_stages).
    Never reads device data back to the host.
    """
    B, Hq, D = query.shape
    a = attention_setup(query, cache, tables, fmt, protected, B, lookup_mode)
    fmt, H, G, block_d = a.fmt, a.num_kv_heads, a.group, a.constants["BLOCK_D"]
    if out is None:
        out = torch.empty(B, Hq, D, dtype=torch.float32, device=query.device)
    if B == 0:
        return out
    if num_splits is None:
        context = max_seq_len if max_seq_len is not None else block_table.shape[1] * cache.shape[1]
        num_splits = choose_num_splits(B, H, context, device_sms(query.device))
    if not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits={num_splits}; accepted: 1 .. {MAX_SPLITS}")
    q_rot, q_sigma, q_proj, _ = rotate_queries(query, tables, fmt, scale)
    q_proj = q_rot if q_proj is None else q_proj  # (unused without a sketch)
    part_acc = torch.empty(B, Hq, num_splits, block_d, dtype=torch.float32, device=query.device)
    part_max = torch.empty(B, Hq, num_splits, dtype=torch.float32, device=query.device)
    part_sum = torch.empty_like(part_max)
    block_g = max(16, next_pow2(G))
    _decode_split_kernel[(B, H, num_splits)](
        cache, block_table, seq_lens, q_rot[0], q_rot[1], q_proj[0], q_proj[1], q_sigma,
        tables.key_centroids, tables.value_centroids, part_acc, part_max, part_sum,
        *a.protected, block_table.stride(0), *a.strides, H, cache.shape[1], num_splits,
        sliding_window or 0,
        G=G, BLOCK_G=block_g, **a.constants, **launch_config("decode", decode_config(D), config),
    )
    _decode_reduce_kernel[(B, H)](
        part_acc, part_max, part_sum, tables.value_rotation, out,
        out.stride(0), out.stride(1), H, num_splits,
        G=G, MAX_SPLITS=MAX_SPLITS, BLOCK_G=block_g, HEAD_DIM=D, BLOCK_D=block_d,
        BLOCK_OUT=min(block_d, 64 if block_d <= 128 else 32), num_warps=4 if block_d <= 128 else 8,
    )
    return out
