"""The compiled CPU ops (``vllm_turboquant.cpu_ops``) against the torch reference, and their invariances.

The matrix holds ``test_kernels.py``'s and ``test_kernels_protected.py``'s cases and more (GQA 1/3/4/8
and MQA, head sizes 64/80/96/112/128/256, block sizes 16/32/64 and ones that are no multiple of 16, ragged,
empty and one-token sequences, sliding windows, the QJL presets and ``SKETCHED``, key means, chunked
prefill, ``compressed_chunk`` both ways, protected tokens), with the compiled ops' own tolerances:
``write_cache`` writes the reference's bytes exactly (codes, norms, QJL signs and gamma, exact copies);
attention is within ``TOL`` (1e-5, relative to the largest output) of the reference, bf16 inputs included.
Invariance tests ask for identical bits: every ISA, batch compositions, chunkings, thread counts, shared
(prefix-cached) blocks, decode vs compressed prefill.
"""

from __future__ import annotations

import itertools
import platform
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import support
from support import (
    SKETCHED,
    filled_cache,
    jittered_tables,
    paged_setup,
    rel_err,
    slots_of,
    strided_like,
)
from vllm_turboquant import cpu_ops, ops
from vllm_turboquant import reference as ref
from vllm_turboquant.layout import cache_format, slot_layout
from vllm_turboquant.protected import ProtectedTokens, exact_rows, protected_positions

pytestmark = pytest.mark.skipif(not cpu_ops.available(), reason=f"no compiled CPU ops: {cpu_ops.unavailable_reason()}")

TOL = 1e-5


def _isas() -> list[str]:
    """The ISAs this CPU and build run."""
    if not cpu_ops.available():
        return []
    keep = cpu_ops.isa()
    found = []
    for name in cpu_ops.ISAS:
        try:
            cpu_ops.set_isa(name)
            found.append(name)
        except ValueError:
            pass
    cpu_ops.set_isa(keep)
    return found


ISAS = _isas()


@pytest.fixture
def each_isa():
    """Run the body under every ISA this CPU runs; yields the names."""
    keep = cpu_ops.isa()
    yield ISAS
    cpu_ops.set_isa(keep)


def chunk_setup(preset, d, H, lens, query_lens, block_size, tables, seed=0, key_dtype=torch.float32):
    """A cache holding every sequence's prefix and chunk (reference-written) and the chunks' packed
    key/value/query_start_loc."""
    cache, block_table = paged_setup(lens, block_size, H, slot_layout(preset, d), seed=seed)
    g = torch.Generator().manual_seed(seed + 11)
    qsl = torch.tensor([0] + torch.tensor(query_lens).cumsum(0).tolist(), dtype=torch.int32)
    T = int(qsl[-1])
    key = (torch.randn(T, H, d, generator=g) + tables.key_mean).to(key_dtype)
    value = torch.randn(T, H, d, generator=g).to(key_dtype)
    keys, values = [], []
    for b, n in enumerate(lens):
        k = torch.randn(n, H, d, generator=g) + tables.key_mean
        v = torch.randn(n, H, d, generator=g)
        lo, hi = int(qsl[b]), int(qsl[b + 1])
        k[n - (hi - lo):], v[n - (hi - lo):] = key[lo:hi].float(), value[lo:hi].float()
        ref.write_cache(cache, slots_of(block_table, b, torch.arange(n), block_size), k, v, tables, preset)
        keys.append(k)
        values.append(v)
    return cache, block_table, qsl, key, value, keys, values


def copies(keys, values, tables, sink, window, dtype, first_query, chunk_exact=True, block_size=4, seed=0):
    """ProtectedTokens whose exact-copy cache holds the copies of the positions the queries at
    first_query[b] .. len - 1 protect, NaN everywhere else (so reading anything else shows); block-table
    entries of blocks holding no such copy point at block 0, all NaN, as stale entries would."""
    g = torch.Generator().manual_seed(seed + 100)
    H, d = tables.key_rotation.shape[:2]
    lens = [k.shape[0] for k in keys]
    per_seq = max(1, -(-max(lens) // block_size))
    cache = torch.full((len(lens) * per_seq + 2, block_size, H, 2 * d), float("nan"), dtype=dtype)
    table = (torch.randperm(cache.shape[0] - 1, generator=g)[:len(lens) * per_seq] + 1).reshape(len(lens), per_seq)
    for b, n in enumerate(lens):
        pos = protected_positions(first_query[b], n, sink, window) if n else torch.arange(0)
        pos = pos if chunk_exact else pos[pos < first_query[b]]
        cache[table[b, pos // block_size], pos % block_size] = exact_rows(keys[b][pos], values[b][pos], tables, dtype)
        used = set((pos // block_size).tolist())
        table[b] = torch.where(torch.tensor([j in used for j in range(per_seq)]), table[b], 0)
    return ProtectedTokens(sink, window, cache, table.int())


# ---------------------------------------------------------------------------------------------
# the library and the contract
# ---------------------------------------------------------------------------------------------

def test_contract_and_auto_resolution():
    ops.check_implements(cpu_ops)
    assert cpu_ops.NAME == "cpu" and ops.IMPLEMENTATIONS["cpu"] == "vllm_turboquant.cpu_ops"
    assert ops.resolve("auto", torch.device("cpu")) == "cpu"
    assert ops.load_ops("auto", torch.device("cpu")) is cpu_ops
    assert cpu_ops.isa() in cpu_ops.ISAS and "generic" in ISAS


def test_missing_library_is_refused_not_replaced(monkeypatch):
    """Without the compiled library, ops='cpu' is refused before the engine starts (naming the cause and the
    fix), a direct call raises instead of quietly running the ~10x slower reference, and 'auto' resolves to
    the reference (the backend then warns at start)."""
    from vllm_turboquant.backend.settings import check_usable, load_settings

    tables = jittered_tables("turboquant3", 64, 2)
    cache, block_table, *_ = filled_cache("turboquant3", 64, 2, [20], 16, tables)
    monkeypatch.setattr(cpu_ops, "_lib", None)
    monkeypatch.setattr(cpu_ops, "_why_not", "the compiled library vllm_turboquant/_tq_cpu*.so is not there")
    assert not cpu_ops.available()
    assert ops.resolve("auto", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match=r"ops='cpu' \(from X\): the compiled CPU ops do not load \(the compiled "
                       r"library .* is not there\)\. To fix: reinstall.*pip install -e.*ops='torch'"):
        check_usable(load_settings({"turboquant": {"ops": "cpu"}}, environ={}), "cpu", "X", environ={})
    with pytest.raises(RuntimeError, match="compiled CPU ops are unavailable.*pip install -e"):
        cpu_ops.paged_decode(torch.randn(1, 4, 64), cache, block_table, torch.tensor([20]), tables, "turboquant3",
                             0.125)


def test_refusals():
    tables = jittered_tables("turboquant3", 64, 2)
    cache, block_table, *_ = filled_cache("turboquant3", 64, 2, [20], 16, tables)
    q, seq_lens = torch.randn(1, 4, 64), torch.tensor([20])
    with pytest.raises(ValueError, match="sliding_window"):
        cpu_ops.paged_decode(q, cache, block_table, seq_lens, tables, "turboquant3", 0.125, 0)
    with pytest.raises(ValueError, match="multiple of the KV heads"):
        cpu_ops.paged_decode(torch.randn(1, 3, 64), cache, block_table, seq_lens, tables, "turboquant3", 0.125)
    with pytest.raises(ValueError, match="uint8"):
        cpu_ops.paged_decode(q, cache.float(), block_table, seq_lens, tables, "turboquant3", 0.125)
    wide = torch.zeros(*cache.shape[:3], 2 * cache.shape[3], dtype=torch.uint8)[..., ::2]
    with pytest.raises(ValueError, match="stride 1"):
        cpu_ops.paged_decode(q, wide, block_table, seq_lens, tables, "turboquant3", 0.125)
    with pytest.raises(ValueError, match="not a cache block"):
        cpu_ops.paged_decode(q, cache, block_table + 1000, seq_lens, tables, "turboquant3", 0.125)
    with pytest.raises(ValueError, match="exceeds the block table"):
        cpu_ops.paged_decode(q, cache, block_table, seq_lens + 1000, tables, "turboquant3", 0.125)
    with pytest.raises(ValueError, match="outside the cache"):
        cpu_ops.write_cache(cache, torch.tensor([10_000]), torch.randn(1, 2, 64), torch.randn(1, 2, 64), tables,
                            "turboquant3")


def test_layer_tables_are_prepared_once_and_again_after_an_in_place_change():
    tables = jittered_tables("turboquant3", 64, 2)
    fmt = cache_format("turboquant3", 64)
    first = cpu_ops._layer(tables, fmt)
    assert cpu_ops._layer(tables, fmt) is first
    tables.key_centroids.mul_(1.01)
    assert cpu_ops._layer(tables, fmt) is not first


# ---------------------------------------------------------------------------------------------
# write_cache: the reference's bytes
# ---------------------------------------------------------------------------------------------

#: every preset (SKETCHED too) at four head sizes (80: not a multiple of 16), one to three KV heads, the
#: three model dtypes in turn; and the smallest head
WRITE_CASES = [(preset, d, 1 + i % 3, (torch.float32, torch.bfloat16, torch.float16)[i % 3])
               for i, (preset, d) in enumerate(itertools.product(
                   ("turboquant2", "turboquant3", "turboquant4", "turboquant2_qjl", "turboquant3_qjl",
                    "turboquant4_qjl", SKETCHED), (64, 80, 128, 256)))] + [("turboquant3", 8, 2, torch.float32)]


@pytest.mark.parametrize("preset,d,H,dtype", WRITE_CASES)
def test_write_cache_is_bit_identical(preset, d, H, dtype):
    layout = slot_layout(preset, d)
    tables = jittered_tables(preset, d, H)
    g = torch.Generator().manual_seed(d + H)
    N, block_size, num_blocks = 40, 16, 4
    key = (torch.randn(N, H, d, generator=g) * 2).to(dtype)
    value = torch.randn(N, H, d, generator=g).to(dtype)
    key[3, 0] = tables.key_mean[0].to(dtype)  # centred key of norm ~0
    key[5] = tables.key_mean.to(dtype)
    value[2] = 0.0  # zero value
    if dtype != torch.float16:
        key[7] *= 1e9  # a norm beyond the field's range (stored saturated at 65504 ** 2)
    slot_mapping = torch.randperm(num_blocks * block_size, generator=g)[:N]
    slot_mapping[4] = slot_mapping[9] = -1  # padding: skipped
    garbage = torch.randint(0, 256, (num_blocks, block_size, H, layout.slot_bytes), generator=g, dtype=torch.uint8)
    want, got = garbage.clone(), garbage.clone()
    ref.write_cache(want, slot_mapping, key, value, tables, preset)
    cpu_ops.write_cache(got, slot_mapping, key, value, tables, preset)
    assert torch.equal(got, want)


@pytest.mark.parametrize("preset,d", [("turboquant3", 64), ("turboquant4", 128), ("turboquant2", 256),
                                      ("turboquant3_qjl", 64)])
def test_write_cache_codes_on_a_large_sample(preset, d):
    """Thousands of tokens, Gaussian and heavy-tailed (outlier channels, a large mean, tiny vectors),
    through the float32 encoder and its float64 fallback: every byte as the reference writes it."""
    H, N = 2, 3000
    tables = jittered_tables(preset, d, H, mean_scale=2.0, seed=1)
    g = torch.Generator().manual_seed(d)
    key = torch.randn(N, H, d, generator=g)
    key[: N // 3] *= torch.rand(N // 3, H, d, generator=g).pow(4) * 20  # heavy tails
    key[N // 3: N // 2] = key[N // 3: N // 2] * 1e-3 + tables.key_mean  # close to the mean
    value = torch.distributions.StudentT(3.0).sample((N, H, d)) * 0.3
    layout = slot_layout(preset, d)
    cache = torch.zeros(N // 16 + 1, 16, H, layout.slot_bytes, dtype=torch.uint8)
    want = cache.clone()
    slots = torch.arange(N)
    ref.write_cache(want, slots, key, value, tables, preset)
    cpu_ops.write_cache(cache, slots, key, value, tables, preset)
    assert torch.equal(cache, want)


@pytest.mark.parametrize("kind", ["vllm", "padded"])
def test_write_cache_into_strided_caches_and_from_strided_inputs(kind):
    preset, d, H = "turboquant4_qjl", 64, 3
    layout = slot_layout(preset, d)
    tables = jittered_tables(preset, d, H)
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(9, (H * 3) * d, generator=g)  # vLLM hands key and value as views of one projection
    key, value = qkv[:, H * d: 2 * H * d].view(9, H, d), qkv[:, 2 * H * d:].view(9, H, d)
    slot_mapping = torch.randperm(32, generator=g)[:9]
    garbage = torch.randint(0, 256, (2, 16, H, layout.slot_bytes), generator=g, dtype=torch.uint8)
    want, got = garbage.clone(), strided_like(garbage, kind)
    ref.write_cache(want, slot_mapping, key, value, tables, preset)
    cpu_ops.write_cache(got, slot_mapping, key, value, tables, preset)
    assert torch.equal(got.contiguous(), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_write_cache_exact_copies(dtype):
    """Copies land at their exact slots, whether or not the packed slot is skipped, bit for bit as the
    reference rounds them; nothing else of either cache changes."""
    preset, d, H, N = "turboquant3", 80, 2, 9
    layout = slot_layout(preset, d)
    tables = jittered_tables(preset, d, H)
    g = torch.Generator().manual_seed(3)
    key = (torch.randn(N, H, d, generator=g) * 2) + tables.key_mean
    value = torch.randn(N, H, d, generator=g)
    slot_mapping = torch.randperm(48, generator=g)[:N]
    slot_mapping[4] = -1
    exact_slots = torch.tensor([3, -1, 0, 11, 7, -1, -1, 5, 1], dtype=torch.int32)
    cache0 = torch.randint(0, 256, (3, 16, H, layout.slot_bytes), generator=g, dtype=torch.uint8)
    copies0 = (torch.randn(3, 4, H, 2 * d, generator=g) * 9).to(dtype)
    table = torch.zeros(1, 1, dtype=torch.int32)
    want_c, want_x = cache0.clone(), copies0.clone()
    got_c, got_x = cache0.clone(), copies0.clone()
    ref.write_cache(want_c, slot_mapping, key, value, tables, preset, ProtectedTokens(4, 8, want_x, table),
                    exact_slots)
    cpu_ops.write_cache(got_c, slot_mapping, key, value, tables, preset, ProtectedTokens(4, 8, got_x, table),
                        exact_slots)
    assert torch.equal(got_c, want_c)
    assert torch.equal(got_x, want_x)


# ---------------------------------------------------------------------------------------------
# paged decode
# ---------------------------------------------------------------------------------------------

DECODE_CASES = [
    # preset,            d,  H, G,  block, seq_lens,             window
    ("turboquant3",      64,  3, 3,  16, [0, 1, 15, 16, 17, 300], None),  # SmolLM2's shape; empty, tile edges
    ("turboquant3",      64,  2, 4,  32, [77, 129],             31),      # a window across tiles
    ("turboquant4_qjl",  128, 1, 16, 64, [65, 3],               None),    # MQA
    ("turboquant2_qjl",  256, 1, 1,  16, [48, 47],              None),    # MHA, d = 256
    ("turboquant4",      256, 1, 4,  32, [200, 0, 1],           64),      # Gemma-3's shape
    ("turboquant2",      128, 4, 8,  16, [111],                 None),    # GQA 8 (the buffered path)
    (SKETCHED,           96,  2, 3,  16, [58, 21],              10),      # m = 72, optimal lambda
    ("turboquant3_qjl",  64,  2, 2,  16, [33],                  1),       # a window of one token
    ("turboquant4",      80,  2, 2,  24, [70, 23, 48],          None),    # block size 24: tiles span blocks
    ("turboquant3",      112, 1, 5,  8,  [41, 16],              30),      # block size 8, head_dim 112
    # test_kernels.py's decode matrix (its split counts dropped: the compiled ops have none)
    *[case[:-1] for case in support.KERNEL_DECODE_CASES],
]


@pytest.mark.parametrize("preset,d,H,G,block_size,lens,window", DECODE_CASES)
def test_decode_matches_reference_on_every_isa(preset, d, H, G, block_size, lens, window, each_isa):
    tables = jittered_tables(preset, d, H, seed=d)
    cache, block_table, *_ = filled_cache(preset, d, H, lens, block_size, tables, seed=G)
    query = torch.randn(len(lens), H * G, d, generator=torch.Generator().manual_seed(7)) * 2
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    scale = d ** -0.5
    want = ref.paged_decode(query, cache, block_table, seq_lens, tables, preset, scale, window)
    outs = []
    for name in each_isa:
        cpu_ops.set_isa(name)
        got = cpu_ops.paged_decode(query, cache, block_table, seq_lens, tables, preset, scale, window)
        assert got.shape == want.shape and got.dtype == torch.float32
        assert rel_err(got, want) < TOL, name
        outs.append(got)
    assert all(torch.equal(o, outs[0]) for o in outs), "ISAs differ"
    for b, n in enumerate(lens):
        if n == 0:
            assert not outs[0][b].any(), "an empty sequence must give zeros"


@pytest.mark.parametrize("kind", ["vllm", "padded"])
def test_decode_strided_cache_and_query(kind):
    preset, d, H, G, lens = "turboquant4_qjl", 64, 2, 4, [37, 1, 20]
    tables = jittered_tables(preset, d, H)
    cache, block_table, *_ = filled_cache(preset, d, H, lens, 16, tables, seed=3)
    qkv = torch.randn(3, (H * G + 2 * H) * d)
    query = qkv[:, : H * G * d].view(3, H * G, d)  # a strided view, as vLLM hands it
    seq_lens = torch.tensor(lens, dtype=torch.int64)
    base = cpu_ops.paged_decode(query.contiguous(), cache, block_table.long(), seq_lens, tables, preset, 0.125, 25)
    got = cpu_ops.paged_decode(query, strided_like(cache, kind), block_table, seq_lens, tables, preset, 0.125, 25)
    assert torch.equal(got, base)
    assert rel_err(got, ref.paged_decode(query, cache, block_table, seq_lens, tables, preset, 0.125, 25)) < TOL


def test_decode_bf16_query():
    preset, d, H, G, lens = "turboquant3", 128, 2, 4, [45, 300]
    tables = jittered_tables(preset, d, H)
    cache, block_table, *_ = filled_cache(preset, d, H, lens, 32, tables)
    query = torch.randn(len(lens), H * G, d).bfloat16()
    seq_lens = torch.tensor(lens)
    want = ref.paged_decode(query, cache, block_table, seq_lens, tables, preset, 0.1)
    assert rel_err(cpu_ops.paged_decode(query, cache, block_table, seq_lens, tables, preset, 0.1), want) < TOL


def test_write_then_decode_end_to_end():
    """Slots written by the compiled encoder and decoded by the compiled decoder == the reference's."""
    preset, d, H, G, block_size, lens = "turboquant3_qjl", 128, 2, 4, 16, [23, 50]
    tables = jittered_tables(preset, d, H)
    cache_c, block_table, *_ = filled_cache(preset, d, H, lens, block_size, tables, writer=cpu_ops.write_cache)
    cache_r, *_ = filled_cache(preset, d, H, lens, block_size, tables, writer=ref.write_cache)
    assert torch.equal(cache_c, cache_r)
    query = torch.randn(len(lens), H * G, d)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    want = ref.paged_decode(query, cache_r, block_table, seq_lens, tables, preset, d ** -0.5)
    assert rel_err(cpu_ops.paged_decode(query, cache_c, block_table, seq_lens, tables, preset, d ** -0.5), want) < TOL


# ---------------------------------------------------------------------------------------------
# prefill
# ---------------------------------------------------------------------------------------------

PREFILL_CASES = [
    # preset,            d,  H, G, block, seq_lens,          query_lens,      window, compressed_chunk
    ("turboquant3",      64,  3, 3, 16, [300, 200, 1],      [300, 130, 1],   None, True),   # fresh, chunk, one token
    ("turboquant3",      64,  3, 3, 16, [300, 200, 9],      [44, 130, 0],    None, False),  # prefix, chunk, idle
    ("turboquant4",      256, 1, 4, 32, [90, 40],           [90, 17],        33,   True),   # Gemma-3's shape
    ("turboquant4",      256, 1, 4, 32, [90, 40],           [31, 17],        33,   False),
    ("turboquant2_qjl",  128, 1, 8, 64, [75],               [19],            None, True),   # MQA
    ("turboquant3_qjl",  128, 2, 1, 16, [64, 65],           [16, 1],         None, False),  # MHA
    (SKETCHED,           96,  2, 2, 16, [47, 12],           [5, 12],         6,    True),
    ("turboquant4_qjl",  64,  2, 4, 32, [81, 30],           [80, 29],        None, False),
    ("turboquant4",      80,  2, 2, 24, [90, 33],           [17, 33],        40,   True),   # block size 24
    ("turboquant2",      128, 1, 4, 8,  [61, 40],           [21, 40],        None, False),  # block size 8
    # test_kernels.py's prefill matrix
    *support.KERNEL_PREFILL_CASES,
]


@pytest.mark.parametrize("preset,d,H,G,block_size,lens,query_lens,window,compressed", PREFILL_CASES)
def test_prefill_matches_reference(preset, d, H, G, block_size, lens, query_lens, window, compressed):
    tables = jittered_tables(preset, d, H, seed=d + 1)
    cache, block_table, qsl, key, value, *_ = chunk_setup(preset, d, H, lens, query_lens, block_size, tables, seed=G)
    query = torch.randn(key.shape[0] + 2, H * G, d, generator=torch.Generator().manual_seed(11)) * 2
    key, value = torch.cat([key, torch.randn(2, H, d)]), torch.cat([value, torch.randn(2, H, d)])  # padding rows
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    args = (query, key, value, cache, block_table, qsl, seq_lens, tables, preset, d ** -0.5, window, compressed)
    want, got = ref.prefill(*args), cpu_ops.prefill(*args)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert rel_err(got, want) < TOL
    assert not got[int(qsl[-1]):].any(), "rows no sequence owns are zeros"


@pytest.mark.parametrize("compressed", [True, False])
def test_prefill_bf16_inputs(compressed):
    preset, d, H, G, lens, query_lens = "turboquant3", 64, 2, 2, [30, 120], [6, 120]
    tables = jittered_tables(preset, d, H)
    cache, block_table, qsl, key, value, *_ = chunk_setup(preset, d, H, lens, query_lens, 16, tables,
                                                          key_dtype=torch.bfloat16)
    query = torch.randn(key.shape[0], H * G, d).bfloat16()
    args = (query, key, value, cache, block_table, qsl, torch.tensor(lens), tables, preset, 0.125, None, compressed)
    assert rel_err(cpu_ops.prefill(*args), ref.prefill(*args)) < TOL


@pytest.mark.parametrize("kind,compressed", [("vllm", False), ("padded", True)])
def test_prefill_strided_cache(kind, compressed):
    """vLLM's permuted cache and a padded one give the bits of a contiguous cache; ``max_query_len`` (a hint)
    changes nothing."""
    preset, d, H, G, block_size, lens, query_lens, window = "turboquant3_qjl", 64, 2, 2, 16, [30, 9], [6, 9], 12
    tables = jittered_tables(preset, d, H)
    cache, block_table, qsl, key, value, *_ = chunk_setup(preset, d, H, lens, query_lens, block_size, tables)
    query = torch.randn(key.shape[0], H * G, d)
    strided = strided_like(cache, kind)
    args = (block_table, qsl, torch.tensor(lens, dtype=torch.int32), tables, preset, 0.125, window, compressed)
    got = cpu_ops.prefill(query, key, value, strided, *args)
    assert torch.equal(got, cpu_ops.prefill(query, key, value, cache, *args))
    assert torch.equal(got, cpu_ops.prefill(query, key, value, strided, *args, None, max(query_lens)))
    assert rel_err(got, ref.prefill(query, key, value, cache, *args)) < TOL


def test_write_cache_of_no_tokens_and_all_padding():
    preset, d, H = "turboquant3", 64, 2
    tables = jittered_tables(preset, d, H)
    cache = torch.zeros(2, 16, H, slot_layout(preset, d).slot_bytes, dtype=torch.uint8)
    empty = torch.zeros(0, H, d)
    cpu_ops.write_cache(cache, torch.zeros(0, dtype=torch.long), empty, empty, tables, preset)
    x = torch.randn(3, H, d)
    cpu_ops.write_cache(cache, torch.full((3,), -1), x, x, tables, preset)
    assert not cache.any()


# ---------------------------------------------------------------------------------------------
# protected tokens
# ---------------------------------------------------------------------------------------------

CPU_PROTECTED_DECODE_CASES = [
    # preset,            d,  H, G, block, lens,                 S, W,  sliding, copy dtype
    ("turboquant3",      64, 2, 2, 16, [0, 1, 6, 7, 40],       2, 4,  None,    torch.float32),
    ("turboquant3_qjl",  64, 2, 4, 16, [5, 37],                4, 0,  None,    torch.bfloat16),
    ("turboquant3_qjl",  64, 1, 3, 16, [20, 50],               0, 8,  12,      torch.float32),
    ("turboquant4",      80, 2, 2, 32, [45, 10],               3, 5,  16,      torch.bfloat16),
    (SKETCHED,           64, 1, 4, 16, [33, 200],              1, 40, None,    torch.float32),
    ("turboquant3",      128, 3, 3, 24, [130, 70],             4, 64, None,    torch.float16),
    # test_kernels_protected.py's decode matrix (split counts dropped)
    *[case[:9] + case[10:] for case in support.PROTECTED_DECODE_CASES],
]


@pytest.mark.parametrize("preset,d,H,G,block_size,lens,sink,window,sliding,dtype", CPU_PROTECTED_DECODE_CASES)
def test_decode_with_protected_tokens(preset, d, H, G, block_size, lens, sink, window, sliding, dtype, each_isa):
    tables = jittered_tables(preset, d, H, seed=d)
    cache, block_table, keys, values = filled_cache(preset, d, H, lens, block_size, tables, seed=G)
    prot = copies(keys, values, tables, sink, window, dtype, [max(n - 1, 0) for n in lens])
    query = torch.randn(len(lens), H * G, d, generator=torch.Generator().manual_seed(7)) * 2
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    args = (query, cache, block_table, seq_lens, tables, preset, d ** -0.5, sliding)
    want = ref.paged_decode(*args, prot)
    outs = []
    for name in each_isa:
        cpu_ops.set_isa(name)
        got = cpu_ops.paged_decode(*args, prot)
        assert not got.isnan().any(), "a copy outside the sink and window was read"
        assert rel_err(got, want) < TOL, name
        outs.append(got)
    assert all(torch.equal(o, outs[0]) for o in outs), "ISAs differ"
    if sink + window:
        assert rel_err(ref.paged_decode(*args), want) > 100 * TOL  # protection matters here


CPU_PROTECTED_PREFILL_CASES = [
    # preset,           d,   H, G, block, lens,        query_lens, S, W,  sliding, compressed, copy dtype
    ("turboquant3",     64,  2, 3, 16, [45, 12],     [9, 12],    3, 5,  None,    False, torch.float32),
    ("turboquant3",     64,  2, 3, 16, [45, 12],     [9, 12],    3, 5,  None,    True,  torch.bfloat16),
    ("turboquant2_qjl", 64,  1, 4, 32, [52, 20],     [13, 2],    2, 0,  24,      True,  torch.float32),
    ("turboquant4_qjl", 96,  2, 2, 16, [37, 5],      [6, 5],     0, 11, None,    False, torch.bfloat16),
    ("turboquant4",     80,  1, 2, 24, [33, 10],     [8, 10],    1, 20, 12,      True,  torch.float16),
    (SKETCHED,          128, 1, 4, 16, [29],         [11],       2, 6,  None,    True,  torch.float32),
    ("turboquant3",     64,  3, 3, 32, [300, 140],   [100, 140], 4, 64, None,    True,  torch.float32),
    ("turboquant3",     64,  3, 3, 32, [300, 140],   [100, 40],  4, 64, None,    False, torch.float32),
    # test_kernels_protected.py's prefill matrix
    *support.PROTECTED_PREFILL_CASES,
]


@pytest.mark.parametrize("preset,d,H,G,block_size,lens,query_lens,sink,window,sliding,compressed,dtype",
                         CPU_PROTECTED_PREFILL_CASES)
def test_prefill_with_protected_tokens(preset, d, H, G, block_size, lens, query_lens, sink, window, sliding,
                                       compressed, dtype, each_isa):
    """The copy cache holds the prefix's protected copies only (NaN at the chunk's own positions: vLLM keeps
    no copy of a long chunk's middle); a chunk's own protected keys come from its K/V."""
    tables = jittered_tables(preset, d, H, seed=d + 1)
    cache, block_table, qsl, key, value, keys, values = chunk_setup(preset, d, H, lens, query_lens, block_size,
                                                                    tables, seed=G)
    ctx = [n - q for n, q in zip(lens, query_lens, strict=True)]
    prot = copies(keys, values, tables, sink, window, dtype, ctx, chunk_exact=False)
    query = torch.randn(key.shape[0], H * G, d, generator=torch.Generator().manual_seed(11)) * 2
    args = (query, key, value, cache, block_table, qsl, torch.tensor(lens), tables, preset, d ** -0.5, sliding,
            compressed)
    want = ref.prefill(*args, prot)
    outs = []
    for name in each_isa:
        cpu_ops.set_isa(name)
        got = cpu_ops.prefill(*args, prot)
        assert not got.isnan().any(), "a copy outside the sink and window (or of the chunk) was read"
        assert rel_err(got, want) < TOL, name
        outs.append(got)
    assert all(torch.equal(o, outs[0]) for o in outs), "ISAs differ"
    assert rel_err(ref.prefill(*args), want) > 100 * TOL  # protection matters here


def test_zero_sink_and_window_is_plain_turboquant():
    preset, d, H, G, lens = "turboquant3_qjl", 64, 2, 2, [20, 9]
    tables = jittered_tables(preset, d, H)
    cache, block_table, keys, values = filled_cache(preset, d, H, lens, 16, tables)
    prot = copies(keys, values, tables, 0, 0, torch.float32, [n - 1 for n in lens])
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    query = torch.randn(len(lens), H * G, d)
    args = (query, cache, block_table, seq_lens, tables, preset, 0.125, 8)
    assert torch.equal(cpu_ops.paged_decode(*args), cpu_ops.paged_decode(*args, prot))


def test_protected_decode_shared_prefix_blocks():
    """Two sequences whose packed and exact-copy block tables share their first blocks (a prefix-cache hit)
    read the same sink copies; sequence 1's own (NaN) sink block is never read."""
    preset, d, H, G, S, W = "turboquant3", 64, 2, 2, 4, 6
    tables = jittered_tables(preset, d, H)
    cache, block_table, keys, values = filled_cache(preset, d, H, [40, 40], 16, tables, seed=4)
    block_table[1, :2] = block_table[0, :2]  # sequence 1 hits sequence 0's first 32 tokens
    keys[1][:32], values[1][:32] = keys[0][:32], values[0][:32]
    prot = copies(keys, values, tables, S, W, torch.float32, [39, 39], block_size=8)
    own = int(prot.block_table[1, 0])
    prot.block_table[1, 0] = prot.block_table[0, 0]
    prot.cache[own] = float("nan")
    query = torch.randn(2, H * G, d)
    seq_lens = torch.tensor([40, 40], dtype=torch.int32)
    want = ref.paged_decode(query, cache, block_table, seq_lens, tables, preset, 0.125, None, prot)
    got = cpu_ops.paged_decode(query, cache, block_table, seq_lens, tables, preset, 0.125, None, prot)
    assert not got.isnan().any()
    assert rel_err(got, want) < TOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_protected_copies_in_vllms_permuted_cache(dtype):
    """The backend hands the copy cache as vLLM allocates it, [num_blocks, H, block_size, 2 d] permuted to
    [num_blocks, block_size, H, 2 d]: writes land at the same rows and attention gives the same bits as with
    a contiguous copy cache."""
    preset, d, H, G, S, W, L, x_bs = "turboquant3", 64, 2, 2, 4, 20, 70, 16
    tables = jittered_tables(preset, d, H)
    cache, block_table, keys, values = filled_cache(preset, d, H, [L], 16, tables, writer=cpu_ops.write_cache)
    flat = torch.zeros(cache.shape[0], x_bs, H, 2 * d, dtype=dtype)
    permuted = torch.zeros(cache.shape[0], H, x_bs, 2 * d, dtype=dtype).permute(0, 2, 1, 3)
    slots = slots_of(block_table, 0, torch.arange(L), x_bs)
    outs = []
    for copy_cache in (flat, permuted):
        prot = ProtectedTokens(S, W, copy_cache, block_table)
        cpu_ops.write_cache(torch.zeros_like(cache), torch.full((L,), -1), keys[0], values[0], tables, preset, prot,
                            slots)
        q = torch.randn(1, H * G, d, generator=torch.Generator().manual_seed(1))
        decode = cpu_ops.paged_decode(q, cache, block_table, torch.tensor([L]), tables, preset, 0.125, None, prot)
        qsl = torch.tensor([0, 30], dtype=torch.int32)  # a chunk of 30 after 40 cached tokens
        chunk = cpu_ops.prefill(torch.randn(30, H * G, d, generator=torch.Generator().manual_seed(2)), keys[0][40:],
                                values[0][40:], cache, block_table, qsl, torch.tensor([L]), tables, preset, 0.125,
                                None, True, prot)
        outs.append((copy_cache.contiguous(), decode, chunk))
    assert all(torch.equal(a, b) for a, b in zip(*outs, strict=True))
    assert rel_err(outs[0][1], ref.paged_decode(q, cache, block_table, torch.tensor([L]), tables, preset, 0.125, None,
                                                ProtectedTokens(S, W, flat, block_table))) < TOL


@pytest.mark.parametrize("compressed,dtype", [(False, torch.float32), (True, torch.bfloat16)])
def test_ops_steps(compressed, dtype):
    """Two prefill chunks and two decode steps of two sequences, every token written (slot and exact copy)
    by ``cpu_ops.write_cache``, against the reference doing the same: the caches are bit-identical, the
    outputs within TOL."""
    preset, d, H, G, block_size, S, W, x_bs = "turboquant3_qjl", 64, 2, 2, 16, 2, 5, 8
    tables = jittered_tables(preset, d, H)
    cache_c, block_table = paged_setup([24, 11], block_size, H, slot_layout(preset, d))
    cache_r = cache_c.clone()
    x_table = torch.arange(8, dtype=torch.int32).reshape(2, 4).flip(1)  # 2 x 32 positions
    copies0 = torch.zeros(8, x_bs, H, 2 * d, dtype=dtype)
    prot_c, prot_r = ProtectedTokens(S, W, copies0, x_table), ProtectedTokens(S, W, copies0.clone(), x_table)
    g = torch.Generator().manual_seed(3)
    done = [0, 0]
    for step_lens in ([12, 9], [10, 0], [1, 1], [1, 1]):  # new tokens per sequence
        T = sum(step_lens)
        key = torch.randn(T, H, d, generator=g) + tables.key_mean
        value = torch.randn(T, H, d, generator=g)
        query = torch.randn(T, H * G, d, generator=g)
        qsl = torch.tensor([0] + torch.tensor(step_lens).cumsum(0).tolist(), dtype=torch.int32)
        ends = [n + s for n, s in zip(done, step_lens, strict=True)]
        seq_lens = torch.tensor(ends, dtype=torch.int32)
        positions = [torch.arange(n, e) for n, e in zip(done, ends, strict=True)]
        slot_mapping = torch.cat([slots_of(block_table, b, p, block_size) for b, p in enumerate(positions)])
        exact_slots = torch.cat([slots_of(x_table, b, p, x_bs) for b, p in enumerate(positions)])
        cpu_ops.write_cache(cache_c, slot_mapping, key, value, tables, preset, prot_c, exact_slots)
        ref.write_cache(cache_r, slot_mapping, key, value, tables, preset, prot_r, exact_slots)
        assert torch.equal(cache_c, cache_r) and torch.equal(prot_c.cache, prot_r.cache), step_lens
        if max(step_lens) == 1:
            args = (query, cache_c, block_table, seq_lens, tables, preset, d ** -0.5, None)
            got, want = cpu_ops.paged_decode(*args, prot_c), ref.paged_decode(*args, prot_r)
        else:
            args = (query, key, value, cache_c, block_table, qsl, seq_lens, tables, preset, d ** -0.5, None,
                    compressed)
            got, want = cpu_ops.prefill(*args, prot_c), ref.prefill(*args, prot_r)
        assert rel_err(got, want) < TOL, step_lens
        done = ends


# ---------------------------------------------------------------------------------------------
# invariance: the same bits whatever the batch, the chunking, the threads, the prefix cache
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset,d,H,G,window", [("turboquant3", 64, 3, 3, None), ("turboquant3_qjl", 128, 2, 4, 50),
                                                 ("turboquant4", 256, 1, 8, None)])
def test_batch_chunking_threads_and_prefix_cache_invariance(preset, d, H, G, window):
    """Sequence 0 (length 150) alone, in batches of 3 and 8 with other sequences, decoded or as rows of
    compressed prefill chunks of several sizes, with 1 or 2 threads, with its first blocks shared with
    another sequence (a prefix-cache hit): every output row is bit-identical."""
    block_size, L = 16, 150
    lens = [L, 7, 300, 1, 64, 150, 33, 99]
    tables = jittered_tables(preset, d, H)
    cache, block_table, *_ = filled_cache(preset, d, H, lens, block_size, tables, seed=1)
    g = torch.Generator().manual_seed(2)
    queries = torch.randn(L, H * G, d, generator=g)  # the queries of sequence 0 at positions 0..L-1
    scale = d ** -0.5

    def decode(pos, batch, threads=1):
        """Sequence 0's query at pos, as row 0 of a decode batch of `batch` sequences."""
        torch.set_num_threads(threads)
        others = torch.randn(batch - 1, H * G, d, generator=g)
        q = torch.cat([queries[pos:pos + 1], others])
        seq_lens = torch.tensor([pos + 1] + lens[1:batch], dtype=torch.int32)
        return cpu_ops.paged_decode(q, cache, block_table[:batch], seq_lens, tables, preset, scale, window)[0]

    def chunked(chunk, threads=1):
        """Sequence 0's rows 0..L-1 as compressed prefill chunks of `chunk` queries, next to sequence 2."""
        torch.set_num_threads(threads)
        rows = []
        for lo in range(0, L, chunk):
            hi = min(lo + chunk, L)
            q = torch.cat([queries[lo:hi], torch.randn(5, H * G, d, generator=g)])
            kv = torch.randn(hi - lo + 5, H, d, generator=g)  # not read: compressed_chunk
            qsl = torch.tensor([0, hi - lo, hi - lo + 5], dtype=torch.int32)
            seq_lens = torch.tensor([hi, lens[2]], dtype=torch.int32)
            out = cpu_ops.prefill(q, kv, kv, cache, block_table[[0, 2]], qsl, seq_lens, tables, preset, scale,
                                  window, True)
            rows.append(out[: hi - lo])
        return torch.cat(rows)

    try:
        base = chunked(L)
        for chunk in (1, 7, 64):
            assert torch.equal(chunked(chunk), base), f"chunks of {chunk}"
        assert torch.equal(chunked(33, threads=2), base), "2 threads"
        for pos in (0, 15, 16, 99, L - 1):
            for batch in (1, 3, 8):
                assert torch.equal(decode(pos, batch), base[pos]), f"decode at {pos}, batch {batch}"
            assert torch.equal(decode(pos, 8, threads=2), base[pos])
        # a prefix-cache hit: sequence 5 holds the same 150 tokens in other blocks, its first 4 shared with 0
        shared = block_table.clone()
        cache[shared[5].long()] = cache[shared[0].long()]
        shared[5, :4] = shared[0, :4]
        seq_lens = torch.tensor([L, L], dtype=torch.int32)
        q = queries[L - 1:].expand(2, -1, -1).contiguous()
        assert torch.equal(cpu_ops.paged_decode(q, cache, shared[[0, 5]], seq_lens, tables, preset, scale, window)[1],
                           base[L - 1])
    finally:
        torch.set_num_threads(1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_protected_decode_equals_compressed_prefill_rows(dtype):
    """With protected tokens too, a decode query and the same query inside a compressed prefill chunk give
    the same bits: decode reads the copies ``write_cache`` stored, the chunk makes its own from its K/V the
    same way (its copy cache here is all NaN), and both read them in the same order."""
    preset, d, H, G, S, W, L = "turboquant3", 64, 2, 3, 4, 20, 90
    tables = jittered_tables(preset, d, H)
    cache, block_table, keys, values = filled_cache(preset, d, H, [L], 16, tables, writer=cpu_ops.write_cache)
    stored = ProtectedTokens(S, W, torch.full((cache.shape[0], 16, H, 2 * d), float("nan"), dtype=dtype), block_table)
    cpu_ops.write_cache(torch.zeros_like(cache), torch.full((L,), -1), keys[0], values[0], tables, preset, stored,
                        slots_of(block_table, 0, torch.arange(L), 16))
    none = ProtectedTokens(S, W, torch.full_like(stored.cache, float("nan")), block_table)
    queries = torch.randn(L, H * G, d)
    qsl = torch.tensor([0, L], dtype=torch.int32)
    rows = cpu_ops.prefill(queries, keys[0], values[0], cache, block_table, qsl, torch.tensor([L]), tables, preset,
                           0.125, None, True, none)
    assert rel_err(rows, ref.prefill(queries, keys[0], values[0], cache, block_table, qsl, torch.tensor([L]), tables,
                                     preset, 0.125, None, True, none)) < TOL
    for pos in (0, 3, 4, 30, L - 1):
        got = cpu_ops.paged_decode(queries[pos:pos + 1], cache, block_table, torch.tensor([pos + 1]), tables, preset,
                                   0.125, None, stored)
        assert torch.equal(got[0], rows[pos]), pos


# ---------------------------------------------------------------------------------------------
# other targets: the portable kernels on aarch64 give the same bits
# ---------------------------------------------------------------------------------------------

CSRC = Path(cpu_ops.__file__).parent / "csrc"
CROSS = shutil.which("aarch64-linux-gnu-g++")
QEMU = shutil.which("qemu-aarch64")


X86_ISAS = {"tq_avx512.cpp": ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mfma", "-mf16c"],
            "tq_avx2.cpp": ["-mavx2", "-mfma", "-mf16c"], "tq_generic.cpp": [], "tq_api.cpp": []}


def _selfcheck(compiler: str, exe: Path, sources: dict[str, list[str]]) -> Path:
    """Build csrc/tools/selfcheck.cpp with the library's sources (each with its ISA flags, compiled at once)."""
    base = [compiler, "-O1", "-std=c++17", "-ffp-contract=off"]
    objects = {name: exe.parent / f"{exe.name}.{name}.o" for name in sources}
    jobs = {name: subprocess.Popen([*base, *flags, "-c", str(CSRC / name), "-o", str(objects[name])],
                                   stderr=subprocess.PIPE) for name, flags in sources.items()}
    for name, job in jobs.items():
        assert job.wait(timeout=600) == 0, f"{compiler} {name}: {job.stderr.read().decode()}"
    subprocess.run([*base, f"-I{CSRC}", str(CSRC / "tools" / "selfcheck.cpp"), *map(str, objects.values()), "-lpthread",
                    "-static", "-o", str(exe)], check=True, capture_output=True, timeout=600)
    return exe


@pytest.mark.skipif(not (CROSS and QEMU and shutil.which("g++") and platform.machine() == "x86_64"),
                    reason="needs an x86-64 host with g++, aarch64-linux-gnu-g++ and qemu-aarch64")
def test_aarch64_build_gives_the_same_bits_as_every_host_isa(tmp_path):
    """Cache writes, decode (with protected tokens and a sliding window) and prefill (compressed and exact
    chunks) on four layouts: the aarch64 build, run under qemu, writes the same bytes as every x86 ISA."""
    arm = _selfcheck(CROSS, tmp_path / "arm", {"tq_generic.cpp": [], "tq_api.cpp": []})
    subprocess.run([QEMU, str(arm), str(tmp_path / "arm.bin")], check=True, capture_output=True, timeout=600)
    host = _selfcheck("g++", tmp_path / "host", X86_ISAS)
    for isa in ISAS:
        out = tmp_path / f"{isa}.bin"
        subprocess.run([str(host), str(out), str(cpu_ops.ISAS.index(isa))], check=True, capture_output=True,
                       timeout=600)
        assert out.read_bytes() == (tmp_path / "arm.bin").read_bytes(), isa
