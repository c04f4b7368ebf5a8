"""The step plan (``layer.plan_step``, run by the metadata builders) and ``PackedLayer.forward``: the decode /
prefill split is planned on the host from vLLM's CPU-side metadata, and attention reads nothing back
from the device -- checked with every tensor-to-host path patched to fail during forward."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

from vllm_turboquant.backend import layer as L  # noqa: E402
from vllm_turboquant.backend.engine import EngineState, ModelFacts  # noqa: E402
from vllm_turboquant.backend.settings import Settings  # noqa: E402
from vllm_turboquant.presets import PRESETS  # noqa: E402

H, G, D, BS = 2, 2, 64, 16


def common_metadata(q_lens, seq_lens, max_blocks=4):
    """A stand-in for vLLM's CommonAttentionMetadata (the fields plan_step reads)."""
    qsl = torch.tensor([0, *torch.cumsum(torch.tensor(q_lens), 0).tolist()], dtype=torch.int32)
    n = len(q_lens)
    return SimpleNamespace(num_reqs=n, num_actual_tokens=int(qsl[-1]), max_query_len=max(q_lens),
                           max_seq_len=max(seq_lens), query_start_loc=qsl.clone(), query_start_loc_cpu=qsl,
                           seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
                           block_table_tensor=torch.arange(n * max_blocks, dtype=torch.int32).reshape(n, max_blocks),
                           slot_mapping=torch.arange(int(qsl[-1])))


def test_plan_of_a_decode_first_batch_is_two_slices():
    meta = L.plan_step(common_metadata([1, 1, 5, 3], [9, 20, 5, 30]), torch.device("cpu"))
    assert (meta.num_decodes, meta.num_prefills, meta.num_prefill_tokens) == (2, 2, 8)
    assert meta.decode_reqs is None and meta.prefill_reqs is None and meta.prefill_rows is None
    assert meta.prefill_query_start_loc.tolist() == [0, 5, 8]


def test_plan_of_an_unordered_batch_indexes_the_requests():
    meta = L.plan_step(common_metadata([4, 1, 2, 1], [4, 7, 9, 3]), torch.device("cpu"))
    assert meta.decode_reqs.tolist() == [1, 3] and meta.prefill_reqs.tolist() == [0, 2]
    assert meta.prefill_rows.tolist() == [0, 1, 2, 3, 5, 6] and meta.prefill_query_start_loc.tolist() == [0, 4, 6]


def test_plan_of_a_decode_only_batch_has_no_prefill():
    meta = L.plan_step(common_metadata([1, 1, 1], [5, 6, 7]), torch.device("cpu"))
    assert meta.decode_only and meta.num_decodes == 3 and meta.prefill_query_start_loc is None


def test_an_empty_request_inside_a_decode_batch_is_planned_not_assumed_away():
    """max_query_len 1 means 'decode-only' only while row i is request i: empty requests may trail (CUDA-graph
    padding), but one in the middle shifts the rows, so the batch gets index tensors."""
    padded = L.plan_step(common_metadata([1, 1, 0, 0], [5, 6, 0, 0]), torch.device("cpu"))
    assert padded.decode_only and padded.decode_reqs is None and padded.prefill_query_start_loc is None
    hole = L.plan_step(common_metadata([1, 0, 1], [5, 0, 7]), torch.device("cpu"))
    assert hole.decode_only and hole.num_decodes == 2 and hole.decode_reqs.tolist() == [0, 2]


class RecordingOps:
    """Stands in for an ops implementation: records what the layer hands it."""

    NAME = "recording"

    def __init__(self):
        self.calls = []

    def paged_decode(self, query, cache, block_table, seq_lens, tables, fmt, scale, sliding_window=None,
                     protected=None):
        self.calls.append(("decode", query.clone(), block_table.clone(), seq_lens.clone(), protected))
        return torch.full(query.shape, 1.0)

    def prefill(self, query, key, value, cache, block_table, query_start_loc, seq_lens, tables, fmt, scale,
                sliding_window=None, compressed_chunk=False, protected=None, max_query_len=None):
        self.calls.append(("prefill", query.clone(), block_table.clone(), seq_lens.clone(), protected,
                           query_start_loc.clone(), max_query_len))
        return torch.full(query.shape, 2.0)


#: Every way a tensor's data reaches the host (free on CPU tensors; a device-to-host sync on a GPU).
HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


def _refuse(*args, **kwargs):
    raise AssertionError("a tensor was read back to the host during forward")


@pytest.mark.parametrize("q_lens,seq_lens", [([1, 1, 5, 3], [9, 20, 5, 30]), ([4, 1, 2, 1], [4, 7, 9, 3]),
                                             ([1, 1, 1], [5, 1, 7])])
@pytest.mark.parametrize("protected", [False, True])
def test_forward_reads_nothing_back_and_hands_the_ops_the_planned_rows(q_lens, seq_lens, protected, monkeypatch):
    preset = PRESETS["turboquant3"]
    settings = Settings(calibration="none", sink=4 if protected else 0, window=8 if protected else 0)
    engine = EngineState(preset, settings, ModelFacts("m", 1, H, 2, 64))
    layer = L.PackedLayer(engine, D, H * G, H, 0.125, None)
    layer.tables, layer.ops = object(), RecordingOps()  # bound: forward must not need more
    exact_bt = torch.arange(100, 100 + 4 * len(q_lens), dtype=torch.int32).reshape(len(q_lens), 4)
    if protected:
        layer.companion = SimpleNamespace(layer_name="x.tq_exact",
                                          exact_cache=lambda: torch.zeros(8, 4, H, 2 * D))
        monkeypatch.setattr(L, "step_metadata", lambda name: SimpleNamespace(block_table=exact_bt))
    meta = L.plan_step(common_metadata(q_lens, seq_lens), torch.device("cpu"))
    T = sum(q_lens)
    query = torch.arange(T, dtype=torch.float32)[:, None, None].expand(T, H * G, D).contiguous()
    key = value = torch.zeros(T, H, D)
    kv_cache = torch.zeros(8, H, BS, 52, dtype=torch.uint8)
    output = torch.zeros(T, H * G, D)
    with pytest.MonkeyPatch.context() as mp:
        for name in HOST_READS:
            mp.setattr(torch.Tensor, name, _refuse)
        for read in (lambda: torch.ones(1).item(), lambda: bool(torch.ones(1)), lambda: int(torch.ones(1))):
            with pytest.raises(AssertionError, match="read back"):  # the patch is in force
                read()
        layer.forward("model.layers.0.self_attn.attn", query, key, value, kv_cache, meta, output)
    # what each op was handed, checked against the batch (after the patch is lifted)
    starts = [0, *torch.cumsum(torch.tensor(q_lens), 0).tolist()]
    decodes = [i for i, n in enumerate(q_lens) if n == 1]
    prefills = [i for i, n in enumerate(q_lens) if n > 1]
    by_kind = {c[0]: c for c in layer.ops.calls}
    if decodes:
        _, q, bt, sl, prot = by_kind["decode"]
        assert q[:, 0, 0].tolist() == [float(starts[i]) for i in decodes]
        assert sl.tolist() == [seq_lens[i] for i in decodes] and torch.equal(bt, meta.block_table[decodes])
        assert (prot is not None) == protected and (not protected or torch.equal(prot.block_table, exact_bt[decodes]))
    if prefills:
        _, q, bt, sl, prot, qsl, mql = by_kind["prefill"]
        rows = [r for i in prefills for r in range(starts[i], starts[i + 1])]
        assert q[:, 0, 0].tolist() == [float(r) for r in rows] and mql == max(q_lens)
        assert torch.equal(bt, meta.block_table[prefills]) and sl.tolist() == [seq_lens[i] for i in prefills]
        assert (not protected or torch.equal(prot.block_table, exact_bt[prefills]))
    assert set(by_kind) == ({"decode"} if decodes else set()) | ({"prefill"} if prefills else set())
    # every row written: decode rows 1 (or, in the default compressed mode, never the one-token-prompt copy),
    # prefill rows 2
    want = torch.tensor([1.0 if n == 1 else 2.0 for i, n in enumerate(q_lens) for _ in range(n)])
    assert torch.equal(output[:, 0, 0], want)
