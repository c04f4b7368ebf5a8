"""Per-row rotation pre-kernel: y = Π x, p = S y and ⟨x, μ⟩ for every (row, head).

Decode and prefill call it once per query (and prefill once per fresh value row)
so that no attention program ever multiplies by Π or S inside its key loop.
One program per (row, KV head) handles the head's whole GQA group, G rows,
as a [G, d] x [d, d] product taken BLOCK_E output columns at a time.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import dot_precision, next_pow2


@triton.jit
def _rotate_kernel(
    x_ptr, rot_ptr, qjl_ptr, mean_ptr,  # x (N, H*G, D); rot (H, D, D); qjl (H, M, D); mean (H, D)
    y_ptr, p_ptr, mu_ptr,  # outputs: y (N, H*G, D) f32; p (N, H*G, M) f32; mu (N, H*G) f32
    stride_xn, stride_xh, num_heads,
    G: tl.constexpr, HEAD_DIM: tl.constexpr, QJL_DIM: tl.constexpr, HAS_MEAN: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_QJL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    n = tl.program_id(0)
    h = tl.program_id(1)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    g_ok = g < G
    d_ok = d < HEAD_DIM
    x = tl.load(x_ptr + n.to(tl.int64) * stride_xn + (h * G + g)[:, None] * stride_xh + d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)  # [G, D]
    row = n.to(tl.int64) * num_heads * G + h * G + g  # [G] output rows
    rot = rot_ptr + h * HEAD_DIM * HEAD_DIM

    for e0 in range(0, BLOCK_D, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E)
        rot_t = tl.load(rot + e[None, :] * HEAD_DIM + d[:, None],  # [D, E] = Π[e, d]ᵀ
                        mask=d_ok[:, None] & (e < HEAD_DIM)[None, :], other=0.0)
        y = tl.dot(x, rot_t, input_precision=DOT_PRECISION)
        tl.store(y_ptr + row[:, None] * HEAD_DIM + e[None, :], y, mask=g_ok[:, None] & (e < HEAD_DIM)[None, :])

    if QJL_DIM > 0:
        qjl = qjl_ptr + h * QJL_DIM * HEAD_DIM
        for m0 in range(0, BLOCK_QJL, BLOCK_E):
            m = m0 + tl.arange(0, BLOCK_E)
            p = tl.zeros((BLOCK_G, BLOCK_E), dtype=tl.float32)
            for e0 in range(0, BLOCK_D, BLOCK_E):  # y chunk again: cheaper than a round trip
                e = e0 + tl.arange(0, BLOCK_E)
                e_ok = e < HEAD_DIM
                rot_t = tl.load(rot + e[None, :] * HEAD_DIM + d[:, None], mask=d_ok[:, None] & e_ok[None, :],
                                other=0.0)
                y = tl.dot(x, rot_t, input_precision=DOT_PRECISION)  # [G, E]
                s_t = tl.load(qjl + m[None, :] * HEAD_DIM + e[:, None],  # [E, M] = S[m, e]ᵀ
                              mask=e_ok[:, None] & (m < QJL_DIM)[None, :], other=0.0)
                p += tl.dot(y, s_t, input_precision=DOT_PRECISION)
            tl.store(p_ptr + row[:, None] * QJL_DIM + m[None, :], p, mask=g_ok[:, None] & (m < QJL_DIM)[None, :])

    if HAS_MEAN:
        mu = tl.load(mean_ptr + h * HEAD_DIM + d, mask=d_ok, other=0.0)
        tl.store(mu_ptr + row, tl.sum(x * mu[None, :], axis=1), mask=g_ok)


def rotate_rows(x: torch.Tensor, rotation: torch.Tensor, qjl: torch.Tensor | None = None,
                mean: torch.Tensor | None = None):
    """Rotate rows of x (N, H*G, d) by their KV head's Π (H, d, d).

    Returns y (N, H*G, d) float32 = Π x; p (N, H*G, m) = S Π x when ``qjl`` (H, m, d)
    is given (m > 0), else None; mu (N, H*G) = ⟨x, μ⟩ when ``mean`` (H, d) is given, else None.
    """
    N, Hx, D = x.shape
    H = rotation.shape[0]
    G = Hx // H
    if x.stride(-1) != 1:
        x = x.contiguous()
    M = qjl.shape[1] if qjl is not None else 0
    y = torch.empty(N, Hx, D, dtype=torch.float32, device=x.device)
    p = torch.empty(N, Hx, M, dtype=torch.float32, device=x.device) if M else None
    mu = torch.empty(N, Hx, dtype=torch.float32, device=x.device) if mean is not None else None
    if N == 0:
        return y, p, mu
    block_d = next_pow2(D)
    _rotate_kernel[(N, H)](
        x, rotation, qjl if M else rotation, mean if mean is not None else rotation,
        y, p if M else y, mu if mu is not None else y,
        x.stride(0), x.stride(1), H,
        G=G, HEAD_DIM=D, QJL_DIM=M, HAS_MEAN=mean is not None,
        BLOCK_G=max(16, next_pow2(G)), BLOCK_D=block_d, BLOCK_E=min(block_d, 64),
        BLOCK_QJL=max(16, next_pow2(M)), DOT_PRECISION=dot_precision(x.device),
        num_warps=4,
    )
    return y, p, mu
