"""Torch reference of TurboQuant: encode K/V into packed slots, paged decode and
causal prefill attention read from them.

This is the ground truth the Triton kernels and the CPU serving path are
tested against: written for clarity, vectorised over tokens and heads.

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

import torch

from .layout import SlotFields, pack_slots, read_fp16, slot_layout, unpack_lookup, unpack_slots
from .presets import Preset, get_preset
from .protected import ProtectedTokens, exact_rows, protected_mask, write_pool
from .registry import LayerTables


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


def _f16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float16).float()


def encode(key: torch.Tensor, value: torch.Tensor, tables: LayerTables, preset: Preset | str) -> SlotFields:
    """Encode key/value (N, H, d) into slot fields (norms rounded to fp16 as stored)."""
    codes, n, y = quantize(key.to(ACC) - tables.key_mean.to(ACC), tables.key_rotation, tables.key_boundaries)
    if tables.qjl.shape[1]:
        signs, gamma = sketch(y, codes, tables.key_centroids, tables.qjl)
    else:
        signs, gamma = n.new_zeros(*n.shape, 0), torch.zeros_like(n)
    vcodes, nv, _ = quantize(value, tables.value_rotation, tables.value_boundaries)
    return SlotFields(key_codes=codes, key_norm=_f16(n), key_signs=signs, key_gamma=_f16(gamma),
                      value_codes=vcodes, value_norm=_f16(nv))


def encode_slots(key: torch.Tensor, value: torch.Tensor, tables: LayerTables, preset: Preset | str) -> torch.Tensor:
    """Encode key/value (N, H, d) into uint8 slots (N, H, slot_bytes)."""
    preset = get_preset(preset)
    return pack_slots(encode(key, value, tables, preset), slot_layout(preset, key.shape[-1]))


def write_cache(cache: torch.Tensor, slot_mapping: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                tables: LayerTables, preset: Preset | str, protected: ProtectedTokens | None = None,
                entries: torch.Tensor | None = None) -> None:
    """Encode N new tokens and store them in place at flat slot indices (block * block_size + offset).

    cache: uint8 [num_blocks, block_size, H, slot_bytes], any strides (vLLM's block-head-token
    cache permuted to this order works as is); slot_mapping (N,), negative = skip (padding).
    With ``protected``, token i's exact copy also goes to pool row entries[i] (-1 = none).
    """
    if protected is not None and entries is not None:
        write_pool(protected.pool, entries, key, value, tables)
    keep = slot_mapping >= 0
    slots = encode_slots(key[keep], value[keep], tables, preset)
    index = slot_mapping[keep].long()
    block_size = cache.shape[1]
    cache[index // block_size, index % block_size] = slots


def dequantize(fields: SlotFields, tables: LayerTables, preset: Preset | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense keys and values (..., H, d) equivalent to the estimator.

    The returned key k satisfies ⟨q, k⟩ = the preset's score estimate for every q
    (code term, QJL term with its λ, and the key mean), so dense attention with
    these tensors is the same computation as attention from the slots.
    """
    coef = get_preset(preset).qjl_coefficient(tables.key_rotation.shape[-1])
    k = reconstruct(fields.key_codes, fields.key_norm, tables.key_rotation, tables.key_centroids,
                    fields.key_signs, fields.key_gamma, tables.qjl, coef) + tables.key_mean
    v = reconstruct(fields.value_codes, fields.value_norm, tables.value_rotation, tables.value_centroids)
    return k, v


def _in_acc(tables: LayerTables) -> LayerTables:
    return LayerTables(**{f: getattr(tables, f).to(ACC) for f in LayerTables.__dataclass_fields__})


def gather_slots(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """Slots of positions [0, length) of every sequence: (B, length, H, slot_bytes)."""
    block_size = cache.shape[1]
    pos = torch.arange(length, device=cache.device)
    blocks = block_table[:, pos // block_size].long()  # (B, length)
    return cache[blocks, pos % block_size]


def _slot_index(block_table: torch.Tensor, pos: torch.Tensor, block_size: int) -> torch.Tensor:
    """Flat cache slots (block * block_size + offset) of positions pos: (n,) for every sequence,
    or (B, n) one row per sequence. Returns (B, n) int64."""
    blocks = block_table[:, pos // block_size] if pos.dim() == 1 else torch.gather(block_table, 1, pos // block_size)
    return blocks.long() * block_size + pos % block_size


def _exact_at(protected: ProtectedTokens, block_table: torch.Tensor, block_size: int, length: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact copies of positions [0, length) of every sequence: has-copy (B, length) bool and the
    rotated rows (B, length, H, 2, d) in ACC (zeros where there is no copy)."""
    slot = _slot_index(block_table, torch.arange(length, device=block_table.device), block_size)
    entry = protected.entry_of_slot.long()[slot]
    has = entry >= 0
    return has, torch.where(has[..., None, None, None], protected.pool[entry.clamp_min(0)].to(ACC), 0.0)


def _decode_exact(protected: ProtectedTokens, block_table: torch.Tensor, block_size: int, seq_lens: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The protected positions with a copy of every decode query (at seq_len - 1): sequence and
    position indices (n,) and their rows (n, H, 2, d) in ACC."""
    S, W = protected.sink, protected.window
    dev = block_table.device
    cand = torch.cat([torch.arange(S, device=dev), torch.arange(-W, 0, device=dev)])
    sink_part = torch.arange(S + W, device=dev) < S
    lens = seq_lens.long().unsqueeze(-1)
    pos = torch.where(sink_part, cand, lens + cand)  # (B, S + W)
    ok = (pos >= 0) & (pos < lens) & (sink_part | (pos >= S))  # window positions < S are sink ones
    pos = torch.where(ok, pos, 0)
    entry = protected.entry_of_slot.long()[_slot_index(block_table.long(), pos, block_size)]
    ok &= entry >= 0
    b_idx, j = torch.nonzero(ok, as_tuple=True)
    return b_idx, pos[b_idx, j], protected.pool[entry[b_idx, j]].to(ACC)


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


def paged_decode(query: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                 tables: LayerTables, preset: Preset | str, scale: float,
                 sliding_window: int | None = None, protected: ProtectedTokens | None = None) -> torch.Tensor:
    """One new query per sequence against its cached tokens, read from packed slots.

    query (B, Hq, d); block_table (B, max_blocks) int; seq_lens (B,) tokens in the
    cache, the query's own included (it sits at position seq_len - 1).
    Scores use the rotated query; values are accumulated in the rotated space and
    un-rotated once per query head. With ``protected``, protected keys that have an exact
    copy are read from it (as a rotated vector of norm 1 without QJL term).
    Returns float32 (B, Hq, d); empty sequences give zeros.
    """
    preset = get_preset(preset)
    B, Hq, d = query.shape
    H = tables.num_heads
    lay = slot_layout(preset, d)
    L = int(seq_lens.max()) if B else 0
    slots = gather_slots(cache, block_table, L)  # (B, L, H, slot_bytes)
    # Codes are decoded straight to centroid values (a table gather per packed word).
    t = _in_acc(tables)
    y = unpack_lookup(slots[..., lay.key_codes:lay.key_codes + lay.key_code_bytes], lay.key_bits, d,
                      t.key_centroids)

    k_pos = torch.arange(L, device=query.device)
    key_norm = read_fp16(slots, lay.key_norm).to(ACC)  # (B, L, H)
    value_norm = read_fp16(slots, lay.value_norm).to(ACC)
    yv = unpack_lookup(slots[..., lay.value_codes:lay.value_codes + lay.value_code_bytes], lay.value_bits, d,
                       t.value_centroids)
    exact_at = None
    if protected is not None and protected.sink + protected.window > 0 and L:
        # only the (at most S + W) protected positions of each sequence are touched
        b_idx, p_idx, rows = _decode_exact(protected, block_table, cache.shape[1], seq_lens)
        exact_at = (b_idx, p_idx)
        y[exact_at], yv[exact_at] = rows[:, :, 0], rows[:, :, 1]
        key_norm[exact_at], value_norm[exact_at] = 1.0, 1.0

    q = query.to(ACC).reshape(B, H, Hq // H, d)
    q_rot = torch.einsum("bhgd,hed->bhge", q, t.key_rotation)
    scores = torch.einsum("bhge,blhe->bhgl", q_rot, y)
    if lay.has_qjl:
        signs = unpack_lookup(slots[..., lay.key_signs:lay.key_signs + lay.sign_bytes], 1, lay.qjl_dim,
                              _SIGN_VALUES.to(q.device).expand(H, 2))
        q_proj = torch.einsum("bhge,hme->bhgm", q_rot, t.qjl)
        sketch = torch.einsum("bhgm,blhm->bhgl", q_proj, signs)
        gamma = read_fp16(slots, lay.key_gamma).to(ACC)
        if exact_at is not None:
            gamma[exact_at] = 0.0
        scores = scores + preset.qjl_coefficient(d) * gamma.permute(0, 2, 1).unsqueeze(2) * sketch
    scores = scores * key_norm.permute(0, 2, 1).unsqueeze(2)
    scores = scores + torch.einsum("bhgd,hd->bhg", q, t.key_mean).unsqueeze(-1)

    visible = (k_pos < seq_lens.unsqueeze(-1)) & _visible(seq_lens.unsqueeze(-1) - 1, k_pos, sliding_window)
    p = _softmax(scores * scale, visible[:, None, None, :])

    weights = p * value_norm.permute(0, 2, 1).unsqueeze(2)
    acc = torch.einsum("bhgl,blhe->bhge", weights, yv)
    out = torch.einsum("bhge,hed->bhgd", acc, t.value_rotation)
    return out.reshape(B, Hq, d).float()


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


def prefill(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cache: torch.Tensor,
            block_table: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
            tables: LayerTables, preset: Preset | str, scale: float, sliding_window: int | None = None,
            compressed_chunk: bool = False, protected: ProtectedTokens | None = None) -> torch.Tensor:
    """Causal attention for chunks of new tokens over a compressed cached prefix.

    query (T, Hq, d), key/value (T, H, d): the new tokens of all sequences, packed;
    sequence b owns rows query_start_loc[b]:query_start_loc[b+1] and has seq_lens[b]
    tokens in total, the new ones last (they must already be written to the cache).
    The prefix is read from the slots; the chunk's own K/V are exact, or read from
    the slots too when ``compressed_chunk`` (what decode would see). With ``protected``,
    a protected prefix key with an exact copy is read from it, and with ``compressed_chunk``
    a protected chunk key from its own exact row (``protected.exact_rows``, what the pool
    holds). Returns (T, Hq, d).
    """
    preset = get_preset(preset)
    layout = slot_layout(preset, query.shape[-1])
    out = torch.zeros(query.shape, dtype=torch.float32, device=query.device)
    guard = protected is not None and protected.sink + protected.window > 0
    t = _in_acc(tables)
    for b in range(len(seq_lens)):
        start, stop, L = int(query_start_loc[b]), int(query_start_loc[b + 1]), int(seq_lens[b])
        if stop == start:
            continue
        ctx = L - (stop - start)
        q_pos = torch.arange(ctx, L, device=query.device)
        if not compressed_chunk and (ctx == 0 or not guard):
            fields = unpack_slots(gather_slots(cache, block_table[b:b + 1], L)[0], layout)
            k, v = dequantize(fields, tables, preset)
            k[ctx:], v[ctx:] = key[start:stop].float(), value[start:stop].float()
            out[start:stop] = fused_attention(query[start:stop], k, v, scale, q_pos, sliding_window)
            continue
        fields = unpack_slots(gather_slots(cache, block_table[b:b + 1], L)[0], layout)
        k, v = dequantize(fields, t, preset)
        exact = None
        if not compressed_chunk:
            k[ctx:], v[ctx:] = key[start:stop].to(ACC), value[start:stop].to(ACC)
        if guard:
            has, rows = _exact_at(protected, block_table[b:b + 1], cache.shape[1], L)
            has, rows = has[0], rows[0]
            has[ctx:] = compressed_chunk  # the chunk's exact rows are in hand
            if compressed_chunk:
                rows[ctx:] = exact_rows(key[start:stop], value[start:stop], tables, protected.pool.dtype).to(ACC)
            k_pos = torch.arange(L, device=query.device)
            use = has & protected_mask(q_pos.unsqueeze(-1), k_pos, protected.sink, protected.window)
            k_exact = torch.einsum("lhe,hed->lhd", rows[:, :, 0], t.key_rotation) + t.key_mean
            v_exact = torch.einsum("lhe,hed->lhd", rows[:, :, 1], t.value_rotation)
            exact = (k_exact, v_exact, use)
        out[start:stop] = dense_attention(query[start:stop], k, v, scale, q_pos, sliding_window, exact)
    return out
