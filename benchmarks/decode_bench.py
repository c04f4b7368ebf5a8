"""Decode attention: TurboQuant paged decode vs a bf16 paged decode, same run, same shapes.

The baseline is a plain bf16 Triton flash-decoding kernel with the *same grid*
(batch x KV head x split, the GQA group as the rows of one program) reading a
vLLM-style bf16 cache ([blocks, block_size, H, d] for K and for V). Both are timed
with ``triton.testing.do_bench_cudagraph`` (median; CUDA graphs, so small points are
not launch-bound). Caches hold random bytes with valid norms: decode cost does not
depend on the values. (``gpu_bench.py`` adds SDPA, copy bandwidth and more.)

Our cache is laid out as vLLM serves it by default (``--cache-layout vllm``):
allocated uint8 [blocks, H, block_size, slot_bytes] and passed permuted to
[blocks, block_size, H, slot_bytes], so a KV head's tokens are adjacent within a
block. ``--cache-layout contiguous`` benchmarks a contiguous [blocks, block_size, H,
slot_bytes] cache instead (tokens H slots apart).

    python benchmarks/decode_bench.py                      # full sweep (H100: ~2 min)
    python benchmarks/decode_bench.py --quick              # a few points
    python benchmarks/decode_bench.py --contexts 8192 --batches 1,16 --gqa 8 --presets turboquant3
    python benchmarks/decode_bench.py --quick --cache-layout contiguous

Columns: time per decode step (us), effective GB/s of cache bytes read
(slot bytes for ours, 2 x d x 2 bytes for bf16), speed-up over bf16.
Without CUDA it runs one tiny config under the Triton interpreter (a smoke test
of this script; its timings mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

if not torch.cuda.is_available():  # must precede the first triton import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from vllm_turboquant.kernels.decode import default_num_splits, paged_decode  # noqa: E402
from vllm_turboquant.layout import slot_layout  # noqa: E402
from vllm_turboquant.protected import ProtectedTokens  # noqa: E402
from vllm_turboquant.registry import CodebookRegistry  # noqa: E402

LOG2E = 1.4426950408889634


# ---------------------------------------------------------------------------
# bf16 baseline: same grid, same split/reduce scheme, no quantisation
# ---------------------------------------------------------------------------

@triton.jit
def _bf16_split_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_table_ptr, seq_lens_ptr,
                       part_acc_ptr, part_max_ptr, part_sum_ptr,
                       stride_bt, num_kv_heads, block_size, score_scale,
                       G: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
                       HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    num_tiles = tl.cdiv(seq_len, BLOCK_N)
    per_split = tl.cdiv(num_tiles, NUM_SPLITS)
    tile_start = split * per_split
    tile_stop = tl.minimum(tile_start + per_split, num_tiles)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, HEAD_DIM)
    row = b.to(tl.int64) * num_kv_heads * G + h * G + g
    q = tl.load(q_ptr + row[:, None] * HEAD_DIM + d[None, :], mask=(g < G)[:, None], other=0.0)
    if UPCAST:  # the interpreter's bf16 tl.dot is wrong: compute in fp32 there
        q = q.to(tl.float32)
    m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, HEAD_DIM), dtype=tl.float32)
    for tile in range(tile_start, tile_stop):
        pos = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        valid = pos < seq_len
        page = tl.load(block_table_ptr + b.to(tl.int64) * stride_bt + pos // block_size, mask=valid, other=0)
        off = ((page.to(tl.int64) * block_size + pos % block_size) * num_kv_heads + h) * HEAD_DIM
        k = tl.load(k_cache_ptr + off[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k)) * score_scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        w = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(w, axis=1)
        m_i = m_new
        v = tl.load(v_cache_ptr + off[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        if UPCAST:
            acc = acc * alpha[:, None] + tl.dot(w, v.to(tl.float32))
        else:
            acc = acc * alpha[:, None] + tl.dot(w.to(tl.bfloat16), v)
    part = row * NUM_SPLITS + split
    tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + d[None, :], acc, mask=(g < G)[:, None])
    tl.store(part_max_ptr + part, m_i, mask=g < G)
    tl.store(part_sum_ptr + part, l_i, mask=g < G)


@triton.jit
def _bf16_reduce_kernel(part_acc_ptr, part_max_ptr, part_sum_ptr, out_ptr,
                        NUM_SPLITS: tl.constexpr, BLOCK_SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # one query head
    sp = tl.arange(0, BLOCK_SPLITS)
    ok = sp < NUM_SPLITS
    m = tl.load(part_max_ptr + row * NUM_SPLITS + sp, mask=ok, other=float("-inf"))
    m_all = tl.max(m, axis=0)
    m_ref = tl.where(m_all == float("-inf"), 0.0, m_all)
    w = tl.exp2(m - m_ref)
    l_all = tl.sum(w * tl.load(part_sum_ptr + row * NUM_SPLITS + sp, mask=ok, other=0.0), axis=0)
    d = tl.arange(0, HEAD_DIM)
    acc = tl.load(part_acc_ptr + (row * NUM_SPLITS + sp)[:, None] * HEAD_DIM + d[None, :], mask=ok[:, None],
                  other=0.0)
    out = tl.sum(w[:, None] * acc, axis=0) / tl.where(l_all > 0, l_all, 1.0)
    tl.store(out_ptr + row * HEAD_DIM + d, out.to(tl.bfloat16))


def bf16_paged_decode(query, k_cache, v_cache, block_table, seq_lens, scale, num_splits):
    """query (B, Hq, d) bf16; k_cache/v_cache bf16 [blocks, block_size, H, d]. Returns bf16 (B, Hq, d)."""
    B, Hq, D = query.shape
    H = k_cache.shape[2]
    G = Hq // H
    part_acc = torch.empty(B * Hq * num_splits, D, dtype=torch.float32, device=query.device)
    part_max = torch.empty(B * Hq * num_splits, dtype=torch.float32, device=query.device)
    part_sum = torch.empty_like(part_max)
    _bf16_split_kernel[(B, H, num_splits)](
        query, k_cache, v_cache, block_table, seq_lens, part_acc, part_max, part_sum,
        block_table.stride(0), H, k_cache.shape[1], scale * LOG2E,
        G=G, NUM_SPLITS=num_splits, BLOCK_G=max(16, triton.next_power_of_2(G)),
        BLOCK_N=64 if D <= 128 else 32, HEAD_DIM=D, UPCAST=os.environ.get("TRITON_INTERPRET", "0") not in ("0", ""),
        num_warps=4 if D <= 128 else 8)
    out = torch.empty_like(query)
    _bf16_reduce_kernel[(B * Hq,)](part_acc, part_max, part_sum, out, NUM_SPLITS=num_splits,
                                   BLOCK_SPLITS=triton.next_power_of_2(num_splits), HEAD_DIM=D)
    return out


# ---------------------------------------------------------------------------
# Harness
# ---------------------------------------------------------------------------

def random_slots(num_blocks, block_size, H, layout, device, cache_layout="vllm"):
    """Random code/sign bytes; norm and gamma fields = fp16 1.0 (random fp16 bytes could be inf/NaN).

    Returns a [num_blocks, block_size, H, slot_bytes] cache: with ``cache_layout="vllm"`` a
    permuted view of vLLM's [num_blocks, H, block_size, slot_bytes] allocation, else contiguous.
    """
    if cache_layout == "vllm":
        cache = torch.randint(0, 256, (num_blocks, H, block_size, layout.slot_bytes), dtype=torch.uint8,
                              device=device).permute(0, 2, 1, 3)
    elif cache_layout == "contiguous":
        cache = torch.randint(0, 256, (num_blocks, block_size, H, layout.slot_bytes), dtype=torch.uint8,
                              device=device)
    else:
        raise ValueError(f"unknown cache layout {cache_layout!r}")
    one = torch.tensor([1.0], dtype=torch.float16).view(torch.uint8).to(device)
    fields = [layout.key_norm, layout.value_norm] + ([layout.key_gamma] if layout.has_qjl else [])
    for off in fields:
        cache[..., off:off + 2] = one
    return cache


def check_baseline(device) -> float:
    """Max error of the bf16 baseline against dense float32 attention on a small ragged batch."""
    from vllm_turboquant.reference import dense_attention
    B, H, G, D, bs, lens = 3, 2, 4, 64, 16, [100, 37, 1]
    k_cache = torch.randn(B * 7, bs, H, D, device=device).to(torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    block_table = torch.randperm(B * 7, device=device).reshape(B, 7).int()
    query = torch.randn(B, H * G, D, device=device).to(torch.bfloat16)
    out = bf16_paged_decode(query, k_cache, v_cache, block_table, torch.tensor(lens, device=device).int(),
                            D ** -0.5, 2)
    err = 0.0
    for b, n in enumerate(lens):
        pos = torch.arange(n, device=device)
        blk = block_table[b, pos // bs].long()
        want = dense_attention(query[b:b + 1], k_cache[blk, pos % bs], v_cache[blk, pos % bs], D ** -0.5,
                               torch.tensor([n - 1], device=device))
        err = max(err, (out[b].float() - want[0]).abs().max().item())
    if err > 2e-2:
        raise AssertionError(f"bf16 baseline kernel is wrong: max error {err:.3g}")
    return err


def time_ms(fn) -> float:
    if torch.cuda.is_available():
        fn()  # compile outside the graph capture
        return triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median")
    import time
    fn()
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def protected_for(B, ctx, H, D, block_size, sink, window, device):
    """An exact-copy cache with every sequence's copies (bf16; as vLLM's companion group holds them), or None."""
    if sink + window == 0:
        return None
    per_seq = triton.cdiv(ctx, block_size)
    copies = torch.randn(B * per_seq, block_size, H, 2 * D, device=device, dtype=torch.bfloat16)
    return ProtectedTokens(sink, window, copies, torch.arange(B * per_seq, device=device).reshape(B, per_seq).int())


def bench_point(preset, B, ctx, H, G, D, block_size, device, num_splits=None, cache_layout="vllm",
                protected=(0, 0)):
    layout = slot_layout(preset, D)
    blocks_per_seq = triton.cdiv(ctx, block_size)
    num_blocks = B * blocks_per_seq
    tables = CodebookRegistry.default(preset, D, 1, H).layer(0).to(device)
    cache = random_slots(num_blocks, block_size, H, layout, device, cache_layout)
    block_table = torch.randperm(num_blocks, device=device).reshape(B, blocks_per_seq).int()
    seq_lens = torch.full((B,), ctx, dtype=torch.int32, device=device)
    query = torch.randn(B, H * G, D, device=device, dtype=torch.bfloat16)
    splits = num_splits or default_num_splits(B, H, torch.device(device), ctx)
    scale = D ** -0.5
    out = torch.empty(B, H * G, D, dtype=torch.bfloat16, device=device)
    prot = protected_for(B, ctx, H, D, block_size, *protected, device)
    ours = time_ms(lambda: paged_decode(query, cache, block_table, seq_lens, tables, preset, scale,
                                        num_splits=splits, out=out, protected=prot))
    cache = None  # free it before the bf16 caches  # noqa: F841
    k_cache = torch.randn(num_blocks, block_size, H, D, device=device, dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    base = time_ms(lambda: bf16_paged_decode(query, k_cache, v_cache, block_table, seq_lens, scale, splits))
    tokens = B * ctx * H
    return dict(preset=preset, batch=B, context=ctx, kv_heads=H, gqa=G, head_dim=D, block_size=block_size,
                cache_layout=cache_layout, splits=splits, sink=protected[0], window=protected[1],
                slot_bytes=layout.slot_bytes, us=ours * 1e3,
                bf16_us=base * 1e3,
                gbps=tokens * layout.slot_bytes / ours / 1e6, bf16_gbps=tokens * 4 * D / base / 1e6,
                speedup=base / ours)


def save_json(path: str | None, data) -> None:
    """Write ``data`` as JSON to ``path`` (nothing when None)."""
    if path:
        with open(path, "w") as f:
            json.dump(data, f, indent=1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default="turboquant3,turboquant4,turboquant3_qjl")
    ap.add_argument("--contexts", default="1024,4096,16384,65536")
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--gqa", default="4,8", help="query heads per KV head")
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--num-splits", type=int, default=None, help="default: choose_num_splits(batch, heads, ctx)")
    ap.add_argument("--cache-layout", choices=["vllm", "contiguous"], default="vllm",
                    help="our cache: vLLM's [blocks, H, block_size, slot] permuted (default) or contiguous "
                         "[blocks, block_size, H, slot]")
    ap.add_argument("--protected", default="0,0",
                    help="S,W protected tokens (sink, recent window) read from bf16 exact copies; ';'-separated list")
    ap.add_argument("--max-gb", type=float, default=40.0, help="skip points whose bf16 cache is larger")
    ap.add_argument("--quick", action="store_true", help="a handful of points (gpu_check.sh)")
    ap.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = ap.parse_args(argv)

    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    presets, contexts, batches, gqas = args.presets.split(","), ints(args.contexts), ints(args.batches), ints(args.gqa)
    H, D = args.kv_heads, args.head_dim
    if args.quick:
        presets, contexts, batches, gqas = ["turboquant3", "turboquant4_qjl"], [4096, 32768], [1, 32], [4, 8]
        args.protected = "0,0;4,64"
    device = "cuda"
    if not torch.cuda.is_available():
        print("decode_bench: CUDA is not available -- running one tiny config under the Triton interpreter "
              "as a smoke test of this script; the timings below mean nothing.")
        device, presets, contexts, batches, gqas, H, D = "cpu", ["turboquant3"], [100], [2], [4], 2, 64
    else:
        print(f"decode_bench on {torch.cuda.get_device_name()}")

    print(f"bf16 baseline check: max error {check_baseline(device):.2e} vs dense fp32 attention")
    print(f"TurboQuant cache layout: {args.cache_layout}")
    rows = []
    prots = [tuple(int(x) for x in sw.split(",")) for sw in args.protected.split(";") if sw]
    header = (f"{'preset':<16}{'S,W':>7}{'B':>4}{'ctx':>7}{'G':>3}{'split':>6}{'ours us':>10}{'bf16 us':>10}"
              f"{'ours GB/s':>11}{'bf16 GB/s':>11}{'speedup':>9}")
    print(header)
    for preset, prot in [(p, sw) for p in presets for sw in prots]:
        for G in gqas:
            for B in batches:
                for ctx in contexts:
                    if B * ctx * H * D * 4 / 1e9 > args.max_gb:
                        continue
                    r = bench_point(preset, B, ctx, H, G, D, args.block_size, device, args.num_splits,
                                    args.cache_layout, prot)
                    rows.append(r)
                    print(f"{preset:<16}{f'{prot[0]},{prot[1]}':>7}{B:>4}{ctx:>7}{G:>3}{r['splits']:>6}{r['us']:>10.1f}"
                          f"{r['bf16_us']:>10.1f}{r['gbps']:>11.0f}{r['bf16_gbps']:>11.0f}{r['speedup']:>8.2f}x",
                          flush=True)
    save_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
