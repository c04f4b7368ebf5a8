"""vLLM attention backend for the packed TurboQuant KV cache.

On the CPU platform every attention layer is served by ``CPU_ATTN``; we register
``TurboQuantCPUBackend`` under that name. A layer whose kv-cache dtype is a
TurboQuant preset gets a uint8 cache ``[num_blocks, H, block_size, slot_bytes]``
(vLLM's block-head-token order; ``customize_spec`` sets ``slot_bytes`` from the
layout, so vLLM's KV budget counts the real bytes) and is attended by
``TurboQuantImpl``; any other layer or dtype runs the stock CPU implementation
untouched.

The attention maths lives in one of two drop-in ``ops`` modules with the same
three functions (``write_cache``, ``paged_decode``, ``prefill``): the torch
reference (CPU) or the Triton kernels (CUDA, or the interpreter when asked).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import replace
from typing import Any, ClassVar

import torch
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadataBuilder,
)
from vllm.v1.kv_cache_interface import AttentionSpec, KVQuantMode

from .layout import check_head_dim, slot_layout
from .presets import PRESETS, Preset
from .registry import CodebookRegistry, LayerTables, load_registry
from .settings import Settings, load_settings

logger = logging.getLogger("vllm.vllm_turboquant")

#: The preset of the most recently built packed layer in this process. customize_spec may run
#: where no vLLM config is current (the worker's spec RPC); it runs right after the model (and
#: so its impls) was built, so this is the running engine's preset.
_LAST_PRESET: list[str] = []
_REGISTRIES: dict[tuple, CodebookRegistry] = {}
_LOCK = threading.Lock()


def _current_vllm_config():
    from vllm.config import get_current_vllm_config_or_none

    return get_current_vllm_config_or_none()


def _run_preset_name() -> str:
    cfg = _current_vllm_config()
    name = cfg.cache_config.cache_dtype if cfg is not None and cfg.cache_config is not None else None
    if name in PRESETS:
        return name
    if _LAST_PRESET:
        return _LAST_PRESET[-1]
    raise RuntimeError(f"vllm-turboquant: cannot tell which preset a uint8 KV cache is for (run dtype {name!r})")


class TurboQuantCPUBackend(CPUAttentionBackend):
    supported_kv_cache_dtypes: ClassVar[list] = [*CPUAttentionBackend.supported_kv_cache_dtypes, *PRESETS]

    @staticmethod
    def get_name() -> str:
        return "CPU_ATTN"  # must stay an AttentionBackendEnum member name

    @classmethod
    def supports_kv_cache_dtype(cls, kv_cache_dtype) -> bool:
        return kv_cache_dtype in PRESETS or super().supports_kv_cache_dtype(kv_cache_dtype)

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        spec = super().customize_spec(spec)
        # Our names are the only ones stored as uint8 without a vLLM-side quant mode.
        if spec.dtype != torch.uint8 or spec.kv_quant_mode != KVQuantMode.NONE or spec.state_content_bytes:
            return spec
        layout = slot_layout(_run_preset_name(), spec.head_size)
        return replace(spec, state_content_bytes=layout.slot_bytes)

    @staticmethod
    def get_impl_cls():
        return TurboQuantImpl

    @staticmethod
    def get_builder_cls():
        return TurboQuantMetadataBuilder


class TurboQuantMetadataBuilder(CPUAttentionMetadataBuilder):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        # The stock scheduler-metadata op only knows stock dtypes; our layers do not use its output.
        if self.kv_cache_dtype in PRESETS:
            self.kv_cache_dtype = "auto"


def _model_facts(vllm_config) -> dict[str, Any]:
    """Model name, layer count and global KV-head count, and this worker's TP position."""
    from vllm.distributed import parallel_state as ps

    mc = vllm_config.model_config
    tp = (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()) \
        if ps.model_parallel_is_initialized() else (0, 1)
    return dict(model=str(mc.model), num_layers=int(mc.hf_text_config.num_hidden_layers),
                total_kv_heads=int(mc.get_total_num_kv_heads()), tp_rank=tp[0], tp_size=tp[1])


def shared_registry(preset: Preset, head_dim: int, facts: dict[str, Any], settings: Settings) -> CodebookRegistry:
    """One registry per (model, preset, head_dim, seed, calibration file) per process.

    A calibration file is loaded and checked against the model here, at engine start."""
    key = (facts["model"], preset.name, head_dim, facts["num_layers"], facts["total_kv_heads"], settings.seed,
           settings.calibration)
    with _LOCK:
        if key not in _REGISTRIES:
            if settings.calibration:
                reg = load_registry(settings.calibration, preset=preset.name, head_dim=head_dim,
                                    num_layers=facts["num_layers"], num_kv_heads=facts["total_kv_heads"])
            else:
                reg = CodebookRegistry.default(preset, head_dim, facts["num_layers"], facts["total_kv_heads"],
                                               seed=settings.seed, model=facts["model"])
            _REGISTRIES[key] = reg
        return _REGISTRIES[key]


def _ops_module(settings: Settings, device: torch.device):
    use_triton = settings.ops == "triton" or (settings.ops == "auto" and device.type == "cuda")
    if use_triton:
        from .kernels import ops
        return ops
    from . import reference
    return reference


class TurboQuantImpl(CPUAttentionBackendImpl):
    """Stock CPU attention, except for layers whose kv-cache dtype is a TurboQuant preset."""

    def __init__(self, num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                 logits_soft_cap=None, attn_type=AttentionType.DECODER, kv_sharing_target_layer_name=None,
                 sinks=None, **kwargs):
        super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                         logits_soft_cap, attn_type, kv_sharing_target_layer_name, sinks, **kwargs)
        self.preset = PRESETS.get(kv_cache_dtype)
        if self.preset is None:
            if str(kv_cache_dtype).startswith("turboquant_"):
                raise ValueError(f"--kv-cache-dtype {kv_cache_dtype} is vLLM's in-tree TurboQuant, which has no CPU "
                                 f"implementation (it would return wrong outputs); use this plugin's presets "
                                 f"instead: {', '.join(PRESETS)}")
            return
        name = self.preset.name
        problems = []
        if attn_type != AttentionType.DECODER:
            problems.append(f"attention type {attn_type!r} (only decoder self-attention is supported)")
        if alibi_slopes is not None:
            problems.append("ALiBi position biases")
        if sinks is not None:
            problems.append("learned attention sinks")
        if logits_soft_cap:
            problems.append(f"attention logit soft-capping ({logits_soft_cap})")
        try:
            check_head_dim(head_size)
        except ValueError as exc:
            problems.append(str(exc))
        if problems:
            raise ValueError(f"--kv-cache-dtype {name} cannot serve this model: " + "; ".join(problems)
                             + ". Use --kv-cache-dtype auto or fp8 for it.")
        cfg = _current_vllm_config()
        self.settings = load_settings(getattr(cfg, "additional_config", None))
        self.facts = _model_facts(cfg)
        self.registry = shared_registry(self.preset, head_size, self.facts, self.settings)
        self.window = sliding_window if sliding_window and sliding_window > 0 else None
        self.layer_index: int | None = None
        self._tables: LayerTables | None = None
        self._ops = None
        _LAST_PRESET[:] = [name]

    # -- helpers -------------------------------------------------------------

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
            self._ops = _ops_module(self.settings, device)
            if self.layer_index == 0:
                logger.info("vllm-turboquant: %s attention on %s (%s ops, slot %d B/token/KV head, "
                            "compressed_prefill=%s)", self.preset.name, device, self._ops.__name__.rsplit(".", 1)[-1],
                            slot_layout(self.preset, self.head_size).slot_bytes, self.settings.compressed_prefill)
        return self._tables

    # -- vLLM hooks ----------------------------------------------------------

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping):
        if self.preset is None:
            return super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        tables = self._layer_tables(layer, key.device)
        n = min(key.shape[0], slot_mapping.shape[0])
        # kv_cache: uint8 [num_blocks, H, block_size, slot_bytes] -> the ops' [blocks, block_size, H, slot] view
        self._ops.write_cache(kv_cache.permute(0, 2, 1, 3), slot_mapping[:n], key[:n], value[:n], tables, self.preset)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output=None, output_scale=None,
                output_block_scale=None):
        if self.preset is None:
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                   output_block_scale)
        if attn_metadata is None:  # profiling run
            return output
        tables = self._layer_tables(layer, query.device)
        cache = kv_cache.permute(0, 2, 1, 3)
        qsl = attn_metadata.query_start_loc.long()
        seq_lens = attn_metadata.seq_lens.long()
        block_table = attn_metadata.block_table
        q_lens = qsl[1:] - qsl[:-1]
        # Decode requests (one new token) go through the paged decode path together;
        # prefill and chunked-prefill requests through the causal prefill path.
        decode = q_lens == 1
        if self.settings.compressed_prefill is False:
            decode &= seq_lens > 1  # a one-token prompt still sees its exact K/V, as prefill would
        if bool(decode.any()):
            rows = qsl[:-1][decode]
            out = self._ops.paged_decode(query[rows], cache, block_table[decode], seq_lens[decode], tables,
                                         self.preset, self.scale, self.window)
            output[rows] = out.to(output.dtype)
        prefill = ~decode & (q_lens > 0)
        if bool(prefill.any()):
            starts, lens = qsl[:-1][prefill], q_lens[prefill]
            rows = torch.cat([torch.arange(int(s), int(s + n), device=query.device) for s, n in zip(starts, lens)])
            sub_qsl = torch.zeros(len(lens) + 1, dtype=torch.long, device=query.device)
            sub_qsl[1:] = torch.cumsum(lens, 0)
            out = self._ops.prefill(query[rows], key[rows], value[rows], cache, block_table[prefill],
                                    sub_qsl, seq_lens[prefill], tables, self.preset, self.scale, self.window,
                                    compressed_chunk=self.settings.compressed_prefill)
            output[rows] = out.to(output.dtype)
        return output
