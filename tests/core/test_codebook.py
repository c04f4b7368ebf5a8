"""Lloyd-Max codebooks against the maths: MSE values, optimality conditions, shipped tables."""

import json

import numpy as np
import pytest
import torch
from scipy import integrate

import vllm_turboquant as tq
from vllm_turboquant import codebook

# Lloyd-Max MSE of a unit vector at d = 128 (Gaussian-limit values quoted by the paper).
PAPER_MSE = {1: 0.3634, 2: 0.1175, 3: 0.03454, 4: 0.009497}


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_stage1_mse_on_random_vectors_of_any_norm(bits):
    x = torch.randn(10_000, 128) * torch.exp(torch.randn(10_000, 1))  # norms spread over decades
    q = tq.TurboQuantMSE(128, bits)
    x_hat = q.dequantize(q.quantize(x))
    mse = (((x - x_hat) ** 2).sum(-1) / (x ** 2).sum(-1)).mean().item()
    print(f"b={bits}: measured {mse:.5f}, Lloyd-Max {PAPER_MSE[bits]}")
    assert abs(mse - PAPER_MSE[bits]) / PAPER_MSE[bits] < 0.03


def _density(d):
    from scipy.special import beta
    return lambda x: (1 - x * x) ** ((d - 3) / 2) / beta(0.5, (d - 1) / 2)


@pytest.mark.parametrize("dim,bits", [(64, 2), (128, 3), (256, 4), (80, 1)])
def test_lloyd_max_conditions_hold_by_quadrature(dim, bits):
    """Centroids are the conditional means of their cells under the exact density (checked by quadrature)."""
    cb = codebook.get_codebook(dim, bits)
    f = _density(dim)
    edges = [-1.0, *cb.boundaries, 1.0]
    for i, c in enumerate(cb.centroids):
        mass = integrate.quad(f, edges[i], edges[i + 1], limit=200)[0]
        mean = integrate.quad(lambda x: x * f(x), edges[i], edges[i + 1], limit=200)[0] / mass
        assert c == pytest.approx(mean, abs=1e-9)
    assert np.allclose(cb.boundaries, (np.array(cb.centroids[1:]) + cb.centroids[:-1]) / 2)
    mse = sum(integrate.quad(lambda x, c=c: (x - c) ** 2 * f(x), edges[i], edges[i + 1], limit=200)[0]
              for i, c in enumerate(cb.centroids)) * dim
    assert cb.mse == pytest.approx(mse, rel=1e-6)


def test_shipped_tables_equal_a_fresh_solve():
    data = json.loads((codebook.resources.files("vllm_turboquant") / "data" / "codebooks.json").read_text())
    assert sorted(map(int, data["tables"])) == sorted(codebook.SHIPPED_DIMS)
    for d, b in [(64, 3), (112, 4), (256, 1)]:
        fresh = codebook.solve_lloyd_max(d, b)
        shipped = codebook.get_codebook(d, b)
        assert np.allclose(fresh.centroids, shipped.centroids, atol=1e-12)


def test_build_lloyd_max_codebook_returns_float32_tensors():
    boundaries, centroids = tq.build_lloyd_max_codebook(dim=128, bits=3)
    assert boundaries.dtype == centroids.dtype == torch.float32
    assert boundaries.shape == (7,) and centroids.shape == (8,)
    assert torch.all(centroids[1:] > centroids[:-1])
    assert torch.allclose(centroids, -centroids.flip(0))


def test_gaussian_option_is_the_large_d_limit():
    # MSE of the N(0, 1/d) solution matches the classic Gaussian Lloyd-Max numbers.
    for bits, mse in PAPER_MSE.items():
        assert codebook.solve_lloyd_max(128, bits, "gaussian").mse == pytest.approx(mse, rel=2e-3)
    exact, gauss = codebook.solve_lloyd_max(4096, 3), codebook.solve_lloyd_max(4096, 3, "gaussian")
    assert np.allclose(exact.centroids, gauss.centroids, rtol=2e-3)


def test_unshipped_head_dim_is_solved_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_TURBOQUANT_CACHE", str(tmp_path))
    codebook.get_codebook.cache_clear()
    cb = codebook.get_codebook(72, 2)
    cached = tmp_path / "codebooks" / "beta_d72_b2.json"
    assert cached.exists()
    codebook.get_codebook.cache_clear()
    cached.write_text(json.dumps({**json.loads(cached.read_text()), "centroids": [9, 9, 9, 9]}))
    assert codebook.get_codebook(72, 2).centroids == (9, 9, 9, 9)  # read back from disk, not re-solved
    codebook.get_codebook.cache_clear()
    cached.write_text("{corrupt")
    assert codebook.get_codebook(72, 2).centroids == cb.centroids  # corrupt cache entry is re-solved
    codebook.get_codebook.cache_clear()


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="bits"):
        codebook.solve_lloyd_max(64, 5)
    with pytest.raises(ValueError, match="density"):
        codebook.solve_lloyd_max(64, 2, "laplace")


def test_fit_codebook_recovers_lloyd_max_on_samples_from_the_density():
    d, bits = 64, 2
    x = torch.nn.functional.normalize(torch.randn(20_000, d), dim=-1).reshape(-1)
    _, start = codebook.get_codebook(d, bits).tensors()
    b, c = codebook.fit_codebook(x, start * 1.5)
    assert torch.allclose(c, start, atol=3e-3)
