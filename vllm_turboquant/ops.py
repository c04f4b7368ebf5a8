"""The attention-ops contract: the three operations a vLLM backend calls on the packed cache.

``AttentionOps`` declares them once -- this is the only copy of their documentation -- and
``load_ops`` returns an implementation by name. Every implementation is a module with the
three functions at module level and a ``NAME``:

=========  ======================================  ===================================================
name       module                                  what it is
=========  ======================================  ===================================================
``torch``  ``vllm_turboquant.reference``           the ground truth: vectorised torch, float64 accumulation
``triton`` ``vllm_turboquant.kernels.ops``         Triton kernels (CUDA; the CPU interpreter for tests)
``cpu``    ``vllm_turboquant.cpu_ops``             compiled C++ kernels for the CPU (built with the package)
=========  ======================================  ===================================================

The backend resolves an implementation once per layer (``load_ops(settings.ops, device)``) and
calls it through this protocol, so vLLM -> ``write_cache`` / ``paged_decode`` / ``prefill`` can be
followed by reading. ``check_implements`` (and ``tests/core/test_ops_contract.py``) hold each
implementation to the protocol's signatures.

Shapes and dtypes shared by the three operations (N new tokens, B sequences, H KV heads,
Hq = H * G query heads, d head_dim):

* ``cache``: uint8 ``[num_blocks, block_size, H, slot_bytes]``, any strides for the first three
  dims, stride 1 in the last (vLLM's ``[num_blocks, H, block_size, slot_bytes]`` cache is passed as
  ``kv_cache.permute(0, 2, 1, 3)``). A flat slot index is ``block * block_size + offset``.
* ``tables``: the layer's ``registry.LayerTables`` (rotations, codebooks, key mean), on the cache's device.
* ``fmt``: the layer's ``layout.CacheFormat`` (preset, slot layout, QJL coefficient), resolved once per layer.
* ``sliding_window``: None (full causal attention) or the number of most recent tokens a query sees,
  its own included (>= 1; ValueError otherwise).
* ``protected``: ``protected.ProtectedTokens`` or None: the sink S, the window W, the exact-copy cache
  ``[num_blocks_x, block_size_x, H, 2 d]`` (rows Π_k (k − μ) | Π_v v in the model dtype) and its block
  table, one row per sequence of the call. A key at position k is read from its exact copy by a query at
  position q when k < S or k > q − W (``protected`` module docstring); only those rows are ever read.
  None or S = W = 0 is plain TurboQuant.
* Index tensors (``slot_mapping``, ``exact_slot_mapping``, ``block_table``, ``seq_lens``, ``query_start_loc``):
  int32 or int64 (vLLM passes int64 slot mappings and int32 block tables, lengths and offsets); block tables
  may be wider than a sequence needs, and entries past its last block are never read.
* Devices: every tensor of a call lives on the cache's device (the ``triton`` ops also run on the CPU, under
  ``TRITON_INTERPRET=1``, for tests); ``query`` / ``key`` / ``value`` may be any float dtype and any strides
  with a contiguous last dim or not (implementations copy when they need to).
* Attention outputs are new float32 tensors whatever the query dtype; the caller casts.
"""

from __future__ import annotations

import importlib
import inspect
from types import ModuleType
from typing import Protocol, runtime_checkable

import torch

from .layout import CacheFormat
from .protected import ProtectedTokens
from .registry import LayerTables

#: Implementation name -> module. ``auto`` picks ``triton`` on CUDA, ``cpu`` on the CPU when its compiled
#: library loads, and ``torch`` otherwise.
IMPLEMENTATIONS: dict[str, str] = {
    "torch": "vllm_turboquant.reference",
    "triton": "vllm_turboquant.kernels.ops",
    "cpu": "vllm_turboquant.cpu_ops",
}
OPS_CHOICES = ("auto", *IMPLEMENTATIONS)


@runtime_checkable
class AttentionOps(Protocol):
    """What the backend calls. Implementations are modules; see the module docstring for shapes."""

    NAME: str

    def write_cache(self, cache: torch.Tensor, slot_mapping: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    tables: LayerTables, fmt: CacheFormat, protected: ProtectedTokens | None = None,
                    exact_slot_mapping: torch.Tensor | None = None) -> None:
        """Encode N new tokens and store them in place.

        slot_mapping: (N,) int flat slot indices, negative = skip (padding); key/value: (N, H, d), any
        float dtype. Each key is centred by its head's mean, normalised, rotated and bucketed (codes,
        fp16 norm; with a QJL sketch also the residual's sign bits and norm γ); each value is rotated
        and bucketed; the fields are packed at ``fmt.layout``'s offsets. With ``protected`` and
        ``exact_slot_mapping`` ((N,) int flat slots of ``protected.cache``, negative = none), token i's exact
        copy (Π_k (k − μ) | Π_v v, rounded to the cache's dtype) also goes to its exact slot, whether or not
        its packed slot is skipped. Raises ValueError for a cache of the wrong dtype, shape or strides.
        """

    def paged_decode(self, query: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor,
                     seq_lens: torch.Tensor, tables: LayerTables, fmt: CacheFormat, scale: float,
                     sliding_window: int | None = None, protected: ProtectedTokens | None = None) -> torch.Tensor:
        """One new query per sequence against its cached tokens, read from the packed slots.

        query: (B, Hq, d); block_table: (B, max_blocks) int; seq_lens: (B,) tokens in the cache, the
        query's own included (it sits at position seq_len - 1, already written). Scores use the rotated
        query against centroid values, values are accumulated in the rotated space and un-rotated once
        per query head; ``scale`` multiplies the scores (1/sqrt(d) usually). Returns float32 (B, Hq, d);
        an empty sequence gives zeros. Raises ValueError when Hq is not a multiple of H.
        """

    def prefill(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cache: torch.Tensor,
                block_table: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                tables: LayerTables, fmt: CacheFormat, scale: float, sliding_window: int | None = None,
                compressed_chunk: bool = False, protected: ProtectedTokens | None = None,
                max_query_len: int | None = None) -> torch.Tensor:
        """Causal attention for chunks of new tokens over their compressed cached prefix.

        query: (T, Hq, d), key/value: (T, H, d), the new tokens of all sequences packed; sequence b owns
        rows query_start_loc[b]:query_start_loc[b+1] (query_start_loc: (B + 1,) int) at positions
        seq_lens[b] - q_len ... seq_lens[b] - 1, already written to the cache. The prefix is read from
        the slots; the chunk's own K/V are exact, or read back from the packed cache too when
        ``compressed_chunk`` (what decode would see, so results do not depend on chunking or prefix-cache
        hits). With ``protected``, protected prefix keys are read from their exact copies in
        ``protected.cache``; with ``compressed_chunk``, a protected chunk key's exact copy is made from the
        chunk's own K/V, rounded to ``protected.cache``'s dtype exactly as ``write_cache`` stores it (its
        cached copy need not exist: vLLM keeps only the copies later steps read).
        ``max_query_len`` (a host int), when the caller knows it, spares an implementation reading it back
        from the device. Returns float32 (T, Hq, d); rows past query_start_loc[-1] are zeros.
        """


def resolve(name: str, device: torch.device) -> str:
    """The implementation ``name`` stands for on ``device`` (``auto``: triton on CUDA, cpu on the CPU when its
    compiled library loads, torch otherwise).

    Raises ValueError naming the accepted values for an unknown name."""
    if name not in OPS_CHOICES:
        raise ValueError(f"ops={name!r}; accepted: {', '.join(OPS_CHOICES)}")
    if name == "auto":
        if device.type == "cuda":
            return "triton"
        compiled = device.type == "cpu" and importlib.import_module(IMPLEMENTATIONS["cpu"]).available()
        return "cpu" if compiled else "torch"
    return name


def check_sliding_window(sliding_window: int | None) -> int:
    """The contract's ``sliding_window`` as an int (0: none, for None); ValueError unless None or >= 1."""
    if sliding_window is None:
        return 0
    if isinstance(sliding_window, bool) or int(sliding_window) < 1:
        raise ValueError(f"sliding_window must be None or >= 1, got {sliding_window!r}")
    return int(sliding_window)


#: The implementations that encode ``Preset.lsq_scale`` (an accuracy lever under evaluation: reference only).
LSQ_SCALE_OPS = ("torch",)


def check_preset(name: str, preset) -> None:
    """Raise ValueError when the ops ``name`` (after ``resolve``) cannot encode ``preset``
    (``Preset.lsq_scale`` outside ``LSQ_SCALE_OPS``), naming the ops that can."""
    if getattr(preset, "lsq_scale", False) and name not in LSQ_SCALE_OPS:
        raise ValueError(f"preset {preset.name!r} stores least-squares scales (lsq_scale), which only the "
                         f"{'/'.join(LSQ_SCALE_OPS)} ops implement; got ops={name!r}: set ops='torch'")


def load_ops(name: str, device: torch.device, preset=None) -> AttentionOps:
    """The implementation module for ``name`` (see ``resolve``) on ``device``, checked against the protocol
    and, when given, against ``preset`` (``check_preset``: ValueError)."""
    if preset is not None:
        check_preset(resolve(name, device), preset)
    module = importlib.import_module(IMPLEMENTATIONS[resolve(name, device)])
    check_implements(module)
    return module  # type: ignore[return-value]


def check_implements(module: ModuleType) -> None:
    """Raise TypeError unless ``module`` has every ``AttentionOps`` function with the protocol's parameters
    (names, order, defaults) and a ``NAME``."""
    problems = [] if isinstance(getattr(module, "NAME", None), str) else ["no NAME"]
    for op in ("write_cache", "paged_decode", "prefill"):
        want = list(inspect.signature(getattr(AttentionOps, op)).parameters.values())[1:]  # without self
        fn = getattr(module, op, None)
        if fn is None:
            problems.append(f"no {op}")
            continue
        got = list(inspect.signature(fn).parameters.values())
        strip = [(p.name, p.default) for p in got if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if strip != [(p.name, p.default) for p in want]:
            problems.append(f"{op}{inspect.signature(fn)} differs from the protocol's "
                            f"{op}({', '.join(p.name for p in want)})")
    if problems:
        raise TypeError(f"{module.__name__} does not implement vllm_turboquant.ops.AttentionOps: "
                        + "; ".join(problems))
