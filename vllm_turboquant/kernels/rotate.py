"""Per-row rotation pre-kernel: c Π x = σ y, p = c_p S y and ⟨x, μ⟩ / s for every (row, head), c, c_p scales.

Decode and prefill call it once per query (c = scale·log2 e, so that the attention kernels score in
log2 units) and prefill once per fresh value row (c = 1), so that no attention program ever multiplies
by Π or S inside its key loop. Grid (row tile, KV head): the N x G rows of one KV head (token t's GQA group
g is flat row t·G + g) are taken BLOCK_M at a time, whatever G, as a [BLOCK_M, d] x [d, d] product taken
BLOCK_E output columns at a time, fp32-accurate (``common.fp32_dot``), so Π is read once per BLOCK_M rows;
y and p are rounded to the output dtype once (queries: hi + lo fp16 pieces, values: fp16). BLOCK_M is fixed
(``ROTATE_BLOCK_M``) and the row count is not specialised on, so every batch size runs one compiled variant.

Any finite x gives fp16 operands (or their hi + lo pieces): each row is divided by its power-of-two scale first
(``common.row_scale``: max |x| / s in [1, 2), so |y| <= ‖x‖ / s < 2 √d and |p| is bounded alike), and
the row's σ = s·c comes back in float32 for the attention kernels to multiply scores (or value weights) by.
⟨x, μ⟩ comes in the same scale (c ⟨x, μ⟩ = σ mu): prefill subtracts it from scores of q / s.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import LOG2E, OPERAND_TORCH_DTYPE, fp32_dot, next_pow2, row_scale, split_operand


@triton.jit
def _store_rows(ptr, lo_ptr, offsets, x, mask, SPLIT: tl.constexpr):
    """x (float32) at ``ptr + offsets`` in its dtype, or with SPLIT as hi + lo fp16 pieces (``split_operand``)
    at ``ptr`` / ``lo_ptr``."""
    if SPLIT:
        hi, lo = split_operand(x)
        tl.store(ptr + offsets, hi, mask=mask)
        tl.store(lo_ptr + offsets, lo, mask=mask)
    else:
        tl.store(ptr + offsets, x.to(ptr.dtype.element_ty), mask=mask)


#: Rows (token x GQA member) per program: a tl.dot operand needs >= 16, and 32 spills at d = 256 with a QJL
#: sketch (and at d = 64, 4 B) on sm_90 where 16 spills nothing (``benchmarks/kernel_report.py``).
ROTATE_BLOCK_M = 16


@triton.jit(do_not_specialize=["num_rows"])
def _rotate_kernel(
    x_ptr, rot_ptr, qjl_ptr, mean_ptr,  # x (N, H*G, D); rot (H, D, D); qjl (H, M, D); mean (H, D)
    y_ptr, p_ptr, mu_ptr, sigma_ptr,  # outputs: y (N, H*G, D); p (N, H*G, M); mu, σ (N, H*G) f32
    y_lo_ptr, p_lo_ptr,  # SPLIT: the lo pieces of y and p (y, p get the hi ones; fp16)
    stride_xn, stride_xh, num_rows, num_heads, scale, proj_scale,  # num_rows = N * G
    G: tl.constexpr, HEAD_DIM: tl.constexpr, QJL_DIM: tl.constexpr, HAS_MEAN: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_QJL: tl.constexpr,
):
    h = tl.program_id(1)
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # flat rows t * G + g of head h
    r_ok = r < num_rows
    t = (r // G).to(tl.int64)
    g = r % G
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    x = tl.load(x_ptr + t[:, None] * stride_xn + (h * G + g)[:, None] * stride_xh + d[None, :],
                mask=r_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)  # [M, D]
    row = t * num_heads * G + h * G + g  # [M] output rows
    s, inv = row_scale(x)
    x = x * inv[:, None]  # max |x| in [1, 2) per row (exact: a power of two)
    sigma = s * scale
    tl.store(sigma_ptr + row, sigma, mask=r_ok)
    rot = rot_ptr + h * HEAD_DIM * HEAD_DIM

    for e0 in range(0, BLOCK_D, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E)
        rot_t = tl.load(rot + e[None, :] * HEAD_DIM + d[:, None],  # [D, E] = Π[e, d]ᵀ
                        mask=d_ok[:, None] & (e < HEAD_DIM)[None, :], other=0.0)
        y = fp32_dot(x, rot_t)
        _store_rows(y_ptr, y_lo_ptr, row[:, None] * HEAD_DIM + e[None, :], y, r_ok[:, None] & (e < HEAD_DIM)[None, :],
                    SPLIT)

    if QJL_DIM > 0:
        qjl = qjl_ptr + h * QJL_DIM * HEAD_DIM
        for m0 in range(0, BLOCK_QJL, BLOCK_E):
            m = m0 + tl.arange(0, BLOCK_E)
            p = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)
            for e0 in range(0, BLOCK_D, BLOCK_E):  # y chunk again: cheaper than a round trip
                e = e0 + tl.arange(0, BLOCK_E)
                e_ok = e < HEAD_DIM
                rot_t = tl.load(rot + e[None, :] * HEAD_DIM + d[:, None], mask=d_ok[:, None] & e_ok[None, :],
                                other=0.0)
                y = fp32_dot(x, rot_t)  # [G, E]
                s_t = tl.load(qjl + m[None, :] * HEAD_DIM + e[:, None],  # [E, M] = S[m, e]ᵀ
                              mask=e_ok[:, None] & (m < QJL_DIM)[None, :], other=0.0)
                p += fp32_dot(y, s_t)
            _store_rows(p_ptr, p_lo_ptr, row[:, None] * QJL_DIM + m[None, :], p * proj_scale,
                        r_ok[:, None] & (m < QJL_DIM)[None, :], SPLIT)

    if HAS_MEAN:
        mu = tl.load(mean_ptr + h * HEAD_DIM + d, mask=d_ok, other=0.0)
        tl.store(mu_ptr + row, tl.sum(x * mu[None, :], axis=1), mask=r_ok)


def rotate_rows(x: torch.Tensor, rotation: torch.Tensor, qjl: torch.Tensor | None = None,
                mean: torch.Tensor | None = None, scale: float = 1.0, dtype: torch.dtype = torch.float32,
                proj_scale: float = 1.0, split: bool = False):
    """Rotate rows of x (N, H*G, d) by their KV head's Π (H, d, d), times ``scale``, in a row scale.

    Returns y (N, H*G, d) in ``dtype`` and sigma (N, H*G) float32 with scale Π x = sigma y (y = Π x / s,
    s the row's power of two with max |x| / s in [1, 2): an fp16 y holds any finite x); p (N, H*G, m) =
    proj_scale S y in ``dtype`` (the same row scale) when ``qjl`` (H, m, d) is given (m > 0), else None; mu (N, H*G)
    float32 = ⟨x, μ⟩ / s (scale ⟨x, μ⟩ = sigma mu) when ``mean`` (H, d) is given, else None.
    With ``split``, y and p come as two fp16 pieces, (2, N, H*G, .): [0] = hi, [1] = lo, hi + lo = the float32
    value within 2**-22 (``common.split_operand``; ``dtype`` is then not used).
    """
    N, Hx, D = x.shape
    H = rotation.shape[0]
    G = Hx // H
    if x.stride(-1) != 1:
        x = x.contiguous()
    M = qjl.shape[1] if qjl is not None else 0
    pieces, dtype = ((2,), OPERAND_TORCH_DTYPE) if split else ((), dtype)
    y = torch.empty(*pieces, N, Hx, D, dtype=dtype, device=x.device)
    p = torch.empty(*pieces, N, Hx, M, dtype=dtype, device=x.device) if M else None
    mu = torch.empty(N, Hx, dtype=torch.float32, device=x.device) if mean is not None else None
    sigma = torch.empty(N, Hx, dtype=torch.float32, device=x.device)
    if N == 0:
        return y, sigma, p, mu
    block_d = next_pow2(D)
    _rotate_kernel[(triton.cdiv(N * G, ROTATE_BLOCK_M), H)](
        x, rotation, qjl if M else rotation, mean if mean is not None else rotation,
        y, p if M else y, mu if mu is not None else sigma, sigma,
        y[-1], (p if M else y)[-1],  # the lo pieces (with split; else unused)
        x.stride(0), x.stride(1), N * G, H, float(scale), float(proj_scale),
        G=G, HEAD_DIM=D, QJL_DIM=M, HAS_MEAN=mean is not None, SPLIT=split,
        BLOCK_M=ROTATE_BLOCK_M, BLOCK_D=block_d, BLOCK_E=min(block_d, 64),
        BLOCK_QJL=max(16, next_pow2(M)),
        num_warps=4,
    )
    return y, sigma, p, mu


def rotate_queries(query: torch.Tensor, tables, fmt, scale: float, mean: bool = False):
    """The attention kernels' query operands (``rotate_rows`` with c = scale·log2 e, so scores come out in
    log2 units): (q̂, σ, p, mu) with c Π_k q = σ q̂ and p = coef S q̂ (coef = ``fmt.qjl_coefficient``: a score is
    n (⟨q̂, ŷ⟩ + γ ⟨p, s⟩); None without a sketch), both as hi + lo fp16 pieces, (2, N, Hq, .) (``split``: one
    fp16 q̂ would move scores by 2**-11 of their size, and scores grow with the key norms, ``tile.scores``),
    σ float32 per row, and with ``mean`` ⟨q, μ⟩ in the row's scale (c ⟨q, μ⟩ = σ mu; float32; else None)."""
    return rotate_rows(query, tables.key_rotation, tables.qjl if fmt.layout.has_qjl else None,
                       tables.key_mean if mean else None, scale=scale * LOG2E, proj_scale=fmt.qjl_coefficient,
                       split=True)
