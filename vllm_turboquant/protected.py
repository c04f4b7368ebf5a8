"""Protected tokens: the attention sink and a recent window are attended exactly.

Attention mass concentrates on a sequence's first tokens (attention sinks) and on
its last few, so quantisation errors there cost the most -- and they are few. For a
query at position q, a key at position k is *protected* when::

    k < S            (the sink)      or      k > q - W      (the recent window, the query's own included)

and a protected key is read from its exact copy instead of its packed slot, inside
the same softmax. S = W = 0 is plain TurboQuant. Every token is still written to the
packed cache, so nothing is re-quantised when it leaves the window.

Exact copies
------------
An exact copy of a token is one row ``[H, 2, d]`` of a per-layer *pool* in the
model dtype: ``Π_k (k − μ)`` and ``Π_v v`` -- the key (minus the head's key mean)
and the value in the rotated spaces the packed codes live in, so the kernels score
and accumulate an exact token exactly like a packed one (norm 1, no QJL term, no
code lookup). Rotation is orthogonal: ⟨Π_k q, Π_k (k − μ)⟩ + ⟨q, μ⟩ = ⟨q, k⟩ up to one
rounding to the model dtype.

``entry_of_slot`` ``[num_blocks * block_size]`` int32 maps a paged cache slot
(``block * block_size + offset``) to its pool row, -1 when it has none. A read
uses the exact copy when the key is protected *and* it has one; otherwise the packed
slot. Keying copies by cache slot is what makes paged blocks and prefix caching work
unchanged: sequences that share a cached prefix block share its sink copies.

Bookkeeping (``PoolPlanner``, host side, once per step and KV-cache group)
------------------------------------------------------------------------
1. A slot being written gets a new token: its old copy (if any) is dropped. This is
   also how block reuse, preemption by recompute and prefix-cache eviction are seen.
2. The copies this step reads (sink and window of every scheduled request) are
   marked used and *needed*; the copies the previous step read for the last time
   (window tokens no later query of that request reads) become *spare*.
3. A new token at position p of a request that ends at L after this step is *needed*
   when p < S or p >= L - W: exactly the tokens a later step of the request reads as
   protected. It gets a row from the unmapped rows first, then the least recently
   used spare rows, then the least recently used needed rows that no request of this
   step reads. Every other new token also gets a copy, but only from unmapped or
   spare rows: spare copies are kept for as long as the pool has room, so a later
   request that hits this prefix in the prefix cache finds the window copies just
   before its hit (and reads what it would have read without the prefix cache).

A request thus *needs* at most S + W rows between steps; spare rows only ever take
room no request needs. The pool has ``pool_rows`` rows:
S + W per ``max_model_len`` tokens of cache capacity, and the same bytes are added
to every cache page (``page_size_padded``), so vLLM's reported KV capacity counts
the pool (``pool_bytes_per_token``). When more short requests run at once than the
pool covers, the least recently used needed copies are recycled and those tokens are
read from their packed slots (counted in ``PoolPlanner.dropped`` and logged).

Semantics across scheduling: within a request, chunked prefill and decode see the
same copies (a chunk's last W tokens are needed, which is what the next chunk's
queries read). A prefix-cache hit finds the sink copies of the shared blocks and,
while the pool has room, the spare window copies before the hit; copies recycled
in between are read packed, so only then can a prefix-cache hit change a result.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

logger = logging.getLogger("vllm.vllm_turboquant")


@dataclass(frozen=True)
class ProtectedTokens:
    """What attention reads for protected positions of one layer.

    sink S / window W: tokens; pool: [P, H, 2, d] model dtype, rows of (Π_k (k − μ), Π_v v);
    entry_of_slot: int32 [num_blocks * block_size], pool row of each cache slot or -1."""

    sink: int
    window: int
    pool: torch.Tensor
    entry_of_slot: torch.Tensor

    def __post_init__(self) -> None:
        check_sink_window(self.sink, self.window)


def check_sink_window(sink: int, window: int) -> None:
    for name, v in (("sink", sink), ("window", window)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"protected tokens: {name}={v!r}, accepted: an integer >= 0")


def protected_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, sink: int, window: int) -> torch.Tensor:
    """Keys at k_pos read exactly by queries at q_pos (broadcast): k < S or k > q - W."""
    return (k_pos < sink) | (k_pos > q_pos - window)


def exact_rows(key: torch.Tensor, value: torch.Tensor, tables, dtype: torch.dtype) -> torch.Tensor:
    """Pool rows (N, H, 2, d) in ``dtype`` for key/value (N, H, d): Π_k (k − μ) and Π_v v.

    Computed in float64, so a row is the same whichever path (store or prefill) makes it."""
    acc = torch.float64
    k = torch.einsum("nhd,hed->nhe", key.to(acc) - tables.key_mean.to(acc), tables.key_rotation.to(acc))
    v = torch.einsum("nhd,hed->nhe", value.to(acc), tables.value_rotation.to(acc))
    return torch.stack([k, v], dim=2).to(dtype)


def write_pool(pool: torch.Tensor, entries: torch.Tensor, key: torch.Tensor, value: torch.Tensor, tables) -> None:
    """Store the exact copies of N new tokens at pool rows ``entries`` (N,), -1 = none."""
    n = min(len(entries), key.shape[0])
    keep = entries[:n] >= 0
    if bool(keep.any()):
        pool[entries[:n][keep].long()] = exact_rows(key[:n][keep], value[:n][keep], tables, pool.dtype)


# -- sizing --------------------------------------------------------------------------------

def pool_bytes_per_token(sink: int, window: int, num_kv_heads: int, head_dim: int, dtype_bytes: int,
                         max_model_len: int) -> float:
    """Pool bytes per cached token (all KV heads): (S + W) exact K+V rows per max_model_len tokens."""
    return (sink + window) * num_kv_heads * 2 * head_dim * dtype_bytes / max_model_len


def padded_page_bytes(page_bytes: int, block_size: int, sink: int, window: int, num_kv_heads: int,
                      head_dim: int, dtype_bytes: int, max_model_len: int) -> int:
    """A cache page plus its share of the pool, rounded up to 8 bytes."""
    extra = math.ceil(block_size * pool_bytes_per_token(sink, window, num_kv_heads, head_dim, dtype_bytes,
                                                        max_model_len))
    return 8 * math.ceil((page_bytes + extra) / 8)


def pool_rows(num_blocks: int, block_size: int, sink: int, window: int, max_model_len: int) -> int:
    """Rows of the pool: S + W per max_model_len tokens of cache, at least S + W."""
    if sink + window == 0:
        return 0
    return max(sink + window, (num_blocks * block_size * (sink + window)) // max_model_len)


# -- bookkeeping ---------------------------------------------------------------------------

class PoolPlanner:
    """Host-side owner of ``entry_of_slot`` for one KV-cache group (see the module docstring)."""

    def __init__(self, sink: int, window: int, num_slots: int, rows: int, device: torch.device):
        check_sink_window(sink, window)
        self.sink, self.window, self.rows = sink, window, rows
        self.entry_of_slot = np.full(num_slots, -1, dtype=np.int32)
        self.slot_of_entry = np.full(rows, -1, dtype=np.int64)
        self.last_used = np.full(rows, -1, dtype=np.int64)
        self.spare = np.zeros(rows, dtype=bool)  # holds a copy no request's sink or window needs now
        self.step = 0
        self.dropped = 0
        self.pending_free = np.zeros(0, dtype=np.int64)  # slots whose copies the last step read for the last time
        self._host_table = torch.from_numpy(self.entry_of_slot)
        self._device_table = self._host_table if device.type == "cpu" else self._host_table.to(device)
        self._device = device

    @property
    def table(self) -> torch.Tensor:
        """``entry_of_slot`` on the device (the CPU one shares memory with the planner)."""
        return self._device_table

    def plan(self, query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_table: torch.Tensor,
             slot_mapping: torch.Tensor, block_size: int) -> torch.Tensor:
        """Update the bookkeeping for one step; return the pool row of every new token (int32, -1 = none).

        Request i writes rows query_start_loc[i]:query_start_loc[i+1] (positions seq_lens[i] - q_len ..
        seq_lens[i] - 1) at slot_mapping's slots (negative = padding)."""
        qsl = query_start_loc.cpu().numpy().astype(np.int64)
        ends = seq_lens.cpu().numpy().astype(np.int64)[: len(qsl) - 1]
        bt = block_table.cpu().numpy().astype(np.int64)[: len(ends)]
        T = int(qsl[-1]) if len(qsl) else 0
        slots = slot_mapping.cpu().numpy().astype(np.int64)[:T]
        self.step += 1
        S, W = self.sink, self.window
        q_lens = np.diff(qsl)
        starts = ends - q_lens

        # 1. rewritten slots lose their old copies
        written = slots[slots >= 0]
        old = self.entry_of_slot[written]
        old = old[old >= 0]
        self.slot_of_entry[old] = -1
        self.last_used[old] = -1
        self.spare[old] = False
        self.entry_of_slot[written] = -1

        # 2. copies read this step: positions < S and >= start + 1 - W before each request's chunk
        #    (and start - W, the one the previous step kept for the last time)
        cand = np.concatenate([np.arange(S), np.arange(-W, 0)]) if S + W else np.zeros(0, np.int64)
        if len(cand) and len(ends):
            sink_part = (np.arange(len(cand)) < S)[None, :]
            pos = np.where(sink_part, cand[None, :], starts[:, None] + cand[None, :])
            ok = (pos >= 0) & (pos < starts[:, None])
            pos = np.where(ok, pos, 0)
            read = np.take_along_axis(bt, pos // block_size, axis=1) * block_size + pos % block_size
            used = self.entry_of_slot[read[ok]]
            used = used[used >= 0]
            self.last_used[used] = self.step
            self.spare[used] = False
            # copies no query after this step reads (positions start - W .. end - W - 1, not sinks)
            done = ok & ~sink_part & (pos >= S) & (pos < (ends - W)[:, None])
            later = read[done]
        else:
            later = np.zeros(0, dtype=np.int64)
        stale = self.entry_of_slot[self.pending_free]
        stale = stale[(stale >= 0) & (self.last_used[np.maximum(stale, 0)] < self.step)]
        self.spare[stale] = True
        self.pending_free = later

        # 3. rows for the new tokens: the needed ones first, then spare copies of the others
        entries = np.full(T, -1, dtype=np.int32)
        req = np.repeat(np.arange(len(ends)), q_lens)
        p = starts[req] + np.arange(T) - qsl[req]
        needed = (p < S) | (p >= ends[req] - W)
        need = np.flatnonzero((slots >= 0) & needed)
        if len(need):
            pick = self._take(len(need), evict_needed=True)
            if len(pick) < len(need):
                self.dropped += len(need) - len(pick)
                if self.dropped == len(need) - len(pick):
                    logger.warning("vllm-turboquant: the protected-token pool (%d rows) is full; some sink/window "
                                   "tokens are read from their packed slots (more concurrent requests than "
                                   "max_model_len amortisation covers)", self.rows)
                # keep the sink and the latest tokens first
                order = np.argsort(np.where(p[need] < S, -1, -p[need]), kind="stable")
                need = need[order[: len(pick)]]
            self._assign(pick, slots[need], spare=False)
            entries[need] = pick
        extra = np.flatnonzero((slots >= 0) & ~needed)
        if len(extra):
            pick = self._take(len(extra), evict_needed=False)
            extra = extra[len(extra) - len(pick):]  # the latest tokens of the chunk first
            self._assign(pick, slots[extra], spare=True)
            entries[extra] = pick
        if self._device.type != "cpu":
            self._device_table.copy_(self._host_table, non_blocking=True)
        return torch.from_numpy(entries).to(self._device, non_blocking=True)

    def _take(self, n: int, evict_needed: bool) -> np.ndarray:
        """Up to n rows not used this step: unmapped ones, then spare ones, then (if allowed) needed
        ones, least recently used first within each class."""
        cls = np.where(self.slot_of_entry < 0, 0, np.where(self.spare, 1, 2))
        ok = (self.last_used < self.step) & (cls < (3 if evict_needed else 2))
        cand = np.flatnonzero(ok)
        if len(cand) > n:
            key = cls[cand] * (self.step + 2) + self.last_used[cand] + 1
            cand = cand[np.argpartition(key, n - 1)[:n]]
        return cand

    def _assign(self, rows: np.ndarray, slots: np.ndarray, spare: bool) -> None:
        evicted = self.slot_of_entry[rows]
        self.entry_of_slot[evicted[evicted >= 0]] = -1
        self.slot_of_entry[rows] = slots
        self.entry_of_slot[slots] = rows
        self.last_used[rows] = self.step
        self.spare[rows] = spare
