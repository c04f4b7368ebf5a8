"""Protected tokens (sink + recent window read exactly): the torch reference's decode / prefill against
dense attention over hand-mixed K/V (the true key and value at protected positions, the dequantised
slots elsewhere), reading copies from a paged exact-copy cache through its own block table."""

import pytest
import torch

from support import make_paged, registry_tables, rel_err
from vllm_turboquant import reference as R
from vllm_turboquant.layout import slot_layout, unpack_slots
from vllm_turboquant.protected import ProtectedTokens, exact_rows, protected_mask, protected_positions

BS = 16
BS_X = 4  # the exact-copy cache has its own (smaller) block size, as the backend's companion group does


def protect_all(seq_lens, keys, values, tables, sink, window, dtype=torch.float64, seed=0):
    """An exact-copy cache with its own shuffled block table. Protected positions (for any query at or
    after them: the sink, and the last max(window, 16) positions) hold their copies; every other row is
    NaN, and blocks wholly outside the sink and the window point at a NaN block, as stale entries would,
    so reading anything but a protected position poisons the output."""
    g = torch.Generator().manual_seed(seed)
    H, d = tables.key_rotation.shape[:2]
    per_seq = max(1, -(-max(seq_lens) // BS_X))
    nblocks = len(seq_lens) * per_seq + 2
    cache = torch.full((nblocks, BS_X, H, 2 * d), float("nan"), dtype=dtype)
    bt = torch.randperm(nblocks - 1, generator=g)[:len(seq_lens) * per_seq].reshape(len(seq_lens), per_seq) + 1
    for b, L in enumerate(seq_lens):
        keep = protected_positions(max(0, L - max(window, 16)), L, sink, max(window, 16)) if L else torch.arange(0)
        rows = exact_rows(keys[b][keep], values[b][keep], tables, dtype)
        cache[bt[b, keep // BS_X], keep % BS_X] = rows
        used = set((keep // BS_X).tolist())
        for j in range(per_seq):
            if j not in used:
                bt[b, j] = 0  # a stale block (all NaN)
    return ProtectedTokens(sink, window, cache, bt.int())


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
    tables = registry_tables(preset, d, H, key_mean=True)
    cache, bt, keys, values = make_paged(preset, d, H, seq_lens, BS, tables)
    prot = protect_all(seq_lens, keys, values, tables, sink, window)
    q = torch.randn(len(seq_lens), H * G, d)
    out = R.paged_decode(q, cache, bt, torch.tensor(seq_lens), tables, preset, d ** -0.5, protected=prot)
    for b, L in enumerate(seq_lens):
        if L == 0:
            assert torch.all(out[b] == 0)
            continue
        pos = torch.arange(L)
        use = (pos < sink) | (pos > L - 1 - window)
        k, v = mixed_kv(cache, bt, b, L, keys, values, tables, preset, use)
        ref = R.dense_attention(q[b:b + 1].double(), k, v, d ** -0.5, torch.tensor([L - 1]))
        assert rel_err(out[b:b + 1], ref) < 1e-6, (b, L)


def test_zero_sink_and_window_is_plain_turboquant_exactly():
    d, H, preset = 64, 2, "turboquant4"
    seq_lens = [30, 17]
    tables = registry_tables(preset, d, H)
    cache, bt, keys, values = make_paged(preset, d, H, seq_lens, BS, tables)
    prot = protect_all(seq_lens, keys, values, tables, 0, 0)
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
    tables = registry_tables(preset, d, H, key_mean=True)
    cache, bt, keys, values = make_paged(preset, d, H, seq_lens, BS, tables)
    prot = protect_all(seq_lens, keys, values, tables, sink, window)
    # the cache need not hold a chunk's own copies below its last W tokens: the op makes them from the
    # chunk's K/V (poisoned here, so reading them from the cache would show)
    for b, (L, n) in enumerate(zip(seq_lens, chunk, strict=True)):
        for p in range(max(L - n, sink), L - window):
            prot.cache[prot.block_table[b, p // BS_X], p % BS_X] = float("nan")
    qsl = torch.tensor([0, 12, 21, 22])
    query = torch.randn(22, H * G, d)
    key = torch.cat([keys[b][L - n:] for b, (L, n) in enumerate(zip(seq_lens, chunk, strict=True))])
    value = torch.cat([values[b][L - n:] for b, (L, n) in enumerate(zip(seq_lens, chunk, strict=True))])
    out = R.prefill(query, key, value, cache, bt, qsl, torch.tensor(seq_lens), tables, preset, d ** -0.5,
                    window_attn, compressed_chunk=compressed, protected=prot)
    for b, (L, n) in enumerate(zip(seq_lens, chunk, strict=True)):
        rows = slice(int(qsl[b]), int(qsl[b + 1]))
        for i, qp in enumerate(range(L - n, L)):
            pos = torch.arange(L)
            use = (pos < sink) | (pos > qp - window)
            if not compressed:
                use |= pos >= L - n  # the chunk's own K/V are exact anyway
            k, v = mixed_kv(cache, bt, b, L, keys, values, tables, preset, use)
            ref = R.dense_attention(query[rows][i:i + 1].double(), k, v, d ** -0.5, torch.tensor([qp]), window_attn)
            assert rel_err(out[rows][i:i + 1], ref) < 1e-5, (b, qp)


def test_write_cache_writes_exact_copies_to_their_slots():
    d, H, preset = 64, 2, "turboquant3"
    tables = registry_tables(preset, d, H, key_mean=True)
    cache = torch.zeros(4, BS, H, slot_layout(preset, d).slot_bytes, dtype=torch.uint8)
    exact = torch.zeros(3, BS_X, H, 2 * d, dtype=torch.bfloat16)
    prot = ProtectedTokens(1, 2, exact, torch.zeros(1, 1, dtype=torch.int32))
    k, v = torch.randn(3, H, d), torch.randn(3, H, d)
    R.write_cache(cache, torch.tensor([5, -1, 7]), k, v, tables, preset, protected=prot,
                  exact_slot_mapping=torch.tensor([9, -1, 0]))
    want = exact_rows(k, v, tables, torch.bfloat16)
    assert torch.equal(exact[2, 1], want[0]) and torch.equal(exact[0, 0], want[2])  # slot 9 = block 2, row 1
    assert int((exact != 0).any(-1).any(-1).sum()) == 2  # nothing else written
    # rows are Π(k − μ) | Π v: un-rotating gives the token back (to bf16 rounding)
    back = torch.einsum("he,hed->hd", exact[2, 1, :, :d].double(), tables.key_rotation.double()) + tables.key_mean
    assert torch.allclose(back.float(), k[0], atol=0.05 * k[0].abs().max().item())
    # the packed slot of token 1 (-1) is skipped, its exact slot (-1) too; token 0's slot is written
    assert cache.view(-1, H, cache.shape[-1])[5].any() and not cache.view(-1, H, cache.shape[-1])[6].any()


def test_protected_positions_and_mask():
    q, k = torch.tensor([[9]]), torch.arange(10)
    assert protected_mask(q, k, 2, 3)[0].tolist() == [True, True] + [False] * 5 + [True] * 3
    assert not protected_mask(q, k, 0, 0).any()
    # a chunk of queries at 20..29 reads the sink and every key > 20 - W
    assert protected_positions(20, 30, 4, 8).tolist() == [0, 1, 2, 3, *range(13, 30)]
    assert protected_positions(29, 30, 4, 8).tolist() == [0, 1, 2, 3, *range(22, 30)]
    assert protected_positions(0, 3, 4, 8).tolist() == [0, 1, 2]  # shorter than S + W
    assert protected_positions(5, 6, 0, 0).tolist() == []
    for first in range(12):  # the set is exactly the union of protected_mask over the chunk's queries
        want = protected_mask(torch.arange(first, 12)[:, None], torch.arange(12)[None, :], 3, 5) & (
            torch.arange(12)[None, :] <= torch.arange(first, 12)[:, None])
        assert protected_positions(first, 12, 3, 5).tolist() == torch.nonzero(want.any(0)).flatten().tolist()
    with pytest.raises(ValueError, match="window=-1"):
        ProtectedTokens(0, -1, torch.zeros(0), torch.zeros(0))
