"""Protected tokens: the attention sink and a recent window are attended exactly.

Attention mass concentrates on a sequence's first tokens (attention sinks) and on
its last few, so quantisation errors there cost the most -- and they are few. For a
query at position q, a key at position k is *protected* when::

    k < S            (the sink)      or      k > q - W      (the recent window, the query's own included)

and a protected key is read from its exact copy instead of its packed slot, inside
the same softmax. S = W = 0 is plain TurboQuant. Every token is still written to the
packed cache, so nothing is re-quantised when it leaves the window.

Exact copies
------------
The exact copy of a token is one row ``[H, 2 * d]`` in the model dtype: ``Π_k (k − μ)`` then ``Π_v v``
-- the key (minus the head's key mean) and the value in the rotated spaces the packed codes live in,
so a kernel scores and accumulates an exact token exactly like a packed one (norm 1, no QJL term, no
code lookup). The rotation is orthogonal: ⟨Π_k q, Π_k (k − μ)⟩ + ⟨q, μ⟩ = ⟨q, k⟩ up to one rounding to
the model dtype.

The copies live in a second paged cache, ``ProtectedTokens.cache`` ``[num_blocks, block_size, H, 2 d]``,
with its own block table: the copy of sequence b's token at position p is row
``block_table[b, p // block_size] * block_size + p % block_size``. The vLLM backend makes this cache
a companion KV-cache group managed by vLLM itself (``backend/exact.py``): its blocks hold the first S
tokens for the request's lifetime and the last W tokens (a sliding window), they come out of vLLM's
KV budget, are freed as tokens leave the window, are preempted and recomputed like any KV block, and a
prefix-cache hit is only taken where the copies it needs are still cached. So every protected position
of a running sequence before the current chunk has its copy; a chunk's own protected keys are made from
its K/V in hand (rounded exactly as stored), so the cache need not keep copies a long chunk writes below
its last W tokens. The ops consult nothing but the block table, and read only protected prefix positions
(other entries may be stale or the null block).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ProtectedTokens:
    """Where the exact copies of one layer's protected tokens are, for the sequences of one op call.

    sink S / window W: tokens; cache: ``[num_blocks, block_size, H, 2 d]`` in the model dtype (any
    strides, the last dim contiguous), rows ``Π_k (k − μ) | Π_v v``; block_table: ``(B, max_blocks)`` int,
    row b for the op's sequence b (the packed cache's block table has the same rows)."""

    sink: int
    window: int
    cache: torch.Tensor
    block_table: torch.Tensor

    def __post_init__(self) -> None:
        check_sink_window(self.sink, self.window)

    @property
    def block_size(self) -> int:
        return self.cache.shape[1]

    def rows(self, seq: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """The copies (n, H, 2 d) of the tokens at (sequence, position) = (seq, pos) (n,)."""
        bs = self.block_size
        return self.cache[self.block_table[seq, pos // bs].long(), pos % bs]


def is_active(protected: ProtectedTokens | None) -> bool:
    """Whether an op call reads exact copies at all: ``protected`` given with S + W > 0."""
    return protected is not None and protected.sink + protected.window > 0


def check_sink_window(sink: int, window: int) -> None:
    """Raise ValueError unless both are integers >= 0."""
    for name, v in (("sink", sink), ("window", window)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"protected tokens: {name}={v!r}, accepted: an integer >= 0")


def protected_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, sink: int, window: int) -> torch.Tensor:
    """Keys at k_pos read exactly by queries at q_pos (broadcast): k < S or k > q - W."""
    return (k_pos < sink) | (k_pos > q_pos - window)


def protected_positions(first_query: int, length: int, sink: int, window: int) -> torch.Tensor:
    """Every key position a chunk of queries at positions [first_query, length) reads exactly:
    [0, min(S, L)) and [max(S, first_query - W + 1), L), ascending (int64)."""
    sink_end = min(sink, length)
    start = max(sink_end, first_query - window + 1) if window else length
    return torch.cat([torch.arange(sink_end), torch.arange(start, length)])


def exact_rows(key: torch.Tensor, value: torch.Tensor, tables, dtype: torch.dtype) -> torch.Tensor:
    """Exact copies (N, H, 2 d) in ``dtype`` of key/value (N, H, d): Π_k (k − μ) then Π_v v.

    Computed in float64 and rounded once, so a copy is the same whichever implementation writes it."""
    acc = torch.float64
    k = torch.einsum("nhd,hed->nhe", key.to(acc) - tables.key_mean.to(acc), tables.key_rotation.to(acc))
    v = torch.einsum("nhd,hed->nhe", value.to(acc), tables.value_rotation.to(acc))
    return torch.cat([k, v], dim=-1).to(dtype)


def exact_bytes_per_token(num_kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
    """Bytes of one token's exact copy over all KV heads (K and V)."""
    return num_kv_heads * 2 * head_dim * dtype_bytes
