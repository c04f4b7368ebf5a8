"""Accuracy of the attention kernels' dot operands: fp32 vs fp16 vs bf16, against the float64
torch reference, on small decode and prefill cases (Triton interpreter, CPU; a GPU run works too).

    python benchmarks/operand_accuracy.py

The attention dots (``tile.mma``) take ``common.OPERAND_DTYPE`` operands with fp32 accumulation. Here the
operand type is swapped for fp32 (centroids, rotated queries and values kept in fp32 too) and for bf16
(emulated: operands rounded to bf16, then an fp32 dot -- the same products and accumulation as a bf16 MMA,
which the interpreter cannot run) and every case is measured as max |out - ref| / max |ref| (``rel err``).
Rotations and the cache write are fp32-accurate in all three. (Interpreter only: compiled kernels keep the
operand type they were compiled with.)

Since 2026-11-30 every score and value product of the packed-cache tile body is fp32-accurate (hi + lo fp16
pieces: ``common.precise_mma``, ``tile.weighted_mma``) and no longer goes through ``tile.mma``; what this
script still varies is the exact-chunk prefill's own dots (``prefill.mma``, ``compressed_chunk=False``). Its
recorded numbers (``benchmarks/RESULTS.md``) are from before that change.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import torch

if not torch.cuda.is_available():  # must precede the first triton import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from vllm_turboquant import reference as ref  # noqa: E402
from vllm_turboquant.kernels import common, prefill, rotate, tile  # noqa: E402
from vllm_turboquant.kernels.decode import paged_decode  # noqa: E402
from vllm_turboquant.layout import cache_format  # noqa: E402
from vllm_turboquant.registry import CodebookRegistry  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("0", "") else "cpu"

# preset, head_dim, KV heads, GQA, context (decode) / prompt (prefill)
CASES = [("turboquant3", 64, 2, 4, 160), ("turboquant4", 128, 1, 8, 200), ("turboquant2", 128, 2, 4, 160),
         ("turboquant3_qjl", 128, 1, 4, 160), ("turboquant4", 256, 1, 2, 100)]


@triton.jit
def _mma_bf16(a, b):  # round_to: the interpreter's own float32 -> bf16 cast truncates
    return tl.dot(common.round_to(a.to(tl.float32), tl.bfloat16).to(tl.float32),
                  common.round_to(b.to(tl.float32), tl.bfloat16).to(tl.float32), out_dtype=tl.float32)


@triton.jit
def _mma_fp32(a, b):
    return tl.dot(a.to(tl.float32), b.to(tl.float32), out_dtype=tl.float32, input_precision="ieee")


def setup(preset, d, H, G, L, seed=0):
    g = torch.Generator().manual_seed(seed)
    fmt = cache_format(preset, d)
    tables = CodebookRegistry.default(preset, d, 1, H, seed=seed).layer(0)
    tables = dataclasses.replace(tables, key_mean=torch.randn(H, d, generator=g) * 0.5).to(DEVICE)
    bs = 16
    nb = -(-L // bs)
    cache = torch.zeros(nb + 1, bs, H, fmt.layout.slot_bytes, dtype=torch.uint8, device=DEVICE)
    block_table = (torch.randperm(nb, generator=g) + 1).reshape(1, nb).int().to(DEVICE)
    key = (torch.randn(L, H, d, generator=g) * 2).to(DEVICE) + tables.key_mean
    value = torch.randn(L, H, d, generator=g).to(DEVICE)
    pos = torch.arange(L, device=DEVICE)
    ref.write_cache(cache, block_table[0, pos // bs].long() * bs + pos % bs, key, value, tables, fmt)
    query = (torch.randn(L, H * G, d, generator=g) * 2).to(DEVICE)
    return fmt, tables, cache, block_table, key, value, query


def rel_err(got, want):
    return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()


def measure(fmt, tables, cache, block_table, key, value, query):
    """(decode rel err, prefill rel err, compressed prefill rel err) of the current operand type."""
    L, d = key.shape[0], key.shape[-1]
    seq = torch.tensor([L], dtype=torch.int32, device=DEVICE)
    qsl = torch.tensor([0, L], dtype=torch.int32, device=DEVICE)
    q1 = query[-1:]
    errs = [rel_err(paged_decode(q1, cache, block_table, seq, tables, fmt, d ** -0.5),
                    ref.paged_decode(q1, cache, block_table, seq, tables, fmt, d ** -0.5))]
    for compressed in (False, True):
        errs.append(rel_err(prefill.prefill(query, key, value, cache, block_table, qsl, seq, tables, fmt, d ** -0.5,
                                            None, compressed),
                            ref.prefill(query, key, value, cache, block_table, qsl, seq, tables, fmt, d ** -0.5, None,
                                        compressed)))
    return errs


def use(mma, host_dtype) -> None:
    """Make the kernels' attention dots ``mma`` and every operand (centroids, signs, copies: OPERAND_DTYPE;
    rotated queries and values: OPERAND_TORCH_DTYPE) fp16 when ``host_dtype`` is, else fp32."""
    tile.mma = prefill.mma = mma
    rotate.OPERAND_TORCH_DTYPE = prefill.OPERAND_TORCH_DTYPE = host_dtype
    common.OPERAND_DTYPE = tile.OPERAND_DTYPE = tl.constexpr(tl.float16 if host_dtype == torch.float16 else tl.float32)


def main() -> int:
    shipped = tile.mma
    print(f"rel err of the kernels vs the float64 reference ({DEVICE}; operand type of the attention dots)")
    print(f"{'preset':<16}{'d':>4}{'G':>3}{'L':>5}  {'operands':<9}{'decode':>10}{'prefill':>10}{'compressed':>11}")
    worst = {}
    for preset, d, H, G, L in CASES:
        data = setup(preset, d, H, G, L)
        for name, mma, host in (("fp32", _mma_fp32, torch.float32), ("fp16", shipped, torch.float16),
                                ("bf16", _mma_bf16, torch.float32)):
            use(mma, host)
            errs = measure(*data)
            worst[name] = max(worst.get(name, 0.0), *errs)
            print(f"{preset:<16}{d:>4}{G:>3}{L:>5}  {name:<9}" + "".join(f"{e:>10.2e}" for e in errs), flush=True)
        use(shipped, torch.float16)
    print("worst: " + ", ".join(f"{k} {v:.2e}" for k, v in worst.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
