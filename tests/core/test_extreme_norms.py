"""No finite input yields a non-finite output: the norm fields and attention over extreme norms.

A stored norm is the fp16 of its square root (``layout.encode_norm``): exact zeros for 0 and anything
below 2**-50, a relative error of at most ``NORM_REL_ERROR`` (about 2**-10) up to ``NORM_MAX`` = 65504²
(about 4.29e9), saturation above it. A plain fp16 norm overflowed to inf at 65504 and attention
then returned NaN for the whole query.

The attention property runs every preset on every implementation of the ops contract this machine
has: the torch reference, the Triton kernels (under the interpreter without a GPU) and the compiled
CPU ops when built. Sequences mix norms 0, 1e-30, 1e-3 ... 1e6 (keys and values) in one sequence.
"""

from __future__ import annotations

import importlib
import os
import zlib

import pytest
import torch

from support import DEVICE, registry_tables
from vllm_turboquant import reference as R
from vllm_turboquant.layout import (
    NORM_MAX,
    NORM_REL_ERROR,
    cache_format,
    decode_norm,
    encode_norm,
    stored_norm,
    unpack_slots,
)
from vllm_turboquant.ops import IMPLEMENTATIONS
from vllm_turboquant.presets import PRESETS

SCALES = [0.0, 1e-30, 1e-3, 1.0, 1e3, 1e4, 6e4, 1e5, 1e6]
#: Attention vs the float64 reference reading the same slots, relative to the largest value norm: the reference
#: itself, the compiled CPU ops (float32 with float64-exact codes), the Triton kernels (fp16 operands).
TOLERANCE = {"torch": 1e-6, "cpu": 1e-5, "triton": 1e-2}


# ------------------------------------------------------------------------------------ the field
def test_norm_field_bounds_over_the_whole_range():
    n = torch.logspace(-60, 14, 200_001, dtype=torch.float64)
    got = stored_norm(n).double()
    assert torch.isfinite(got).all()
    normal = (n >= 2.0**-28) & (n <= NORM_MAX)
    rel = ((got - n).abs() / n)[normal]
    assert rel.max() <= NORM_REL_ERROR
    # the cost of the wider range: about one more bit of relative error than a plain fp16 norm (2**-11)
    plain = ((n.float().half().double() - n).abs() / n)[(n >= 2.0**-14) & (n <= 65504)]
    assert rel.max() > 2.0**-11 * 0.99 and plain.max() <= 2.0**-11 + 2.0**-24
    sub = (n < 2.0**-28) & (n >= 2.0**-50)
    assert ((got - n).abs()[sub] <= 2.0**-24 * n[sub].sqrt() + 2.0**-50).all()
    assert (got[n > NORM_MAX] == NORM_MAX).all()  # saturates, finite
    assert (got[n < 2.0**-50] == 0).all()
    assert (got[1:] >= got[:-1]).all()  # monotone


def test_norm_field_zero_tiny_saturated_and_idempotent():
    n = torch.tensor([0.0, 1e-30, 2.0**-51, 1.0, 65504.0, 65520.0, 1e6, NORM_MAX, 1e10, 1e38, float("inf")])
    s = encode_norm(n)
    assert s.dtype == torch.float16 and torch.isfinite(s).all()
    d = decode_norm(s)
    assert d[0] == 0 and d[1] == 0 and d[2] == 0
    assert d[3] == 1.0 and abs(d[4] / 65504.0 - 1) <= NORM_REL_ERROR and abs(d[6] / 1e6 - 1) <= NORM_REL_ERROR
    assert (d[-4:] == NORM_MAX).all()
    assert torch.equal(stored_norm(d), d)  # a decoded norm encodes to the same field
    assert torch.equal(decode_norm(s.float()), d)


# ------------------------------------------------------------------------------------ attention
def _implementations():
    out = []
    for name, module in IMPLEMENTATIONS.items():
        try:
            mod = importlib.import_module(module)
        except Exception as exc:  # triton missing
            out.append(pytest.param(name, marks=pytest.mark.skip(reason=f"{name}: {exc}")))
            continue
        if name == "cpu" and not mod.available():
            out.append(pytest.param(name, marks=pytest.mark.skip(reason=f"cpu ops: {mod.unavailable_reason()}")))
        elif name == "triton" and DEVICE.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            out.append(pytest.param(name, marks=pytest.mark.skip(reason="no GPU and TRITON_INTERPRET unset")))
        else:
            out.append(name)
    return out


def _extreme(n: int, H: int, d: int, g: torch.Generator, extreme_keys: bool, extreme_values: bool):
    """Keys/values (n, H, d) whose norms follow SCALES (cycled, shuffled per head)."""
    def rows(extreme: bool):
        x = torch.randn(n, H, d, generator=g)
        x = x / x.norm(dim=-1, keepdim=True)
        if not extreme:
            return x * 3
        scale = torch.tensor(SCALES, dtype=torch.float64)[torch.randint(0, len(SCALES), (n, H), generator=g)]
        scale[0] = 1e6  # every sequence gets a norm past fp16's range...
        scale[1] = 0.0  # ...and an exact zero
        return (x.double() * scale.unsqueeze(-1)).float()
    return rows(extreme_keys), rows(extreme_values)


@pytest.mark.parametrize("impl", _implementations())
@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("which", ["keys", "values", "both"])
def test_attention_is_finite_and_follows_the_stored_norms(impl, preset, which):
    ops = importlib.import_module(IMPLEMENTATIONS[impl])
    dev = DEVICE if impl == "triton" else torch.device("cpu")
    d, H, G, block_size, lens = 64, 2, 2, 16, [40, 23]
    fmt = cache_format(preset, d)
    tables = registry_tables(preset, d, H, key_mean=True).to(dev)
    g = torch.Generator().manual_seed(zlib.crc32(f"{preset}-{which}".encode()))
    num_blocks = len(lens) * 3 + 1  # 3 blocks of 16 per sequence
    cache = torch.zeros(num_blocks, block_size, H, fmt.layout.slot_bytes, dtype=torch.uint8, device=dev)
    block_table = torch.randperm(num_blocks - 1, generator=g)[:6].reshape(2, 3).int().to(dev)
    keys, values = [], []
    for b, L in enumerate(lens):
        k, v = _extreme(L, H, d, g, which in ("keys", "both"), which in ("values", "both"))
        k = k + tables.key_mean.cpu()  # the norm that is stored is ‖k − μ‖
        pos = torch.arange(L)
        slots = (block_table[b, pos // block_size].cpu().long() * block_size + pos % block_size).to(dev)
        ops.write_cache(cache, slots, k.to(dev), v.to(dev), tables, fmt)
        keys.append(k)
        values.append(v)

    if impl == "cpu":  # the compiled encoder writes the reference's bytes, extreme norms included
        want_cache = torch.zeros_like(cache)
        for b, L in enumerate(lens):
            pos = torch.arange(L)
            slots = block_table[b, pos // block_size].long() * block_size + pos % block_size
            R.write_cache(want_cache, slots, keys[b], values[b], tables, fmt)
        assert torch.equal(cache, want_cache)

    # the slots hold the norms as encode_norm defines them (saturated past NORM_MAX, zeros stay zeros)
    for b, L in enumerate(lens):
        f = unpack_slots(R.gather_slots(cache.cpu(), block_table[b:b + 1].cpu(), L)[0], fmt.layout)
        for got, x in ((f.key_norm, keys[b].double() - tables.key_mean.cpu().double()), (f.value_norm, values[b])):
            want = stored_norm(x.double().norm(dim=-1))
            assert torch.isfinite(got).all()
            torch.testing.assert_close(got, want, rtol=2 * NORM_REL_ERROR, atol=0)  # one fp16 step in √n at most

    q = torch.randn(len(lens), H * G, d, generator=g)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    scale = d ** -0.5
    out = ops.paged_decode(q.to(dev), cache, block_table, seq_lens.to(dev), tables, fmt, scale).cpu()
    assert torch.isfinite(out).all(), f"{impl} {preset} decode: non-finite output"
    # what the slots say, in float64 (the estimator the ops compute)
    want = R.paged_decode(q, cache.cpu(), block_table.cpu(), seq_lens, tables.to("cpu"), fmt, scale)
    bound = max(v.double().norm(dim=-1).max().item() for v in values)  # outputs are averages of values
    assert (out - want).abs().max().item() <= TOLERANCE[impl] * bound + 1e-6

    # prefill over the whole sequence, reading the chunk back from the slots, and with its exact K/V
    T = sum(lens)
    qp = torch.randn(T, H * G, d, generator=g)
    qsl = torch.tensor([0, lens[0], T], dtype=torch.int32)
    kp, vp = torch.cat(keys), torch.cat(values)
    for compressed in (True, False):
        got = ops.prefill(qp.to(dev), kp.to(dev), vp.to(dev), cache, block_table, qsl.to(dev), seq_lens.to(dev),
                          tables, fmt, scale, None, compressed).cpu()
        assert torch.isfinite(got).all(), f"{impl} {preset} prefill (compressed={compressed}): non-finite output"
        if compressed:
            ref = R.prefill(qp, kp, vp, cache.cpu(), block_table.cpu(), qsl, seq_lens, tables.to("cpu"), fmt, scale,
                            None, True)
            assert (got - ref).abs().max().item() <= TOLERANCE[impl] * bound + 1e-6
