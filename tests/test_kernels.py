"""Triton kernels (store, paged decode, prefill) against the torch reference.

On a CPU-only machine these run under the Triton interpreter (set below, before
triton is imported). On a GPU run them compiled, on CUDA tensors::

    TRITON_INTERPRET=0 python -m pytest tests/test_kernels.py

(``benchmarks/gpu_check.sh`` does exactly that). DEVICE follows: CUDA whenever it
is available and the interpreter is off, else CPU.

The interpreter costs ~1 ms per program instance and ~10 us per tl op, so the
cases are small and hand-picked to cover head_dim 64/128/256, GQA 1/3/4/8 and MQA,
block sizes 16/32/64, ragged lengths, sequences ending mid-block, empty and
single-token sequences, sliding windows, presets with and without QJL, and a
non-zero key mean -- not a cartesian product. The strided-cache tests pass vLLM's
[num_blocks, H, block_size, slot_bytes] cache permuted to [num_blocks, block_size, H,
slot_bytes] (and a view with padded slots); ``kernels.ops`` is checked against
``reference`` as a drop-in (signatures and one call each).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import dataclasses  # noqa: E402
import inspect  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from vllm_turboquant import reference as ref  # noqa: E402
from vllm_turboquant.codebook import get_codebook  # noqa: E402
from vllm_turboquant.kernels import ops  # noqa: E402
from vllm_turboquant.kernels.decode import default_num_splits, paged_decode  # noqa: E402
from vllm_turboquant.kernels.prefill import prefill  # noqa: E402
from vllm_turboquant.kernels.store import store  # noqa: E402
from vllm_turboquant.layout import slot_layout, unpack_slots  # noqa: E402
from vllm_turboquant.presets import Preset, get_preset  # noqa: E402
from vllm_turboquant.registry import CodebookRegistry, LayerTables  # noqa: E402

INTERPRET = os.environ["TRITON_INTERPRET"].lower() not in ("0", "false", "off", "")
DEVICE = torch.device("cuda" if torch.cuda.is_available() and not INTERPRET else "cpu")
REL_TOL = 1e-3

#: A sketch on top of 3-bit codes, m = 0.75 d (not a power of two), variance-optimal lambda.
SKETCHED = Preset("test_k3v3_qjl075", 3, 3, qjl_ratio=0.75, qjl_scale="optimal")


def make_tables(preset, d: int, H: int, *, mean_scale: float = 0.5, seed: int = 0) -> LayerTables:
    """Seeded rotations, the shipped codebooks of preset's bit widths (per head, jittered so that
    heads differ), a random QJL matrix and a random key mean; works for presets not in PRESETS."""
    preset = get_preset(preset)
    base = CodebookRegistry.default("turboquant3", d, 1, H, seed=seed).layer(0)
    g = torch.Generator().manual_seed(1000 + seed)

    def per_head(bits):
        b, c = get_codebook(d, bits).tensors()
        jitter = 1.0 + 0.05 * torch.rand(H, 1, generator=g)  # per-head tables, still sorted
        return b.expand(H, -1) * jitter, c.expand(H, -1) * jitter

    kb, kc = per_head(preset.key_bits)
    vb, vc = per_head(preset.value_bits)
    return dataclasses.replace(
        base, qjl=torch.randn(H, preset.qjl_dim(d), d, generator=g),
        key_boundaries=kb.contiguous(), key_centroids=kc.contiguous(),
        value_boundaries=vb.contiguous(), value_centroids=vc.contiguous(),
        key_mean=torch.randn(H, d, generator=g) * mean_scale,
    ).to(DEVICE)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-6)).item()


def paged_setup(lens, block_size, H, layout, seed=0):
    """An empty cache with a shuffled block table giving every sequence enough blocks."""
    g = torch.Generator().manual_seed(seed)
    B = len(lens)
    per_seq = max(1, -(-max(lens) // block_size))
    num_blocks = B * per_seq + 3
    cache = torch.zeros(num_blocks, block_size, H, layout.slot_bytes, dtype=torch.uint8, device=DEVICE)
    block_table = torch.randperm(num_blocks, generator=g)[:B * per_seq].reshape(B, per_seq).int().to(DEVICE)
    return cache, block_table


def slots_of(block_table, b, positions, block_size):
    return block_table[b, positions // block_size].long() * block_size + positions % block_size


def strided_like(cache, kind="vllm"):
    """A copy of cache [num_blocks, block_size, H, slot_bytes] (same logical bytes) in other memory.

    "vllm": vLLM's block-head-token cache, allocated [num_blocks, H, block_size, slot_bytes]
    and permuted; "padded": slots padded to slot_bytes + 6 bytes and blocks by one more
    slot, with a storage offset (a view into a larger allocation).
    """
    nb, bs, H, sb = cache.shape
    if kind == "vllm":
        out = torch.zeros(nb, H, bs, sb, dtype=torch.uint8, device=cache.device).permute(0, 2, 1, 3)
    else:
        big = torch.zeros(nb + 1, bs * H + 1, sb + 6, dtype=torch.uint8, device=cache.device)
        out = big[1:, 1:].unflatten(1, (bs, H))[..., 3:3 + sb]
        assert out.storage_offset() > 0
    assert out.stride(-1) == 1 and not out.is_contiguous()
    return out.copy_(cache)


# ---------------------------------------------------------------------------
# store
# ---------------------------------------------------------------------------

def assert_slots_match(got, want, key, value, tables, preset, layout):
    """Slots (N, H, bytes) must be identical except where a coordinate is within rounding of a boundary.

    A key code that flips may change the residual, so that slot's QJL signs and gamma
    are excused; every other sign flip needs |S r| within rounding of 0. At most
    0.1% of coordinates (and never more than a handful) may flip.
    """
    if torch.equal(got, want):
        return
    fg, fw = unpack_slots(got.cpu(), layout), unpack_slots(want.cpu(), layout)
    t = tables.to("cpu")
    torch.testing.assert_close(fg.key_norm, fw.key_norm, rtol=1e-3, atol=0)
    torch.testing.assert_close(fg.value_norm, fw.value_norm, rtol=1e-3, atol=0)

    def rotated(x, rot):  # float64 unit vectors, rotated
        x = x.double()
        n = x.norm(dim=-1, keepdim=True)
        return torch.einsum("nhd,hed->nhe", torch.where(n > 0, x / n.clamp_min(1e-300), 0.0), rot.double())

    def check_codes(codes_g, codes_w, y, boundaries):
        flips = codes_g != codes_w
        if flips.any():
            dist = (y.unsqueeze(-1) - boundaries.double()[None, :, None, :]).abs().amin(-1)
            assert (dist[flips] < 1e-5).all(), f"codes differ away from a boundary: {dist[flips].max():.3g}"
        return flips

    yk = rotated(key.cpu().float() - t.key_mean, t.key_rotation)
    key_flips = check_codes(fg.key_codes, fw.key_codes, yk, t.key_boundaries)
    value_flips = check_codes(fg.value_codes, fw.value_codes, rotated(value.cpu(), t.value_rotation),
                              t.value_boundaries)
    flips = int(key_flips.sum() + value_flips.sum())
    assert flips <= max(3, key_flips.numel() // 500), f"{flips} code flips"
    if layout.has_qjl:
        excused = key_flips.any(-1)
        torch.testing.assert_close(fg.key_gamma[~excused], fw.key_gamma[~excused], rtol=1e-3, atol=1e-4)
        r = yk - ref.lookup(fw.key_codes, t.key_centroids).double()
        proj = torch.einsum("nhd,hmd->nhm", r, t.qjl.double())
        bad = (fg.key_signs != fw.key_signs) & ~excused.unsqueeze(-1)
        assert (proj[bad].abs() < 1e-5).all(), "QJL signs differ away from 0"


@pytest.mark.parametrize("preset,d,H,dtype", [
    ("turboquant3", 64, 2, torch.float32),
    ("turboquant4", 128, 1, torch.bfloat16),
    ("turboquant2", 256, 2, torch.float32),
    ("turboquant4_qjl", 64, 2, torch.float32),
    ("turboquant3_qjl", 128, 2, torch.float16),
    ("turboquant2_qjl", 256, 1, torch.float32),
    (SKETCHED, 64, 2, torch.float32),
    ("turboquant3_qjl", 80, 2, torch.float32),  # head_dim not a power of two
])
def test_store_matches_reference(preset, d, H, dtype):
    layout = slot_layout(preset, d)
    tables = make_tables(preset, d, H)
    g = torch.Generator().manual_seed(d + H)
    N, block_size, num_blocks = 9, 16, 3
    key = (torch.randn(N, H, d, generator=g) * 2).to(dtype).to(DEVICE)
    value = torch.randn(N, H, d, generator=g).to(dtype).to(DEVICE)
    key[3, 0] = tables.key_mean[0].to(dtype)  # centred key of norm ~0
    value[2] = 0.0  # zero value: n_v = 0, codes of y = 0
    slot_mapping = torch.randperm(num_blocks * block_size, generator=g)[:N].to(DEVICE)
    slot_mapping[4] = -1  # padding token: skipped
    garbage = torch.randint(0, 256, (num_blocks, block_size, H, layout.slot_bytes), generator=g, dtype=torch.uint8)
    want, got = garbage.to(DEVICE), garbage.clone().to(DEVICE)
    ref.write_cache(want, slot_mapping, key, value, tables, preset)
    store(got, slot_mapping, key, value, tables, preset)

    keep = slot_mapping >= 0
    flat_g, flat_w = got.view(-1, H, layout.slot_bytes), want.view(-1, H, layout.slot_bytes)
    untouched = torch.ones(flat_g.shape[0], dtype=torch.bool, device=DEVICE)
    untouched[slot_mapping[keep]] = False
    assert torch.equal(flat_g[untouched], flat_w[untouched]), "store wrote outside its slots"
    assert_slots_match(flat_g[slot_mapping[keep]], flat_w[slot_mapping[keep]], key[keep], value[keep],
                       tables, preset, layout)


def test_store_empty_and_bad_cache():
    layout = slot_layout("turboquant3", 64)
    tables = make_tables("turboquant3", 64, 2)
    cache = torch.zeros(2, 16, 2, layout.slot_bytes, dtype=torch.uint8, device=DEVICE)
    empty = torch.zeros(0, 2, 64, device=DEVICE)
    store(cache, torch.zeros(0, dtype=torch.long, device=DEVICE), empty, empty, tables, "turboquant3")
    assert not cache.any()
    with pytest.raises(ValueError, match="uint8"):
        store(cache[..., :-2], torch.zeros(1, dtype=torch.long, device=DEVICE),
              torch.randn(1, 2, 64, device=DEVICE), torch.randn(1, 2, 64, device=DEVICE), tables, "turboquant3")


@pytest.mark.parametrize("kind,preset,d,H", [("vllm", "turboquant3_qjl", 64, 3), ("padded", "turboquant4", 80, 2)])
def test_store_strided_cache(kind, preset, d, H):
    """A permuted / padded cache gets exactly the bytes a contiguous one gets, and nothing else changes."""
    layout = slot_layout(preset, d)
    tables = make_tables(preset, d, H)
    g = torch.Generator().manual_seed(5)
    N, block_size, num_blocks = 7, 16, 2
    key = (torch.randn(N, H, d, generator=g) * 2).to(DEVICE)
    value = torch.randn(N, H, d, generator=g).to(DEVICE)
    slot_mapping = torch.randperm(num_blocks * block_size, generator=g)[:N].to(DEVICE)
    slot_mapping[2] = -1
    garbage = torch.randint(0, 256, (num_blocks, block_size, H, layout.slot_bytes), generator=g,
                            dtype=torch.uint8).to(DEVICE)
    contiguous, strided, want = garbage.clone(), strided_like(garbage, kind), strided_like(garbage, kind)
    store(contiguous, slot_mapping, key, value, tables, preset)
    store(strided, slot_mapping, key, value, tables, preset)
    ref.write_cache(want, slot_mapping, key, value, tables, preset)
    assert torch.equal(strided.contiguous(), contiguous), "strided cache bytes differ from the contiguous cache"
    keep = slot_mapping >= 0
    flat_g, flat_w = contiguous.view(-1, H, layout.slot_bytes), want.contiguous().view(-1, H, layout.slot_bytes)
    untouched = torch.ones(flat_g.shape[0], dtype=torch.bool, device=DEVICE)
    untouched[slot_mapping[keep]] = False
    assert torch.equal(flat_g[untouched], flat_w[untouched])
    assert_slots_match(flat_g[slot_mapping[keep]], flat_w[slot_mapping[keep]], key[keep], value[keep],
                       tables, preset, layout)


def test_kernels_reject_a_non_contiguous_slot_dim():
    layout = slot_layout("turboquant3", 64)
    tables = make_tables("turboquant3", 64, 2)
    cache = torch.zeros(2, 16, 2, 2 * layout.slot_bytes, dtype=torch.uint8, device=DEVICE)[..., ::2]
    x = torch.randn(1, 2, 64, device=DEVICE)
    one = torch.ones(1, dtype=torch.int32, device=DEVICE)
    table = torch.zeros(1, 1, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="stride 1"):
        store(cache, torch.zeros(1, dtype=torch.long, device=DEVICE), x, x, tables, "turboquant3")
    with pytest.raises(ValueError, match="stride 1"):
        paged_decode(x, cache, table, one, tables, "turboquant3", 0.125)
    with pytest.raises(ValueError, match="stride 1"):
        prefill(x, x, x, cache, table, torch.tensor([0, 1], dtype=torch.int32, device=DEVICE), one, tables,
                "turboquant3", 0.125)


# ---------------------------------------------------------------------------
# paged decode
# ---------------------------------------------------------------------------

def filled_cache(preset, d, H, lens, block_size, tables, seed=0, writer=ref.write_cache):
    """A paged cache holding lens[b] random tokens per sequence, written by ``writer``."""
    layout = slot_layout(preset, d)
    cache, block_table = paged_setup(lens, block_size, H, layout, seed)
    g = torch.Generator().manual_seed(seed + 1)
    for b, n in enumerate(lens):
        key = (torch.randn(n, H, d, generator=g) + tables.key_mean.cpu()).to(DEVICE)
        value = torch.randn(n, H, d, generator=g).to(DEVICE)
        writer(cache, slots_of(block_table, b, torch.arange(n, device=DEVICE), block_size), key, value, tables,
               preset)
    return cache, block_table


DECODE_CASES = [
    # preset,            d,  H, G, block, seq_lens,          window, splits
    ("turboquant3",     64,  2, 4, 16, [0, 1, 37, 100],    None,   2),  # empty, single token, mid-block
    ("turboquant4_qjl", 128, 1, 8, 32, [70, 5],            20,     3),  # MQA, window, more splits than tiles
    ("turboquant2_qjl", 256, 2, 1, 64, [90, 64],           None,   1),  # MHA, a block-aligned length
    ("turboquant3",     64,  3, 3, 16, [33, 17],           8,      2),  # GQA 3 (SmolLM2 shape)
    ("turboquant4",     128, 2, 4, 64, [129, 1, 0],        64,     4),
    (SKETCHED,          64,  1, 16, 32, [50, 31],          None,   2),  # m = 48, optimal lambda
    ("turboquant3_qjl", 256, 1, 4, 16, [40],               1,      2),  # window of one token
    ("turboquant2",     128, 2, 8, 16, [200],              100,    3),
    ("turboquant4_qjl", 96,  2, 3, 16, [37, 0, 5],         9,      2),  # head_dim not a power of two
]


@pytest.mark.parametrize("preset,d,H,G,block_size,lens,window,splits", DECODE_CASES)
def test_decode_matches_reference(preset, d, H, G, block_size, lens, window, splits):
    tables = make_tables(preset, d, H, seed=d)
    cache, block_table = filled_cache(preset, d, H, lens, block_size, tables, seed=G)
    g = torch.Generator().manual_seed(7)
    query = torch.randn(len(lens), H * G, d, generator=g).to(DEVICE) * 2
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    scale = d ** -0.5
    want = ref.paged_decode(query, cache, block_table, seq_lens, tables, preset, scale, window)
    got = paged_decode(query, cache, block_table, seq_lens, tables, preset, scale, window, num_splits=splits)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert rel_err(got, want) < REL_TOL
    for b, n in enumerate(lens):
        if n == 0:
            assert not got[b].any(), "an empty sequence must give zeros"


@pytest.mark.parametrize("lookup_mode", ["gather", "load"])
def test_decode_bf16_query_lookup_modes_and_out(lookup_mode):
    preset, d, H, G, block_size, lens = "turboquant4_qjl", 64, 2, 2, 32, [45, 3]
    tables = make_tables(preset, d, H)
    cache, block_table = filled_cache(preset, d, H, lens, block_size, tables)
    query = torch.randn(len(lens), H * G, d, device=DEVICE).to(torch.bfloat16)
    seq_lens = torch.tensor(lens, dtype=torch.int64, device=DEVICE)
    want = ref.paged_decode(query, cache, block_table, seq_lens, tables, preset, 0.125)
    out = torch.empty(len(lens), H * G, d, dtype=torch.bfloat16, device=DEVICE)
    got = paged_decode(query, cache, block_table, seq_lens, tables, preset, 0.125, out=out, lookup_mode=lookup_mode)
    assert got is out
    assert rel_err(got, want) < 1e-2  # bf16 output rounding
    assert default_num_splits(len(lens), H, DEVICE) >= 1
    got = paged_decode(query, cache, block_table, seq_lens, tables, preset, 0.125, lookup_mode=lookup_mode)
    assert rel_err(got, want) < REL_TOL


@pytest.mark.parametrize("kind", ["vllm", "padded"])
def test_decode_strided_cache(kind):
    """Same bytes in a permuted / padded cache: the same output, bit for bit, and the reference's."""
    preset, d, H, G, block_size, lens, window = "turboquant4_qjl", 64, 2, 4, 16, [37, 1, 20], 25
    tables = make_tables(preset, d, H)
    cache, block_table = filled_cache(preset, d, H, lens, block_size, tables, seed=3)
    strided = strided_like(cache, kind)
    query = torch.randn(len(lens), H * G, d, device=DEVICE)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    got = paged_decode(query, strided, block_table, seq_lens, tables, preset, 0.125, window, num_splits=2)
    base = paged_decode(query, cache, block_table, seq_lens, tables, preset, 0.125, window, num_splits=2)
    want = ref.paged_decode(query, strided, block_table, seq_lens, tables, preset, 0.125, window)
    assert torch.equal(got, base)
    assert rel_err(got, want) < REL_TOL


def test_store_then_decode_end_to_end():
    """Kernel-written slots decoded by the kernel == reference-written slots decoded by the reference."""
    preset, d, H, G, block_size, lens = "turboquant3_qjl", 128, 2, 4, 16, [23, 50]
    tables = make_tables(preset, d, H)
    cache_k, block_table = filled_cache(preset, d, H, lens, block_size, tables, writer=store)
    cache_r, _ = filled_cache(preset, d, H, lens, block_size, tables, writer=ref.write_cache)
    query = torch.randn(len(lens), H * G, d, device=DEVICE)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    want = ref.paged_decode(query, cache_r, block_table, seq_lens, tables, preset, d ** -0.5)
    got = paged_decode(query, cache_k, block_table, seq_lens, tables, preset, d ** -0.5, num_splits=2)
    # a code flipped at a boundary may move a score by ~1e-6: far inside the tolerance
    assert rel_err(got, want) < REL_TOL


# ---------------------------------------------------------------------------
# prefill
# ---------------------------------------------------------------------------

PREFILL_CASES = [
    # preset,            d,  H, G, block, seq_lens,     query_lens,  window, compressed_chunk
    ("turboquant3",     64,  2, 4, 16, [40, 20, 5],  [10, 20, 0], None, False),  # prefix, fresh, idle seq
    ("turboquant4_qjl", 128, 1, 8, 32, [70, 9],      [12, 3],     20,   False),  # MQA + window
    ("turboquant4_qjl", 128, 1, 8, 32, [70, 9],      [12, 3],     20,   True),
    ("turboquant2_qjl", 256, 2, 1, 64, [50],         [7],         None, True),
    ("turboquant3",     64,  3, 3, 16, [33, 17],     [30, 1],     8,    False),  # GQA 3, decode-like row
    ("turboquant4",     256, 1, 4, 32, [25, 70],     [25, 5],     None, False),  # full prefill + chunk
    (SKETCHED,          128, 2, 2, 64, [100],        [40],        16,   False),
    ("turboquant3_qjl", 96,  2, 2, 16, [30, 12],     [6, 12],     7,    True),   # head_dim 96
]


@pytest.mark.parametrize("preset,d,H,G,block_size,lens,query_lens,window,compressed", PREFILL_CASES)
def test_prefill_matches_reference(preset, d, H, G, block_size, lens, query_lens, window, compressed):
    tables = make_tables(preset, d, H, seed=d + 1)
    layout = slot_layout(preset, d)
    cache, block_table = paged_setup(lens, block_size, H, layout, seed=G)
    g = torch.Generator().manual_seed(11)
    T = sum(query_lens)
    qsl = torch.tensor([0] + torch.tensor(query_lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    key = (torch.randn(T, H, d, generator=g) + tables.key_mean.cpu()).to(DEVICE)
    value = torch.randn(T, H, d, generator=g).to(DEVICE)
    for b, n in enumerate(lens):  # prefix random, the chunk's own tokens written too
        k = (torch.randn(n, H, d, generator=g) + tables.key_mean.cpu()).to(DEVICE)
        v = torch.randn(n, H, d, generator=g).to(DEVICE)
        lo, hi = int(qsl[b]), int(qsl[b + 1])
        k[n - (hi - lo):], v[n - (hi - lo):] = key[lo:hi], value[lo:hi]
        ref.write_cache(cache, slots_of(block_table, b, torch.arange(n, device=DEVICE), block_size), k, v, tables,
                        preset)
    query = torch.randn(T, H * G, d, generator=g).to(DEVICE) * 2
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    scale = d ** -0.5
    want = ref.prefill(query, key, value, cache, block_table, qsl, seq_lens, tables, preset, scale, window,
                       compressed)
    got = prefill(query, key, value, cache, block_table, qsl, seq_lens, tables, preset, scale, window, compressed)
    assert got.shape == want.shape
    assert rel_err(got, want) < REL_TOL


def prefill_setup(preset, d, H, G, block_size, lens, query_lens, tables, seed=11):
    """A cache holding every sequence's prefix and chunk (reference-written), the chunk's packed
    query/key/value and query_start_loc."""
    layout = slot_layout(preset, d)
    cache, block_table = paged_setup(lens, block_size, H, layout, seed=G)
    g = torch.Generator().manual_seed(seed)
    T = sum(query_lens)
    qsl = torch.tensor([0] + torch.tensor(query_lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    key = (torch.randn(T, H, d, generator=g) + tables.key_mean.cpu()).to(DEVICE)
    value = torch.randn(T, H, d, generator=g).to(DEVICE)
    for b, n in enumerate(lens):
        k = (torch.randn(n, H, d, generator=g) + tables.key_mean.cpu()).to(DEVICE)
        v = torch.randn(n, H, d, generator=g).to(DEVICE)
        lo, hi = int(qsl[b]), int(qsl[b + 1])
        k[n - (hi - lo):], v[n - (hi - lo):] = key[lo:hi], value[lo:hi]
        ref.write_cache(cache, slots_of(block_table, b, torch.arange(n, device=DEVICE), block_size), k, v, tables,
                        preset)
    query = torch.randn(T, H * G, d, generator=g).to(DEVICE)
    return cache, block_table, qsl, query, key, value


@pytest.mark.parametrize("kind,compressed", [("vllm", False), ("padded", True)])
def test_prefill_strided_cache(kind, compressed):
    preset, d, H, G, block_size, lens, query_lens, window = "turboquant3_qjl", 64, 2, 2, 16, [30, 9], [6, 9], 12
    tables = make_tables(preset, d, H)
    cache, block_table, qsl, query, key, value = prefill_setup(preset, d, H, G, block_size, lens, query_lens,
                                                               tables)
    strided = strided_like(cache, kind)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    args = (block_table, qsl, seq_lens, tables, preset, 0.125, window, compressed)
    got = prefill(query, key, value, strided, *args)
    base = prefill(query, key, value, cache, *args)
    want = ref.prefill(query, key, value, strided, *args)
    assert torch.equal(got, base)
    assert rel_err(got, want) < REL_TOL


def test_prefill_bf16_inputs():
    preset, d, H, G, block_size, lens, query_lens = "turboquant3", 64, 2, 2, 16, [30, 12], [6, 12]
    tables = make_tables(preset, d, H)
    layout = slot_layout(preset, d)
    cache, block_table = paged_setup(lens, block_size, H, layout)
    T = sum(query_lens)
    qsl = torch.tensor([0, 6, 18], dtype=torch.int32, device=DEVICE)
    key = torch.randn(T, H, d, device=DEVICE).to(torch.bfloat16)
    value = torch.randn(T, H, d, device=DEVICE).to(torch.bfloat16)
    for b, n in enumerate(lens):
        k, v = torch.randn(n, H, d, device=DEVICE), torch.randn(n, H, d, device=DEVICE)
        lo, hi = int(qsl[b]), int(qsl[b + 1])
        k[n - (hi - lo):], v[n - (hi - lo):] = key[lo:hi].float(), value[lo:hi].float()
        ref.write_cache(cache, slots_of(block_table, b, torch.arange(n, device=DEVICE), block_size), k, v, tables,
                        preset)
    query = torch.randn(T, H * G, d, device=DEVICE).to(torch.bfloat16)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    want = ref.prefill(query, key, value, cache, block_table, qsl, seq_lens, tables, preset, 0.125)
    got = prefill(query, key, value, cache, block_table, qsl, seq_lens, tables, preset, 0.125, max_query_len=12)
    assert rel_err(got, want) < REL_TOL


# ---------------------------------------------------------------------------
# kernels.ops: drop-in for the reference
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["write_cache", "paged_decode", "prefill"])
def test_ops_signatures_match_reference(name):
    got, want = inspect.signature(getattr(ops, name)), inspect.signature(getattr(ref, name))
    as_tuples = lambda sig: [(p.name, p.kind, p.default) for p in sig.parameters.values()]  # noqa: E731
    assert as_tuples(got) == as_tuples(want)
    assert got == want, "annotations differ"
    assert set(ops.__all__) == {"write_cache", "paged_decode", "prefill"}


def test_ops_end_to_end_on_a_vllm_cache():
    """write_cache, then prefill and decode through ``ops``, on vLLM's permuted cache, against the reference."""
    preset, d, H, G, block_size, lens = "turboquant3_qjl", 64, 2, 3, 16, [20, 7]
    tables = make_tables(preset, d, H)
    layout = slot_layout(preset, d)
    cache, block_table = paged_setup(lens, block_size, H, layout)
    vllm_cache = torch.zeros(cache.shape[0], H, block_size, layout.slot_bytes, dtype=torch.uint8, device=DEVICE)
    cache_k, cache_r = vllm_cache.permute(0, 2, 1, 3), vllm_cache.clone().permute(0, 2, 1, 3)
    g = torch.Generator().manual_seed(2)
    T = sum(lens)
    key = (torch.randn(T, H, d, generator=g) + tables.key_mean.cpu()).to(DEVICE)
    value = torch.randn(T, H, d, generator=g).to(DEVICE)
    slot_mapping = torch.cat([slots_of(block_table, b, torch.arange(n, device=DEVICE), block_size)
                              for b, n in enumerate(lens)])
    slot_mapping = torch.cat([slot_mapping, torch.full((2,), -1, device=DEVICE)])  # CUDA-graph padding
    key_p = torch.cat([key, torch.randn(2, H, d, device=DEVICE)])
    value_p = torch.cat([value, torch.randn(2, H, d, device=DEVICE)])
    assert ops.write_cache(cache_k, slot_mapping, key_p, value_p, tables, preset) is None
    ref.write_cache(cache_r, slot_mapping, key_p, value_p, tables, preset)
    assert_slots_match(cache_k[block_table[0, 0]].contiguous(), cache_r[block_table[0, 0]].contiguous(),
                       key[:block_size], value[:block_size], tables, preset, layout)

    # prefill of the whole prompts (plus a padding row no sequence owns), from the reference-written cache
    qsl = torch.tensor([0, lens[0], T], dtype=torch.int32, device=DEVICE)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    query = torch.randn(T + 1, H * G, d, generator=g).to(DEVICE).to(torch.bfloat16)
    args = (key_p[:T + 1], value_p[:T + 1], cache_r, block_table, qsl, seq_lens, tables, preset, d ** -0.5, 8)
    got, want = ops.prefill(query, *args), ref.prefill(query, *args)
    assert got.dtype == want.dtype == torch.float32 and got.shape == want.shape
    assert not got[T].any(), "padding rows must be zeros, as in the reference"
    assert rel_err(got, want) < REL_TOL

    # decode of the next token of each sequence, from the kernel-written cache
    query = torch.randn(len(lens), H * G, d, generator=g).to(DEVICE)
    got = ops.paged_decode(query, cache_k, block_table, seq_lens, tables, preset, d ** -0.5)
    want = ref.paged_decode(query, cache_r, block_table, seq_lens, tables, preset, d ** -0.5)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert rel_err(got, want) < REL_TOL
    with pytest.raises(ValueError, match="sliding_window"):
        ops.paged_decode(query, cache_k, block_table, seq_lens, tables, preset, d ** -0.5, 0)
