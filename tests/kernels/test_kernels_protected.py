"""Protected tokens (attention sink + recent window read exactly) in the Triton kernels, against
``reference`` with the same ``ProtectedTokens``.

The exact copies live in a paged exact-copy cache with its own block size and shuffled block table.
Only the positions some query of the call protects hold copies; every other row is NaN, and blocks
wholly outside the sink and the window point at an all-NaN block, as stale entries would -- so a
kernel that reads (or multiplies by) anything it must not turns its output into NaN. Without
``compressed_chunk`` the chunk's own positions are NaN too: prefill reads its fresh K/V there.

Tolerances (``support.ATTN_TOL`` / ``OPERAND_TOL``, as for the unprotected kernels): exact copies are scored
and accumulated fp32-accurately like packed slots (16-bit copies in their row scale are exact fp16 operands,
float32 ones are split), so 2e-5; 4e-3 where the chunk attends its own K/V or the kernels wrote the slots.
That protection changes an output is checked against a 1e-2 difference (``MATTERS``).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

import support  # noqa: E402
from support import (  # noqa: E402
    ATTN_TOL,
    DEVICE,
    OPERAND_TOL,
    assert_slots_match,
    filled_cache,
    jittered_tables,
    paged_setup,
    rel_err,
    slots_of,
)
from vllm_turboquant import reference as ref  # noqa: E402
from vllm_turboquant.kernels import ops  # noqa: E402
from vllm_turboquant.kernels.decode import paged_decode  # noqa: E402
from vllm_turboquant.kernels.prefill import prefill  # noqa: E402
from vllm_turboquant.kernels.store import store  # noqa: E402
from vllm_turboquant.layout import slot_layout  # noqa: E402
from vllm_turboquant.protected import ProtectedTokens, exact_rows, protected_positions  # noqa: E402

MATTERS = 1e-2


def exact_copies(keys, values, tables, sink, window, dtype, first_query, chunk_exact=True, block_size=4, seed=0):
    """ProtectedTokens whose cache holds the copies of the positions protected for queries at
    first_query[b] .. len - 1 of every sequence b (``protected_positions``), NaN everywhere else (and
    at the chunk's own positions unless ``chunk_exact``)."""
    g = torch.Generator().manual_seed(seed + 100)
    H, d = tables.key_rotation.shape[:2]
    lens = [k.shape[0] for k in keys]
    per_seq = max(1, -(-max(lens) // block_size))
    nblocks = len(lens) * per_seq + 2
    cache = torch.full((nblocks, block_size, H, 2 * d), float("nan"), dtype=dtype, device=DEVICE)
    bt = (torch.randperm(nblocks - 1, generator=g)[:len(lens) * per_seq] + 1).reshape(len(lens), per_seq)
    for b, L in enumerate(lens):
        keep = protected_positions(first_query[b], L, sink, window) if L else torch.arange(0)
        if not chunk_exact:
            keep = keep[keep < first_query[b]]
        if len(keep):
            k = keep.to(DEVICE)
            cache[bt[b, keep // block_size].to(DEVICE), (keep % block_size).to(DEVICE)] = exact_rows(
                keys[b][k], values[b][k], tables, dtype)
        used = set((keep // block_size).tolist())
        bt[b] = torch.where(torch.tensor([j in used for j in range(per_seq)]), bt[b], 0)  # stale: all NaN
    return ProtectedTokens(sink, window, cache, bt.int().to(DEVICE))


# ---------------------------------------------------------------------------
# decode
# ---------------------------------------------------------------------------

DECODE_CASES = support.PROTECTED_DECODE_CASES


@pytest.mark.parametrize("preset,d,H,G,block_size,lens,sink,window,sliding,splits,dtype", DECODE_CASES)
def test_decode_protected_matches_reference(preset, d, H, G, block_size, lens, sink, window, sliding, splits,
                                            dtype):
    tables = jittered_tables(preset, d, H, seed=d)
    cache, block_table, keys, values = filled_cache(preset, d, H, lens, block_size, tables, seed=G)
    prot = exact_copies(keys, values, tables, sink, window, dtype, [max(L - 1, 0) for L in lens])
    query = torch.randn(len(lens), H * G, d, generator=torch.Generator().manual_seed(7)).to(DEVICE) * 2
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    scale = d ** -0.5
    want = ref.paged_decode(query, cache, block_table, seq_lens, tables, preset, scale, sliding, prot)
    got = paged_decode(query, cache, block_table, seq_lens, tables, preset, scale, sliding, num_splits=splits,
                       protected=prot)
    assert not got.isnan().any(), "a stale (NaN) copy was read"
    assert rel_err(got, want) < ATTN_TOL
    for b, n in enumerate(lens):
        if n == 0:
            assert not got[b].any()
    # protection changes the output (the test would be vacuous otherwise)
    plain = ref.paged_decode(query, cache, block_table, seq_lens, tables, preset, scale, sliding)
    assert rel_err(plain, want) > MATTERS


def test_zero_sink_and_window_is_bit_identical():
    preset, d, H, G, block_size, lens = "turboquant3_qjl", 64, 2, 2, 16, [20, 9]
    tables = jittered_tables(preset, d, H)
    cache, block_table, keys, values = filled_cache(preset, d, H, lens, block_size, tables)
    prot = exact_copies(keys, values, tables, 0, 0, torch.float32, [L - 1 for L in lens])
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    query = torch.randn(len(lens), H * G, d, device=DEVICE)
    a = paged_decode(query, cache, block_table, seq_lens, tables, preset, 0.125, 8, num_splits=2)
    b = paged_decode(query, cache, block_table, seq_lens, tables, preset, 0.125, 8, num_splits=2, protected=prot)
    assert torch.equal(a, b)
    qsl = torch.tensor([0, 5, 14], dtype=torch.int32, device=DEVICE)
    chunk = [k[-n:] for k, n in zip(keys, (5, 9), strict=True)], [v[-n:] for v, n in zip(values, (5, 9), strict=True)]
    key, value = torch.cat(chunk[0]), torch.cat(chunk[1])
    q = torch.randn(14, H * G, d, device=DEVICE)
    for compressed in (False, True):
        args = (q, key, value, cache, block_table, qsl, seq_lens, tables, preset, 0.125, None, compressed)
        assert torch.equal(prefill(*args), prefill(*args, protected=prot))


def test_decode_shared_prefix_blocks():
    """Two sequences whose packed and exact-copy block tables share their first blocks (a prefix-cache
    hit) read the same sink copies."""
    preset, d, H, G, S, W = "turboquant3", 64, 2, 2, 4, 6
    tables = jittered_tables(preset, d, H)
    cache, block_table, keys, values = filled_cache(preset, d, H, [40, 40], 16, tables, seed=4)
    block_table[1, :2] = block_table[0, :2]  # sequence 1 hits sequence 0's first 32 tokens
    keys[1][:32], values[1][:32] = keys[0][:32], values[0][:32]
    prot = exact_copies(keys, values, tables, S, W, torch.float32, [39, 39], block_size=8)
    own = int(prot.block_table[1, 0])
    prot.block_table[1, 0] = prot.block_table[0, 0]  # the sink's copy block is shared too
    prot.cache[own] = float("nan")  # ... and sequence 1's own sink block is never read
    query = torch.randn(2, H * G, d, device=DEVICE)
    seq_lens = torch.tensor([40, 40], dtype=torch.int32, device=DEVICE)
    want = ref.paged_decode(query, cache, block_table, seq_lens, tables, preset, 0.125, None, prot)
    got = paged_decode(query, cache, block_table, seq_lens, tables, preset, 0.125, protected=prot)
    assert rel_err(got, want) < ATTN_TOL


# ---------------------------------------------------------------------------
# prefill
# ---------------------------------------------------------------------------

PREFILL_CASES = support.PROTECTED_PREFILL_CASES


@pytest.mark.parametrize("preset,d,H,G,block_size,lens,query_lens,sink,window,sliding,compressed,dtype",
                         PREFILL_CASES)
def test_prefill_protected_matches_reference(preset, d, H, G, block_size, lens, query_lens, sink, window, sliding,
                                             compressed, dtype):
    tables = jittered_tables(preset, d, H, seed=d + 1)
    cache, block_table, keys, values = filled_cache(preset, d, H, lens, block_size, tables, seed=G)
    ctx = [n - q for n, q in zip(lens, query_lens, strict=True)]
    # NaN at the chunk's own positions: vLLM keeps no copy of a long chunk's middle, so they come from its K/V
    prot = exact_copies(keys, values, tables, sink, window, dtype, ctx, chunk_exact=False)
    qsl = torch.tensor([0] + torch.tensor(query_lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    key = torch.cat([k[c:] for k, c in zip(keys, ctx, strict=True)])
    value = torch.cat([v[c:] for v, c in zip(values, ctx, strict=True)])
    query = torch.randn(key.shape[0], H * G, d, generator=torch.Generator().manual_seed(11)).to(DEVICE) * 2
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    args = (query, key, value, cache, block_table, qsl, seq_lens, tables, preset, d ** -0.5, sliding, compressed)
    want = ref.prefill(*args, prot)
    got = prefill(*args, protected=prot)
    assert not got.isnan().any(), "a stale (NaN) copy was read"
    assert rel_err(got, want) < (ATTN_TOL if compressed else OPERAND_TOL)
    assert rel_err(ref.prefill(*args), want) > MATTERS  # protection matters here


# ---------------------------------------------------------------------------
# store
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("preset,d,dtype,tol", [("turboquant3_qjl", 64, torch.float32, 1e-5),
                                                ("turboquant4", 80, torch.bfloat16, 1e-2)])
def test_store_writes_exact_copies(preset, d, dtype, tol):
    """Copies land at their exact slots (whether or not the packed slot is skipped), nothing else of the
    copy cache changes, the packed slots are those of a plain store. ``tol``: one rounding to the copy
    dtype (the kernel rotates in fp32, the reference in float64)."""
    H, N, block_size, num_blocks, x_bs = 2, 9, 16, 3, 4
    layout = slot_layout(preset, d)
    tables = jittered_tables(preset, d, H)
    g = torch.Generator().manual_seed(5)
    key = (torch.randn(N, H, d, generator=g) * 2).to(DEVICE) + tables.key_mean
    value = torch.randn(N, H, d, generator=g).to(DEVICE)
    slot_mapping = torch.randperm(num_blocks * block_size, generator=g)[:N].to(DEVICE)
    slot_mapping[4] = -1  # padding: no packed slot, but its copy is still written (as the reference does)
    exact_slots = torch.tensor([3, -1, 0, 11, 7, -1, -1, 5, 1], dtype=torch.int32, device=DEVICE)
    garbage = torch.randint(0, 256, (num_blocks, block_size, H, layout.slot_bytes), generator=g, dtype=torch.uint8)
    copies0 = (torch.randn(3, x_bs, H, 2 * d, generator=g) * 9).to(dtype).to(DEVICE)
    no_table = torch.zeros(1, 1, dtype=torch.int32, device=DEVICE)
    prot_k = ProtectedTokens(0, 4, copies0.clone(), no_table)
    prot_r = ProtectedTokens(0, 4, copies0.clone(), no_table)
    cache_k, cache_r, cache_plain = garbage.to(DEVICE), garbage.clone().to(DEVICE), garbage.clone().to(DEVICE)
    ops.write_cache(cache_k, slot_mapping, key, value, tables, preset, prot_k, exact_slots)
    ref.write_cache(cache_r, slot_mapping, key, value, tables, preset, prot_r, exact_slots)
    store(cache_plain, slot_mapping, key, value, tables, preset)

    assert torch.equal(cache_k, cache_plain), "the copy write changed the packed slots"
    keep = slot_mapping >= 0
    flat_k, flat_r = cache_k.view(-1, H, layout.slot_bytes), cache_r.view(-1, H, layout.slot_bytes)
    assert_slots_match(flat_k[slot_mapping[keep]], flat_r[slot_mapping[keep]], key[keep], value[keep], tables,
                       preset, layout)

    rows_k, rows_r, rows0 = prot_k.cache.view(-1, H, 2 * d), prot_r.cache.view(-1, H, 2 * d), copies0.view(-1, H, 2 * d)
    written = exact_slots[exact_slots >= 0].long()
    untouched = torch.ones(rows0.shape[0], dtype=torch.bool, device=DEVICE)
    untouched[written] = False
    assert torch.equal(rows_k[untouched], rows0[untouched]), "store wrote outside its exact slots"
    want = exact_rows(key[exact_slots >= 0], value[exact_slots >= 0], tables, dtype)
    assert rel_err(rows_k[written], want) < tol
    assert rel_err(rows_k[written], rows_r[written]) < tol


# ---------------------------------------------------------------------------
# ops end to end: chunked prefill, then decode
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("compressed,dtype", [(False, torch.float32), (True, torch.bfloat16)])
def test_ops_steps(compressed, dtype):
    """Two prefill chunks and two decode steps of two sequences through ``ops`` (kernel-written packed and
    copy caches) and ``reference`` (reference-written ones); every token gets its copy at its position.

    The kernels' copies are rotated in float32, the reference's in float64: in bfloat16 an element may
    round the other way, so the kernels' outputs are compared with the reference reading the kernels'
    caches, and with the fully reference-made output within that rounding."""
    preset, d, H, G, block_size, S, W, x_bs = "turboquant3_qjl", 64, 2, 2, 16, 2, 5, 8
    tables = jittered_tables(preset, d, H)
    layout = slot_layout(preset, d)
    lens = [24, 11]
    cache_k, block_table = paged_setup(lens, block_size, H, layout)
    cache_r = cache_k.clone()
    x_table = torch.arange(8, dtype=torch.int32, device=DEVICE).reshape(2, 4).flip(1)  # 2 x 32 positions
    copies = torch.zeros(8, x_bs, H, 2 * d, dtype=dtype, device=DEVICE)
    prot_k = ProtectedTokens(S, W, copies, x_table)
    prot_r = ProtectedTokens(S, W, copies.clone(), x_table)
    rounding = 1e-2 if dtype == torch.bfloat16 else 1e-5
    g = torch.Generator().manual_seed(3)
    done = [0, 0]
    for step_lens in ([12, 9], [10, 0], [1, 1], [1, 1]):  # new tokens per sequence
        T = sum(step_lens)
        key = (torch.randn(T, H, d, generator=g) + tables.key_mean.cpu()).to(DEVICE)
        value = torch.randn(T, H, d, generator=g).to(DEVICE)
        query = torch.randn(T, H * G, d, generator=g).to(DEVICE)
        qsl = torch.tensor([0] + torch.tensor(step_lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
        ends = [n + s for n, s in zip(done, step_lens, strict=True)]
        seq_lens = torch.tensor(ends, dtype=torch.int32, device=DEVICE)
        positions = [torch.arange(n, e, device=DEVICE) for n, e in zip(done, ends, strict=True)]
        slot_mapping = torch.cat([slots_of(block_table, b, p, block_size) for b, p in enumerate(positions)])
        exact_slots = torch.cat([slots_of(x_table, b, p, x_bs) for b, p in enumerate(positions)])
        ops.write_cache(cache_k, slot_mapping, key, value, tables, preset, prot_k, exact_slots)
        ref.write_cache(cache_r, slot_mapping, key, value, tables, preset, prot_r, exact_slots)
        assert rel_err(prot_k.cache, prot_r.cache) < rounding
        outs = []
        for impl, cache, prot in ((ops, cache_k, prot_k), (ref, cache_r, prot_k), (ref, cache_r, prot_r)):
            if max(step_lens) == 1:
                outs.append(impl.paged_decode(query, cache, block_table, seq_lens, tables, preset, d ** -0.5, None,
                                              prot))
            else:
                outs.append(impl.prefill(query, key, value, cache, block_table, qsl, seq_lens, tables, preset,
                                         d ** -0.5, None, compressed, prot))
        got, want, want_r = outs
        assert rel_err(got, want) < OPERAND_TOL, step_lens  # kernel-written slots (and chunk values)
        assert rel_err(got, want_r) < (OPERAND_TOL if dtype == torch.float32 else 1e-2), step_lens
        done = ends
