"""The QJL estimator: unbiased at λ = 1 with the predicted variance; λ* lowers the score error."""

import math

import torch
import torch.nn.functional as F

from vllm_turboquant import TurboQuantMSE, TurboQuantProd

D, BITS, M = 128, 3, 128


def _errors(q, k, seeds, **kw):
    """Score errors over independent (rotation, S) draws, and the mean of γ² n²."""
    err, gamma2 = [], []
    for seed in seeds:
        tq = TurboQuantProd(D, BITS, M, seed=seed, **kw)
        c = tq.compress(k)
        err.append((tq.inner_product(q, c) - q @ k.T).item())
        gamma2.append((c["residual_norms"] ** 2 * c["norms"] ** 2).item())
    return torch.tensor(err, dtype=torch.float64), sum(gamma2) / len(gamma2)


def test_unbiased_mean_within_three_standard_errors():
    q, k = torch.randn(D), torch.randn(1, D) * 3.0
    err, _ = _errors(q, k, range(200))
    se = err.std() / math.sqrt(len(err))
    print(f"mean error {err.mean():.4f}, standard error {se:.4f}")
    assert abs(err.mean()) < 3 * se


def test_variance_at_most_the_qjl_bound():
    # Many draws so that the sample variance is known to ~3%: the true variance sits just below the bound.
    q, k = torch.randn(D), torch.randn(1, D) * 3.0
    err, g2n2 = _errors(q, k, range(1000, 3000))
    bound = math.pi / 2 * g2n2 * q.norm().item() ** 2 / M
    print(f"variance {err.var():.5f}, bound {bound:.5f}")
    assert err.var() <= 1.10 * bound
    assert err.var() >= 0.5 * bound  # the sketch really is in play


def _mse_codes_alone_and_optimal(keys, queries, seeds):
    codes_only, optimal = [], []
    for seed in seeds:
        tq = TurboQuantProd(D, BITS, M, seed=seed, qjl_scale="optimal")
        mse = TurboQuantMSE(D, BITS - 1, seed=seed)  # the same rotation and codes, no sketch
        true = queries @ keys.T
        optimal.append(((tq.inner_product(queries, tq.compress(keys)) - true) ** 2).mean())
        codes_only.append(((queries @ mse.dequantize(mse.quantize(keys)).T - true) ** 2).mean())
    return torch.stack(codes_only).mean().item(), torch.stack(optimal).mean().item()


def test_optimal_lambda_beats_codes_alone_on_random_keys():
    keys, queries = torch.randn(256, D), torch.randn(32, D)
    alone, opt = _mse_codes_alone_and_optimal(keys, queries, range(5))
    print(f"random keys: codes alone {alone:.4f}, with λ* sketch {opt:.4f}")
    assert opt < 0.8 * alone


def test_optimal_lambda_beats_codes_alone_on_anisotropic_keys():
    scales = torch.ones(D)
    scales[:4] = 20.0  # a few outlier channels carry most of the energy, as in real keys
    keys = torch.randn(256, D) * scales + 5.0 * F.one_hot(torch.tensor(7), D)
    queries = torch.randn(32, D) * scales.sqrt()
    alone, opt = _mse_codes_alone_and_optimal(keys, queries, range(5))
    print(f"anisotropic keys: codes alone {alone:.4f}, with λ* sketch {opt:.4f}")
    assert opt < 0.8 * alone


def test_sign_of_zero_projection_is_plus_one_and_zero_keys_score_zero():
    from vllm_turboquant.reference import sketch

    y = torch.randn(5, 1, 16)
    codes = torch.zeros(5, 1, 16, dtype=torch.int64)
    qjl = torch.zeros(1, 8, 16)  # every projection is exactly 0
    signs, gamma = sketch(y, codes, torch.zeros(1, 2), qjl)
    assert torch.all(signs == 1) and torch.allclose(gamma, y.norm(dim=-1))
    tq = TurboQuantProd(64, 2, 64)
    c = tq.compress(torch.zeros(3, 64))
    assert torch.all(c["norms"] == 0)
    assert torch.all(tq.inner_product(torch.randn(64), c) == 0)  # a zero key scores exactly 0
