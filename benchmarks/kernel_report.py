"""Registers, spills and shared memory of every TurboQuant kernel, compiled ahead of time for a GPU
target -- no GPU needed (Triton's own NVIDIA backend and ptxas do the work on the CPU).

    python benchmarks/kernel_report.py                      # sm_90 (H100 / H200), head_dim 128
    python benchmarks/kernel_report.py --head-dim 64,256 --presets turboquant3,turboquant3_qjl

The launches are the ones ``store``, ``paged_decode`` and ``prefill`` make (recorded with CPU stand-in
tensors, not run). Columns: kernel, its constexpr configuration, registers
per thread, spill stores / loads (bytes), shared memory, compile seconds. A GPU run reads the same
numbers from the driver (``gpu_bench.py``); this one is for machines without one.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ["TRITON_INTERPRET"] = "0"  # compile, never interpret (nothing is launched)

import torch  # noqa: E402
import triton  # noqa: E402

from vllm_turboquant.kernels import decode, prefill, rotate, store  # noqa: E402
from vllm_turboquant.kernels.launches import Launch, jit_function, record_launches  # noqa: E402
from vllm_turboquant.layout import cache_format  # noqa: E402
from vllm_turboquant.registry import CodebookRegistry  # noqa: E402

KERNELS = (store._store_kernel, rotate._rotate_kernel, decode._decode_split_kernel, decode._decode_reduce_kernel,
           prefill._prefill_kernel)
SHOWN = ("BLOCK_N", "BLOCK_T", "BLOCK_R", "BLOCK_G", "BLOCK_M", "KEY_WORD", "VALUE_WORD", "LOOKUP", "PROTECT",
         "num_warps", "num_stages")


def record(preset: str, D: int, H: int, G: int, protect: bool, lookup: str = "gather") -> list[Launch]:
    """The launches of one store, decode and prefill call (CPU stand-ins, vLLM's permuted cache)."""
    from vllm_turboquant.protected import ProtectedTokens

    fmt = cache_format(preset, D)
    tables = CodebookRegistry.default(preset, D, 1, H).layer(0)
    cache = torch.zeros(64, H, 16, fmt.layout.slot_bytes, dtype=torch.uint8).permute(0, 2, 1, 3)
    B, T = 8, 64
    block_table = torch.zeros(B, 4, dtype=torch.int32)
    prot = ProtectedTokens(4, 64, torch.zeros(64, 16, H, 2 * D, dtype=torch.bfloat16), block_table) if protect else None
    seq_lens = torch.full((B,), 64, dtype=torch.int32)
    kv = torch.zeros(T, H, D, dtype=torch.bfloat16)
    with record_launches(*KERNELS, run=False) as launches:
        store.store(cache, torch.arange(T), kv, kv, tables, fmt, prot,
                    torch.arange(T) if protect else None, lookup_mode=lookup)
        decode.paged_decode(torch.zeros(B, H * G, D, dtype=torch.bfloat16), cache, block_table, seq_lens, tables,
                            fmt, D ** -0.5, num_splits=4, protected=prot, lookup_mode=lookup)
        qsl = torch.arange(0, T + 1, T // B, dtype=torch.int32)
        prefill.prefill(torch.zeros(T, H * G, D, dtype=torch.bfloat16), kv, kv, cache, block_table, qsl, seq_lens,
                        tables, fmt, D ** -0.5, protected=prot, max_query_len=T // B, lookup_mode=lookup)
    return launches


def aot_compile(launch: Launch, arch: int):
    """Compile a recorded launch for ``sm_<arch>`` without a GPU (Triton's JIT steps, minus the launch)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    jf = jit_function(launch.kernel)
    binder = create_function_from_signature(jf.signature, jf.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    opts, signature, constexprs, attrs = jf._pack_args(backend, launch.kwargs, bound, specialization, options)
    return triton.compile(ASTSource(jf, signature, constexprs, attrs), target=target, options=opts.__dict__)


def resources(compiled, arch: int) -> dict:
    """Registers and spills from ``ptxas -v`` on the kernel's PTX; shared memory from its metadata."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        sm = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        out = subprocess.run([get_ptxas(arch).path, "-v", "--gpu-name", sm, ptx, "-o", os.path.join(tmp, "k.o")],
                             capture_output=True, text=True).stderr
    num = lambda pattern: int(m.group(1)) if (m := re.search(pattern, out)) else -1  # noqa: E731
    return dict(regs=num(r"Used (\d+) registers"), spill_stores=num(r"(\d+) bytes spill stores"),
                spill_loads=num(r"(\d+) bytes spill loads"), shared=compiled.metadata.shared)


def report(launches: list[Launch], arch: int, seen: set) -> list[dict]:
    rows = []
    for launch in launches:
        key = launch.key()
        if key in seen:
            continue
        seen.add(key)
        t0 = time.perf_counter()
        compiled = aot_compile(launch, arch)
        row = dict(kernel=launch.name, config=" ".join(f"{k}={launch.kwargs[k]}" for k in SHOWN if k in launch.kwargs),
                   seconds=time.perf_counter() - t0, **resources(compiled, arch))
        rows.append(row)
        print(f"{row['kernel']:<24}{row['regs']:>5}{row['spill_stores']:>7}{row['spill_loads']:>7}"
              f"{row['shared']:>8}{row['seconds']:>6.1f}s  {row['config']}", flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100 / H200)")
    ap.add_argument("--presets", default="turboquant3")
    ap.add_argument("--head-dim", default="128")
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--gqa", type=int, default=4)
    ap.add_argument("--protected", action="store_true", help="also the protected-token variants")
    ap.add_argument("--lookup", default="gather", help="gather, load or both (comma-separated)")
    args = ap.parse_args(argv)
    print(f"kernels compiled for sm_{args.arch} on the CPU (triton {triton.__version__})")
    print(f"{'kernel':<24}{'regs':>5}{'spill':>7}{'(ld)':>7}{'shared':>8}{'time':>7}  config")
    seen: set = set()
    spills = 0
    for preset in args.presets.split(","):
        for D in (int(x) for x in args.head_dim.split(",")):
            for protect in (False, True) if args.protected else (False,):
                for lookup in args.lookup.split(","):
                    print(f"-- {preset} d={D} H={args.kv_heads} G={args.gqa}{' protected' if protect else ''}")
                    rows = report(record(preset, D, args.kv_heads, args.gqa, protect, lookup), args.arch, seen)
                    spills += sum(r["spill_stores"] > 0 for r in rows)
    print(f"kernels with spills: {spills}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
