"""The seed library's API (tonbistudio/turboquant-pytorch), on this package's core.

Same names, arguments and shapes as the seed, with one difference: every entry
point accepts vectors of any norm (norms are stored), so callers never have to
normalise. ``bits`` of the inner-product classes is the total per coordinate,
as in the paper: (bits - 1)-bit Lloyd-Max codes plus a 1-bit QJL sketch.
"""

from __future__ import annotations

import torch

from .codebook import get_codebook
from .presets import qjl_coefficient
from .reference import quantize, reconstruct, sketch
from .rotation import derive_seed, haar_orthogonal, qjl_matrix


def _as_rows(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """(..., d) -> (N, 1, d) float32 and the leading shape."""
    x = torch.as_tensor(x)
    return x.float().reshape(-1, 1, x.shape[-1]), tuple(x.shape[:-1])


class TurboQuantMSE:
    """Stage 1: random rotation + Lloyd-Max scalar codes, ``bits`` per coordinate.

    ``quantize(x (..., dim))`` returns int64 codes (..., dim); the vectors' norms
    ride along as ``codes.norms`` and are used by ``dequantize`` (or pass ``norms=``).
    """

    def __init__(self, dim: int, bits: int, seed: int = 42, device: str | torch.device = "cpu"):
        self.dim, self.bits, self.seed = dim, bits, seed
        self.Pi = haar_orthogonal(dim, seed).to(device)
        self.boundaries, self.centroids = get_codebook(dim, bits).tensors(device)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        rows, lead = _as_rows(x)
        codes, norms, _ = quantize(rows, self.Pi[None], self.boundaries[None])
        out = codes.reshape(*lead, self.dim)
        out.norms = norms.float().reshape(lead)
        return out

    def dequantize(self, codes: torch.Tensor, norms: torch.Tensor | None = None) -> torch.Tensor:
        if norms is None:
            norms = getattr(codes, "norms", None)
        lead = tuple(codes.shape[:-1])
        n = torch.ones(lead) if norms is None else torch.as_tensor(norms, dtype=torch.float32)
        x = reconstruct(codes.reshape(-1, 1, self.dim), n.reshape(-1, 1), self.Pi[None], self.centroids[None])
        return x.reshape(*lead, self.dim)


class TurboQuantProd:
    """Stage 1 + 2: (bits - 1)-bit codes and a QJL sign sketch of the residual
    (``proj_dim`` rows, default dim) for unbiased inner products.

    ``qjl_scale="optimal"`` uses the variance-optimal λ* instead of λ = 1 (biased,
    lower mean squared error).
    """

    def __init__(self, dim: int, bits: int, proj_dim: int | None = None, seed: int = 42,
                 qjl_scale: str = "unbiased", device: str | torch.device = "cpu"):
        if bits < 2:
            raise ValueError(f"TurboQuantProd needs bits >= 2 (one of them is the QJL bit), got {bits}")
        self.dim, self.bits, self.proj_dim = dim, bits, proj_dim or dim
        self.mse = TurboQuantMSE(dim, bits - 1, seed, device)
        self.S = qjl_matrix(self.proj_dim, dim, derive_seed(seed, 0, 0, "qjl")).to(device)
        if qjl_scale not in ("unbiased", "optimal"):
            raise ValueError(f"qjl_scale={qjl_scale!r}, accepted: 'unbiased', 'optimal'")
        self.qjl_coefficient = qjl_coefficient(dim, self.proj_dim, qjl_scale)

    def compress(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x (..., dim) -> dict: codes (..., dim) int64, signs (..., proj_dim) ±1,
        residual_norms (...) = γ (of the unit vector), norms (...) = ‖x‖."""
        rows, lead = _as_rows(x)
        codes, norms, y = quantize(rows, self.mse.Pi[None], self.mse.boundaries[None])
        signs, gamma = sketch(y, codes, self.mse.centroids[None], self.S[None])
        return {"codes": codes.reshape(*lead, self.dim), "signs": signs.float().reshape(*lead, self.proj_dim),
                "residual_norms": gamma.float().reshape(lead), "norms": norms.float().reshape(lead)}

    def dequantize(self, compressed: dict[str, torch.Tensor]) -> torch.Tensor:
        """Dense vectors whose inner product with any query is the estimate (..., dim)."""
        c = compressed
        lead = tuple(c["codes"].shape[:-1])
        x = reconstruct(c["codes"].reshape(-1, 1, self.dim), c["norms"].reshape(-1, 1), self.mse.Pi[None],
                        self.mse.centroids[None], c["signs"].reshape(-1, 1, self.proj_dim),
                        c["residual_norms"].reshape(-1, 1), self.S[None], self.qjl_coefficient)
        return x.reshape(*lead, self.dim)

    def inner_product(self, query: torch.Tensor, compressed: dict[str, torch.Tensor]) -> torch.Tensor:
        """Estimated ⟨query, x⟩: query (dim,) -> (N,), or (Q, dim) -> (Q, N)."""
        keys = self.dequantize(compressed).reshape(-1, self.dim)
        return torch.as_tensor(query).float() @ keys.T


class TurboQuantKVCache:
    """A growing compressed cache for one attention head: keys for inner products
    (TurboQuantProd), values for reconstruction (TurboQuantMSE), both at ``bits``."""

    def __init__(self, dim: int, bits: int, proj_dim: int | None = None, seed: int = 42):
        self.key_quantizer = TurboQuantProd(dim, bits, proj_dim, seed)
        self.value_quantizer = TurboQuantMSE(dim, bits, seed + 1)
        self._keys: list[dict[str, torch.Tensor]] = []
        self._values: list[torch.Tensor] = []

    def append_key(self, key: torch.Tensor) -> None:
        """key (dim,) or (n, dim)."""
        self._keys.append(self.key_quantizer.compress(torch.as_tensor(key).reshape(-1, self.key_quantizer.dim)))

    def append_value(self, value: torch.Tensor) -> None:
        """value (dim,) or (n, dim)."""
        self._values.append(self.value_quantizer.quantize(torch.as_tensor(value).reshape(-1, self.value_quantizer.dim)))

    def __len__(self) -> int:
        return sum(k["norms"].shape[0] for k in self._keys)

    def _stacked_keys(self) -> dict[str, torch.Tensor]:
        return {name: torch.cat([k[name] for k in self._keys]) for name in self._keys[0]} if self._keys else {}

    def attention_scores(self, query: torch.Tensor) -> torch.Tensor:
        """Unbiased ⟨query, key_i⟩ for every cached key: (seq_len,)."""
        if not self._keys:
            return torch.zeros(0)
        return self.key_quantizer.inner_product(query, self._stacked_keys())

    def get_values(self) -> torch.Tensor:
        """Reconstructed values (seq_len, dim)."""
        if not self._values:
            return torch.zeros(0, self.value_quantizer.dim)
        codes = torch.cat(list(self._values))
        norms = torch.cat([v.norms for v in self._values])
        return self.value_quantizer.dequantize(codes, norms)


class TurboQuantCompressorV2:
    """Key compressor for whole layers: compress (H, S, D) keys, score queries (H, D)
    against them without decompressing per key (asymmetric estimator)."""

    def __init__(self, dim: int, bits: int, proj_dim: int | None = None, seed: int = 42):
        self.quantizer = TurboQuantProd(dim, bits, proj_dim, seed)

    def compress(self, keys: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.quantizer.compress(keys)

    def asymmetric_attention_scores(self, query: torch.Tensor, compressed: dict[str, torch.Tensor]) -> torch.Tensor:
        """query (H, D) -> (H, S); or (H, Q, D) -> (H, Q, S). Raw inner products (no 1/sqrt(D))."""
        keys = self.quantizer.dequantize(compressed)  # (H, S, D)
        q = torch.as_tensor(query).float()
        if q.dim() == keys.dim() - 1:
            return torch.einsum("...d,...sd->...s", q, keys)
        return q @ keys.transpose(-1, -2)


class TurboQuantCompressorMSE:
    """Value compressor: MSE codes at ``bits``; ``decompress`` reconstructs (..., D)."""

    def __init__(self, dim: int, bits: int, seed: int = 42):
        self.quantizer = TurboQuantMSE(dim, bits, seed)

    def compress(self, values: torch.Tensor) -> dict[str, torch.Tensor]:
        codes = self.quantizer.quantize(values)
        return {"codes": codes, "norms": codes.norms}

    def decompress(self, compressed: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.quantizer.dequantize(compressed["codes"], compressed["norms"])
