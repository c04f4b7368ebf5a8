"""Seeded random rotations and QJL projections.

Every matrix is a pure function of (seed, layer, head, purpose), so any worker
of a tensor- or pipeline-parallel engine rebuilds the same matrices for the
same global (layer, KV head) without talking to the others.
Matrices are generated in float64 on the CPU and returned as float32.
"""

from __future__ import annotations

import hashlib
import math
from typing import Literal

import torch

RotationKind = Literal["haar", "hadamard"]
ROTATION_KINDS = ("haar", "hadamard")


def derive_seed(seed: int, layer: int, head: int, purpose: str) -> int:
    """A 63-bit generator seed for one (layer, KV head, purpose)."""
    digest = hashlib.blake2b(f"{seed}:{layer}:{head}:{purpose}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _generator(seed: int) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g


def haar_orthogonal(dim: int, seed: int) -> torch.Tensor:
    """A Haar-random orthogonal (dim, dim) matrix: QR of a Gaussian matrix with the sign fix."""
    g = torch.randn(dim, dim, generator=_generator(seed), dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    d = torch.sign(torch.diagonal(r))
    d[d == 0] = 1.0
    return (q * d).to(torch.float32)


def hadamard(dim: int) -> torch.Tensor:
    """The normalised Sylvester-Hadamard matrix (dim a power of two), float64."""
    if dim < 1 or dim & (dim - 1):
        raise ValueError(f"a Hadamard rotation needs a power-of-two dimension, got {dim}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < dim:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(dim)


def randomized_hadamard(dim: int, seed: int) -> torch.Tensor:
    """H · diag(random signs): orthogonal, applied in O(d log d) by a fast transform."""
    signs = torch.randint(0, 2, (dim,), generator=_generator(seed), dtype=torch.int64).to(torch.float64) * 2 - 1
    return (hadamard(dim) * signs).to(torch.float32)


def rotation(dim: int, seed: int, kind: RotationKind = "haar") -> torch.Tensor:
    """A seeded orthogonal (dim, dim) matrix Π; a vector x is rotated as y = Π x."""
    if kind == "haar":
        return haar_orthogonal(dim, seed)
    if kind == "hadamard":
        return randomized_hadamard(dim, seed)
    raise ValueError(f"unknown rotation kind {kind!r}; accepted: {', '.join(ROTATION_KINDS)}")


def qjl_matrix(m: int, dim: int, seed: int) -> torch.Tensor:
    """The QJL projection S: (m, dim) with i.i.d. N(0, 1) entries."""
    return torch.randn(m, dim, generator=_generator(seed), dtype=torch.float64).to(torch.float32)
