"""Torch reference of TurboQuant: the ``torch`` implementation of ``ops.AttentionOps`` (encode K/V into
packed slots, paged decode and causal prefill attention read from them).

This is the ground truth the Triton kernels and the CPU serving path are
tested against: written for clarity, vectorised over tokens and heads. The three
operations' contract (shapes, dtypes, errors) is documented once, in ``ops.AttentionOps``.

Shapes: N tokens, H KV heads, Hq = H * G query heads (GQA group G), d head_dim,
m QJL sketch size. Paged caches are uint8 ``[num_blocks, block_size, H, slot_bytes]``
(any strides).
Per key (after subtracting the head's key mean μ)::

    n = ‖k‖,  y = Π k / n,  idx = bucket(y),  ŷ = c[idx],  r = y − ŷ,  γ = ‖r‖,  s = sign(S r)
    ⟨q, k⟩ ≈ n (⟨Π q, ŷ⟩ + λ γ √(π/2) / m ⟨S Π q, s⟩) + ⟨q, μ⟩

Values: v̂ = n_v Π_vᵀ c_v[idx_v]; attention output Π_vᵀ Σ_i p_i n_v,i c_v[idx_v,i].

Everything that reads the packed cache is computed in float64 (``ACC``) and returned as
float32. That is not for accuracy but for invariance: float32 results of a batched matmul
depend on the batch shape, a code near a cell boundary then flips with the batch, and
quantisation turns that into visible differences. In float64 the outputs (and codes) are
the same however requests are batched, chunked or served from the prefix cache. A
prefill chunk that attends to its own exact K/V (vLLM's usual semantics, where chunking
already changes what is read) uses torch's fused float32 attention instead.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from .layout import (
    CacheFormat,
    SlotFields,
    SlotLayout,
    cache_format,
    pack_slots,
    read_fp16,
    read_norm,
    stored_norm,
    unpack_lookup,
    unpack_slots,
    word_table,
)
from .ops import check_sliding_window
from .presets import Preset, get_preset
from .protected import ProtectedTokens, exact_rows, is_active, protected_mask, protected_positions
from .registry import LayerTables

#: This module's name in ``ops.IMPLEMENTATIONS``.
NAME = "torch"
ACC = torch.float64  # the computation dtype (see the module docstring)
_SIGN_VALUES = torch.tensor([[-1.0, 1.0]], dtype=ACC)  # sign bit 0 -> -1, 1 -> +1


def _unit_and_norm(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = x.norm(dim=-1)
    u = torch.where((n > 0).unsqueeze(-1), x / n.clamp_min(torch.finfo(x.dtype).tiny).unsqueeze(-1), 0.0)
    return u, n


def lookup(codes: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Centroid values of codes (..., H, d) under per-head tables centroids (H, K)."""
    H, K = centroids.shape
    head = torch.arange(H, device=codes.device).unsqueeze(-1) * K
    return centroids.reshape(-1)[codes + head]


def quantize(x: torch.Tensor, rotation: torch.Tensor, boundaries: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalise, rotate and bucket vectors x (N, H, d) with per-head rotation (H, d, d)
    and boundaries (H, 2**b - 1). Returns codes (N, H, d) int64 = #{boundaries < y},
    norms (N, H) and the rotated unit vectors y (N, H, d), both in ACC."""
    u, n = _unit_and_norm(x.to(ACC))
    y = torch.einsum("nhd,hed->nhe", u, rotation.to(ACC))
    N, H, _ = y.shape
    codes = torch.searchsorted(boundaries.to(ACC).unsqueeze(0).expand(N, H, -1).contiguous(), y.contiguous())
    return codes, n, y


def sketch(y: torch.Tensor, codes: torch.Tensor, centroids: torch.Tensor, qjl: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """QJL sketch of the residual r = y - c[codes]: signs (N, H, m) of +-1 (sign(0) = +1)
    and gamma = ‖r‖ (N, H). qjl is (H, m, d)."""
    r = y - lookup(codes, centroids.to(y.dtype))
    proj = torch.einsum("nhd,hmd->nhm", r, qjl.to(y.dtype))
    return torch.where(proj >= 0, 1.0, -1.0), r.norm(dim=-1)


def reconstruct(codes: torch.Tensor, norm: torch.Tensor, rotation: torch.Tensor, centroids: torch.Tensor,
                signs: torch.Tensor | None = None, gamma: torch.Tensor | None = None,
                qjl: torch.Tensor | None = None, qjl_coefficient: float = 0.0) -> torch.Tensor:
    """Dense vectors (..., H, d) equivalent to the estimator: n Πᵀ (c[codes] + coef γ Sᵀ s).

    Without a sketch this is the MSE reconstruction; with one, ⟨q, result⟩ is the
    QJL-corrected score estimate for every q."""
    dt = centroids.dtype
    y = lookup(codes, centroids)
    if signs is not None and signs.shape[-1]:
        sketch = torch.einsum("...hm,hmd->...hd", signs.to(dt), qjl.to(dt))
        y = y + qjl_coefficient * gamma.to(dt).unsqueeze(-1) * sketch
    return norm.to(dt).unsqueeze(-1) * torch.einsum("...he,hed->...hd", y, rotation.to(dt))


def lsq_scale(norm: torch.Tensor, y: torch.Tensor, codes: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """The least-squares scale (N, H) of codes (N, H, d) for vectors of norm ``norm`` (N, H) whose rotated unit
    vectors are y (N, H, d): s = ‖x‖ ⟨y, c⟩ / ⟨c, c⟩ with c = centroids[codes] (per head, (H, K)), the s that
    minimises ‖x − s Πᵀ c‖; clamped at 0 (a norm field holds s ≥ 0), ‖x‖ where ⟨c, c⟩ = 0. ``Preset.lsq_scale``."""
    c = lookup(codes, centroids.to(y.dtype))
    cc = (c * c).sum(-1)
    yc = (y * c).sum(-1).clamp_min(0.0)
    return torch.where(cc > 0, norm * yc / torch.where(cc > 0, cc, 1.0), norm)


def _f16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float16).float()


def encode(key: torch.Tensor, value: torch.Tensor, tables: LayerTables, preset: Preset | str) -> SlotFields:
    """Encode key/value (N, H, d) into slot fields (norms as stored: ``layout.stored_norm``; γ rounded to fp16)."""
    codes, n, y = quantize(key.to(ACC) - tables.key_mean.to(ACC), tables.key_rotation, tables.key_boundaries)
    if tables.qjl.shape[1]:
        signs, gamma = sketch(y, codes, tables.key_centroids, tables.qjl)
    else:
        signs, gamma = n.new_zeros(*n.shape, 0), torch.zeros_like(n)
    vcodes, nv, yv = quantize(value, tables.value_rotation, tables.value_boundaries)
    if get_preset(preset).lsq_scale:
        n = lsq_scale(n, y, codes, tables.key_centroids)
        nv = lsq_scale(nv, yv, vcodes, tables.value_centroids)
    return SlotFields(key_codes=codes, key_norm=stored_norm(n), key_signs=signs, key_gamma=_f16(gamma),
                      value_codes=vcodes, value_norm=stored_norm(nv))


def encode_slots(key: torch.Tensor, value: torch.Tensor, tables: LayerTables,
                 fmt: CacheFormat | Preset | str) -> torch.Tensor:
    """Encode key/value (N, H, d) into uint8 slots (N, H, slot_bytes)."""
    fmt = cache_format(fmt, key.shape[-1])
    return pack_slots(encode(key, value, tables, fmt.preset), fmt.layout)


def write_cache(cache: torch.Tensor, slot_mapping: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                tables: LayerTables, fmt: CacheFormat, protected: ProtectedTokens | None = None,
                exact_slot_mapping: torch.Tensor | None = None) -> None:
    """``ops.AttentionOps.write_cache``: the fields encoded in float64 (``encode``), packed by ``pack_slots``;
    exact copies by ``protected.exact_rows``. (A preset name for ``fmt`` is accepted too.)"""
    if protected is not None and exact_slot_mapping is not None:
        n = min(exact_slot_mapping.shape[0], key.shape[0])
        keep = exact_slot_mapping[:n] >= 0
        index = exact_slot_mapping[:n][keep].long()
        bs = protected.cache.shape[1]
        protected.cache[index // bs, index % bs] = exact_rows(key[:n][keep], value[:n][keep], tables,
                                                             protected.cache.dtype)
    keep = slot_mapping >= 0
    slots = encode_slots(key[keep], value[keep], tables, fmt)
    index = slot_mapping[keep].long()
    block_size = cache.shape[1]
    cache[index // block_size, index % block_size] = slots


def dequantize(fields: SlotFields, tables: LayerTables, fmt: CacheFormat | Preset | str
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense keys and values (..., H, d) equivalent to the estimator.

    The returned key k satisfies ⟨q, k⟩ = the preset's score estimate for every q
    (code term, QJL term with its λ, and the key mean), so dense attention with
    these tensors is the same computation as attention from the slots.
    """
    coef = cache_format(fmt, tables.key_rotation.shape[-1]).qjl_coefficient
    k = reconstruct(fields.key_codes, fields.key_norm, tables.key_rotation, tables.key_centroids,
                    fields.key_signs, fields.key_gamma, tables.qjl, coef) + tables.key_mean
    v = reconstruct(fields.value_codes, fields.value_norm, tables.value_rotation, tables.value_centroids)
    return k, v


class _AccTables:
    """A layer's tables in ACC, with the word tables ``unpack_lookup`` gathers codes from."""

    def __init__(self, tables: LayerTables):
        self.tables = LayerTables(**{f: getattr(tables, f).to(ACC) for f in LayerTables.__dataclass_fields__})
        self._words: dict[tuple[str, int], torch.Tensor] = {}

    def words(self, name: str, bits: int) -> torch.Tensor:
        """``word_table`` of the key or value centroids (name), or of the ±1 sign values ("signs")."""
        if (name, bits) not in self._words:
            values = (_SIGN_VALUES.to(self.tables.qjl.device).expand(self.tables.num_heads, 2) if name == "signs"
                      else getattr(self.tables, f"{name}_centroids"))
            self._words[name, bits] = word_table(values, bits)
        return self._words[name, bits]


_ACC_TABLES: dict[int, tuple[weakref.ref, tuple[int, ...], _AccTables]] = {}


def _in_acc(tables: LayerTables) -> _AccTables:
    """tables in ACC, converted once per LayerTables object (again if a tensor of it is modified)."""
    key = id(tables)
    # inference tensors (vLLM builds tables in inference mode) have no version counter
    versions = tuple(-1 if x.is_inference() else x._version
                     for x in (getattr(tables, f) for f in LayerTables.__dataclass_fields__))
    hit = _ACC_TABLES.get(key)
    if hit is None or hit[0]() is not tables or hit[1] != versions:
        ref = weakref.ref(tables, lambda _, key=key: _ACC_TABLES.pop(key, None))
        hit = _ACC_TABLES[key] = (ref, versions, _AccTables(tables))
    return hit[2]


def gather_slots(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """Slots of positions [0, length) of every sequence: (B, length, H, slot_bytes)."""
    B = block_table.shape[0]
    _, block_size, H, nbytes = cache.shape
    n = -(-length // block_size)
    return cache[block_table[:, :n].long()].reshape(B, n * block_size, H, nbytes)[:, :length]


def _decode_exact(protected: ProtectedTokens, seq_lens: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The protected positions of every decode query (at seq_len - 1): sequence and position indices (n,)
    and their exact copies (n, H, 2 d) in ACC."""
    S, W = protected.sink, protected.window
    dev = seq_lens.device
    cand = torch.cat([torch.arange(S, device=dev), torch.arange(-W, 0, device=dev)])
    sink_part = torch.arange(S + W, device=dev) < S
    lens = seq_lens.long().unsqueeze(-1)
    pos = torch.where(sink_part, cand, lens + cand)  # (B, S + W)
    ok = (pos >= 0) & (pos < lens) & (sink_part | (pos >= S))  # window positions < S are sink ones
    b_idx, j = torch.nonzero(ok, as_tuple=True)
    p_idx = pos[b_idx, j]
    return b_idx, p_idx, protected.rows(b_idx, p_idx).to(ACC)


def _visible(q_pos: torch.Tensor, k_pos: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    """Causal (and sliding-window) visibility of key positions to query positions."""
    ok = k_pos <= q_pos
    if sliding_window is not None:
        ok &= k_pos > q_pos - sliding_window
    return ok


def _softmax(scores: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim with masked entries (rows with nothing visible give zeros)."""
    if scores.shape[-1] == 0:
        return scores
    scores = scores.masked_fill(~visible, float("-inf"))
    peak = scores.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(scores.dtype).min)
    e = torch.exp(scores - peak) * visible
    return e / e.sum(-1, keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)


@dataclass
class _Tokens:
    """What attention reads of L cached tokens, head-major (..., H, L[, d or m]), in ACC: the key and
    value codes as centroid values (the rotated spaces), the norms, and the QJL signs (+-1) and γ
    (None without a sketch)."""

    key: torch.Tensor
    key_norm: torch.Tensor
    signs: torch.Tensor | None
    gamma: torch.Tensor | None
    value: torch.Tensor
    value_norm: torch.Tensor

    def put_exact(self, batch: torch.Tensor, pos: torch.Tensor, rows: torch.Tensor) -> None:
        """Read the tokens at (sequence, position) = (batch, pos) (n,) from exact rotated rows
        (n, H, 2 d) instead: norm 1, no QJL term."""
        at = (batch, slice(None), pos)
        d = rows.shape[-1] // 2
        self.key[at], self.value[at] = rows[..., :d].to(ACC), rows[..., d:].to(ACC)
        self.key_norm[at] = self.value_norm[at] = 1.0
        if self.gamma is not None:
            self.gamma[at] = 0.0

    def first(self, n: int) -> _Tokens:
        """The first n tokens (views)."""
        return _Tokens(self.key[..., :n, :], self.key_norm[..., :n],
                       None if self.signs is None else self.signs[..., :n, :],
                       None if self.gamma is None else self.gamma[..., :n],
                       self.value[..., :n, :], self.value_norm[..., :n])


def _read_tokens(slots: torch.Tensor, lay: SlotLayout, acc: _AccTables) -> _Tokens:
    """Decode head-major slots (..., H, L, slot_bytes): codes straight to centroid values (a table
    gather per packed word), fp16 fields to ACC."""
    def codes(name: str, offset: int, nbytes: int, bits: int, n: int) -> torch.Tensor:
        return unpack_lookup(slots[..., offset:offset + nbytes], bits, n, None, head_axis=-3,
                             table=acc.words(name, bits))

    signs = gamma = None
    if lay.has_qjl:
        signs = codes("signs", lay.key_signs, lay.sign_bytes, 1, lay.qjl_dim)
        gamma = read_fp16(slots, lay.key_gamma).to(ACC)
    return _Tokens(key=codes("key", lay.key_codes, lay.key_code_bytes, lay.key_bits, lay.head_dim),
                   key_norm=read_norm(slots, lay.key_norm).to(ACC), signs=signs, gamma=gamma,
                   value=codes("value", lay.value_codes, lay.value_code_bytes, lay.value_bits, lay.head_dim),
                   value_norm=read_norm(slots, lay.value_norm).to(ACC))


def _scores(q_rot: torch.Tensor, tok: _Tokens, t: LayerTables, coef: float) -> torch.Tensor:
    """Scores (..., H, M, L) of rotated queries Π q (..., H, M, d) against tokens (..., H, L, ...):
    n (⟨Π q, ŷ⟩ + coef γ ⟨S Π q, s⟩). The estimate's ⟨q, μ⟩ term is the same for every key of a
    query (exact copies included), so softmax cancels it: attention leaves it out."""
    scores = q_rot @ tok.key.transpose(-1, -2)
    if tok.signs is not None:
        q_proj = torch.einsum("...hme,hke->...hmk", q_rot, t.qjl)
        scores = scores + coef * tok.gamma.unsqueeze(-2) * (q_proj @ tok.signs.transpose(-1, -2))
    return scores * tok.key_norm.unsqueeze(-2)


def _attend(parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]], scale: float
            ) -> torch.Tensor:
    """Σ_j p_j w_j v_j over the columns j of all parts, p = softmax over the visible columns of
    scale * scores; parts: (scores (..., M, n), visible (broadcasts to scores), values (..., n, d),
    weights w (..., 1, n) or None for 1). Rows with nothing visible give zeros. Overwrites the scores."""
    peak = None
    for scores, visible, _, _ in parts:
        scores.mul_(scale).masked_fill_(~visible, float("-inf"))
        if scores.shape[-1]:
            top = scores.amax(-1, keepdim=True)
            peak = top if peak is None else torch.maximum(peak, top)
    out = total = 0.0
    for scores, _, values, weights in parts:
        if peak is not None:
            scores.sub_(peak.clamp_min(torch.finfo(ACC).min)).exp_()
        total = total + scores.sum(-1, keepdim=True)
        out = out + (scores if weights is None else scores * weights) @ values
    return out / total.clamp_min(torch.finfo(ACC).tiny)


def _unrotate(acc: torch.Tensor, t: LayerTables) -> torch.Tensor:
    """Π_vᵀ of value sums accumulated in the rotated space (..., H, M, d)."""
    return torch.einsum("...hme,hed->...hmd", acc, t.value_rotation)


def paged_decode(query: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                 tables: LayerTables, fmt: CacheFormat, scale: float,
                 sliding_window: int | None = None, protected: ProtectedTokens | None = None) -> torch.Tensor:
    """``ops.AttentionOps.paged_decode``, all sequences at once: slots gathered head-major and decoded to
    centroid values, protected positions with a copy overwritten by their exact rotated rows (norm 1, no
    QJL term), scores and value sums as batched float64 matmuls. (A preset name for ``fmt`` is accepted.)"""
    check_sliding_window(sliding_window)
    fmt = cache_format(fmt, query.shape[-1])
    B, Hq, d = query.shape
    acc = _in_acc(tables)
    t = acc.tables
    H = t.num_heads
    L = int(seq_lens.max()) if B else 0
    tok = _read_tokens(gather_slots(cache, block_table, L).transpose(1, 2), fmt.layout, acc)
    if is_active(protected) and L:
        # only the (at most S + W) protected positions of each sequence are touched
        b_idx, p_idx, rows = _decode_exact(protected, seq_lens)
        tok.put_exact(b_idx, p_idx, rows)

    q_rot = torch.einsum("bhgd,hed->bhge", query.to(ACC).reshape(B, H, Hq // H, d), t.key_rotation)
    scores = _scores(q_rot, tok, t, fmt.qjl_coefficient)  # (B, H, G, L)
    k_pos = torch.arange(L, device=query.device)
    visible = (k_pos < seq_lens.unsqueeze(-1)) & _visible(seq_lens.unsqueeze(-1) - 1, k_pos, sliding_window)
    out = _attend([(scores, visible[:, None, None, :], tok.value, tok.value_norm.unsqueeze(-2))], scale)
    return _unrotate(out, t).reshape(B, Hq, d).float()


def dense_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
                    q_pos: torch.Tensor, sliding_window: int | None = None,
                    exact: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Causal GQA attention: query (T, Hq, d) at positions q_pos (T,), key/value (L, H, d)
    at positions 0..L-1. ``exact`` = (key', value' (L, H, d), use (T, L) bool): query t reads
    key/value l from key'/value' where use[t, l]. Computed in ACC; returns float32 (T, Hq, d)."""
    T, Hq, d = query.shape
    L, H, _ = key.shape
    q = query.to(ACC).reshape(T, H, Hq // H, d)
    scores = torch.einsum("thgd,lhd->thgl", q, key.to(ACC)) * scale
    if exact is not None:
        use = exact[2][:, None, None, :]
        scores = torch.where(use, torch.einsum("thgd,lhd->thgl", q, exact[0].to(ACC)) * scale, scores)
    visible = _visible(q_pos.unsqueeze(-1), torch.arange(L, device=query.device), sliding_window)
    p = _softmax(scores, visible[:, None, None, :])
    if exact is None:
        out = torch.einsum("thgl,lhd->thgd", p, value.to(ACC))
    else:
        out = (torch.einsum("thgl,lhd->thgd", torch.where(use, 0.0, p), value.to(ACC))
               + torch.einsum("thgl,lhd->thgd", torch.where(use, p, 0.0), exact[1].to(ACC)))
    return out.reshape(T, Hq, d).float()


def fused_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
                    q_pos: torch.Tensor, sliding_window: int | None = None) -> torch.Tensor:
    """``dense_attention`` through torch's fused float32 kernel (same arguments, float32 (T, Hq, d))."""
    T, Hq, d = query.shape
    L, H, _ = key.shape
    if L == 0:
        return torch.zeros(T, Hq, d, device=query.device)
    mask = _visible(q_pos.unsqueeze(-1), torch.arange(L, device=query.device), sliding_window)
    out = torch.nn.functional.scaled_dot_product_attention(
        query.float().transpose(0, 1), key.float().transpose(0, 1), value.float().transpose(0, 1),
        attn_mask=mask, scale=scale, enable_gqa=Hq != H)
    return out.transpose(0, 1).nan_to_num(0.0)  # rows with nothing visible give zeros


#: Prefill queries per block: a block scores only the keys its queries can see.
QUERY_BLOCK = 256


def prefill(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cache: torch.Tensor,
            block_table: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
            tables: LayerTables, fmt: CacheFormat, scale: float, sliding_window: int | None = None,
            compressed_chunk: bool = False, protected: ProtectedTokens | None = None,
            max_query_len: int | None = None) -> torch.Tensor:
    """``ops.AttentionOps.prefill``. (A preset name for ``fmt`` is accepted; ``max_query_len`` is not needed.)

    Reading the slots, this is decode's computation for a block of queries at a time: rotated
    queries score against centroid values, values are summed in the rotated space. An exact copy
    is an extra key column, read by the queries that protect it; the slot's column is masked
    for them. A chunk that attends to its own exact K/V without protected tokens (vLLM's usual
    semantics) goes through torch's fused float32 attention over the dequantised prefix.
    """
    check_sliding_window(sliding_window)
    fmt = cache_format(fmt, query.shape[-1])
    T, Hq, d = query.shape
    layout = fmt.layout
    out = torch.zeros(query.shape, dtype=torch.float32, device=query.device)
    guard = is_active(protected)
    acc = _in_acc(tables)
    t = acc.tables
    H, G = t.num_heads, Hq // t.num_heads
    coef = fmt.qjl_coefficient
    dev = query.device
    q_rot = chunk_rows = None
    for b in range(len(seq_lens)):
        start, stop, L = int(query_start_loc[b]), int(query_start_loc[b + 1]), int(seq_lens[b])
        if stop == start:
            continue
        ctx = L - (stop - start)
        if not compressed_chunk and (ctx == 0 or not guard):  # vLLM's usual semantics, torch's fused kernel
            k, v = key[start:stop].float(), value[start:stop].float()
            if ctx:
                k0, v0 = dequantize(unpack_slots(gather_slots(cache, block_table[b:b + 1], ctx)[0], layout),
                                    tables, fmt)
                k, v = torch.cat([k0, k]), torch.cat([v0, v])
            out[start:stop] = fused_attention(query[start:stop], k, v, scale, torch.arange(ctx, L, device=dev),
                                              sliding_window)
            continue
        if q_rot is None:  # every query of the batch rotated once: (H, T * G, d), row t * G + g
            q = query.to(ACC).reshape(T, H, G, d).transpose(0, 1).reshape(H, T * G, d)
            q_rot = torch.einsum("hmd,hed->hme", q, t.key_rotation)
            if not compressed_chunk:  # the chunk's own K/V as exact rotated rows (not rounded)
                chunk_rows = exact_rows(key, value, tables, ACC)
            elif guard:  # the chunk's own copies, rounded as write_cache stores them
                chunk_rows = exact_rows(key, value, tables, protected.cache.dtype)
        tok = _read_tokens(gather_slots(cache, block_table[b:b + 1], L).transpose(1, 2), layout, acc)  # (1, H, L, .)
        if not compressed_chunk:  # the chunk's own K/V, exactly (as rotated rows)
            tok.put_exact(torch.zeros(L - ctx, dtype=torch.long, device=dev), torch.arange(ctx, L, device=dev),
                          chunk_rows[start:stop])
        if guard:  # the exact copies its queries read: the prefix's from the cache, the chunk's own from its K/V
            S, W = protected.sink, protected.window
            pos = protected_positions(ctx, L, S, W).to(dev)
            prefix = pos[pos < ctx]
            rows = protected.rows(torch.full_like(prefix, b), prefix)
            if compressed_chunk:  # (without compression the chunk's keys are exact in tok already)
                chunk = pos[pos >= ctx]
                rows = torch.cat([rows, chunk_rows[start + chunk - ctx]])
            pos, rows = pos if compressed_chunk else prefix, rows.to(ACC)  # rows (n, H, 2 d)
            has = torch.zeros(L, dtype=torch.bool, device=dev)
            has[pos] = True
        for lo in range(ctx, L, QUERY_BLOCK):  # queries at positions [lo, hi)
            hi = min(lo + QUERY_BLOCK, L)
            q_pos = torch.arange(lo, hi, device=dev).unsqueeze(-1)
            rows_q = slice((start + lo - ctx) * G, (start + hi - ctx) * G)
            qr = q_rot[None, :, rows_q]  # (1, H, n * G, d)
            n_slots = hi  # slot columns: the keys some query of the block may read from its slot
            parts = []
            if guard:
                if bool(has[max(hi - W, 0):hi].all()):
                    n_slots = max(hi - W, 0)  # every query of the block reads these keys exactly
                sel = (pos < S) | ((pos > lo - W) & (pos < hi))
                e_pos, e_rows = pos[sel], rows[sel].transpose(0, 1).unsqueeze(0)  # (1, H, copies, 2 d)
                use = protected_mask(q_pos, e_pos, S, W) & _visible(q_pos, e_pos, sliding_window)
                parts.append((qr @ e_rows[..., :d].transpose(-1, -2), use.repeat_interleave(G, 0),
                              e_rows[..., d:], None))
            k_pos = torch.arange(n_slots, device=dev)
            read = _visible(q_pos, k_pos, sliding_window)
            if guard:
                read &= ~(has[:n_slots] & protected_mask(q_pos, k_pos, S, W))
            slots = tok.first(n_slots)
            parts.append((_scores(qr, slots, t, coef), read.repeat_interleave(G, 0), slots.value,
                          slots.value_norm.unsqueeze(-2)))
            o = _unrotate(_attend(parts, scale), t)  # (1, H, n * G, d)
            out[start + lo - ctx:start + hi - ctx] = o.reshape(H, hi - lo, G, d).transpose(0, 1).reshape(-1, Hq, d)
    return out
