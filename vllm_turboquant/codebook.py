"""Lloyd-Max codebooks for the coordinates of a randomly rotated unit vector.

A coordinate x of a uniformly random unit vector in R^d has density
f(x) ∝ (1 - x²)^((d-3)/2) on [-1, 1], i.e. x = 2t - 1 with t ~ Beta(a, a),
a = (d-1)/2. Lloyd-Max is 1-D k-means on that density: boundaries are the
midpoints of neighbouring centroids, centroids the conditional means of their
cells. Cell masses and first moments have closed forms through the regularised
incomplete beta function, so each iteration is exact (no quadrature).

``density="gaussian"`` solves the same problem for N(0, 1/d), the large-d limit.

Tables for the usual head sizes ship in ``data/codebooks.json``; other sizes
are solved on first use and cached on disk.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from dataclasses import dataclass
from functools import cache, lru_cache
from importlib import resources
from typing import Literal

import torch

from .cache import cache_dir, cache_root, replace_atomically

logger = logging.getLogger("vllm.vllm_turboquant")

Density = Literal["beta", "gaussian"]
SHIPPED_DIMS = (64, 80, 96, 112, 128, 192, 256)
SHIPPED_BITS = (1, 2, 3, 4)
_TABLE_FILE = "codebooks.json"
_TABLE_VERSION = 1


@dataclass(frozen=True)
class Codebook:
    """A sorted scalar codebook.

    centroids: 2**bits reconstruction levels (ascending).
    boundaries: the 2**bits - 1 interior cell boundaries; code = #{boundaries < y}.
    mse: expected squared error of a whole unit vector, d * E[(x - c(x))²].
    """

    dim: int
    bits: int
    density: str
    centroids: tuple[float, ...]
    boundaries: tuple[float, ...]
    mse: float

    def tensors(self, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(boundaries, centroids) as float32 tensors."""
        return (
            torch.tensor(self.boundaries, dtype=torch.float32, device=device),
            torch.tensor(self.centroids, dtype=torch.float32, device=device),
        )


def _cell_moments(edges, dim: int, density: Density):
    """Mass, first and second moment of the density over each cell [edges[i], edges[i+1]]."""
    import numpy as np
    from scipy import special, stats

    edges = np.asarray(edges, dtype=np.float64)
    if density == "beta":
        a = (dim - 1) / 2.0
        t = np.clip((edges + 1.0) / 2.0, 0.0, 1.0)
        i0 = special.betainc(a, a, t)
        i1 = special.betainc(a + 1, a, t)
        i2 = special.betainc(a + 2, a, t)
        mass = np.diff(i0)
        m_t1 = 0.5 * np.diff(i1)  # E[t; cell], mean of Beta(a, a) is 1/2
        m_t2 = (a * (a + 1)) / (2 * a * (2 * a + 1)) * np.diff(i2)
        # x = 2t - 1
        m1 = 2 * m_t1 - mass
        m2 = 4 * m_t2 - 4 * m_t1 + mass
        return mass, m1, m2
    if density == "gaussian":
        s = 1.0 / math.sqrt(dim)
        z = edges / s
        cdf, pdf = stats.norm.cdf(z), stats.norm.pdf(z)
        zpdf = np.where(np.isfinite(z), np.nan_to_num(z) * pdf, 0.0)
        mass = np.diff(cdf)
        m1 = -s * np.diff(pdf)
        m2 = s * s * (mass - np.diff(zpdf))
        return mass, m1, m2
    raise ValueError(f"unknown density {density!r}; accepted: 'beta', 'gaussian'")


def solve_lloyd_max(dim: int, bits: int, density: Density = "beta", tol: float = 1e-13,
                    max_iter: int = 100_000) -> Codebook:
    """Solve the Lloyd-Max codebook for (dim, bits) on the exact (or Gaussian) density."""
    import numpy as np
    from scipy import special, stats

    if dim < 3:
        raise ValueError(f"dim must be >= 3, got {dim}")
    if bits not in SHIPPED_BITS:
        raise ValueError(f"bits must be one of {SHIPPED_BITS}, got {bits}")
    levels = 2 ** bits
    lo, hi = (-1.0, 1.0) if density == "beta" else (-np.inf, np.inf)
    # Start from the midpoints (in probability) of equal-mass cells.
    q = (np.arange(levels) + 0.5) / levels
    if density == "beta":
        a = (dim - 1) / 2.0
        c = 2 * special.betaincinv(a, a, q) - 1
    else:
        c = stats.norm.ppf(q) / math.sqrt(dim)
    for _ in range(max_iter):
        edges = np.concatenate([[lo], (c[1:] + c[:-1]) / 2, [hi]])
        mass, m1, _ = _cell_moments(edges, dim, density)
        new = m1 / mass
        if np.max(np.abs(new - c)) < tol:
            c = new
            break
        c = new
    else:
        raise RuntimeError(f"Lloyd-Max did not converge for dim={dim}, bits={bits}")
    c = (c - c[::-1]) / 2  # the density is symmetric: make the table exactly so
    edges = np.concatenate([[lo], (c[1:] + c[:-1]) / 2, [hi]])
    mass, m1, m2 = _cell_moments(edges, dim, density)
    mse = float(dim * np.sum(m2 - 2 * c * m1 + c * c * mass))
    return Codebook(dim, bits, density, tuple(map(float, c)), tuple(map(float, edges[1:-1])), mse)


def _codebook_to_json(cb: Codebook) -> dict:
    return {"centroids": list(cb.centroids), "boundaries": list(cb.boundaries), "mse": cb.mse}


def _codebook_from_json(dim: int, bits: int, density: str, entry: dict) -> Codebook:
    return Codebook(dim, bits, density, tuple(entry["centroids"]), tuple(entry["boundaries"]), entry["mse"])


@lru_cache(maxsize=1)
def _shipped_tables() -> dict:
    text = resources.files("vllm_turboquant").joinpath("data", _TABLE_FILE).read_text()
    data = json.loads(text)
    if data.get("version") != _TABLE_VERSION:
        raise RuntimeError(f"codebook table version {data.get('version')} != {_TABLE_VERSION}; reinstall")
    return data["tables"]


@cache
def get_codebook(dim: int, bits: int, density: Density = "beta") -> Codebook:
    """The Lloyd-Max codebook for (dim, bits): shipped table, disk cache, or a fresh solve."""
    if density == "beta" and dim in SHIPPED_DIMS and bits in SHIPPED_BITS:
        return _codebook_from_json(dim, bits, density, _shipped_tables()[str(dim)][str(bits)])
    path = cache_root() / "codebooks" / f"{density}_d{dim}_b{bits}.json"
    if path.exists():
        try:
            return _codebook_from_json(dim, bits, density, json.loads(path.read_text()))
        except (ValueError, KeyError):
            with contextlib.suppress(OSError):
                path.unlink()  # a corrupt cache entry is re-solved below
    cb = solve_lloyd_max(dim, bits, density)
    try:  # a cache for later starts; a read-only or full cache folder only costs the solve again
        cache_dir("codebooks")
        replace_atomically(path, lambda tmp: tmp.write_text(json.dumps(_codebook_to_json(cb))))
    except OSError as exc:
        logger.warning("vllm-turboquant: could not cache the (%d, %d-bit) codebook in %s (%s); it is solved "
                       "again at the next start", dim, bits, path.parent, exc)
    return cb


def build_lloyd_max_codebook(dim: int, bits: int, density: Density = "beta") -> tuple[torch.Tensor, torch.Tensor]:
    """Seed-library API: ``(boundaries, centroids)`` float32 tensors for (dim, bits)."""
    return get_codebook(dim, bits, density).tensors()


def fit_codebook(samples: torch.Tensor, init_centroids: torch.Tensor, iters: int = 30,
                 max_samples: int = 1 << 17) -> tuple[torch.Tensor, torch.Tensor]:
    """Empirical Lloyd-Max (1-D k-means), one codebook per row.

    samples (G, N) (or (N,) for one), init_centroids (G, K) (or (K,)), sorted. At most
    ``max_samples`` evenly spaced samples per row are used. Returns (boundaries (G, K-1),
    centroids (G, K)) float32; a cell that ends up empty keeps its value.
    """
    single = init_centroids.dim() == 1
    x = samples.reshape(1, -1) if single else samples.reshape(samples.shape[0], -1)
    if x.shape[1] > max_samples:
        x = x[:, torch.linspace(0, x.shape[1] - 1, max_samples).long()]
    # Sorted samples and their prefix sums turn each iteration's cell sums and counts into
    # K - 1 binary searches per row instead of one per sample.
    x = x.to(torch.float64).sort(dim=1).values.contiguous()
    prefix = torch.nn.functional.pad(x.cumsum(1), (1, 0))  # (G, N + 1)
    n = torch.full((x.shape[0], 1), x.shape[1], dtype=torch.long)
    c = init_centroids.reshape(x.shape[0], -1).to(torch.float64).clone()
    for _ in range(iters):
        b = ((c[:, 1:] + c[:, :-1]) / 2).contiguous()
        # cell j holds b[j-1] < x <= b[j] (as searchsorted(b, x) assigns them)
        edges = torch.cat([torch.zeros_like(n), torch.searchsorted(x, b, right=True), n], 1)  # (G, K + 1)
        counts = (edges[:, 1:] - edges[:, :-1]).to(torch.float64)
        sums = prefix.gather(1, edges[:, 1:]) - prefix.gather(1, edges[:, :-1])
        new = torch.where(counts > 0, sums / counts.clamp_min(1), c).sort(dim=1).values
        done = torch.allclose(new, c, rtol=0, atol=1e-10)
        c = new
        if done:
            break
    b = (c[:, 1:] + c[:, :-1]) / 2
    return (b[0].float(), c[0].float()) if single else (b.float(), c.float())

def write_shipped_tables() -> str:
    """Solve every shipped (dim, bits) and write ``data/codebooks.json``; returns its path."""
    tables = {
        str(d): {str(b): _codebook_to_json(solve_lloyd_max(d, b)) for b in SHIPPED_BITS} for d in SHIPPED_DIMS
    }
    path = resources.files("vllm_turboquant").joinpath("data", _TABLE_FILE)
    with open(str(path), "w") as f:
        json.dump({"version": _TABLE_VERSION, "density": "beta", "tables": tables}, f, indent=1)
        f.write("\n")
    return str(path)


if __name__ == "__main__":
    print("wrote", write_shipped_tables())
