"""vLLM 0.33 CUDA attention backend for the packed TurboQuant KV cache.

STATUS: THIS BACKEND HAS NOT RUN ON A GPU YET. Its vLLM glue has run on the CPU against vLLM 0.33.0's
own classes (tests/backend/test_gpu_glue.py: the real ``Attention`` layer, KV-cache specs, grouping,
layout and page views, ``CommonAttentionMetadata``, metadata builders, Model Runner V2's metadata
helpers, this impl's ``do_kv_cache_update`` / ``forward``, with the Triton kernels under the
interpreter) and is checked statically (tests/backend/test_gpu_backend_static.py). No CUDA device, no
compiled Triton, no CUDA graph has been involved: run ``benchmarks/gpu_check.sh`` and a real engine on a
GPU before relying on it.

Selecting it
------------
``plugin.register`` (on CUDA, vLLM 0.33) registers our preset names as kv-cache dtypes and this class
as ``AttentionBackendEnum.CUSTOM``; the platform plugin (``platform.py``, entry point
``vllm.platform_plugins``) makes vLLM pick CUSTOM for a layer whose kv-cache dtype is one of ours, so::

    vllm serve MODEL --kv-cache-dtype turboquant3
    LLM(MODEL, kv_cache_dtype="turboquant3")

need nothing else. ``--attention-backend CUSTOM`` (or ``--attention-config '{"backend": "CUSTOM"}'``) is
still accepted, and is the way when the platform plugin stands aside (another out-of-tree platform
plugin installed, or ``VLLM_TURBOQUANT_PLATFORM=0``). Layers kept at bf16 by
``--kv-cache-dtype-skip-layers`` get vLLM's own backend through the platform plugin (also under CUSTOM) when
protected tokens are off; with protected tokens on that combination is refused (``platform.skip_layers_problem``:
vLLM 0.33 would pad every packed page to the bf16 page size).

Model Runner V2 (0.33's default on CUDA)
----------------------------------------
What the model runner does with this backend, in order (``vllm/v1/worker/gpu/``):

* model build: ``Attention.__init__`` builds the impl (``PackedLayer``, the engine state); after loading,
  ``process_weights_after_loading`` binds the layer's tables on the device and, with protected tokens,
  creates its exact-copy companion layer (``exact.py``);
* memory profile (``profile_run``): a forward of ``max_num_batched_tokens`` tokens with no attention
  metadata -- ``forward`` then only allocates, and frees, the transient buffers a real call of that size
  takes (``transient_bytes``), so vLLM's peak-memory measurement counts them before it sizes the KV cache;
* KV cache: ``get_kv_cache_spec`` -> ``customize_attention_spec`` (``customize_spec``: one slot of
  ``slot_bytes`` per token and KV head, uint8), grouping and page unification, one layout for the model
  (``supported_kv_cache_layouts``), ``create_kv_cache_views``; ``init_attn_backend`` builds one metadata
  builder per group (``_prepare_layers`` binds the tables again, idempotently);
* CUDA-graph memory profile (``profile_cudagraph_memory``) and capture (``capture_model``): with a
  throwaway, then the real, KV cache. FULL graphs are captured for uniform one-token decode batches only
  (``build_for_cudagraph_capture``); every other batch runs piecewise, attention eager, with real
  metadata built from zeroed block tables and all-padding (-1) slot mappings for the warm-up runs;
* every step: MRV2 orders the batch decodes first (``sort_batch_req_ids``: one-token requests, then shorter
  chunks, then prefills), gathers the block tables (a sliding-window group's entries below
  ``num_retained_tokens`` nulled -- the exact-copy companion opts out, ``ExactCopySpec``) and builds
  ``CommonAttentionMetadata``; ``build`` plans the step on the host from it (``layer.plan_step``: the decode
  rows are a leading slice; an unordered batch, e.g. from Model Runner V1, gets index tensors), then
  ``do_kv_cache_update`` and ``forward`` run per layer. Padding slots (-1) are skipped; padding rows past
  ``num_actual_tokens`` are not written.

Cache layout
------------
0.33 has no ``get_kv_cache_shape``: the runner views each layer's bytes as the logical
``[num_blocks, H, block_size, C]`` tensor (``create_kv_cache_views``), C = ``spec.state_content_size_bytes``
(= ``slot_bytes`` here), with the strides of the ``KVCacheLayout`` resolved for the whole model, then
``.view(spec.dtype)`` (uint8). ``permute(0, 2, 1, 3)`` gives the ops' ``[blocks, block_size, H, slot]`` view
(any strides, slot bytes contiguous). Only block-compact layouts (L and B outermost) are declared: the
exact-copy companion's pages are always padded to the packed page, and page unification may pad packed
pages too, which vLLM can lay out only in block-compact layouts (``compute_layout_strides`` asserts
otherwise). LBHNC (a head's tokens of a block adjacent) is preferred.

Head sizes: ``TESTED_HEAD_SIZES``, the ones both attention kernels are tested at (tests/support.py);
a layer of another head size is refused (vLLM's selection error carries ``check_gpu_head_size``'s reason).

Transient memory
----------------
The ops return new float32 outputs (the ``ops.AttentionOps`` contract), cast into vLLM's ``output`` by
``PackedLayer.forward``; with the rotated queries (hi + lo fp16 pieces) and values the Triton kernels make, a
prefill of T tokens allocates about T x Hq x d x (4 + 4 + output itemsize) bytes beyond vLLM's own buffers
(~0.3 GB for an 8K-token chunk, 32 query heads, d = 128, bf16; ``transient_bytes``). The profile run counts
them (above), so vLLM sizes the KV cache around them; writing straight into ``output`` (dropping the float32
output and the cast) needs an ``out`` argument in the ops contract.
"""

from __future__ import annotations

import logging
from typing import ClassVar

import torch
from vllm.config import get_current_vllm_config
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.kv_cache_layout import KVCacheLayout

from ..layout import check_head_dim
from ..presets import PRESETS
from .engine import engine_for
from .layer import PackedLayer, PackedMetadata, check_no_output_quant, check_packed_layer, packed_spec, plan_step
from .platform import skip_layers_problem
from .settings import load_settings

logger = logging.getLogger("vllm.vllm_turboquant")

_NOT_OURS = ("kv_cache_dtype {dtype!r} is not a vllm-turboquant preset; the CUSTOM backend serves only "
             "--kv-cache-dtype " + ", ".join(PRESETS) + " (layers kept at another dtype by "
             "--kv-cache-dtype-skip-layers get vLLM's own backend only through vllm-turboquant's platform plugin, "
             "which is not the active vLLM platform here)")

#: Head sizes both attention kernels are tested at (tests/support.py: KERNEL_DECODE_CASES and KERNEL_PREFILL_CASES);
#: others are refused on GPU even where the packed layout could hold them.
TESTED_HEAD_SIZES = (64, 96, 128, 256)
#: KV-cache layouts declared to vLLM: the block-compact ones (see the module docstring), preferred first.
LAYOUTS = (KVCacheLayout.LBHNC, KVCacheLayout.LBNHC, KVCacheLayout.BLHNC, KVCacheLayout.BLNHC)


def check_gpu_head_size(head_size: int) -> None:
    """Raise ValueError unless the kernels are tested for ``head_size`` (and the layout holds it)."""
    check_head_dim(head_size)
    if head_size not in TESTED_HEAD_SIZES:
        raise ValueError(f"unsupported head_dim {head_size}: the GPU kernels are tested for head sizes "
                         f"{', '.join(map(str, TESTED_HEAD_SIZES))}")


def transient_bytes(num_tokens: int, num_heads: int, num_kv_heads: int, head_size: int, qjl_dim: int,
                    out_itemsize: int) -> int:
    """Device bytes one attention call over ``num_tokens`` query rows allocates and frees (an upper estimate,
    counted from the kernels' allocations): per query row the ops' float32 output, the rotated query and its
    QJL projection as hi + lo fp16 pieces (``rotate.rotate_queries``), their float32 row scale and key-mean
    term, and the output's cast to the model dtype; per token and KV head the rotated values (fp16) and
    their row scale (``rotate_rows``, exact-chunk prefill) and the chunk's exact copies (``store.chunk_copies``,
    at most float32); per token the store's int64 slot list."""
    rows = num_tokens * num_heads
    return (rows * (head_size * (4 + 4 + out_itemsize) + qjl_dim * 4 + 8)
            + num_tokens * num_kv_heads * (head_size * (2 + 2 * 4) + 4) + num_tokens * 8)


class TurboQuantGPUBackend(AttentionBackend):
    """Packed TurboQuant KV cache on CUDA (Triton kernels). Registered as AttentionBackendEnum.CUSTOM."""

    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list] = list(PRESETS)

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"  # Attention.__init__ does AttentionBackendEnum[get_name()]

    @staticmethod
    def get_impl_cls() -> type[TurboQuantGPUImpl]:
        return TurboQuantGPUImpl

    @staticmethod
    def get_builder_cls() -> type[TurboQuantGPUMetadataBuilder]:
        return TurboQuantGPUMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        return [MultipleOf(16)]  # the kernels take any block size; 16 keeps vLLM's CUDA default

    @classmethod
    def supports_kv_cache_dtype(cls, kv_cache_dtype) -> bool:
        return kv_cache_dtype in PRESETS

    @classmethod
    def supports_head_size(cls, head_size: int) -> bool:
        return head_size in TESTED_HEAD_SIZES

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return True

    @classmethod
    def supports_kv_connector(cls) -> bool:
        return False  # connectors have not been tried with packed slots

    @classmethod
    def supports_device_cpu_query_lens_mismatch(cls) -> bool:
        return False  # the builder plans the decode-only path from the host query lengths

    @classmethod
    def customize_spec(cls, spec):
        return packed_spec(super().customize_spec(spec))

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        return LAYOUTS  # block-compact only: padded pages need them (module docstring)

    @classmethod
    def validate_configuration(
        cls,
        head_size: int,
        dtype: torch.dtype,
        kv_cache_dtype,
        block_size: int | None,
        use_mla: bool,
        has_sink: bool,
        use_sparse: bool,
        use_mm_prefix: bool,
        use_per_head_quant_scales: bool,
        device_capability,
        attn_type: str,
        has_sliding_window: bool = False,
        use_non_causal: bool = False,
        use_batch_invariant: bool = False,
        use_kv_connector: bool = False,
        use_pcp: bool = False,
        use_adaptive_verification: bool = False,
        use_dcp: bool = False,
        use_rswa: bool = False,
    ) -> list[str]:
        reasons = super().validate_configuration(
            head_size=head_size, dtype=dtype, kv_cache_dtype=kv_cache_dtype, block_size=block_size,
            use_mla=use_mla, has_sink=has_sink, use_sparse=use_sparse, use_mm_prefix=use_mm_prefix,
            use_per_head_quant_scales=use_per_head_quant_scales, device_capability=device_capability,
            attn_type=attn_type, has_sliding_window=has_sliding_window, use_non_causal=use_non_causal,
            use_batch_invariant=use_batch_invariant, use_kv_connector=use_kv_connector, use_pcp=use_pcp,
            use_adaptive_verification=use_adaptive_verification, use_dcp=use_dcp, use_rswa=use_rswa)
        # Name the problem instead of vLLM's generic wording.
        better = {"kv_cache_dtype not supported": _NOT_OURS.format(dtype=kv_cache_dtype)}
        if not cls.supports_head_size(head_size):
            try:
                check_gpu_head_size(head_size)
            except ValueError as exc:
                better["head_size not supported"] = str(exc)
        return [better.get(r, r) for r in reasons]


class TurboQuantGPUMetadataBuilder(AttentionMetadataBuilder[PackedMetadata]):
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
    reorder_batch_threshold: ClassVar[int | None] = 1  # decode-first batches: the split is two slices

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self._prepare_layers()

    def _prepare_layers(self) -> None:
        """Build each packed layer's tables now: the first forward may be inside a CUDA graph capture,
        where the host-to-device copies would fail."""
        context = getattr(self.vllm_config.compilation_config, "static_forward_context", None) or {}
        device = torch.device(self.device)
        if device.type == "cuda" and device.index is None:  # the ops compare devices exactly
            device = torch.device("cuda", torch.cuda.current_device())
        for name in self.layer_names:
            layer = context.get(name)
            impl = getattr(layer, "impl", None)
            if isinstance(impl, TurboQuantGPUImpl):
                impl.packed.bind(name, device)

    @classmethod
    def get_cudagraph_support(cls, vllm_config, kv_cache_spec) -> AttentionCGSupport:
        # The torch reference ops (settings ops=torch) sync with the host: no CUDA graphs then.
        if load_settings(getattr(vllm_config, "additional_config", None)).ops == "torch":
            return AttentionCGSupport.NEVER
        return cls._cudagraph_support

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> PackedMetadata:
        return plan_step(common_attn_metadata, torch.device(self.device))

    def build_for_cudagraph_capture(self, common_attn_metadata: CommonAttentionMetadata) -> PackedMetadata:
        md = self.build(0, common_attn_metadata)
        if not md.decode_only:
            raise RuntimeError("vllm-turboquant: CUDA graphs are only supported for one-token decode batches "
                               f"(capture asked for max_query_len={md.max_query_len})")
        # As TRITON_ATTN does: short dummy contexts keep capture fast; a replay reads the real lengths.
        md.seq_lens.fill_(1)
        return md


class TurboQuantGPUImpl(AttentionImpl[PackedMetadata]):
    """Attention over the packed cache with the Triton ops (or the torch reference if settings say so)."""

    def __init__(self, num_heads, head_size, scale, num_kv_heads=None, alibi_slopes=None, sliding_window=None,
                 kv_cache_dtype="auto", logits_soft_cap=None, attn_type=AttentionType.DECODER,
                 kv_sharing_target_layer_name=None, sinks=None, **kwargs):
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads if num_kv_heads is not None else num_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.sliding_window = sliding_window
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        preset = PRESETS.get(kv_cache_dtype)
        if preset is None:
            raise ValueError(_NOT_OURS.format(dtype=kv_cache_dtype))
        check_packed_layer(preset.name, attn_type, alibi_slopes, sinks, logits_soft_cap, head_size,
                           kv_sharing_target_layer_name)
        try:
            check_gpu_head_size(head_size)
        except ValueError as exc:
            raise ValueError(f"--kv-cache-dtype {preset.name} cannot serve this model on GPU: {exc}. Use "
                             "--kv-cache-dtype auto or fp8 for it.") from None
        # Model-specific options vLLM forwards to impls (chunk_lookback, use_alibi_sqrt, ...) change
        # the attention maths; refuse any that is set rather than ignore it.
        active = sorted(k for k, v in kwargs.items() if not (v is None or v is False or (type(v) is int and v == -1)))
        if active:
            raise ValueError(f"--kv-cache-dtype {preset.name} cannot serve this model: attention options "
                             f"{active} are not supported. Use --kv-cache-dtype auto or fp8 for it.")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{self.num_heads} query heads is not a multiple of {self.num_kv_heads} KV heads")
        self._vllm_config = get_current_vllm_config()
        problem = skip_layers_problem(self._vllm_config)
        if problem:
            raise ValueError(f"vllm-turboquant: {problem}")
        engine = engine_for(self._vllm_config, preset.name)
        self.packed = PackedLayer(engine, head_size, num_heads, self.num_kv_heads, scale, sliding_window)

    def _tables_for(self, layer, device: torch.device):
        if self.packed.tables is None and device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"vllm-turboquant: tables of {layer.layer_name} were not built before CUDA graph "
                               "capture (the metadata builder builds them; was it skipped?)")
        return self.packed.bind(layer.layer_name, device)

    def _reserve_transients(self, query: torch.Tensor, output: torch.Tensor) -> None:
        """Allocate and free what a real call over these rows allocates, so that the profiled peak holds it
        (vLLM sizes the KV cache from that peak; the caching allocator keeps the block for later calls)."""
        qjl_dim = self.packed.preset.qjl_dim(self.head_size)
        nbytes = transient_bytes(query.shape[0], self.num_heads, self.num_kv_heads, self.head_size, qjl_dim,
                                 output.element_size())
        if nbytes:
            torch.empty(nbytes, dtype=torch.uint8, device=query.device)

    def process_weights_after_loading(self, act_dtype: torch.dtype) -> None:
        # after the layer is registered, before vLLM collects KV-cache specs
        self.packed.prepare(self, self._vllm_config)

    def do_kv_cache_update(self, layer, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                           slot_mapping: torch.Tensor) -> None:
        if slot_mapping.shape[0] == 0:
            return
        self._tables_for(layer, key.device)
        self.packed.write(layer.layer_name, key, value, kv_cache, slot_mapping)

    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: PackedMetadata, output: torch.Tensor,
                output_scale: torch.Tensor | None = None,
                output_block_scale: torch.Tensor | None = None) -> torch.Tensor:
        check_no_output_quant(output_scale, output_block_scale)
        if attn_metadata is None:  # the memory profile: count the transients of a real call this size
            self._reserve_transients(query, output)
            return output
        self._tables_for(layer, query.device)
        return self.packed.forward(layer.layer_name, query, key, value, kv_cache, attn_metadata, output)
