"""One-shot GPU benchmark of the TurboQuant Triton kernels (``gpu_check.sh`` runs it first).

    python benchmarks/gpu_bench.py                  # on a CUDA GPU: ~2 min, most of it compiling
    python benchmarks/gpu_bench.py --dry-run        # CPU, Triton interpreter, tiny shapes: checks the script

Needs torch, triton and numpy only (not vLLM). Every time is measured in this run and printed next to
its baseline from the same run, as a ratio:

1. device-to-device copy bandwidth (``Tensor.copy_``, read + write bytes): the memory roofline;
2. decode attention at the issue's target point (turboquant3, batch 8, 32K context, 8 KV heads,
   GQA 4, head_dim 128) and a few others, against a bf16 paged flash-decoding Triton kernel with the
   same grid (``decode_bench.bf16_paged_decode``) and against ``torch.nn.functional.
   scaled_dot_product_attention`` on contiguous bf16 K/V; achieved GB/s of each against the copy
   bandwidth;
3. the cache write (``store``) of an 8K-token prefill against a bf16 ``index_copy_`` of K and V, and
   as a fraction of copy bandwidth; with the fp32-accurate rotation (3 fp16 MMAs, default) and one pass;
4. "impl forward": ``write_cache`` of B new tokens + ``paged_decode``, the two calls the backend makes per
   decode step and layer, against the bf16 equivalent (index_copy_ + the bf16 paged kernel);
5. prefill of a 4K prompt against SDPA (causal, bf16);
6. registers and spills of every compiled kernel variant (from the driver);
7. a short sweep of the decode split kernel's BLOCK_N / num_warps / num_stages and the centroid lookup
   (gather vs load) at the target point, printing the best.

Times are medians of ``triton.testing.do_bench_cudagraph`` (CUDA graphs: no launch overhead); the first
call of each kernel configuration (compile + run) is reported apart as ``compile s``. Caches hold random
codes with valid norms: decode cost does not depend on the values.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

if not torch.cuda.is_available():  # must precede the first triton import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.testing  # noqa: E402
from decode_bench import bf16_paged_decode, check_baseline, protected_for, random_slots, save_json  # noqa: E402

from vllm_turboquant.kernels import decode, ops, prefill, rotate, store  # noqa: E402
from vllm_turboquant.kernels.decode import choose_num_splits, device_sms  # noqa: E402
from vllm_turboquant.layout import cache_format  # noqa: E402
from vllm_turboquant.registry import CodebookRegistry  # noqa: E402

KERNELS = {"store": store._store_kernel, "rotate": rotate._rotate_kernel, "decode_split": decode._decode_split_kernel,
           "decode_reduce": decode._decode_reduce_kernel, "prefill": prefill._prefill_kernel}


class Clock:
    """Times callables: CUDA graphs on a GPU, a plain wall clock under the interpreter (meaningless numbers:
    the dry run only proves the script works)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def first(self, fn) -> float:
        """Seconds of the first call: compile (if this configuration is new) + one run."""
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t0

    def ms(self, fn) -> float:
        """Median milliseconds per call."""
        if self.cuda:
            return triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median")
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3


def tables_for(preset, D, H, device):
    return CodebookRegistry.default(preset, D, 1, H).layer(0).to(device)


def copy_bandwidth(clock, device, nbytes) -> dict:
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = clock.ms(lambda: dst.copy_(src))
    return dict(bytes=nbytes, us=ms * 1e3, gbps=2 * nbytes / ms / 1e6)


def decode_inputs(preset, B, ctx, H, G, D, device, block_size=16):
    fmt = cache_format(preset, D)
    nb = B * triton.cdiv(ctx, block_size)
    cache = random_slots(nb, block_size, H, fmt.layout, device)
    block_table = torch.randperm(nb, device=device).reshape(B, -1).int()
    seq_lens = torch.full((B,), ctx, dtype=torch.int32, device=device)
    query = torch.randn(B, H * G, D, device=device, dtype=torch.bfloat16)
    return fmt, cache, block_table, seq_lens, query


def decode_point(clock, preset, B, ctx, H, G, D, device, protected=(0, 0), config=None, lookup="gather") -> dict:
    fmt, cache, block_table, seq_lens, query = decode_inputs(preset, B, ctx, H, G, D, device)
    tables = tables_for(preset, D, H, device)
    prot = protected_for(B, ctx, H, D, 16, *protected, device)
    out = torch.empty(B, H * G, D, dtype=torch.bfloat16, device=device)
    splits = choose_num_splits(B, H, ctx, device_sms(torch.device(device)))

    def run():
        decode.paged_decode(query, cache, block_table, seq_lens, tables, fmt, D ** -0.5, num_splits=splits, out=out,
                            protected=prot, lookup_mode=lookup, config=config)

    compile_s = clock.first(run)
    ms = clock.ms(run)
    return dict(preset=preset, batch=B, context=ctx, kv_heads=H, gqa=G, head_dim=D, splits=splits,
                sink=protected[0], window=protected[1], slot_bytes=fmt.layout.slot_bytes, us=ms * 1e3,
                gbps=B * ctx * H * fmt.layout.slot_bytes / ms / 1e6, compile_s=compile_s)


def decode_baselines(clock, B, ctx, H, G, D, device) -> dict:
    """The bf16 paged Triton kernel (same grid and splits) and SDPA on contiguous bf16 K/V."""
    bs = 16
    nb = B * triton.cdiv(ctx, bs)
    k_cache = torch.randn(nb, bs, H, D, device=device, dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    block_table = torch.randperm(nb, device=device).reshape(B, -1).int()
    seq_lens = torch.full((B,), ctx, dtype=torch.int32, device=device)
    query = torch.randn(B, H * G, D, device=device, dtype=torch.bfloat16)
    splits = choose_num_splits(B, H, ctx, device_sms(torch.device(device)))
    paged_ms = clock.ms(lambda: bf16_paged_decode(query, k_cache, v_cache, block_table, seq_lens, D ** -0.5, splits))
    k_cache = v_cache = None  # free them before SDPA's copies
    q = query.view(B, H * G, 1, D)
    k = torch.randn(B, H, ctx, D, device=device, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=G > 1)  # noqa: E731
    sdpa_ms = clock.ms(sdpa)
    nbytes = B * ctx * H * D * 2 * 2
    return dict(bf16_paged_us=paged_ms * 1e3, bf16_paged_gbps=nbytes / paged_ms / 1e6, sdpa_us=sdpa_ms * 1e3,
                sdpa_gbps=nbytes / sdpa_ms / 1e6)


def store_point(clock, preset, N, H, D, device, precision="fp32") -> dict:
    fmt = cache_format(preset, D)
    tables = tables_for(preset, D, H, device)
    key = torch.randn(N, H, D, device=device, dtype=torch.bfloat16)
    value = torch.randn_like(key)
    nb = triton.cdiv(2 * N, 16)
    slot_mapping = torch.randperm(nb * 16, device=device)[:N]
    cache = torch.zeros(nb, H, 16, fmt.layout.slot_bytes, dtype=torch.uint8, device=device).permute(0, 2, 1, 3)
    run = lambda: store.store(cache, slot_mapping, key, value, tables, fmt, precision=precision)  # noqa: E731
    compile_s = clock.first(run)
    ms = clock.ms(run)
    k_cache = torch.zeros(nb * 16, H, D, dtype=torch.bfloat16, device=device)
    v_cache = torch.zeros_like(k_cache)

    def bf16_write():
        k_cache.index_copy_(0, slot_mapping, key)
        v_cache.index_copy_(0, slot_mapping, value)

    base_ms = clock.ms(bf16_write)
    moved = N * H * (4 * D + fmt.layout.slot_bytes)  # bf16 K/V read + slots written
    return dict(preset=preset, tokens=N, precision=precision, us=ms * 1e3, bf16_us=base_ms * 1e3,
                gbps=moved / ms / 1e6, bf16_gbps=N * H * 8 * D / base_ms / 1e6, compile_s=compile_s)


def impl_forward_point(clock, preset, B, ctx, H, G, D, device) -> dict:
    """One decode step of one layer as the backend makes it: write the B new tokens, then attend."""
    fmt, cache, block_table, seq_lens, query = decode_inputs(preset, B, ctx, H, G, D, device)
    tables = tables_for(preset, D, H, device)
    key = torch.randn(B, H, D, device=device, dtype=torch.bfloat16)
    value = torch.randn_like(key)
    slot_mapping = (block_table[:, -1].long() * 16 + (ctx - 1) % 16).contiguous()

    def ours():
        ops.write_cache(cache, slot_mapping, key, value, tables, fmt)
        ops.paged_decode(query, cache, block_table, seq_lens, tables, fmt, D ** -0.5)

    compile_s = clock.first(ours)
    ms = clock.ms(ours)
    k_cache = torch.randn(block_table.numel(), 16, H, D, device=device, dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    splits = choose_num_splits(B, H, ctx, device_sms(torch.device(device)))

    def bf16():
        k_cache.view(-1, H, D).index_copy_(0, slot_mapping, key)
        v_cache.view(-1, H, D).index_copy_(0, slot_mapping, value)
        bf16_paged_decode(query, k_cache, v_cache, block_table, seq_lens, D ** -0.5, splits)

    base_ms = clock.ms(bf16)
    return dict(preset=preset, batch=B, context=ctx, us=ms * 1e3, bf16_us=base_ms * 1e3, compile_s=compile_s)


def prefill_point(clock, preset, T, H, G, D, device) -> dict:
    """A fresh T-token prompt (written to the cache first, as the backend does) against causal SDPA in bf16."""
    fmt = cache_format(preset, D)
    tables = tables_for(preset, D, H, device)
    nb = triton.cdiv(T, 16)
    cache = torch.zeros(nb, H, 16, fmt.layout.slot_bytes, dtype=torch.uint8, device=device).permute(0, 2, 1, 3)
    block_table = torch.arange(nb, device=device, dtype=torch.int32).reshape(1, nb)
    key = torch.randn(T, H, D, device=device, dtype=torch.bfloat16)
    value = torch.randn_like(key)
    query = torch.randn(T, H * G, D, device=device, dtype=torch.bfloat16)
    store.store(cache, torch.arange(T, device=device), key, value, tables, fmt)
    qsl = torch.tensor([0, T], dtype=torch.int32, device=device)
    seq_lens = torch.tensor([T], dtype=torch.int32, device=device)
    run = lambda: ops.prefill(query, key, value, cache, block_table, qsl, seq_lens, tables, fmt, D ** -0.5,  # noqa: E731
                              max_query_len=T)
    compile_s = clock.first(run)
    ms = clock.ms(run)
    q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (query, key, value))
    sdpa_ms = clock.ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                               enable_gqa=G > 1))
    return dict(preset=preset, tokens=T, us=ms * 1e3, sdpa_us=sdpa_ms * 1e3, compile_s=compile_s)


def kernel_resources() -> list[dict]:
    """n_regs / n_spills of every compiled variant of every kernel (CUDA only)."""
    rows = []
    for name, kernel in KERNELS.items():
        for caches in getattr(kernel, "device_caches", {}).values():
            for compiled in caches[0].values():
                if hasattr(compiled, "_init_handles"):  # n_regs / n_spills are filled in when it loads
                    compiled._init_handles()
                rows.append(dict(kernel=name, n_regs=compiled.n_regs, n_spills=compiled.n_spills,
                                 num_warps=compiled.metadata.num_warps, num_stages=compiled.metadata.num_stages,
                                 shared=compiled.metadata.shared))
    return rows


SWEEP = [dict(BLOCK_N=n, num_warps=w, num_stages=s) for n, w, s in
         [(32, 4, 2), (32, 4, 3), (64, 4, 2), (64, 4, 3), (64, 8, 2), (64, 8, 3), (128, 8, 2), (32, 8, 2), (64, 4, 1)]]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes under the Triton interpreter (CPU)")
    ap.add_argument("--json", default=None, help="write every result here")
    ap.add_argument("--budget", type=float, default=120.0, help="seconds; later sections are skipped past it")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and os.environ.get("TRITON_INTERPRET", "0") in ("0", ""):
        print("gpu_bench: no CUDA device; run with --dry-run (the Triton interpreter)")
        return 2
    device = "cuda" if cuda else "cpu"
    clock = Clock(cuda)
    t_start = time.perf_counter()
    if cuda:
        print(f"gpu_bench on {torch.cuda.get_device_name()} ({device_sms(torch.device(device))} SMs), torch "
              f"{torch.__version__}, triton {triton.__version__}")
        target = dict(preset="turboquant3", B=8, ctx=32768, H=8, G=4, D=128)
        others = [("turboquant3", 1, 32768), ("turboquant3", 64, 4096), ("turboquant3_qjl", 8, 32768),
                  ("turboquant4", 8, 32768), ("turboquant2", 8, 32768)]
        store_tokens, prefill_tokens, copy_bytes, sweep = 8192, 4096, 1 << 30, SWEEP
    else:
        print("gpu_bench --dry-run: Triton interpreter on the CPU, tiny shapes; the numbers mean nothing")
        target = dict(preset="turboquant3", B=2, ctx=64, H=2, G=2, D=64)
        others = [("turboquant3_qjl", 1, 48)]
        store_tokens, prefill_tokens, copy_bytes, sweep = 16, 16, 1 << 20, SWEEP[:2]
    results: dict = {"device": torch.cuda.get_device_name() if cuda else "cpu (interpreter)"}
    H, G, D = target["H"], target["G"], target["D"]

    def over_budget(section: str) -> bool:
        if time.perf_counter() - t_start > args.budget:
            print(f"-- {section}: skipped (past the {args.budget:.0f} s budget)")
            return True
        print(f"-- {section}", flush=True)
        return False

    print("-- copy bandwidth")
    copy = results["copy"] = copy_bandwidth(clock, device, copy_bytes)
    print(f"device-to-device copy of {copy['bytes'] >> 20} MiB: {copy['gbps']:.0f} GB/s (read + write)")
    print(f"bf16 paged baseline check: max error {check_baseline(device):.2e} vs dense fp32 attention")

    if not over_budget("decode (target point first)"):
        rows = []
        points = [(target["preset"], target["B"], target["ctx"])] + others
        for i, (preset, B, ctx) in enumerate(points):
            r = decode_point(clock, preset, B, ctx, H, G, D, device)
            r.update(decode_baselines(clock, B, ctx, H, G, D, device))
            rows.append(r)
            print(f"{preset:<16} B={B:<3} ctx={ctx:<6} splits={r['splits']:<3} ours {r['us']:9.1f} us "
                  f"{r['gbps']:6.0f} GB/s | bf16 paged {r['bf16_paged_us']:9.1f} us {r['bf16_paged_gbps']:6.0f} GB/s "
                  f"({r['bf16_paged_gbps'] / copy['gbps']:.0%} of copy) -> {r['bf16_paged_us'] / r['us']:.2f}x | "
                  f"SDPA {r['sdpa_us']:9.1f} us -> {r['sdpa_us'] / r['us']:.2f}x | compile {r['compile_s']:.1f} s",
                  flush=True)
            if i == 0:
                results["target"] = r
                ok = r["bf16_paged_us"] / r["us"] >= 2 and r["sdpa_us"] / r["us"] >= 1.5
                print(f"target (>= 2x bf16 paged, >= 1.5x SDPA): {'met' if ok else 'MISSED'}")
            if time.perf_counter() - t_start > args.budget:
                break
        r = decode_point(clock, target["preset"], target["B"], target["ctx"], H, G, D, device, protected=(4, 64))
        print(f"{target['preset']:<16} protected S=4 W=64: {r['us']:9.1f} us (vs {rows[0]['us']:.1f} us plain: "
              f"{r['us'] / rows[0]['us']:.2f}x) | compile {r['compile_s']:.1f} s")
        results["decode"] = rows + [r]

    if not over_budget(f"store ({store_tokens}-token prefill)"):
        rows = []
        for preset in ("turboquant3", "turboquant3_qjl"):
            for precision in ("fp32", "fp16") if cuda else ("fp32",):
                r = store_point(clock, preset, store_tokens, H, D, device, precision)
                rows.append(r)
                print(f"{preset:<16} rotation {r['precision']:<8} ours {r['us']:9.1f} us {r['gbps']:6.0f} GB/s "
                      f"({r['gbps'] / copy['gbps']:.0%} of copy) | bf16 index_copy {r['bf16_us']:9.1f} us "
                      f"({r['bf16_gbps'] / copy['gbps']:.0%} of copy) -> {r['bf16_us'] / r['us']:.2f}x | "
                      f"compile {r['compile_s']:.1f} s", flush=True)
        results["store"] = rows

    if not over_budget("impl forward (write_cache + paged_decode, one layer, one step)"):
        r = results["impl_forward"] = impl_forward_point(clock, target["preset"], target["B"], target["ctx"], H, G, D,
                                                         device)
        print(f"{r['preset']:<16} B={r['batch']} ctx={r['context']}: ours {r['us']:9.1f} us | bf16 "
              f"{r['bf16_us']:9.1f} us -> {r['bf16_us'] / r['us']:.2f}x | compile {r['compile_s']:.1f} s")

    if not over_budget(f"prefill ({prefill_tokens}-token prompt)"):
        r = results["prefill"] = prefill_point(clock, target["preset"], prefill_tokens, H, G, D, device)
        print(f"{r['preset']:<16} ours {r['us']:9.1f} us | SDPA causal bf16 {r['sdpa_us']:9.1f} us -> "
              f"{r['sdpa_us'] / r['us']:.2f}x | compile {r['compile_s']:.1f} s")

    if not over_budget("sweep of the decode split kernel at the target point"):
        rows = []
        for lookup in ("gather", "load"):
            for cfg in sweep if lookup == "gather" else sweep[:1]:
                r = decode_point(clock, target["preset"], target["B"], target["ctx"], H, G, D, device, config=cfg,
                                 lookup=lookup)
                rows.append(dict(cfg, lookup=lookup, us=r["us"], gbps=r["gbps"], compile_s=r["compile_s"]))
                print(f"BLOCK_N={cfg['BLOCK_N']:<4} warps={cfg['num_warps']} stages={cfg['num_stages']} {lookup:<6} "
                      f"{r['us']:9.1f} us {r['gbps']:6.0f} GB/s | compile {r['compile_s']:.1f} s", flush=True)
                if time.perf_counter() - t_start > args.budget:
                    break
        best = min(rows, key=lambda r: r["us"])
        print(f"best: {best}")
        results["sweep"] = rows

    print("-- kernel registers and spills")
    results["kernels"] = kernel_resources() if cuda else []
    for r in results["kernels"]:
        print(f"{r['kernel']:<14} regs {r['n_regs']:>4} spills {r['n_spills']:>5} warps {r['num_warps']} "
              f"stages {r['num_stages']} shared {r['shared']}")
    if not cuda:
        print("(interpreter: no compiled kernels; benchmarks/kernel_report.py compiles them for sm_90 on the CPU)")
    print(f"gpu_bench done in {time.perf_counter() - t_start:.0f} s")
    save_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
