"""The ``triton`` implementation of ``vllm_turboquant.ops.AttentionOps`` (the contract and its
documentation live there): thin wrappers over the kernels of ``store.py``, ``decode.py`` and ``prefill.py``.

Beyond the contract: everything (cache, tables, tensors) must live on one CUDA device, or on the CPU
under ``TRITON_INTERPRET=1`` (tests only). Rotations and the cache write are fp32-accurate; the
attention dots take fp16 operands with fp32 accumulation (``common.OPERAND_DTYPE``; the reference
computes in float64), the scores fp32-accurate from hi + lo pieces (``tile.scores``: their error would
otherwise grow with the key norms); exact copies of protected tokens are rounded to the dtype of the exact-copy cache
that holds them. ``prefill`` reads the longest query length back to the host once per call unless the
caller passes ``max_query_len``. ``paged_decode`` picks its split count from shapes only
(``decode.choose_num_splits``; the context bound is the block table's width), so it never syncs and a
captured CUDA graph stays valid for any sequence lengths.
"""

from __future__ import annotations

import torch

from ..layout import CacheFormat, cache_format
from ..ops import check_sliding_window
from ..protected import ProtectedTokens
from ..registry import LayerTables
from .decode import paged_decode as _paged_decode
from .prefill import prefill as _prefill
from .store import store as _store

#: This module's name in ``vllm_turboquant.ops.IMPLEMENTATIONS``.
NAME = "triton"
__all__ = ["NAME", "write_cache", "paged_decode", "prefill"]


def write_cache(cache: torch.Tensor, slot_mapping: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                tables: LayerTables, fmt: CacheFormat, protected: ProtectedTokens | None = None,
                exact_slot_mapping: torch.Tensor | None = None) -> None:
    _store(cache, slot_mapping, key, value, tables, cache_format(fmt, key.shape[-1]), protected, exact_slot_mapping)


def paged_decode(query: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                 tables: LayerTables, fmt: CacheFormat, scale: float,
                 sliding_window: int | None = None, protected: ProtectedTokens | None = None) -> torch.Tensor:
    check_sliding_window(sliding_window)
    return _paged_decode(query, cache, block_table, seq_lens, tables, cache_format(fmt, query.shape[-1]), scale,
                         sliding_window, protected=protected)


def prefill(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cache: torch.Tensor,
            block_table: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
            tables: LayerTables, fmt: CacheFormat, scale: float, sliding_window: int | None = None,
            compressed_chunk: bool = False, protected: ProtectedTokens | None = None,
            max_query_len: int | None = None) -> torch.Tensor:
    check_sliding_window(sliding_window)
    out = torch.zeros(query.shape, dtype=torch.float32, device=query.device)
    return _prefill(query, key, value, cache, block_table, query_start_loc, seq_lens, tables,
                    cache_format(fmt, query.shape[-1]), scale, sliding_window, compressed_chunk, protected=protected,
                    max_query_len=max_query_len, out=out)
