"""Cache-write throughput: the fused TurboQuant ``store`` kernel vs a plain bf16 cache write.

The baseline is what a bf16 cache does per step: scatter K and V rows into
[blocks, block_size, H, d] caches (``index_copy_``). Ours reads the same bf16 K/V
and writes packed slots (centre, rotate, quantise, QJL sketch, pack).

    python benchmarks/store_bench.py                       # tokens 1 .. 32768
    python benchmarks/store_bench.py --tokens 256,8192 --presets turboquant3

Columns: time (us), tokens/s (millions), effective GB/s of bytes moved
(bf16 K/V read + slot bytes written), slowdown vs the bf16 write. The packed cache is
vLLM's [blocks, H, block_size, slot_bytes] permuted (``--cache-layout vllm``, default)
or a contiguous [blocks, block_size, H, slot_bytes] one (``--cache-layout contiguous``).
Without CUDA it runs one tiny config under the Triton interpreter (smoke test only).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

if not torch.cuda.is_available():  # must precede the first triton import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
from decode_bench import time_ms  # noqa: E402  (one timer for both benchmarks; this folder is on sys.path)

from vllm_turboquant.kernels.store import store  # noqa: E402
from vllm_turboquant.layout import slot_layout  # noqa: E402
from vllm_turboquant.registry import CodebookRegistry  # noqa: E402


def bench_point(preset, N, H, D, block_size, device, cache_layout="vllm"):
    layout = slot_layout(preset, D)
    num_blocks = triton.cdiv(2 * N, block_size)
    tables = CodebookRegistry.default(preset, D, 1, H).layer(0).to(device)
    key = torch.randn(N, H, D, device=device, dtype=torch.bfloat16)
    value = torch.randn_like(key)
    slot_mapping = torch.randperm(num_blocks * block_size, device=device)[:N]
    if cache_layout == "vllm":
        cache = torch.zeros(num_blocks, H, block_size, layout.slot_bytes, dtype=torch.uint8,
                            device=device).permute(0, 2, 1, 3)
    else:
        cache = torch.zeros(num_blocks, block_size, H, layout.slot_bytes, dtype=torch.uint8, device=device)
    ours = time_ms(lambda: store(cache, slot_mapping, key, value, tables, preset))
    k_cache = torch.zeros(num_blocks * block_size, H, D, dtype=torch.bfloat16, device=device)
    v_cache = torch.zeros_like(k_cache)

    def bf16_write():
        k_cache.index_copy_(0, slot_mapping, key)
        v_cache.index_copy_(0, slot_mapping, value)

    base = time_ms(bf16_write)
    moved = N * H * (4 * D + layout.slot_bytes)
    return dict(us=ours * 1e3, bf16_us=base * 1e3, mtok=N / ours / 1e3, gbps=moved / ours / 1e6,
                slowdown=ours / base)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default="turboquant3,turboquant4,turboquant3_qjl")
    ap.add_argument("--tokens", default="1,16,256,4096,32768")
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--cache-layout", choices=["vllm", "contiguous"], default="vllm")
    args = ap.parse_args(argv)
    presets, tokens = args.presets.split(","), [int(x) for x in args.tokens.split(",") if x]
    H, D, device = args.kv_heads, args.head_dim, "cuda"
    if not torch.cuda.is_available():
        print("store_bench: CUDA is not available -- running one tiny config under the Triton interpreter "
              "as a smoke test of this script; the timings below mean nothing.")
        presets, tokens, H, D, device = ["turboquant3_qjl"], [8], 2, 64, "cpu"
    else:
        print(f"store_bench on {torch.cuda.get_device_name()}, H={H}, d={D}, cache layout {args.cache_layout}")
    print(f"{'preset':<16}{'tokens':>7}{'ours us':>10}{'bf16 us':>10}{'Mtok/s':>9}{'GB/s':>8}{'vs bf16':>10}")
    for preset in presets:
        for N in tokens:
            r = bench_point(preset, N, H, D, args.block_size, device, args.cache_layout)
            print(f"{preset:<16}{N:>7}{r['us']:>10.1f}{r['bf16_us']:>10.1f}{r['mtok']:>9.2f}{r['gbps']:>8.0f}"
                  f"{r['slowdown']:>9.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
