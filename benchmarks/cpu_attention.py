"""Per-layer CPU decode attention and cache write: the compiled TurboQuant ops (``vllm_turboquant.cpu_ops``)
against vLLM's own bf16 CPU attention (``cpu_attention_with_kv_cache``, as its CPU backend calls it, on a
bf16 paged cache of the same shapes), measured interleaved in one process on one thread (as vLLM's CPU
worker runs here).

    python benchmarks/cpu_attention.py                 # the default subset (a few minutes)
    python benchmarks/cpu_attention.py --all           # context 1K-32K x batch 1/8 x head_dim 64/128/256 x GQA 1/4/8
    python benchmarks/cpu_attention.py --contexts 4096 --batches 8 --shapes 64x3x3 --preset turboquant3

Shapes are ``head_dim x KV heads x GQA group``; the default ones are SmolLM2-135M (64 x 3 x 3), a Llama-3-8B
layer (128 x 8 x 4) and Gemma-3-270M (256 x 1 x 4); ``--all`` crosses head_dim 64/128/256 with GQA 1/4/8 at
2 KV heads. Caches hold random bytes (valid fp16 norms): decode cost does not depend on the values. Before
every timed call the caches are flushed (a 512 MiB sweep; ``--no-flush`` keeps them warm) and then code,
tables and interpreter re-warmed by a 16-token call of the same op: in a serving step only the KV caches
and the weights stream through, the rest stays hot. Each call is timed alone in thread CPU time (robust to
other processes on a shared machine; memory stalls count) and the best of ``--reps`` is kept for both
implementations, alternating call by call.

Columns: µs per (sequence, layer) for each implementation and their ratio; the cache bytes read per
call over the time (GB/s: slot bytes for ours, 2 x head_dim x 2 bytes for bf16) next to this machine's
single-thread read bandwidth measured in the same run; the cache write per layer call (one new token per
sequence, all KV heads) for both; the machine's load average before and after. Then (``--prefill``) one
layer's prefill of a 4K-token chunk, cold and after a 2K cached prefix, at the first shape: vLLM's op, ours
compressed (every key read back from the cache, the serving default) and exact (the chunk attends its own
K/V), and the chunk's cache write.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass

import torch

DEFAULT_SHAPES = ("64x3x3", "128x8x4", "256x1x4")
ALL_SHAPES = tuple(f"{d}x2x{g}" for d in (64, 128, 256) for g in (1, 4, 8))


@dataclass(frozen=True)
class Shape:
    head_dim: int
    kv_heads: int
    group: int

    @classmethod
    def parse(cls, text: str) -> Shape:
        d, h, g = (int(x) for x in text.lower().split("x"))
        return cls(d, h, g)

    def __str__(self) -> str:
        return f"d={self.head_dim} H={self.kv_heads} G={self.group}"


class Flusher:
    """Evicts the caches by streaming through a buffer larger than the last-level cache."""

    def __init__(self, mib: int):
        self.buf = torch.ones(mib << 18, dtype=torch.float32) if mib else None

    def __call__(self) -> None:
        if self.buf is not None:
            self.buf.add_(1.0)


def read_bandwidth(gib: float = 1.0) -> float:
    """Single-thread read bandwidth in GB/s: the best of 3 sums over a buffer of ``gib`` GiB."""
    x = torch.ones(int(gib * (1 << 28)), dtype=torch.float32)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best / 1e9


def timed(fn, flush: Flusher, warm=None) -> float:
    """fn's thread CPU time (robust to other processes on the machine; memory stalls count) after evicting
    the caches and, with ``warm``, re-warming code, tables and interpreter with a tiny call: in a serving
    step only the KV cache and the weights stream, the rest stays hot."""
    flush()
    if warm is not None:
        warm()
    t = time.thread_time()
    fn()
    return time.thread_time() - t


def best_of(fns: list, flush: Flusher, reps: int, warms: list | None = None) -> list[float]:
    """Each fn's best time over ``reps`` rounds, the fns alternating call by call."""
    warms = warms or [None] * len(fns)
    best = [float("inf")] * len(fns)
    for fn in fns:  # warm-up: tables, scratch, thread pools
        fn()
    for _ in range(reps):
        for i, fn in enumerate(fns):
            best[i] = min(best[i], timed(fn, flush, warms[i]))
    return best


class Setup:
    """Both caches, tables and inputs for one (shape, context, batch)."""

    def __init__(self, shape: Shape, context: int, batch: int, preset: str, block_size: int, tables=None):
        from vllm_turboquant.layout import cache_format
        from vllm_turboquant.registry import CodebookRegistry

        d, H, G = shape.head_dim, shape.kv_heads, shape.group
        self.shape, self.context, self.batch = shape, context, batch
        self.fmt = cache_format(preset, d)
        lay = self.fmt.layout
        self.tables = tables if tables is not None else CodebookRegistry.default(preset, d, 1, H).layer(0)
        per_seq = -(-context // block_size)
        num_blocks = batch * per_seq + 1
        g = torch.Generator().manual_seed(0)
        # ours: vLLM's [blocks, H, block_size, slot] allocation, passed as [blocks, block_size, H, slot]
        raw = torch.randint(0, 256, (num_blocks, H, block_size, lay.slot_bytes), dtype=torch.uint8, generator=g)
        one = torch.tensor([1.0], dtype=torch.float16).view(torch.uint8)
        for off in {lay.key_norm, lay.value_norm, lay.key_gamma if lay.has_qjl else lay.key_norm}:
            raw[..., off:off + 2] = one
        self.cache = raw.permute(0, 2, 1, 3)
        # vLLM's bf16 cache: [blocks, H, block_size, 2 d] viewed as [blocks, H, 2 block_size, d], K and V halves
        kv = torch.randn(num_blocks, H, block_size, 2 * d, generator=g).to(torch.bfloat16)
        self.key_cache, self.value_cache = kv.view(num_blocks, H, 2 * block_size, d).chunk(2, dim=2)
        perm = torch.randperm(num_blocks - 1, generator=g)[: batch * per_seq] + 1
        self.block_table = perm.reshape(batch, per_seq).to(torch.int32)
        self.seq_lens = torch.full((batch,), context, dtype=torch.int32)
        self.query_start_loc = torch.arange(batch + 1, dtype=torch.int32)
        self.query = torch.randn(batch, H * G, d, generator=g).to(torch.bfloat16)
        self.out = torch.empty(batch, H * G, d, dtype=torch.bfloat16)
        self.scale = d ** -0.5
        # one new token per sequence, written at its last position
        self.new_key = torch.randn(batch, H, d, generator=g).to(torch.bfloat16)
        self.new_value = torch.randn(batch, H, d, generator=g).to(torch.bfloat16)
        last = context - 1
        self.slot_mapping = (self.block_table[:, last // block_size].long() * block_size + last % block_size)
        self.block_size = block_size

    @property
    def our_bytes(self) -> int:
        return self.batch * self.context * self.shape.kv_heads * self.fmt.layout.slot_bytes

    @property
    def bf16_bytes(self) -> int:
        return self.batch * self.context * self.shape.kv_heads * 2 * self.shape.head_dim * 2


class VllmOp:
    """vLLM's CPU attention and cache write, called as its CPU backend calls them."""

    def __init__(self, s: Setup, query_start_loc: torch.Tensor | None = None):
        from vllm import _custom_ops as ops
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        self.ops, self.s = ops, s
        # AMX needs the kernel's per-process permission; in vLLM's worker oneDNN's bf16 GEMMs have asked for it
        if torch.cpu._is_amx_tile_supported():
            torch._C._cpu._init_amx()
        d, H, G = s.shape.head_dim, s.shape.kv_heads, s.shape.group
        self.isa = _get_attn_isa(torch.bfloat16, s.block_size, d)
        # built once per step per KV-cache group in vLLM, not per layer: outside the timed call
        self.meta = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=s.batch, num_heads=H * G, num_kv_heads=H, head_dim=d, seq_lens=s.seq_lens,
            dtype=torch.bfloat16, query_start_loc=s.query_start_loc if query_start_loc is None else query_start_loc,
            causal=True, sliding_window_size=-1, isa=self.isa, enable_kv_split=False)

    def attend(self, query: torch.Tensor, query_start_loc: torch.Tensor, out: torch.Tensor) -> None:
        s = self.s
        self.ops.cpu_attention_with_kv_cache(
            query=query, key_cache=s.key_cache, value_cache=s.value_cache, output=out,
            query_start_loc=query_start_loc, seq_lens=s.seq_lens, scale=s.scale, causal=True, alibi_slopes=None,
            sliding_window=-1, block_table=s.block_table, softcap=0.0, scheduler_metadata=self.meta, s_aux=None)

    def decode(self) -> None:
        self.attend(self.s.query, self.s.query_start_loc, self.s.out)

    def write(self) -> None:
        s = self.s
        self.ops.cpu_attn_reshape_and_cache(s.new_key, s.new_value, s.key_cache, s.value_cache, s.slot_mapping,
                                            self.isa)


class Prefill:
    """One layer's prefill of a ``chunk``-token prompt chunk after ``prefix`` cached tokens (one sequence), for
    vLLM's op (bf16 cache) and ours in both modes: compressed (every key read back from the cache: the
    default) and exact (the chunk attends its own K/V), plus the chunk's cache write."""

    def __init__(self, shape: Shape, prefix: int, chunk: int, preset: str, block_size: int):
        self.s = s = Setup(shape, prefix + chunk, 1, preset, block_size)
        d, H, G = shape.head_dim, shape.kv_heads, shape.group
        g = torch.Generator().manual_seed(1)
        self.q = torch.randn(chunk, H * G, d, generator=g).to(torch.bfloat16)
        self.k = torch.randn(chunk, H, d, generator=g).to(torch.bfloat16)
        self.v = torch.randn(chunk, H, d, generator=g).to(torch.bfloat16)
        self.qsl = torch.tensor([0, chunk], dtype=torch.int32)
        pos = torch.arange(prefix, prefix + chunk)
        self.slots = s.block_table[0, pos // block_size].long() * block_size + pos % block_size
        self.base = VllmOp(s, self.qsl)
        self.out = torch.empty(chunk, H * G, d, dtype=torch.bfloat16)

    def ours(self, compressed: bool):
        from vllm_turboquant import cpu_ops

        s = self.s
        return lambda: cpu_ops.prefill(self.q, self.k, self.v, s.cache, s.block_table, self.qsl, s.seq_lens,
                                       s.tables, s.fmt, s.scale, None, compressed)

    def write(self):
        from vllm_turboquant import cpu_ops

        s = self.s
        return lambda: cpu_ops.write_cache(s.cache, self.slots, self.k, self.v, s.tables, s.fmt)

    def vllm(self):
        return lambda: self.base.attend(self.q, self.qsl, self.out)

    def vllm_write(self):
        s, ops = self.s, self.base.ops
        return lambda: ops.cpu_attn_reshape_and_cache(self.k, self.v, s.key_cache, s.value_cache, self.slots,
                                                      self.base.isa)


def ours(s: Setup):
    from vllm_turboquant import cpu_ops

    def decode() -> None:
        cpu_ops.paged_decode(s.query, s.cache, s.block_table, s.seq_lens, s.tables, s.fmt, s.scale)

    def write() -> None:
        cpu_ops.write_cache(s.cache, s.slot_mapping, s.new_key, s.new_value, s.tables, s.fmt)

    return decode, write


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--all", action="store_true", help="every context, batch, head_dim and GQA group")
    parser.add_argument("--contexts", default=None, help="comma-separated (default 1024,4096,16384)")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--shapes", default=None, help="head_dim x KV heads x GQA group, comma-separated")
    parser.add_argument("--preset", default="turboquant3")
    parser.add_argument("--block-size", type=int, default=128, help="vLLM's CPU default")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--flush-mib", type=int, default=512, help="0 = --no-flush")
    parser.add_argument("--no-flush", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prefill", type=int, default=4096, help="prefill table: chunk tokens (0: none)")
    parser.add_argument("--out", default=None, help="also append the markdown to this file")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    from vllm_turboquant import cpu_ops

    if not cpu_ops.available():
        print(f"the compiled CPU ops are unavailable: {cpu_ops.unavailable_reason()}", file=sys.stderr)
        return 1
    contexts = [int(c) for c in (args.contexts or ("1024,4096,16384,32768" if args.all else "1024,4096,16384"))
                .split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    shapes = [Shape.parse(x) for x in (args.shapes.split(",") if args.shapes else
                                      ALL_SHAPES if args.all else DEFAULT_SHAPES)]
    flush = Flusher(0 if args.no_flush else args.flush_mib)
    load_before = os.getloadavg()
    bandwidth = read_bandwidth()
    lines = [f"### Decode attention per (sequence, layer): {args.preset} vs vLLM bf16 "
             f"(`cpu_attention_with_kv_cache`), {args.threads} thread(s)\n",
             f"{os.cpu_count()}-core {cpu_ops.isa()} CPU (our kernels: {cpu_ops.isa()}), block size {args.block_size}, "
             f"{'warm caches' if flush.buf is None else f'caches flushed ({args.flush_mib} MiB) before each call'}, "
             "thread CPU time, "
             f"best of {args.reps}; single-thread read bandwidth {bandwidth:.1f} GB/s; "
             f"load average before {load_before[0]:.2f} / {load_before[1]:.2f} / {load_before[2]:.2f}\n",
             "| shape | context | batch | ours µs | vLLM bf16 µs | speed-up | ours GB/s | bf16 GB/s "
             "| write ours µs/call | write bf16 µs/call |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    rows = []
    for shape in shapes:
        for context in contexts:
            for batch in batches:
                s = Setup(shape, context, batch, args.preset, args.block_size)
                tiny = Setup(shape, 16, 1, args.preset, args.block_size, tables=s.tables)
                base, tiny_base = VllmOp(s), VllmOp(tiny)
                (our_decode, our_write), (tiny_decode, tiny_write) = ours(s), ours(tiny)
                t_ours, t_base = best_of([our_decode, base.decode], flush, args.reps, [tiny_decode, tiny_base.decode])
                w_ours, w_base = best_of([our_write, base.write], flush, args.reps, [tiny_write, tiny_base.write])
                row = (f"| {shape} | {context} | {batch} | {t_ours / batch * 1e6:.1f} | {t_base / batch * 1e6:.1f} "
                       f"| {t_base / t_ours:.2f}x | {s.our_bytes / t_ours / 1e9:.1f} | "
                       f"{s.bf16_bytes / t_base / 1e9:.1f} | {w_ours * 1e6:.1f} | {w_base * 1e6:.1f} |")
                rows.append(row)
                print(row, flush=True)
                del s, base
    if args.prefill:
        prefill_lines = [f"\n### Prefill of a {args.prefill}-token chunk per layer, ms ({shapes[0]}, 1 thread, "
                         f"best of {min(args.reps, 3)})\n",
                         "| cached before the chunk | vLLM bf16 | ours compressed (default) | vs vLLM "
                         "| ours exact chunk | vs vLLM | write ours | write bf16 |",
                         "|---|---|---|---|---|---|---|---|"]
        for prefix in (0, args.prefill // 2):
            p = Prefill(shapes[0], prefix, args.prefill, args.preset, args.block_size)
            t_base, t_comp, t_exact = best_of([p.vllm(), p.ours(True), p.ours(False)], flush, min(args.reps, 3))
            w_ours, w_base = best_of([p.write(), p.vllm_write()], flush, min(args.reps, 3))
            prefill_lines.append(f"| {prefix} | {t_base * 1e3:.1f} | {t_comp * 1e3:.1f} | {t_base / t_comp:.2f}x | "
                                 f"{t_exact * 1e3:.1f} | {t_base / t_exact:.2f}x | {w_ours * 1e3:.1f} | "
                                 f"{w_base * 1e3:.1f} |")
            print(prefill_lines[-1] if len(prefill_lines) > 4 else "\n".join(prefill_lines), flush=True)
        rows += prefill_lines
    load_after = os.getloadavg()
    tail = f"\nload average after {load_after[0]:.2f} / {load_after[1]:.2f} / {load_after[2]:.2f}\n"
    print(tail, flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n".join(lines + rows) + "\n" + tail)
    return 0


if __name__ == "__main__":
    sys.exit(main())
