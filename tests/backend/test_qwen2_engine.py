"""The Qwen2 tiny model (``support.build_qwen2``: Qwen2.5's architecture -- head_dim 128, 8 query / 2 KV heads,
q/k/v projections with bias, tied embeddings) served by the CPU build with turboquant3 and its default
protected tokens, every attention call of every layer checked against an independent computation: dense
attention over the dequantised packed slots, with the exact K/V vLLM handed to the cache write at the
positions the preset protects (first S, last W), in the default compressed-prefill mode (every key read
back from the cache). The GPU-glue harness (test_gpu_glue.py) runs the same model's shapes through vLLM 0.33.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("vllm")

from support import build_qwen2  # noqa: E402
from vllm_turboquant import reference as R  # noqa: E402
from vllm_turboquant.backend.inprocess import attention_layers, in_process_llm  # noqa: E402
from vllm_turboquant.layout import unpack_slots  # noqa: E402
from vllm_turboquant.presets import PRESETS  # noqa: E402
from vllm_turboquant.protected import protected_mask  # noqa: E402


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    return build_qwen2(tmp_path_factory.mktemp("qwen2") / "qwen2")


def test_the_tiny_model_has_qwen2s_architecture(qwen2):
    from safetensors import safe_open

    cfg = json.loads((qwen2 / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForCausalLM"] and cfg["tie_word_embeddings"] is True
    assert cfg["hidden_size"] // cfg["num_attention_heads"] == 128
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (8, 2)
    with safe_open(str(qwen2 / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert "lm_head.weight" not in names  # tied to the embeddings
        for proj in ("q_proj", "k_proj", "v_proj"):
            assert f.get_tensor(f"model.layers.0.self_attn.{proj}.bias").abs().max() > 0.1


def _attach_checker(llm) -> dict:
    """Record the exact K/V of every slot as vLLM writes it; after each attention call recompute the outputs
    with dense attention over the dequantised slots, the recorded exact K/V at protected positions."""
    stats = {"errors": [], "layers": set(), "decode": 0, "prefill": 0, "exact_reads": 0}
    for _, impl in attention_layers(llm):
        assert impl.packed is not None, "every Qwen2 layer is packed"
        exact: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        original_forward, original_update = impl.forward, impl.do_kv_cache_update

        def update(layer, key, value, kv_cache, slot_mapping, _upd=original_update, _exact=exact):
            for i, s in enumerate(slot_mapping[:key.shape[0]].tolist()):
                if s >= 0:
                    _exact[s] = (key[i].double().clone(), value[i].double().clone())
            return _upd(layer, key, value, kv_cache, slot_mapping)

        def checked(layer, query, key, value, kv_cache, md, output=None, *args, _p=impl.packed,
                    _fwd=original_forward, _exact=exact, **kw):
            out = _fwd(layer, query, key, value, kv_cache, md, output, *args, **kw)
            if md is None:
                return out
            cache = kv_cache.permute(0, 2, 1, 3)
            bs, sink, window = cache.shape[1], _p.engine.sink, _p.engine.window
            qsl, seq_lens = md.query_start_loc.tolist(), md.seq_lens.tolist()
            for b, L in enumerate(seq_lens):
                qs, qe = qsl[b], qsl[b + 1]
                if qe == qs:
                    continue
                k, v = R.dequantize(unpack_slots(R.gather_slots(cache, md.block_table[b:b + 1], L)[0], _p.fmt.layout),
                                    _p.tables, _p.fmt)
                pos = torch.arange(L)
                slots = (md.block_table[b, pos // bs].long() * bs + pos % bs).tolist()
                k_x = torch.stack([_exact[s][0] for s in slots])
                v_x = torch.stack([_exact[s][1] for s in slots])
                q_pos = torch.arange(L - (qe - qs), L)
                use = protected_mask(q_pos[:, None], pos[None, :], sink, window)
                stats["exact_reads"] += int((use & (pos[None, :] <= q_pos[:, None])).sum())
                want = R.dense_attention(query[qs:qe], k.double(), v.double(), _p.scale, q_pos, _p.window,
                                         exact=(k_x, v_x, use))
                got = output[qs:qe].float()
                stats["errors"].append(((got - want).abs().max() / want.abs().max().clamp_min(1e-6)).item())
                stats["decode" if qe - qs == 1 else "prefill"] += 1
            stats["layers"].add(_p.layer_index)
            return out

        impl.forward, impl.do_kv_cache_update = checked, update
    return stats


def test_qwen2_turboquant3_matches_dense_attention_layer_by_layer(qwen2):
    from vllm import SamplingParams

    # byte-level tokenizer without merges: n letters are n tokens
    prompts = ["".join(chr(97 + (7 * i + 3 * j) % 26) for j in range(n)) for i, n in enumerate([5, 37, 150, 1])]
    greedy = SamplingParams(max_tokens=6, temperature=0)
    with in_process_llm(str(qwen2), kv_cache_dtype="turboquant3", dtype="float32", max_num_batched_tokens=64,
                        max_num_seqs=4, block_size=32, additional_config={"turboquant": {"ops": "torch"}}) as llm:
        layers = attention_layers(llm)
        stats = _attach_checker(llm)
        outs = llm.generate(prompts, greedy, use_tqdm=False)
        outs += llm.generate([prompts[2] + "xyz"], greedy, use_tqdm=False)  # a prefix-cache hit
    preset = PRESETS["turboquant3"]
    assert [len(o.outputs[0].token_ids) for o in outs] == [6] * 5
    assert stats["layers"] == set(range(len(layers))) and len(layers) == 2
    assert stats["decode"] > 0 and stats["prefill"] > 0 and stats["exact_reads"] > 0 and preset.sink + preset.window
    print(f"qwen2 turboquant3: {len(stats['errors'])} checks, max relative error {max(stats['errors']):.2e}, "
          f"{stats['exact_reads']} protected reads")
    assert max(stats["errors"]) < 1e-3
