"""The torch reference: paged decode from packed slots against dense attention over the
dequantised (estimator-equivalent) K/V, prefill consistency, cache writes."""


import pytest
import torch

from support import dense_decode, make_paged, registry_tables, rel_err
from vllm_turboquant import reference as R
from vllm_turboquant.layout import slot_layout, unpack_slots

CASES = [(g, d) for g in (1, 3, 8) for d in (64, 128, 256)]


@pytest.mark.parametrize("group,d", CASES)
@pytest.mark.parametrize("preset", ["turboquant3", "turboquant3_qjl"])
def test_paged_decode_equals_dense_attention_over_dequantised_kv(group, d, preset):
    H = 2
    seq_lens = [37, 1, 16, 50, 0]
    tables = registry_tables(preset, d, H, key_mean=(d == 128))
    cache, bt, _, _ = make_paged(preset, d, H, seq_lens, 16, tables)
    q = torch.randn(len(seq_lens), H * group, d)
    out = R.paged_decode(q, cache, bt, torch.tensor(seq_lens), tables, preset, d ** -0.5)
    ref = dense_decode(q, cache, bt, seq_lens, tables, preset, d ** -0.5)
    assert rel_err(out, ref) < 1e-5
    assert torch.all(out[-1] == 0)  # an empty sequence attends to nothing


@pytest.mark.parametrize("preset", ["turboquant4", "turboquant2_qjl"])
def test_paged_decode_sliding_window_and_block_sizes(preset):
    d, H, group = 64, 1, 4
    for block_size in (16, 32, 64):
        seq_lens = [100, 7, 64]
        tables = registry_tables(preset, d, H)
        cache, bt, _, _ = make_paged(preset, d, H, seq_lens, block_size, tables)
        q = torch.randn(3, H * group, d)
        for window in (None, 1, 20):
            out = R.paged_decode(q, cache, bt, torch.tensor(seq_lens), tables, preset, 0.1, window)
            ref = dense_decode(q, cache, bt, seq_lens, tables, preset, 0.1, window)
            assert rel_err(out, ref) < 1e-5


def test_window_of_one_returns_the_own_value():
    preset, d = "turboquant4", 64
    tables = registry_tables(preset, d, 1)
    cache, bt, _, _ = make_paged(preset, d, 1, [30], 16, tables)
    out = R.paged_decode(torch.randn(1, 2, d), cache, bt, torch.tensor([30]), tables, preset, 1.0, sliding_window=1)
    lay = slot_layout(preset, d)
    _, v = R.dequantize(unpack_slots(R.gather_slots(cache, bt, 30)[0], lay), tables, preset)
    assert torch.allclose(out[0, 0], v[29, 0], atol=1e-5) and torch.allclose(out[0, 1], v[29, 0], atol=1e-5)


def test_quantised_attention_approaches_exact_attention_with_more_bits():
    """Not just self-consistent: the estimate approximates real attention, better with each bit."""
    d, H = 128, 2
    q = torch.randn(1, H * 2, d) * 2
    errors = []
    for preset in ("turboquant2", "turboquant3", "turboquant4"):
        tables = registry_tables(preset, d, H)
        torch.manual_seed(1)
        cache, bt, keys, values = make_paged(preset, d, H, [200], 16, tables)
        out = R.paged_decode(q, cache, bt, torch.tensor([200]), tables, preset, d ** -0.5)
        exact = R.dense_attention(q, keys[0], values[0], d ** -0.5, torch.tensor([199]))
        errors.append(((out - exact).norm() / exact.norm()).item())
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.25  # random values average out, so relative output error is a harsh measure


@pytest.mark.parametrize("preset", ["turboquant3", "turboquant3_qjl"])
def test_compressed_prefill_matches_decode_and_chunking(preset):
    """With compressed_chunk, prefill of the last token equals decode, and splitting a prompt
    into chunks gives the same outputs as one pass."""
    d, H, group, bs = 64, 2, 2, 16
    tables = registry_tables(preset, d, H, key_mean=True)
    L = 45
    cache, bt, keys, values = make_paged(preset, d, H, [L], bs, tables)
    q = torch.randn(L, H * group, d)
    full = R.prefill(q, keys[0], values[0], cache, bt, torch.tensor([0, L]), torch.tensor([L]), tables, preset,
                     0.125, compressed_chunk=True)
    chunks = []
    for start, stop in ((0, 20), (20, 33), (33, L)):
        chunks.append(R.prefill(q[start:stop], keys[0][start:stop], values[0][start:stop], cache, bt,
                                torch.tensor([0, stop - start]), torch.tensor([stop]), tables, preset, 0.125,
                                compressed_chunk=True))
    assert rel_err(torch.cat(chunks), full) < 1e-5
    dec = R.paged_decode(q[-1:], cache, bt, torch.tensor([L]), tables, preset, 0.125)
    assert rel_err(full[-1:], dec) < 1e-5


def test_prefill_with_exact_chunk_uses_exact_new_tokens_and_compressed_prefix():
    preset, d, H = "turboquant3", 64, 1
    tables = registry_tables(preset, d, H)
    seq_lens, new = [40, 10], [8, 10]  # seq 0 has a 32-token cached prefix; seq 1 is a fresh prompt
    cache, bt, keys, values = make_paged(preset, d, H, seq_lens, 16, tables)
    q = torch.randn(sum(new), H * 3, d)
    k_new = torch.cat([keys[0][32:], keys[1]])
    v_new = torch.cat([values[0][32:], values[1]])
    out = R.prefill(q, k_new, v_new, cache, bt, torch.tensor([0, 8, 18]), torch.tensor(seq_lens), tables, preset, 0.2)
    lay = slot_layout(preset, d)
    k0, v0 = R.dequantize(unpack_slots(R.gather_slots(cache, bt[:1], 40)[0], lay), tables, preset)
    k0[32:], v0[32:] = keys[0][32:], values[0][32:]
    ref0 = R.dense_attention(q[:8], k0, v0, 0.2, torch.arange(32, 40))
    ref1 = R.dense_attention(q[8:], keys[1], values[1], 0.2, torch.arange(10))  # nothing compressed at all
    assert rel_err(out[:8], ref0) < 1e-5 and rel_err(out[8:], ref1) < 1e-5


def test_write_cache_skips_padding_slots_and_writes_exact_bytes():
    preset, d, H = "turboquant2_qjl", 64, 2
    tables = registry_tables(preset, d, H)
    cache = torch.zeros(4, 16, H, slot_layout(preset, d).slot_bytes, dtype=torch.uint8)
    k, v = torch.randn(3, H, d), torch.randn(3, H, d)
    R.write_cache(cache, torch.tensor([5, -1, 17]), k, v, tables, preset)
    slots = R.encode_slots(k, v, tables, preset)
    assert torch.equal(cache[0, 5], slots[0]) and torch.equal(cache[1, 1], slots[2])
    assert int((cache.reshape(-1, H, cache.shape[-1]).abs().sum((1, 2)) > 0).sum()) == 2


def test_encode_codes_are_nearest_centroids():
    preset, d, H = "turboquant4", 128, 3
    tables = registry_tables(preset, d, H)
    k = torch.randn(50, H, d) * 4
    f = R.encode(k, torch.randn(50, H, d), tables, preset)
    y = torch.einsum("nhd,hed->nhe", k / k.norm(dim=-1, keepdim=True), tables.key_rotation)
    nearest = (y.unsqueeze(-1) - tables.key_centroids[None, :, None, :]).abs().argmin(-1)
    assert torch.equal(f.key_codes, nearest)
    assert torch.allclose(f.key_norm, k.norm(dim=-1), rtol=1e-3)


def test_block_head_token_cache_views_work_like_contiguous_caches():
    """vLLM's CPU cache is [blocks, H, block_size, slot]; its permuted view serves the reference as is."""
    preset, d, H = "turboquant3_qjl", 64, 2
    tables = registry_tables(preset, d, H)
    sb = slot_layout(preset, d).slot_bytes
    bhn = torch.zeros(6, H, 16, sb, dtype=torch.uint8)
    view = bhn.permute(0, 2, 1, 3)
    contiguous = torch.zeros(6, 16, H, sb, dtype=torch.uint8)
    k, v = torch.randn(40, H, d), torch.randn(40, H, d)
    mapping = torch.randperm(96)[:40]
    R.write_cache(view, mapping, k, v, tables, preset)
    R.write_cache(contiguous, mapping, k, v, tables, preset)
    assert torch.equal(view, contiguous)
    bt = torch.arange(6).reshape(1, 6).int()
    q = torch.randn(1, 4, d)
    assert torch.equal(R.paged_decode(q, view, bt, torch.tensor([90]), tables, preset, 0.1),
                       R.paged_decode(q, contiguous, bt, torch.tensor([90]), tables, preset, 0.1))


def test_fused_attention_equals_dense_attention():
    q, k, v = torch.randn(7, 6, 64), torch.randn(20, 2, 64), torch.randn(20, 2, 64)
    for window in (None, 4):
        pos = torch.arange(13, 20)
        fused = R.fused_attention(q, k, v, 0.125, pos, window)
        assert rel_err(fused, R.dense_attention(q, k, v, 0.125, pos, window)) < 1e-5


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_lsq_scale_is_the_least_squares_fit_and_never_worse_than_the_norm(bits):
    """Preset.lsq_scale: each norm field holds argmin_s ‖x − s Πᵀ c‖ (solved here by torch.linalg.lstsq on the
    dequantised unit-norm direction), so every vector's reconstruction error is at most the norm-scaled one's."""
    from vllm_turboquant.layout import stored_norm
    from vllm_turboquant.presets import Preset

    d, H, N = 64, 2, 40
    norm_p, lsq_p = Preset("t_norm", bits, bits), Preset("t_lsq", bits, bits, lsq_scale=True)
    tables = registry_tables(norm_p, d, H, key_mean=True)
    g = torch.Generator().manual_seed(5)
    k, v = torch.randn(N, H, d, generator=g) * 3, torch.randn(N, H, d, generator=g)
    f_norm, f_lsq = R.encode(k, v, tables, norm_p), R.encode(k, v, tables, lsq_p)
    assert torch.equal(f_norm.key_codes, f_lsq.key_codes) and torch.equal(f_norm.value_codes, f_lsq.value_codes)
    for x, codes, rot, cent, n_norm, n_lsq in (
            (k.double() - tables.key_mean.double(), f_lsq.key_codes, tables.key_rotation, tables.key_centroids,
             f_norm.key_norm, f_lsq.key_norm),
            (v.double(), f_lsq.value_codes, tables.value_rotation, tables.value_centroids, f_norm.value_norm,
             f_lsq.value_norm)):
        direction = R.reconstruct(codes, torch.ones(N, H, dtype=torch.float64), rot.double(), cent.double())
        want = torch.linalg.lstsq(direction.unsqueeze(-1), x.unsqueeze(-1)).solution.squeeze(-1).squeeze(-1)
        assert torch.equal(n_lsq, stored_norm(want.float())), "the stored field is the fp16-rounded LS scale"
        assert torch.equal(n_norm, stored_norm(x.norm(dim=-1).float()))
        err_lsq = (x - n_lsq.double().unsqueeze(-1) * direction).norm(dim=-1)
        err_norm = (x - n_norm.double().unsqueeze(-1) * direction).norm(dim=-1)
        assert (err_lsq <= err_norm + 1e-3 * x.norm(dim=-1)).all()
        assert err_lsq.mean() < err_norm.mean()
    with pytest.raises(ValueError, match="lsq_scale=True needs qjl_ratio=0"):
        Preset("t_bad", 2, 2, qjl_ratio=1.0, lsq_scale=True)
