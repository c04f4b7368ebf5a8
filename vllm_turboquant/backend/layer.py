"""What the CPU and the GPU attention impls share: one packed (TurboQuant) layer, served the same way.

* ``packed_spec``: the ``customize_spec`` body (uint8, no vLLM-side quant mode -> ``state_content_bytes =
  slot_bytes``);
* ``check_packed_layer``: the refusals, naming the problem;
* ``PackedMetadata`` / ``plan_step``: one step of a packed KV-cache group, planned on the host by the metadata
  builder from vLLM's CPU-side metadata (the decode / prefill split; no device reads);
* ``PackedLayer``: one layer's engine state, cache format, tables, ops and exact-copy companion
  (``exact.py``); the cache write and the attention of a planned step, each call going to the layer's
  ``ops.AttentionOps``.

This module imports no vLLM attention backend class, so importing it pulls in neither backend (the
CPU build must never import ``gpu.py``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from ..layout import CacheFormat, cache_format, check_head_dim
from ..ops import AttentionOps, load_ops
from ..protected import ProtectedTokens
from ..registry import LayerTables
from .engine import EngineState, current_engine

logger = logging.getLogger("vllm.vllm_turboquant")


def packed_spec(spec):
    """``customize_spec`` for packed layers: one slot of ``slot_bytes`` per (token, KV head).

    Our names are the only ones stored as uint8 without a vLLM-side quant mode; any other spec (or one
    already sized) is returned unchanged."""
    from vllm.v1.kv_cache_interface import KVQuantMode

    if spec.dtype != torch.uint8 or spec.kv_quant_mode != KVQuantMode.NONE or spec.state_content_bytes:
        return spec
    return replace(spec, state_content_bytes=current_engine().slot_bytes(spec.head_size))


def check_packed_layer(name: str, attn_type: Any, alibi_slopes, sinks, logits_soft_cap, head_size: int,
                       kv_sharing_target_layer_name: str | None = None) -> None:
    """Raise ValueError listing every feature of this layer the packed path cannot serve."""
    from vllm.v1.attention.backend import AttentionType

    problems = []
    if attn_type != AttentionType.DECODER:
        problems.append(f"attention type {attn_type!r} (only decoder self-attention is supported)")
    if alibi_slopes is not None:
        problems.append("ALiBi position biases")
    if sinks is not None:
        problems.append("learned attention sinks")
    if logits_soft_cap:
        problems.append(f"attention logit soft-capping ({logits_soft_cap})")
    if kv_sharing_target_layer_name:
        # the shared cache was encoded with the other layer's rotations and codebooks
        problems.append(f"sharing the KV cache of layer {kv_sharing_target_layer_name!r}")
    try:
        check_head_dim(head_size)
    except ValueError as exc:
        problems.append(str(exc))
    if problems:
        raise ValueError(f"--kv-cache-dtype {name} cannot serve this model: " + "; ".join(problems)
                         + ". Use --kv-cache-dtype auto or fp8 for it.")


def check_no_output_quant(output_scale, output_block_scale) -> None:
    """Raise NotImplementedError for vLLM's fused output quantisation (``output_scale`` /
    ``output_block_scale`` given to an impl's ``forward``): the packed path writes unquantised outputs."""
    if output_scale is not None or output_block_scale is not None:
        raise NotImplementedError("vllm-turboquant does not support fused output quantization")


def step_metadata(layer_name: str):
    """This step's attention metadata of a layer (vLLM's cache-write hook is not handed it)."""
    from vllm.forward_context import get_forward_context

    meta = get_forward_context().attn_metadata
    if isinstance(meta, list):  # speculative decoding: [0] is the base model's
        meta = meta[0]
    return meta.get(layer_name) if isinstance(meta, dict) else meta


# -- the step plan -----------------------------------------------------------------------------------------

@dataclass
class PackedMetadata:
    """One step of a packed KV-cache group. Request i owns query rows query_start_loc[i]:query_start_loc[i+1],
    the last q_len of its seq_lens[i] tokens (all written to the cache before attention runs).

    The builder plans the split once, on the host: requests ``decode_reqs`` (one new token each: paged
    decode) and ``prefill_reqs`` (prefill / chunked prefill). With vLLM's decode-first batch order
    (``reorder_batch_threshold = 1``) they are the slices [0, num_decodes) and [num_decodes, num_reqs) and
    the index tensors are None; an unordered batch gets index tensors (copied to the device, never read back).
    """

    num_actual_tokens: int
    num_reqs: int
    max_query_len: int
    max_seq_len: int
    query_start_loc: torch.Tensor  # (num_reqs + 1,) int32, device
    seq_lens: torch.Tensor  # (num_reqs,), device
    block_table: torch.Tensor  # (num_reqs, max_blocks) int32, device
    slot_mapping: torch.Tensor  # (num_tokens,), device, negative = padding
    num_decodes: int
    num_prefills: int
    num_prefill_tokens: int
    decode_reqs: torch.Tensor | None = None  # request indices when the batch is not decode-first
    prefill_reqs: torch.Tensor | None = None
    prefill_rows: torch.Tensor | None = None  # query rows of the prefill requests, in order
    prefill_query_start_loc: torch.Tensor | None = None  # (num_prefills + 1,) rebased to 0, device

    @property
    def decode_only(self) -> bool:
        return self.num_prefills == 0


def plan_step(cam, device: torch.device) -> PackedMetadata:
    """Plan one step from vLLM's ``CommonAttentionMetadata``: only its host copies are read."""
    num_reqs = cam.num_reqs
    qsl = cam.query_start_loc_cpu[:num_reqs + 1].numpy().astype(np.int64)
    q_lens = np.diff(qsl)
    meta = PackedMetadata(
        num_actual_tokens=cam.num_actual_tokens, num_reqs=num_reqs, max_query_len=cam.max_query_len,
        max_seq_len=cam.max_seq_len, query_start_loc=cam.query_start_loc, seq_lens=cam.seq_lens,
        block_table=cam.block_table_tensor, slot_mapping=cam.slot_mapping, num_decodes=num_reqs, num_prefills=0,
        num_prefill_tokens=0)
    if cam.max_query_len <= 1 and (q_lens[:cam.num_actual_tokens] == 1).all():
        return meta  # decode-only (CUDA-graph) batches, row i = request i (any empty ones trail): nothing to index
    is_decode = q_lens == 1
    prefill = np.flatnonzero(~is_decode & (q_lens > 0))
    nd = int(np.argmin(is_decode)) if not is_decode.all() else num_reqs  # leading decodes
    meta.num_decodes, meta.num_prefills = int(is_decode.sum()), len(prefill)
    meta.num_prefill_tokens = int(q_lens[prefill].sum())
    sub = np.concatenate([[0], np.cumsum(q_lens[prefill])])
    meta.prefill_query_start_loc = torch.from_numpy(sub).to(device, non_blocking=True)
    ordered = nd == meta.num_decodes and np.array_equal(prefill, np.arange(nd, nd + len(prefill)))
    if not ordered:
        meta.decode_reqs = torch.from_numpy(np.flatnonzero(is_decode)).to(device, non_blocking=True)
        meta.prefill_reqs = torch.from_numpy(prefill).to(device, non_blocking=True)
        rows = np.concatenate([np.arange(qsl[i], qsl[i + 1]) for i in prefill] or [np.zeros(0, np.int64)])
        meta.prefill_rows = torch.from_numpy(rows).to(device, non_blocking=True)
    return meta


# -- one packed layer ------------------------------------------------------------------------------------

class PackedLayer:
    """One packed attention layer: its engine state, cache format, per-layer tables, ops and exact-copy
    companion.

    The impl builds it in its ``__init__`` (while vLLM's config is current), calls ``prepare``
    from ``process_weights_after_loading``, ``write`` from ``do_kv_cache_update`` and ``forward`` from
    ``forward``; ``bind`` resolves the tables and the ops on the layer's device once."""

    def __init__(self, engine: EngineState, head_size: int, num_heads: int, num_kv_heads: int, scale: float,
                 sliding_window: int | None):
        self.engine = engine
        self.fmt: CacheFormat = cache_format(engine.preset, head_size)
        self.num_heads, self.num_kv_heads, self.scale = num_heads, num_kv_heads, float(scale)
        self.window = sliding_window if sliding_window and sliding_window > 0 else None
        self.registry = engine.registry(head_size)
        self.layer_index: int | None = None
        self.tables: LayerTables | None = None
        self.ops: AttentionOps | None = None
        self.companion = None  # exact.ExactCopyLayer when protected tokens are on

    @property
    def preset(self):
        return self.fmt.preset

    @property
    def protects(self) -> bool:
        return self.engine.sink + self.engine.window > 0

    def prepare(self, impl, vllm_config) -> None:
        """After the weights are loaded, before vLLM profiles memory and collects KV-cache specs: build the
        layer's tables on its device (so nothing is allocated lazily later) and, with protected tokens, its
        exact-copy companion layer. Idempotent."""
        from .exact import attach, layer_name_of

        name = layer_name_of(impl, vllm_config)
        device = torch.device(vllm_config.device_config.device)
        if device.type == "cuda" and device.index is None:  # the ops compare devices exactly
            device = torch.device("cuda", torch.cuda.current_device())
        self.bind(name, device)
        if self.protects and self.companion is None:
            self.companion = attach(name, vllm_config, self.engine.sink, self.engine.window)

    def _kv_head_range(self) -> tuple[int, int]:
        """This worker's slice of the global KV heads (replicated when TP > KV heads)."""
        f = self.engine.facts
        if f.total_kv_heads >= f.tp_size:
            start = f.tp_rank * self.num_kv_heads
        else:
            start = (f.tp_rank * f.total_kv_heads) // f.tp_size
        return start, start + self.num_kv_heads

    def bind(self, layer_name: str, device: torch.device) -> LayerTables:
        """The layer's tables on ``device`` and its ops, resolved on the first call."""
        if self.tables is None:
            from vllm.model_executor.models.utils import extract_layer_index

            self.layer_index = extract_layer_index(layer_name)
            start, stop = self._kv_head_range()
            self.tables = self.registry.layer(self.layer_index).heads(start, stop).to(device)
            self.ops = load_ops(self.engine.settings.ops, device, self.preset)
            if self.layer_index == 0 and self.ops.NAME == "torch" and self.engine.settings.ops == "auto":
                from .. import cpu_ops

                logger.warning("vllm-turboquant: the compiled CPU ops do not load (%s): the torch reference "
                               "ops serve, ~10x slower. To fix: %s", cpu_ops.unavailable_reason(), cpu_ops.BUILD_HINT)
            if self.layer_index == 0:
                logger.info("vllm-turboquant: %s attention on %s (%s ops, slot %d B/token/KV head, "
                            "compressed_prefill=%s, protected sink=%d window=%d, calibration=%s)",
                            self.preset.name, device, self.ops.NAME, self.fmt.layout.slot_bytes,
                            self.engine.settings.compressed_prefill, self.engine.sink, self.engine.window,
                            self.engine.calibration_file() or "none")
        return self.tables

    def _exact(self) -> tuple:
        """(exact-copy cache in the ops' order, the companion's step metadata), or (None, None)."""
        if self.companion is None:
            return None, None
        return self.companion.exact_cache(), step_metadata(self.companion.layer_name)

    def _protected(self, cache, block_table) -> ProtectedTokens | None:
        return None if cache is None else ProtectedTokens(self.engine.sink, self.engine.window, cache, block_table)

    def write(self, layer_name: str, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
              slot_mapping: torch.Tensor) -> None:
        """Encode the new tokens into the cache (and their exact copies into the companion's). kv_cache:
        vLLM's uint8 [num_blocks, H, block_size, slot_bytes] view (any strides, slot bytes contiguous)."""
        tables = self.bind(layer_name, key.device)
        n = min(key.shape[0], slot_mapping.shape[0])
        cache_x, meta_x = self._exact()
        protected = self._protected(cache_x, None if meta_x is None else meta_x.block_table)
        exact_slots = None if meta_x is None else meta_x.slot_mapping[:n]
        # -> the ops' [blocks, block_size, H, slot] view
        self.ops.write_cache(kv_cache.permute(0, 2, 1, 3), slot_mapping[:n], key[:n], value[:n], tables, self.fmt,
                             protected, exact_slots)

    def forward(self, layer_name: str, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, meta: PackedMetadata, output: torch.Tensor) -> torch.Tensor:
        """Attention of a planned step: decode requests through ``paged_decode`` together, prefill and
        chunked-prefill requests through ``prefill``; writes ``output`` rows in place. Reads nothing back
        from the device. A one-token step is a decode here in either prefill mode (vLLM's batch does not say
        whether the token is a prompt's): with ``compressed_prefill`` false its own token is exact only inside
        the recent window, like any decode's."""
        tables = self.bind(layer_name, query.device)
        compressed = self.engine.settings.compressed_prefill
        cache = kv_cache.permute(0, 2, 1, 3)
        cache_x, meta_x = self._exact()
        bt_x = None if meta_x is None else meta_x.block_table
        if meta.num_decodes:
            if meta.decode_reqs is None:
                reqs, rows = slice(0, meta.num_decodes), slice(0, meta.num_decodes)
            else:
                reqs = meta.decode_reqs
                rows = meta.query_start_loc[:-1].long()[reqs]
            seq_lens = meta.seq_lens[reqs]
            out = self.ops.paged_decode(query[rows], cache, meta.block_table[reqs], seq_lens, tables, self.fmt,
                                        self.scale, self.window,
                                        self._protected(cache_x, None if bt_x is None else bt_x[reqs]))
            output[rows] = out.to(output.dtype)
        if meta.num_prefills:
            if meta.prefill_reqs is None:
                reqs = slice(meta.num_decodes, meta.num_decodes + meta.num_prefills)
                first = meta.num_decodes  # decodes own one row each
                rows = slice(first, first + meta.num_prefill_tokens)
            else:
                reqs, rows = meta.prefill_reqs, meta.prefill_rows
            out = self.ops.prefill(query[rows], key[rows], value[rows], cache, meta.block_table[reqs],
                                   meta.prefill_query_start_loc, meta.seq_lens[reqs], tables, self.fmt, self.scale,
                                   self.window, compressed,
                                   self._protected(cache_x, None if bt_x is None else bt_x[reqs]),
                                   meta.max_query_len)
            output[rows] = out.to(output.dtype)
        return output
