"""The three calls the vLLM backend makes, on the Triton kernels: a drop-in for ``vllm_turboquant.reference``.

``write_cache``, ``paged_decode`` and ``prefill`` have the reference's signatures
(same names, order and defaults; tests/test_kernels.py checks it) and semantics,
so a backend can pick its implementation module once::

    from vllm_turboquant import reference as tq_ops                # CPU / ground truth
    from vllm_turboquant.kernels import ops as tq_ops              # CUDA (Triton)

    tq_ops.write_cache(cache, slot_mapping, key, value, tables, preset, protected, entries)
    out = tq_ops.paged_decode(query, cache, block_table, seq_lens, tables, preset, scale, sliding_window,
                              protected)
    out = tq_ops.prefill(query, key, value, cache, block_table, query_start_loc, seq_lens, tables, preset,
                         scale, sliding_window, compressed_chunk, protected)

As in the reference:

* ``cache`` is uint8 ``[num_blocks, block_size, H, slot_bytes]`` with any strides for the
  first three dims -- vLLM's ``[num_blocks, H, block_size, slot_bytes]`` cache is passed as
  ``kv_cache.permute(0, 2, 1, 3)``. The last dim must be contiguous (ValueError otherwise).
* Outputs are new float32 tensors, (B, Hq, d) for decode and (T, Hq, d) for prefill,
  whatever the query dtype; the caller casts (or uses the kernels' ``out=`` directly).
  Prefill rows that no sequence owns (padding past ``query_start_loc[-1]``) are zeros.
* ``sliding_window`` is None (full causal attention) or the number of most recent
  tokens a query sees, its own included (>= 1; ValueError otherwise).
* ``protected`` (``vllm_turboquant.protected.ProtectedTokens``, None = off): the attention
  sink and recent window are read from their exact copies in the pool where they have one;
  ``write_cache`` stores token i's copy at pool row ``entries[i]`` (-1 = none). The kernels
  compute the copies in float32 (the reference in float64): rows agree within one rounding
  to the pool's dtype. None or S = W = 0 runs exactly the unprotected kernels.

Differences: everything (cache, tables, tensors) must live on one CUDA device (or on
CPU under ``TRITON_INTERPRET=1``, which is only for tests). ``prefill`` reads the
longest query length back to the host once per call (the reference syncs too); the
kernels' own ``prefill(..., max_query_len=...)`` avoids that, e.g. under CUDA graphs.
``paged_decode`` uses ``default_num_splits``, which depends only on shapes.
"""

from __future__ import annotations

import torch

from ..presets import Preset
from ..protected import ProtectedTokens
from ..registry import LayerTables
from .decode import paged_decode as _paged_decode
from .prefill import prefill as _prefill
from .store import store as _store

__all__ = ["write_cache", "paged_decode", "prefill"]


def _check_window(sliding_window: int | None) -> None:
    if sliding_window is not None and int(sliding_window) < 1:
        raise ValueError(f"sliding_window must be None or >= 1, got {sliding_window!r}")


def write_cache(cache: torch.Tensor, slot_mapping: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                tables: LayerTables, preset: Preset | str, protected: ProtectedTokens | None = None,
                entries: torch.Tensor | None = None) -> None:
    """Encode N new tokens and store them in place at flat slot indices (block * block_size + offset).

    cache: uint8 [num_blocks, block_size, H, slot_bytes], any strides but a contiguous last
    dim; slot_mapping (N,), negative = skip (padding); key/value (N, H, d), any float dtype.
    With ``protected``, token i's exact copy also goes to pool row entries[i] (-1 = none).
    """
    _store(cache, slot_mapping, key, value, tables, preset, protected, entries)


def paged_decode(query: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                 tables: LayerTables, preset: Preset | str, scale: float,
                 sliding_window: int | None = None, protected: ProtectedTokens | None = None) -> torch.Tensor:
    """One new query per sequence against its cached tokens, read from packed slots.

    query (B, Hq, d); block_table (B, max_blocks) int; seq_lens (B,) tokens in the cache,
    the query's own included. With ``protected``, protected keys that have an exact copy are
    read from it. Returns float32 (B, Hq, d); empty sequences give zeros.
    """
    _check_window(sliding_window)
    return _paged_decode(query, cache, block_table, seq_lens, tables, preset, scale, sliding_window,
                         protected=protected)


def prefill(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cache: torch.Tensor,
            block_table: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
            tables: LayerTables, preset: Preset | str, scale: float, sliding_window: int | None = None,
            compressed_chunk: bool = False, protected: ProtectedTokens | None = None) -> torch.Tensor:
    """Causal attention for chunks of new tokens over a compressed cached prefix.

    query (T, Hq, d), key/value (T, H, d): the new tokens of all sequences, packed;
    sequence b owns rows query_start_loc[b]:query_start_loc[b+1] and has seq_lens[b]
    tokens in total, the new ones last (already written to the cache). The chunk's own
    K/V are exact, or read from the slots when ``compressed_chunk``. With ``protected``, a
    protected prefix key with an exact copy is read from it, and with ``compressed_chunk`` a
    protected chunk key from its own exact row. Returns float32 (T, Hq, d).
    """
    _check_window(sliding_window)
    out = torch.zeros(query.shape, dtype=torch.float32, device=query.device)
    return _prefill(query, key, value, cache, block_table, query_start_loc, seq_lens, tables, preset, scale,
                    sliding_window, compressed_chunk, protected=protected, out=out)
