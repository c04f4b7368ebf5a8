"""Protected tokens (attention sink + recent window read exactly) in the Triton kernels, against
``reference`` with the same ``ProtectedTokens``.

Pools hold a copy of *every* cached token (in shuffled rows, a few garbage rows in between), so
the kernels' protected mask alone decides what is read exactly; some positions have no copy
(entry -1: read packed even when protected). Prefill pools also hold garbage copies of the
chunk's own slots: those must never be read (the chunk is fresh K/V, or its own exact rows with
``compressed_chunk``). Small grids: the Triton interpreter costs ~1 ms per program instance.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from test_kernels import (DEVICE, REL_TOL, SKETCHED, assert_slots_match, make_tables, paged_setup,  # noqa: E402
                          rel_err, slots_of)
from vllm_turboquant import reference as ref  # noqa: E402
from vllm_turboquant.kernels import ops  # noqa: E402
from vllm_turboquant.kernels.decode import paged_decode  # noqa: E402
from vllm_turboquant.kernels.prefill import prefill  # noqa: E402
from vllm_turboquant.kernels.store import store  # noqa: E402
from vllm_turboquant.layout import slot_layout  # noqa: E402
from vllm_turboquant.protected import PoolPlanner, ProtectedTokens, exact_rows  # noqa: E402


def fill(preset, d, H, lens, block_size, tables, seed=0):
    """A reference-written cache of random tokens; returns cache, block_table and each sequence's K/V."""
    cache, block_table = paged_setup(lens, block_size, H, slot_layout(preset, d), seed)
    g = torch.Generator().manual_seed(seed + 1)
    keys, values = [], []
    for b, n in enumerate(lens):
        k = (torch.randn(n, H, d, generator=g) + tables.key_mean.cpu()).to(DEVICE)
        v = torch.randn(n, H, d, generator=g).to(DEVICE)
        ref.write_cache(cache, slots_of(block_table, b, torch.arange(n, device=DEVICE), block_size), k, v, tables,
                        preset)
        keys.append(k)
        values.append(v)
    return cache, block_table, keys, values


def make_protected(cache, block_table, keys, values, tables, sink, window, dtype, missing=(), garbage_from=None,
                   seed=0):
    """A pool with a copy of every cached position but ``missing`` (entry -1), in shuffled rows with
    unused garbage rows in between. Positions >= garbage_from[b] get garbage copies instead."""
    g = torch.Generator().manual_seed(seed + 100)
    block_size = cache.shape[1]
    H, d = keys[0].shape[1:] if keys else (cache.shape[2], 0)
    entry = torch.full((cache.shape[0] * block_size,), -1, dtype=torch.int32)
    rows, slots = [], []
    for b, k in enumerate(keys):
        L = k.shape[0]
        keep = torch.tensor([p for p in range(L) if p not in missing], dtype=torch.long)
        if not len(keep):
            continue
        r = exact_rows(k[keep], values[b][keep], tables, dtype)
        if garbage_from is not None:
            bad = keep.to(DEVICE) >= garbage_from[b]
            r[bad] = (torch.randn(r[bad].shape, generator=g) * 5).to(dtype).to(DEVICE)
        rows.append(r)
        slots.append(slots_of(block_table, b, keep.to(DEVICE), block_size).cpu())
    rows = torch.cat(rows) if rows else torch.zeros(0, H, 2, d, dtype=dtype, device=DEVICE)
    slots = torch.cat(slots) if slots else torch.zeros(0, dtype=torch.long)
    P = rows.shape[0] + 5
    place = torch.randperm(P, generator=g)[:rows.shape[0]]
    pool = (torch.randn(P, H, 2, d, generator=g) * 7).to(dtype).to(DEVICE)  # unused rows: garbage
    pool[place.to(DEVICE)] = rows
    entry[slots] = place.int()
    return ProtectedTokens(sink, window, pool, entry.to(DEVICE))


# ---------------------------------------------------------------------------
# decode
# ---------------------------------------------------------------------------

DECODE_CASES = [
    # preset,           d,  H, G, block, lens,                S, W,  sliding, splits, pool dtype,     missing
    ("turboquant3",     64, 2, 2, 16, [0, 1, 6, 7, 40],       2, 4,  None,    2, torch.float32,  (3, 38)),
    ("turboquant3_qjl", 64, 2, 4, 16, [5, 37],                4, 0,  None,    2, torch.bfloat16, (1,)),
    ("turboquant3_qjl", 64, 1, 3, 16, [20, 50],               0, 8,  12,      2, torch.float32,  (45,)),
    ("turboquant4",     80, 2, 2, 32, [45, 10],               3, 5,  16,      3, torch.bfloat16, ()),
    (SKETCHED,          64, 1, 4, 16, [33],                   1, 40, None,    1, torch.float32,  (0,)),
]


@pytest.mark.parametrize("preset,d,H,G,block_size,lens,sink,window,sliding,splits,dtype,missing", DECODE_CASES)
def test_decode_protected_matches_reference(preset, d, H, G, block_size, lens, sink, window, sliding, splits,
                                            dtype, missing):
    tables = make_tables(preset, d, H, seed=d)
    cache, block_table, keys, values = fill(preset, d, H, lens, block_size, tables, seed=G)
    prot = make_protected(cache, block_table, keys, values, tables, sink, window, dtype, missing)
    query = torch.randn(len(lens), H * G, d, generator=torch.Generator().manual_seed(7)).to(DEVICE) * 2
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    scale = d ** -0.5
    want = ref.paged_decode(query, cache, block_table, seq_lens, tables, preset, scale, sliding, prot)
    got = paged_decode(query, cache, block_table, seq_lens, tables, preset, scale, sliding, num_splits=splits,
                       protected=prot)
    assert rel_err(got, want) < REL_TOL
    for b, n in enumerate(lens):
        if n == 0:
            assert not got[b].any()
    # protection changes the output (the test would be vacuous otherwise)
    plain = ref.paged_decode(query, cache, block_table, seq_lens, tables, preset, scale, sliding)
    assert rel_err(plain, want) > 10 * REL_TOL


def test_zero_sink_and_window_is_bit_identical():
    preset, d, H, G, block_size, lens = "turboquant3_qjl", 64, 2, 2, 16, [20, 9]
    tables = make_tables(preset, d, H)
    cache, block_table, keys, values = fill(preset, d, H, lens, block_size, tables)
    prot = make_protected(cache, block_table, keys, values, tables, 0, 0, torch.float32)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    query = torch.randn(len(lens), H * G, d, device=DEVICE)
    a = paged_decode(query, cache, block_table, seq_lens, tables, preset, 0.125, 8, num_splits=2)
    b = paged_decode(query, cache, block_table, seq_lens, tables, preset, 0.125, 8, num_splits=2, protected=prot)
    assert torch.equal(a, b)
    qsl = torch.tensor([0, 5, 14], dtype=torch.int32, device=DEVICE)
    chunk = [k[-n:] for k, n in zip(keys, (5, 9))], [v[-n:] for v, n in zip(values, (5, 9))]
    key, value = torch.cat(chunk[0]), torch.cat(chunk[1])
    q = torch.randn(14, H * G, d, device=DEVICE)
    for compressed in (False, True):
        args = (q, key, value, cache, block_table, qsl, seq_lens, tables, preset, 0.125, None, compressed)
        assert torch.equal(prefill(*args), prefill(*args, protected=prot))


# ---------------------------------------------------------------------------
# prefill
# ---------------------------------------------------------------------------

PREFILL_CASES = [
    # preset,           d,  H, G, block, lens,     query_lens, S, W,  sliding, compressed, pool dtype,  missing
    ("turboquant3",     64, 2, 2, 16, [30, 9],  [6, 9],     2, 4,  None,    False, torch.float32,  (5,)),
    ("turboquant3",     64, 2, 2, 16, [30, 9],  [6, 9],     2, 4,  None,    True,  torch.bfloat16, (5,)),
    ("turboquant3_qjl", 64, 2, 4, 16, [40, 12], [10, 12],   4, 0,  16,      True,  torch.float32,  (2,)),
    ("turboquant3_qjl", 64, 1, 2, 16, [33, 3],  [5, 3],     0, 8,  None,    False, torch.bfloat16, (27,)),
    ("turboquant4",     80, 2, 2, 16, [20, 6],  [4, 6],     3, 30, 10,      True,  torch.float32,  ()),
    (SKETCHED,          64, 1, 4, 16, [26],     [7],        1, 3,  None,    True,  torch.float32,  (0, 21)),
]


@pytest.mark.parametrize("preset,d,H,G,block_size,lens,query_lens,sink,window,sliding,compressed,dtype,missing",
                         PREFILL_CASES)
def test_prefill_protected_matches_reference(preset, d, H, G, block_size, lens, query_lens, sink, window, sliding,
                                             compressed, dtype, missing):
    tables = make_tables(preset, d, H, seed=d + 1)
    cache, block_table, keys, values = fill(preset, d, H, lens, block_size, tables, seed=G)
    ctx = [n - q for n, q in zip(lens, query_lens)]
    # the chunk's slots have (garbage) copies too: prefill must never read them
    prot = make_protected(cache, block_table, keys, values, tables, sink, window, dtype, missing, garbage_from=ctx)
    qsl = torch.tensor([0] + torch.tensor(query_lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    key = torch.cat([k[c:] for k, c in zip(keys, ctx)])
    value = torch.cat([v[c:] for v, c in zip(values, ctx)])
    query = torch.randn(key.shape[0], H * G, d, generator=torch.Generator().manual_seed(11)).to(DEVICE) * 2
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    args = (query, key, value, cache, block_table, qsl, seq_lens, tables, preset, d ** -0.5, sliding, compressed)
    want = ref.prefill(*args, prot)
    got = prefill(*args, protected=prot)
    assert rel_err(got, want) < REL_TOL
    assert rel_err(ref.prefill(*args), want) > 10 * REL_TOL  # protection matters here


# ---------------------------------------------------------------------------
# store
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("preset,d,dtype,tol", [("turboquant3_qjl", 64, torch.float32, 1e-5),
                                                ("turboquant4", 80, torch.bfloat16, 1e-2)])
def test_store_writes_pool_rows(preset, d, dtype, tol):
    H, N, block_size, num_blocks, P = 2, 9, 16, 3, 12
    layout = slot_layout(preset, d)
    tables = make_tables(preset, d, H)
    g = torch.Generator().manual_seed(5)
    key = (torch.randn(N, H, d, generator=g) * 2).to(DEVICE) + tables.key_mean
    value = torch.randn(N, H, d, generator=g).to(DEVICE)
    slot_mapping = torch.randperm(num_blocks * block_size, generator=g)[:N].to(DEVICE)
    slot_mapping[4] = -1  # padding: no slot, but its copy is still written (as the reference does)
    entries = torch.tensor([3, -1, 0, 11, 7, -1, -1, 5, 1], dtype=torch.int32, device=DEVICE)
    garbage = torch.randint(0, 256, (num_blocks, block_size, H, layout.slot_bytes), generator=g, dtype=torch.uint8)
    pool0 = (torch.randn(P, H, 2, d, generator=g) * 9).to(dtype).to(DEVICE)
    entry_of_slot = torch.full((num_blocks * block_size,), -1, dtype=torch.int32, device=DEVICE)
    prot_k = ProtectedTokens(0, 4, pool0.clone(), entry_of_slot)
    prot_r = ProtectedTokens(0, 4, pool0.clone(), entry_of_slot)
    cache_k, cache_r, cache_plain = garbage.to(DEVICE), garbage.clone().to(DEVICE), garbage.clone().to(DEVICE)
    ops.write_cache(cache_k, slot_mapping, key, value, tables, preset, prot_k, entries)
    ref.write_cache(cache_r, slot_mapping, key, value, tables, preset, prot_r, entries)
    store(cache_plain, slot_mapping, key, value, tables, preset)

    assert torch.equal(cache_k, cache_plain), "the pool write changed the packed slots"
    keep = slot_mapping >= 0
    flat_k, flat_r = cache_k.view(-1, H, layout.slot_bytes), cache_r.view(-1, H, layout.slot_bytes)
    assert_slots_match(flat_k[slot_mapping[keep]], flat_r[slot_mapping[keep]], key[keep], value[keep], tables,
                       preset, layout)
    assert torch.equal(flat_k[slot_mapping[keep]], flat_r[slot_mapping[keep]])  # no boundary flips in this data

    written = entries[entries >= 0].long()
    untouched = torch.ones(P, dtype=torch.bool, device=DEVICE)
    untouched[written] = False
    assert torch.equal(prot_k.pool[untouched], pool0[untouched]), "store wrote outside its pool rows"
    assert prot_k.pool.dtype == dtype
    want = exact_rows(key[entries >= 0], value[entries >= 0], tables, dtype)
    assert rel_err(prot_k.pool[written], want) < tol
    assert rel_err(prot_k.pool[written], prot_r.pool[written]) < tol


# ---------------------------------------------------------------------------
# ops end to end, with the planner: chunked prefill, then decode
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("compressed,dtype", [(False, torch.float32), (True, torch.bfloat16)])
def test_ops_steps_with_planner(compressed, dtype):
    """Two prefill chunks and two decode steps of two sequences through ``ops`` (kernel-written cache and
    pool) and ``reference`` (reference-written ones), the pool rows assigned by ``PoolPlanner`` (which runs
    short of rows in step 2: some window tokens lose their copies).

    The kernels' pool rows are computed in float32, the reference's in float64: in bfloat16 a row element
    may round the other way, so the outputs are compared against the reference reading the kernels' pool,
    and the two pools (and the fully reference-made output) within that rounding."""
    preset, d, H, G, block_size, S, W = "turboquant3_qjl", 64, 2, 2, 16, 2, 5
    tables = make_tables(preset, d, H)
    layout = slot_layout(preset, d)
    lens = [22, 9]
    cache_k, block_table = paged_setup([L + 2 for L in lens], block_size, H, layout)
    cache_r = cache_k.clone()
    planner = PoolPlanner(S, W, cache_k.shape[0] * block_size, 2 * (S + W) + 2, DEVICE)
    pool = torch.zeros(planner.rows, H, 2, d, dtype=dtype, device=DEVICE)
    prot_k = ProtectedTokens(S, W, pool, planner.table)
    prot_r = ProtectedTokens(S, W, pool.clone(), planner.table)
    rounding = 1e-2 if dtype == torch.bfloat16 else 1e-5
    g = torch.Generator().manual_seed(3)
    done = [0, 0]
    for step_lens in ([12, 9], [10, 0], [1, 1], [1, 1]):  # new tokens per sequence
        T = sum(step_lens)
        key = (torch.randn(T, H, d, generator=g) + tables.key_mean.cpu()).to(DEVICE)
        value = torch.randn(T, H, d, generator=g).to(DEVICE)
        query = torch.randn(T, H * G, d, generator=g).to(DEVICE)
        qsl = torch.tensor([0] + torch.tensor(step_lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
        ends = [n + s for n, s in zip(done, step_lens)]
        seq_lens = torch.tensor(ends, dtype=torch.int32, device=DEVICE)
        slot_mapping = torch.cat([slots_of(block_table, b, torch.arange(n, e, device=DEVICE), block_size)
                                  for b, (n, e) in enumerate(zip(done, ends))])
        entries = planner.plan(qsl, seq_lens, block_table, slot_mapping, block_size)
        ops.write_cache(cache_k, slot_mapping, key, value, tables, preset, prot_k, entries)
        ref.write_cache(cache_r, slot_mapping, key, value, tables, preset, prot_r, entries)
        assert rel_err(prot_k.pool, prot_r.pool) < rounding
        outs = []
        for cache, prot in ((cache_k, prot_k), (cache_r, prot_k), (cache_r, prot_r)):
            impl = ops if len(outs) == 0 else ref
            if max(step_lens) == 1:
                outs.append(impl.paged_decode(query, cache, block_table, seq_lens, tables, preset, d ** -0.5, None,
                                              prot))
            else:
                outs.append(impl.prefill(query, key, value, cache, block_table, qsl, seq_lens, tables, preset,
                                         d ** -0.5, None, compressed, prot))
        got, want, want_r = outs
        assert rel_err(got, want) < REL_TOL, step_lens
        assert rel_err(got, want_r) < (REL_TOL if dtype == torch.float32 else 1e-2), step_lens
        done = ends
    assert planner.dropped > 0 and (planner.entry_of_slot >= 0).sum() > 0


@pytest.mark.parametrize("compressed", [False, True])
def test_prefix_cached_sequence_shares_the_sink_copies_of_its_prefix_blocks(compressed):
    """B hits A's cached prefix blocks (same physical blocks): the planner gives B no new sink
    copies, B's prefill and decode read A's. Kernels == reference, and B's sink is really read
    exactly (differs from reading the same blocks packed)."""
    preset, d, H, G, bs, S, W = "turboquant3", 64, 2, 2, 16, 4, 8
    tables = make_tables(preset, d, H).to(DEVICE)
    cache = torch.zeros(6, bs, H, slot_layout(preset, d).slot_bytes, dtype=torch.uint8, device=DEVICE)
    block_table = torch.tensor([[0, 1, 2], [0, 1, 3]], dtype=torch.int32, device=DEVICE)  # 32 shared tokens
    planner = PoolPlanner(S, W, 6 * bs, rows=64, device=torch.device(DEVICE))
    pool = torch.zeros(64, H, 2, d, dtype=torch.float32, device=DEVICE)
    g = torch.Generator().manual_seed(5)
    k_a, v_a = torch.randn(40, H, d, generator=g), torch.randn(40, H, d, generator=g)
    k_b, v_b = torch.randn(8, H, d, generator=g), torch.randn(8, H, d, generator=g)

    def step(bt, start, k, v):
        pos = torch.arange(start, start + k.shape[0])
        slots = (bt[0, pos // bs].long() * bs + pos % bs).to(DEVICE)
        qsl = torch.tensor([0, k.shape[0]], device=DEVICE)
        lens = torch.tensor([start + k.shape[0]], device=DEVICE)
        entries = planner.plan(qsl, lens, bt, slots, bs)
        prot = ProtectedTokens(S, W, pool, planner.table)
        ref.write_cache(cache, slots, k, v, tables, preset, protected=prot, entries=entries)
        return qsl, lens, prot

    step(block_table[:1], 0, k_a, v_a)  # A: a 40-token prompt
    shared = [int(planner.entry_of_slot[p]) for p in range(S)]
    assert all(e >= 0 for e in shared)
    qsl, lens, prot = step(block_table[1:], 32, k_b, v_b)  # B: prefix hit on blocks 0-1, computes 8 tokens
    assert [int(planner.entry_of_slot[p]) for p in range(S)] == shared  # B reads A's sink copies
    q = torch.randn(8, H * G, d, generator=g).to(DEVICE)
    args = (q, k_b.to(DEVICE), v_b.to(DEVICE), cache, block_table[1:], qsl, lens, tables, preset, d ** -0.5)
    want = ref.prefill(*args, compressed_chunk=compressed, protected=prot)
    got = ops.prefill(*args, compressed_chunk=compressed, protected=prot)
    assert rel_err(got, want) < REL_TOL
    plain = ref.prefill(*args, compressed_chunk=compressed)
    assert rel_err(plain, want) > 1e-4
    qd = torch.randn(1, H * G, d, generator=g).to(DEVICE)
    want = ref.paged_decode(qd, cache, block_table[1:], lens, tables, preset, 0.1, protected=prot)
    got = ops.paged_decode(qd, cache, block_table[1:], lens, tables, preset, 0.1, protected=prot)
    assert rel_err(got, want) < REL_TOL
