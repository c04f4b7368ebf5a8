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
What this impl shares with the CUDA backend (``gpu_backend.py``, vLLM 0.33) lives in
``packed_attention.py``.
"""

from __future__ import annotations

from typing import ClassVar

from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadataBuilder,
)
from vllm.v1.kv_cache_interface import AttentionSpec

from .packed_attention import (PackedLayerMixin, check_packed_layer, packed_spec, protected_group,  # noqa: F401
                               shared_registry, step_metadata)
from .presets import PRESETS


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
        # Our names are the only ones stored as uint8 without a vLLM-side quant mode.
        return packed_spec(super().customize_spec(spec))

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
        self.tq_group = protected_group(vllm_config, kv_cache_spec.block_size)

    def build(self, common_prefix_len, common_attn_metadata, fast_build=False):
        meta = super().build(common_prefix_len, common_attn_metadata, fast_build)
        if self.tq_group is not None:
            meta.tq_group, meta.tq_entries = self.tq_group, None
        return meta


class TurboQuantImpl(PackedLayerMixin, CPUAttentionBackendImpl):
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
        check_packed_layer(self.preset.name, attn_type, alibi_slopes, sinks, logits_soft_cap, head_size,
                           kv_sharing_target_layer_name)
        self._init_packed(self.preset, head_size, sliding_window)

    # -- vLLM hooks ----------------------------------------------------------

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping):
        if self.preset is None:
            return super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        self._write_packed(layer, key, value, kv_cache, slot_mapping, step_metadata(layer.layer_name))

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output=None, output_scale=None,
                output_block_scale=None):
        if self.preset is None:
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                   output_block_scale)
        if attn_metadata is None:  # profiling run
            return output
        return self._forward_packed(layer, query, key, value, kv_cache, attn_metadata.query_start_loc,
                                    attn_metadata.seq_lens, attn_metadata.block_table, output, attn_metadata)

