"""What the norm field's encoding costs: fp16(√n) (current) against a plain fp16 n (before).

    python benchmarks/reliability/norm_encoding.py

Prints (1) the relative rounding error of a stored norm over norms log-uniform in [1e-3, 6e4] (both
encodings represent that range) and the range each one holds, and (2) the effect on attention: the
reference's paged decode (turboquant3 / turboquant3_qjl, head_dim 128, 512 tokens, Gaussian keys with an
offset and values) against exact float64 attention, with each encoding. Both use 2 bytes per norm.
"""

from __future__ import annotations

import torch

import vllm_turboquant.layout as L
from vllm_turboquant import reference as R
from vllm_turboquant.registry import CodebookRegistry


def plain_encode(n):
    return n.to(torch.float64).to(torch.float32).to(torch.float16)


def plain_decode(s):
    return s.to(torch.float32)


def field_error(encode, decode) -> tuple[float, float]:
    n = torch.logspace(-3, torch.log10(torch.tensor(6e4)).item(), 1_000_000, dtype=torch.float64)
    rel = (decode(encode(n)).double() - n).abs() / n
    return rel.max().item(), rel.pow(2).mean().sqrt().item()


def attention_error(preset: str, seed: int = 0) -> float:
    d, H, G, T = 128, 2, 4, 512
    g = torch.Generator().manual_seed(seed)
    tables = CodebookRegistry.default(preset, d, 1, H, seed=seed).layer(0)
    keys = torch.randn(T, H, d, generator=g) * 2 + torch.randn(1, H, d, generator=g)
    values = torch.randn(T, H, d, generator=g)
    block = 16
    cache = torch.zeros(T // block, block, H, L.slot_layout(preset, d).slot_bytes, dtype=torch.uint8)
    R.write_cache(cache, torch.arange(T), keys, values, tables, preset)
    q = torch.randn(8, H * G, d, generator=g)
    table = torch.arange(T // block, dtype=torch.int32).expand(8, -1).contiguous()
    lens = torch.full((8,), T, dtype=torch.int32)
    got = R.paged_decode(q, cache, table, lens, tables, preset, d ** -0.5).double()
    want = torch.cat([R.dense_attention(q[b:b + 1].double(), keys.double(), values.double(), d ** -0.5,
                                        torch.tensor([T - 1])) for b in range(8)]).double()
    return ((got - want).norm() / want.norm()).item()


def main() -> None:
    sqrt_enc, sqrt_dec = L.encode_norm, L.decode_norm
    rows = []
    for name, enc, dec, top in (("fp16(n) (before)", plain_encode, plain_decode, 65504.0),
                                ("fp16(sqrt n) (now)", sqrt_enc, sqrt_dec, L.NORM_MAX)):
        worst, rms = field_error(enc, dec)
        L.encode_norm, L.decode_norm = enc, dec  # the reference reads and writes norms through these
        try:
            attn = {p: sum(attention_error(p, s) for s in range(3)) / 3 for p in ("turboquant3", "turboquant3_qjl")}
        finally:
            L.encode_norm, L.decode_norm = sqrt_enc, sqrt_dec
        rows.append((name, worst, rms, top, attn))
    print("| norm field (2 bytes) | max rel. error | RMS rel. error | largest norm held | "
          "decode rel. error turboquant3 | turboquant3_qjl |")
    print("|---|---|---|---|---|---|")
    for name, worst, rms, top, attn in rows:
        print(f"| {name} | {worst:.2e} ({worst / 2**-11:.2f} x 2^-11) | {rms:.2e} | {top:.4g} | "
              f"{attn['turboquant3']:.5f} | {attn['turboquant3_qjl']:.5f} |")


if __name__ == "__main__":
    main()
