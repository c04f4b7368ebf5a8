"""The offline lever screen (``evals/screen.py``) against the maths: Lloyd-Max distortion of isotropic unit
vectors, the transform-coding gain of anisotropic ones, and greedy bit allocation worked by hand."""

from __future__ import annotations

import pytest
import torch

from evals.screen import allocate_bits, klt_error, screen_head, summarise
from vllm_turboquant.codebook import get_codebook
from vllm_turboquant.rotation import rotation

D = 64


def _tables(bits: int):
    boundaries, centroids = get_codebook(D, bits).tensors()
    return rotation(D, 7, "haar"), boundaries, centroids


def test_allocate_bits_by_hand():
    # variances 4 and 1, 2 bits: the first bit lowers 4·(1 − 0.3634) = 2.55 vs 1·0.6366; the second
    # 4·(0.3634 − 0.1175) = 0.98 vs 0.64: both go to the first coordinate.
    assert allocate_bits(torch.tensor([4.0, 1.0]), 2).tolist() == [2, 0]
    # 3 bits: 4·(0.1175 − 0.03454) = 0.33 < 0.64, so the third goes to the second coordinate.
    assert allocate_bits(torch.tensor([4.0, 1.0]), 3).tolist() == [2, 1]
    # equal variances share the bits evenly; the cap holds
    assert allocate_bits(torch.ones(8), 16).tolist() == [2] * 8
    assert allocate_bits(torch.tensor([100.0, 1e-6]), 5).tolist() == [4, 1]
    with pytest.raises(ValueError, match="cannot allocate 9 bits over 2 coordinates"):
        allocate_bits(torch.ones(2), 9)


@pytest.mark.parametrize("bits", [1, 2])
def test_isotropic_vectors_match_lloyd_max_and_no_lever_gains(bits):
    torch.manual_seed(0)
    x = torch.randn(6000, D, dtype=torch.float64)
    errs = screen_head(x[:3000], x[3000:], *_tables(bits), bits)
    # the served error of isotropic unit vectors is the codebook's own expected distortion
    assert errs["served"] == pytest.approx(get_codebook(D, bits).mse, rel=0.03)
    # isotropic data: the KLT has no axes to prefer, and a 2-D codebook gains only its packing gain, nothing at
    # 4 points per pair and under 1 dB at 16
    assert errs["klt"] == pytest.approx(errs["served"], rel=0.10)
    if bits == 1:
        assert errs["vq2"] == pytest.approx(errs["served"], rel=0.04)
    else:
        assert 0.8 * errs["served"] < errs["vq2"] < errs["served"]


def test_klt_gains_on_anisotropic_vectors():
    torch.manual_seed(1)
    scales = torch.ones(D, dtype=torch.float64)
    scales[:8] = 6.0  # 8 strong axes hold ~90% of the energy, in a random basis
    basis = rotation(D, 3, "haar").double()
    x = (torch.randn(6000, D, dtype=torch.float64) * scales) @ basis
    errs = screen_head(x[:3000], x[3000:], *_tables(1), 1)
    assert errs["klt"] < 0.6 * errs["served"]
    # the allocation the KLT made: the strong axes get the bits
    _, alloc = klt_error(x[:3000] / x[:3000].norm(dim=-1, keepdim=True),
                         x[3000:] / x[3000:].norm(dim=-1, keepdim=True), 1)
    assert alloc.sum() == D
    assert int((alloc > 0).sum()) < D


def test_summarise_ratios():
    rows = [{"kind": "value", "bits": 1, "layer": 0, "head": h, "served": 0.4, "vq2": v, "klt": k}
            for h, (v, k) in enumerate([(0.4, 0.2), (0.2, 0.4)])]
    (s,) = summarise(rows)
    assert s["heads"] == 2 and s["vq2_ratio"] == pytest.approx(0.75) and s["klt_ratio"] == pytest.approx(0.75)
    assert (s["vq2_worst"], s["vq2_best"]) == (pytest.approx(1.0), pytest.approx(0.5))
    # the results index's cell for a screen report
    from evals.index import screen_headline

    assert screen_headline([s]) == "MSE vs served at equal bytes, values, b = 1: `vq2` 0.75, `klt` 0.75"
