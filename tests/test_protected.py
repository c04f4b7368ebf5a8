"""Protected tokens (sink + recent window read exactly): the pool planner's bookkeeping, and the
torch reference's decode / prefill against dense attention over hand-mixed K/V (the true key and
value at protected positions, the dequantised slots elsewhere)."""

import pytest
import torch

from test_reference import make_paged, make_tables, rel_err
from vllm_turboquant import reference as R
from vllm_turboquant.layout import slot_layout, unpack_slots
from vllm_turboquant.protected import (PoolPlanner, ProtectedTokens, exact_rows, padded_page_bytes,
                                       pool_bytes_per_token, pool_rows, protected_mask)

BS = 16


def slots_of(block_table, b, positions):
    positions = torch.as_tensor(positions)
    return (block_table[b, positions // BS].long() * BS + positions % BS).long()


def protect_all(block_table, seq_lens, keys, values, tables, sink, window, dtype=torch.float64, missing=()):
    """A pool holding an exact copy of every cached token (except positions in ``missing``)."""
    num_slots = (int(block_table.max()) + 1) * BS
    entry = torch.full((num_slots,), -1, dtype=torch.int32)
    rows, n = [], 0
    for b, L in enumerate(seq_lens):
        keep = [p for p in range(L) if p not in missing]
        if not keep:
            continue
        entry[slots_of(block_table, b, keep)] = torch.arange(n, n + len(keep), dtype=torch.int32)
        rows.append(exact_rows(keys[b][keep], values[b][keep], tables, dtype))
        n += len(keep)
    H, d = tables.key_rotation.shape[:2]
    pool = torch.cat(rows) if rows else torch.zeros(0, H, 2, d, dtype=dtype)
    return ProtectedTokens(sink, window, pool, entry)


def mixed_kv(cache, block_table, b, L, keys, values, tables, preset, use):
    """Dequantised K/V of sequence b with exact K/V where ``use`` (L,) is true."""
    lay = slot_layout(preset, keys[b].shape[-1])
    k, v = R.dequantize(unpack_slots(R.gather_slots(cache, block_table[b:b + 1], L)[0], lay), tables, preset)
    k, v = k.double(), v.double()
    k[use], v[use] = keys[b][:L][use].double(), values[b][:L][use].double()
    return k, v


@pytest.mark.parametrize("preset", ["turboquant3", "turboquant3_qjl"])
@pytest.mark.parametrize("sink,window", [(4, 0), (0, 8), (4, 8), (3, 40)])
def test_decode_reads_protected_positions_exactly(preset, sink, window):
    d, H, G = 64, 2, 3
    seq_lens = [1, 5, 12, 13, 50, 0]  # shorter than, equal to and longer than S + W
    tables = make_tables(preset, d, H, key_mean=True)
    cache, bt, keys, values = make_paged(preset, d, H, seq_lens, BS, tables)
    missing = {9}  # a protected position without a copy is read from its slot
    prot = protect_all(bt, seq_lens, keys, values, tables, sink, window, missing=missing)
    q = torch.randn(len(seq_lens), H * G, d)
    out = R.paged_decode(q, cache, bt, torch.tensor(seq_lens), tables, preset, d ** -0.5, protected=prot)
    for b, L in enumerate(seq_lens):
        if L == 0:
            assert torch.all(out[b] == 0)
            continue
        pos = torch.arange(L)
        use = ((pos < sink) | (pos > L - 1 - window)) & (pos != 9)
        k, v = mixed_kv(cache, bt, b, L, keys, values, tables, preset, use)
        ref = R.dense_attention(q[b:b + 1].double(), k, v, d ** -0.5, torch.tensor([L - 1]))
        assert rel_err(out[b:b + 1], ref) < 1e-6, (b, L)


def test_zero_sink_and_window_is_plain_turboquant_exactly():
    d, H, preset = 64, 2, "turboquant4"
    seq_lens = [30, 17]
    tables = make_tables(preset, d, H)
    cache, bt, keys, values = make_paged(preset, d, H, seq_lens, BS, tables)
    prot = protect_all(bt, seq_lens, keys, values, tables, 0, 0)
    q = torch.randn(2, H * 2, d)
    a = R.paged_decode(q, cache, bt, torch.tensor(seq_lens), tables, preset, 0.1)
    b = R.paged_decode(q, cache, bt, torch.tensor(seq_lens), tables, preset, 0.1, protected=prot)
    assert torch.equal(a, b)
    qsl = torch.tensor([0, 5, 9])
    query, key, value = torch.randn(9, H * 2, d), torch.randn(9, H, d), torch.randn(9, H, d)
    for compressed in (False, True):
        a = R.prefill(query, key, value, cache, bt, qsl, torch.tensor(seq_lens), tables, preset, 0.1,
                      compressed_chunk=compressed)
        b = R.prefill(query, key, value, cache, bt, qsl, torch.tensor(seq_lens), tables, preset, 0.1,
                      compressed_chunk=compressed, protected=prot)
        assert torch.equal(a, b)


@pytest.mark.parametrize("compressed", [False, True])
@pytest.mark.parametrize("window_attn", [None, 10])
def test_prefill_reads_protected_positions_exactly_per_query(compressed, window_attn):
    d, H, G, preset, sink, window = 64, 2, 2, "turboquant3", 2, 6
    seq_lens = [40, 9, 3]
    chunk = [12, 9, 1]  # chunked over a prefix, a whole prompt, a one-token chunk
    tables = make_tables(preset, d, H, key_mean=True)
    cache, bt, keys, values = make_paged(preset, d, H, seq_lens, BS, tables)
    # copies exist for the prefix only: chunk keys come from the tokens in hand
    prot = protect_all(bt, seq_lens, keys, values, tables, sink, window)
    qsl = torch.tensor([0, 12, 21, 22])
    query = torch.randn(22, H * G, d)
    key = torch.cat([keys[b][L - n:] for b, (L, n) in enumerate(zip(seq_lens, chunk))])
    value = torch.cat([values[b][L - n:] for b, (L, n) in enumerate(zip(seq_lens, chunk))])
    out = R.prefill(query, key, value, cache, bt, qsl, torch.tensor(seq_lens), tables, preset, d ** -0.5,
                    window_attn, compressed_chunk=compressed, protected=prot)
    for b, (L, n) in enumerate(zip(seq_lens, chunk)):
        rows = slice(int(qsl[b]), int(qsl[b + 1]))
        for i, qp in enumerate(range(L - n, L)):
            pos = torch.arange(L)
            use = (pos < sink) | (pos > qp - window)
            if not compressed:
                use |= pos >= L - n  # the chunk's own K/V are exact anyway
            k, v = mixed_kv(cache, bt, b, L, keys, values, tables, preset, use)
            ref = R.dense_attention(query[rows][i:i + 1].double(), k, v, d ** -0.5, torch.tensor([qp]), window_attn)
            assert rel_err(out[rows][i:i + 1], ref) < 1e-5, (b, qp)


def test_write_cache_fills_the_pool_rows_it_is_given():
    d, H, preset = 64, 2, "turboquant3"
    tables = make_tables(preset, d, H, key_mean=True)
    cache = torch.zeros(4, BS, H, slot_layout(preset, d).slot_bytes, dtype=torch.uint8)
    pool = torch.zeros(5, H, 2, d, dtype=torch.bfloat16)
    prot = ProtectedTokens(1, 2, pool, torch.full((4 * BS,), -1, dtype=torch.int32))
    k, v = torch.randn(3, H, d), torch.randn(3, H, d)
    R.write_cache(cache, torch.tensor([5, 6, 7]), k, v, tables, preset, protected=prot,
                  entries=torch.tensor([4, -1, 0], dtype=torch.int32))
    want = exact_rows(k, v, tables, torch.bfloat16)
    assert torch.equal(pool[4], want[0]) and torch.equal(pool[0], want[2]) and torch.all(pool[1:4] == 0)
    # rows are Π(k − μ) and Π v: un-rotating gives the token back (to bf16 rounding)
    back = torch.einsum("he,hed->hd", pool[4, :, 0].double(), tables.key_rotation.double()) + tables.key_mean
    assert torch.allclose(back.float(), k[0], atol=0.05 * k[0].abs().max().item())


# -- the planner ---------------------------------------------------------------------------------

def plan(planner, bt, starts, lens):
    """One step: request i computes positions starts[i] .. starts[i] + lens[i] - 1."""
    qsl = torch.tensor([0, *torch.cumsum(torch.tensor(lens), 0).tolist()])
    ends = torch.tensor(starts) + torch.tensor(lens)
    slots = torch.cat([slots_of(bt, i, torch.arange(s, s + n)) for i, (s, n) in enumerate(zip(starts, lens))])
    return planner.plan(qsl, ends, bt, slots, BS), slots


def copies(planner, bt, b, L):
    """Positions of sequence b (of length L) that hold an exact copy."""
    return [p for p in range(L) if planner.entry_of_slot[int(slots_of(bt, b, [p]))] >= 0]


def needed(planner, bt, b, L):
    """Positions of sequence b whose copy is needed (not spare)."""
    return [p for p in copies(planner, bt, b, L)
            if not planner.spare[planner.entry_of_slot[int(slots_of(bt, b, [p]))]]]


def test_planner_keeps_sink_and_window_through_chunks_and_decode():
    S, W = 2, 5
    bt = torch.arange(12).reshape(2, 6).int()
    pl = PoolPlanner(S, W, 12 * BS, rows=40, device=torch.device("cpu"))
    entries, _ = plan(pl, bt, [0, 0], [20, 3])  # prompt of 20, prompt of 3 (shorter than S + W)
    assert needed(pl, bt, 0, 20) == [0, 1, 15, 16, 17, 18, 19]
    assert needed(pl, bt, 1, 3) == [0, 1, 2]
    assert copies(pl, bt, 0, 20) == list(range(20))  # the pool has room: spare copies of the rest
    assert int((entries >= 0).sum()) == 23 and len(set(entries.tolist())) == 23
    plan(pl, bt, [20, 3], [7, 1])  # a chunk of 7, a decode step
    # this step's queries still read 15..19; they become spare at the next step
    assert needed(pl, bt, 0, 27) == [0, 1, 15, 16, 17, 18, 19, 22, 23, 24, 25, 26]
    assert needed(pl, bt, 1, 4) == [0, 1, 2, 3]
    for step in range(10):
        plan(pl, bt, [27 + step, 4 + step], [1, 1])
        # a request needs at most S + W rows between steps (+ the one the step just read for the last time)
        assert len(needed(pl, bt, 0, 28 + step)) <= S + W + 1
    assert needed(pl, bt, 0, 37) == [0, 1, 31, 32, 33, 34, 35, 36]
    assert needed(pl, bt, 1, 14) == [0, 1, 8, 9, 10, 11, 12, 13]
    assert pl.dropped == 0


def test_planner_spare_copies_serve_a_prefix_cache_hit_and_never_evict_needed_ones():
    S, W = 1, 4
    bt = torch.tensor([[0, 1, 2], [0, 1, 3]]).int()  # B shares A's first two blocks (32 tokens)
    pl = PoolPlanner(S, W, 4 * BS, rows=48, device=torch.device("cpu"))
    plan(pl, bt[:1], [0], [40])
    window = [int(pl.entry_of_slot[int(s)]) for s in slots_of(bt, 0, torch.arange(28, 32))]
    assert all(e >= 0 for e in window) and all(pl.spare[window])  # A does not need them, they are kept
    plan(pl, bt[1:], [32], [8])  # B: prefix hit, computes 32..39, reads 0 and 28..31
    assert [int(pl.entry_of_slot[int(s)]) for s in slots_of(bt, 0, torch.arange(28, 32))] == window
    assert not any(pl.spare[window])  # needed again (B's window)
    # a long prompt floods the pool: spare copies go, needed ones stay
    pl2 = PoolPlanner(S, W, 4 * BS, rows=10, device=torch.device("cpu"))
    plan(pl2, bt[:1], [0], [40])
    assert copies(pl2, bt, 0, 40) == [0, 31, 32, 33, 34, 35, 36, 37, 38, 39]
    assert needed(pl2, bt, 0, 40) == [0, 36, 37, 38, 39] and pl2.dropped == 0


def test_planner_forgets_a_slot_when_it_is_rewritten_and_evicts_least_recently_used():
    S, W = 1, 2
    bt = torch.arange(4).reshape(2, 2).int()
    pl = PoolPlanner(S, W, 4 * BS, rows=3, device=torch.device("cpu"))
    plan(pl, bt, [0], [10])
    assert copies(pl, bt, 0, 10) == [0, 8, 9]
    # the block is reused by a new request (e.g. after preemption): its slots get new tokens
    plan(pl, bt, [0], [4])
    assert copies(pl, bt, 0, 4) == [0, 2, 3]
    # a second request needs 3 rows; only rows not read this step can be recycled
    plan(pl, bt[1:], [0], [6])
    assert copies(pl, bt[1:], 0, 6) == [0, 4, 5] and copies(pl, bt, 0, 4) == []
    entries, _ = plan(pl, bt, [4, 6], [1, 1])  # both read their copies: nothing left to recycle
    assert pl.dropped == 2 and int((entries >= 0).sum()) == 0


def test_protected_mask_and_pool_sizing():
    q, k = torch.tensor([[9]]), torch.arange(10)
    assert protected_mask(q, k, 2, 3)[0].tolist() == [True, True] + [False] * 5 + [True] * 3
    assert not protected_mask(q, k, 0, 0).any()
    # turboquant3, head_dim 128, 8 KV heads, bf16, 32K context: 68 exact rows per 32768 tokens
    per_token = pool_bytes_per_token(4, 64, 8, 128, 2, 32768)
    assert per_token == pytest.approx(68 * 8 * 512 / 32768)
    page = 16 * 8 * slot_layout("turboquant3", 128).slot_bytes
    assert padded_page_bytes(page, 16, 4, 64, 8, 128, 2, 32768) >= page + 16 * per_token
    assert pool_rows(1000, 16, 4, 64, 2048) == 1000 * 16 * 68 // 2048 and pool_rows(10, 16, 0, 0, 2048) == 0
    with pytest.raises(ValueError, match="window=-1"):
        ProtectedTokens(0, -1, torch.zeros(0), torch.zeros(0))
