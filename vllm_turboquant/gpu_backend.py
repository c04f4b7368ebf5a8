"""vLLM 0.33 CUDA attention backend for the packed TurboQuant KV cache.

STATUS: THIS BACKEND HAS NOT RUN ON A GPU YET. It was written against the vLLM
0.33.0 sources (the GPU wheel's Python files) and is only checked statically
(tests/test_gpu_backend_static.py: every vLLM name it imports exists in 0.33 and
every method it overrides keeps 0.33's parameter names). The attention maths is
the Triton ops of ``kernels/ops.py``, which are tested on their own; the wiring
in this file is not. Run a real engine on a CUDA machine before relying on it.

Selecting it
------------
The plugin (``plugin.register``, on CUDA platforms only) registers our preset
names as kv-cache dtypes and this class as ``AttentionBackendEnum.CUSTOM``.
vLLM 0.33 does not pick CUSTOM by itself: without ``--attention-backend`` the
CUDA platform walks a fixed priority list (FLASH_ATTN, FLASHINFER, TRITON_ATTN,
FLEX_ATTENTION, TURBOQUANT) and none of those accepts our names, so the run
stops with "No valid attention backend found ... kv_cache_dtype not supported".
Select it explicitly::

    vllm serve MODEL --kv-cache-dtype turboquant3 --attention-backend CUSTOM
    LLM(MODEL, kv_cache_dtype="turboquant3", attention_backend="CUSTOM")
    # or --attention-config '{"backend": "CUSTOM"}'

There is no public hook that lets a general plugin choose the backend from the
cache dtype: the priority list is fixed in ``platforms/cuda.py``, 0.33 has no
``VLLM_ATTENTION_BACKEND`` variable, and the plugin runs before the engine
config exists. (Overriding the TURBOQUANT slot instead would take the in-tree
``turboquant_*`` dtypes away; a platform plugin would replace the whole CUDA
platform.) So the explicit flag is the supported route.

With ``--attention-backend CUSTOM`` every attention layer of the run must use a
TurboQuant preset: ``validate_configuration`` refuses other kv-cache dtypes, so
``--kv-cache-dtype-skip-layers`` (bf16 boundary layers) does not work on GPU yet.

Cache layout
------------
0.33 has no ``get_kv_cache_shape``: the runner views each layer's bytes as the
logical ``[num_blocks, H, block_size, C]`` tensor (``create_kv_cache_views`` in
``v1/kv_cache_interface.py``), C = ``spec.state_content_size_bytes``, with the
strides of the resolved ``KVCacheLayout`` (every layout keeps C innermost), then
``.view(spec.dtype)``. Our dtypes map to uint8 and ``customize_spec`` sets
``state_content_bytes = slot_bytes``, so a layer gets uint8 ``[num_blocks, H,
block_size, slot_bytes]``, whatever the physical order; ``permute(0, 2, 1, 3)``
gives the ops' ``[blocks, block_size, H, slot]`` view (any strides, slot bytes
contiguous). We prefer LBHNC (HND: one head's tokens of a block are adjacent,
which the decode kernel reads) and accept every layout.

CUDA graphs
-----------
The builder reports UNIFORM_SINGLE_TOKEN_DECODE. A batch of one-token queries
(``max_query_len <= 1``) takes a sync-free path (``paged_decode`` on rows
``0..num_reqs-1``, fixed split count), which full CUDA graphs can capture; any
batch with a longer query takes the shared varlen path
(``PackedLayerMixin._forward_packed``), which reads the decode/prefill split back
to the host and so runs eagerly (piecewise mode keeps attention out of graphs).
Per-layer tables are built when the metadata builder is created (before graph
capture; vLLM does no warm-up run before capturing by default).

Protected tokens (``protected.py``; on by default for the plain presets) plan their
exact-copy pool on the host once per step, which syncs: with S + W > 0 the builder
reports no CUDA-graph support and every batch takes the varlen path. Set
``sink``/``window`` to 0 to get the graph-captured decode back. Moving the plan
into ``build`` (with a persistent entries buffer) would lift this; not done yet.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionMetadata,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.kv_cache_layout import KVCacheLayout

from .layout import check_head_dim
from .packed_attention import (PackedLayerMixin, check_packed_layer, packed_spec, protected_group, protected_settings,
                               step_metadata)
from .presets import PRESETS
from .settings import load_settings

logger = logging.getLogger("vllm.vllm_turboquant")

_NOT_OURS = ("kv_cache_dtype {dtype!r} is not a vllm-turboquant preset; the CUSTOM backend serves only "
             "--kv-cache-dtype " + ", ".join(PRESETS) + " (layers kept at another dtype, e.g. by "
             "--kv-cache-dtype-skip-layers, are not supported on GPU yet)")


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
        try:
            check_head_dim(head_size)
        except ValueError:
            return False
        return True

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
        return (KVCacheLayout.LBHNC, KVCacheLayout.LBNHC, KVCacheLayout.BLHNC, KVCacheLayout.BLNHC,
                KVCacheLayout.BHLNC, KVCacheLayout.LHBNC)

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
                check_head_dim(head_size)
            except ValueError as exc:
                better["head_size not supported"] = str(exc)
        return [better.get(r, r) for r in reasons]


@dataclass
class TurboQuantGPUMetadata(AttentionMetadata):
    """What the ops need, per batch. Request i owns query rows query_start_loc[i]:query_start_loc[i+1],
    the last q_len of its seq_lens[i] tokens (all written to the cache before forward runs)."""

    num_actual_tokens: int
    max_query_len: int
    max_seq_len: int
    num_reqs: int
    query_start_loc: torch.Tensor  # (num_reqs + 1,) int32, device
    seq_lens: torch.Tensor  # (num_reqs,) device
    block_table: torch.Tensor  # (num_reqs, max_blocks) int32, device
    slot_mapping: torch.Tensor  # (num_tokens,) device, negative = padding
    decode_only: bool  # every request has at most one new token: the sync-free decode path
    tq_group: object = None  # packed_attention.ProtectedGroup when protected tokens are on
    tq_entries: torch.Tensor | None = None  # this step's pool rows of the new tokens (planned by the first layer)


class TurboQuantGPUMetadataBuilder(AttentionMetadataBuilder[TurboQuantGPUMetadata]):
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.tq_group = protected_group(vllm_config, kv_cache_spec.block_size)
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
                impl._layer_tables(layer, device)

    @classmethod
    def get_cudagraph_support(cls, vllm_config, kv_cache_spec) -> AttentionCGSupport:
        # The torch reference ops (settings ops=torch) sync with the host: no CUDA graphs then.
        if load_settings(getattr(vllm_config, "additional_config", None)).ops == "torch":
            return AttentionCGSupport.NEVER
        # Protected tokens plan their exact-copy pool on the host per step (a sync): eager only, for now.
        if sum(protected_settings(vllm_config)):
            return AttentionCGSupport.NEVER
        return cls._cudagraph_support

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> TurboQuantGPUMetadata:
        cam = common_attn_metadata
        return TurboQuantGPUMetadata(
            num_actual_tokens=cam.num_actual_tokens,
            max_query_len=cam.max_query_len,
            max_seq_len=cam.max_seq_len,
            num_reqs=cam.num_reqs,
            query_start_loc=cam.query_start_loc,
            seq_lens=cam.seq_lens,
            block_table=cam.block_table_tensor,
            slot_mapping=cam.slot_mapping,
            decode_only=cam.max_query_len <= 1 and self.tq_group is None,  # a host int: no sync
            tq_group=self.tq_group,
        )

    def build_for_cudagraph_capture(self, common_attn_metadata: CommonAttentionMetadata) -> TurboQuantGPUMetadata:
        md = self.build(0, common_attn_metadata)
        if not md.decode_only:
            raise RuntimeError("vllm-turboquant: CUDA graphs are only supported for one-token decode batches "
                               f"(capture asked for max_query_len={md.max_query_len})")
        # As TRITON_ATTN does: short dummy contexts keep capture fast; a replay reads the real lengths.
        md.seq_lens.fill_(1)
        return md


class TurboQuantGPUImpl(PackedLayerMixin, AttentionImpl[TurboQuantGPUMetadata]):
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
        check_packed_layer(preset.name, attn_type, alibi_slopes, sinks, logits_soft_cap, head_size)
        # Model-specific options vLLM forwards to impls (chunk_lookback, use_alibi_sqrt, ...) change
        # the attention maths; refuse any that is set rather than ignore it.
        active = sorted(k for k, v in kwargs.items() if not (v is None or v is False or (type(v) is int and v == -1)))
        if active:
            raise ValueError(f"--kv-cache-dtype {preset.name} cannot serve this model: attention options "
                             f"{active} are not supported. Use --kv-cache-dtype auto or fp8 for it.")
        if kv_sharing_target_layer_name is not None:
            # The shared cache was encoded with the target layer's tables, not this layer's.
            raise ValueError(f"--kv-cache-dtype {preset.name} cannot serve this model: cross-layer KV cache "
                             f"sharing ({kv_sharing_target_layer_name}). Use --kv-cache-dtype auto or fp8 for it.")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{self.num_heads} query heads is not a multiple of {self.num_kv_heads} KV heads")
        self._init_packed(preset, head_size, sliding_window)

    def _tables_for(self, layer, device: torch.device):
        if self._tables is None and device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"vllm-turboquant: tables of {layer.layer_name} were not built before CUDA graph "
                               "capture (the metadata builder builds them; was it skipped?)")
        return self._layer_tables(layer, device)

    def do_kv_cache_update(self, layer, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                           slot_mapping: torch.Tensor) -> None:
        if slot_mapping.shape[0] == 0:
            return
        self._tables_for(layer, key.device)
        self._write_packed(layer, key, value, kv_cache, slot_mapping, step_metadata(layer.layer_name))

    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: TurboQuantGPUMetadata, output: torch.Tensor,
                output_scale: torch.Tensor | None = None,
                output_block_scale: torch.Tensor | None = None) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("vllm-turboquant does not support fused output quantization")
        if attn_metadata is None:  # profiling run
            return output.fill_(0)
        self._tables_for(layer, query.device)
        if attn_metadata.decode_only:
            return self._forward_decode_only(query, value, kv_cache, attn_metadata, output)
        return self._forward_packed(layer, query, key, value, kv_cache, attn_metadata.query_start_loc,
                                    attn_metadata.seq_lens, attn_metadata.block_table, output, attn_metadata)

    def _forward_decode_only(self, query: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                             md: TurboQuantGPUMetadata, output: torch.Tensor) -> torch.Tensor:
        """Every request has one new token (padding requests none), so request i owns query row i:
        no host sync, fixed shapes, CUDA-graph safe. Same results as ``_forward_packed``."""
        B = min(md.num_reqs, query.shape[0])
        seq_lens = md.seq_lens[:B]
        out = self._ops.paged_decode(query[:B], kv_cache.permute(0, 2, 1, 3), md.block_table[:B], seq_lens,
                                     self._tables, self.preset, self.scale, self.window)
        if not self.settings.compressed_prefill:
            # A one-token prompt is a prefill in the varlen path: it attends to its own exact value.
            exact = value[:B].float().repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)
            out = torch.where((seq_lens == 1).view(B, 1, 1), exact, out)
        output[:B] = out.to(output.dtype)
        return output
