"""Calibration: the transformers capture sees exactly the K/V vLLM writes to its cache, and the
automatic calibration at engine start is made once per model, cached, loaded, and falls back
with a warning that says why."""

from __future__ import annotations

import logging
import shutil
import sys

import pytest
import torch

import vllm_turboquant.calibrate  # noqa: F401  (the module, not registry.calibrate)
from support import build_llama
from vllm_turboquant.backend.settings import Settings, load_settings
from vllm_turboquant.presets import PRESETS, Preset
from vllm_turboquant.registry import load_registry

C = sys.modules["vllm_turboquant.calibrate"]
TEXT = " ".join(f"w{(i * 37) % 500 + 4}" for i in range(1100))  # the tiny models' word-level vocabulary


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_llama(tmp_path_factory.mktemp("calib") / "d64_gqa", head_dim=64, num_heads=4, num_kv_heads=2)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_TURBOQUANT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_capture_is_what_vllm_writes_to_its_cache(tiny):
    """Post-RoPE K/V per layer and KV head, in order: transformers capture vs the tensors vLLM hands
    its cache-write hook (both float32 here, so they agree to rounding)."""
    pytest.importorskip("vllm")
    from vllm import SamplingParams

    from vllm_turboquant.backend.inprocess import attention_layers, in_process_llm

    keys, values = C.capture_kv(str(tiny), TEXT, tokens=1024, chunk=512)
    assert len(keys) == 4 and keys[0].shape == (1024, 2, 64)
    with in_process_llm(str(tiny), kv_cache_dtype="auto", dtype="float32", enable_prefix_caching=False) as llm:
        ids = llm.get_tokenizer()(TEXT)["input_ids"]
        seen: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
        for _, impl in attention_layers(llm):
            got: list[tuple[torch.Tensor, torch.Tensor]] = []
            seen.append(got)
            original = impl.do_kv_cache_update

            def record(layer, key, value, kv_cache, slot_mapping, _got=got, _orig=original):
                n = int((slot_mapping >= 0).sum())
                _got.append((key[:n].float().clone(), value[:n].float().clone()))
                return _orig(layer, key, value, kv_cache, slot_mapping)

            impl.do_kv_cache_update = record
        for start in (0, 512):  # independent sequences, as the capture runs them
            llm.generate([{"prompt_token_ids": ids[start:start + 512]}], SamplingParams(max_tokens=1), use_tqdm=False)
    for layer, got in enumerate(seen):
        k = torch.cat([kv[0] for kv in got])[:1024].reshape(1024, 2, 64)
        v = torch.cat([kv[1] for kv in got])[:1024].reshape(1024, 2, 64)
        assert (k - keys[layer]).norm() / k.norm() < 1e-4, layer
        assert (v - values[layer]).norm() / v.norm() < 1e-4, layer


def test_fit_leaves_out_the_sink_tokens_of_every_chunk():
    torch.manual_seed(0)
    keys = [torch.randn(1024, 2, 64)]
    keys[0][::512] += 50.0  # an outlying first token per chunk
    values = [torch.randn(1024, 2, 64)]
    reg = C.fit_registry(keys, values, "turboquant3", chunk=512, skip=4)
    keep = torch.arange(1024) % 512 >= 4
    torch.testing.assert_close(reg.layer(0).key_mean, keys[0][keep].mean(0))
    with_sinks = C.fit_registry(keys, values, "turboquant3", chunk=512, skip=0)
    torch.testing.assert_close(with_sinks.layer(0).key_mean, keys[0].mean(0))


def test_settings_calibration_values(tmp_path):
    own = tmp_path / "x.safetensors"
    own.write_bytes(b"")
    assert load_settings({}, environ={}).calibration == "auto"
    assert load_settings({}, environ={"VLLM_TURBOQUANT_CALIBRATION": "AUTO"}).calibration == "auto"
    assert load_settings({"turboquant": {"calibration": "None"}}, environ={}).calibration == "none"
    assert load_settings({"turboquant": {"calibration": str(own)}}, environ={}).calibration == str(own)
    with pytest.raises(ValueError, match="calibration=.*missing.safetensors.*no such file"):
        load_settings({"turboquant": {"calibration": str(tmp_path / "missing.safetensors")}}, environ={})


def test_auto_calibration_is_made_once_and_cached_per_model(tiny, cache, monkeypatch, tmp_path):
    path = C.ensure_auto_calibration(str(tiny), "turboquant3")
    assert path is not None and path.parent == cache / "calibration" and path.exists()
    reg = load_registry(path, preset="turboquant3", head_dim=64, num_layers=4, num_kv_heads=2)
    # the subprocess fitted what the capture + fit give in this process on the built-in text
    keys, values = C.capture_kv(str(tiny), C.builtin_text(), C.AUTO_TOKENS)
    expect = C.fit_registry(keys, values, "turboquant3")
    for layer in (0, 3):
        torch.testing.assert_close(reg.layer(layer).key_mean, expect.layer(layer).key_mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(reg.layer(layer).value_centroids, expect.layer(layer).value_centroids,
                                   rtol=1e-3, atol=1e-4)
    assert reg.layer(0).key_mean.abs().max() > 0  # calibrated, not the data-oblivious zeros

    def no_subprocess(*a, **k):
        raise AssertionError("a cached calibration must not run again")

    monkeypatch.setattr(C, "_launch", no_subprocess)
    assert C.ensure_auto_calibration(str(tiny), "turboquant3") == path
    # another seed or preset is another file; changed weights are another model
    assert C.auto_calibration_file(str(tiny), "turboquant3", 1) != path
    assert C.auto_calibration_file(str(tiny), "turboquant4", 0) != path
    # a release that changes what a preset name holds must not pick up a file fitted for the old bits
    resplit = Preset("turboquant3", 3, 3, sink=4, window=64, auto_calibrate=True)
    assert C.auto_calibration_file(str(tiny), resplit, 0) != path
    other = tmp_path / "d64_gqa_finetuned"
    shutil.copytree(tiny, other)
    weights = next(other.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert C.model_digest(str(other)) != C.model_digest(str(tiny))


def test_an_unusable_cached_calibration_is_made_again(tiny, cache, caplog):
    """A damaged cached file, or one fitted for other code bits under the expected name, is removed
    with a warning and fitted again; the engine never starts on it."""
    caplog.set_level(logging.INFO, logger="vllm.vllm_turboquant")
    path = C.ensure_auto_calibration(str(tiny), "turboquant3")
    good = path.read_bytes()
    path.write_bytes(b"not a safetensors file")
    assert C.ensure_auto_calibration(str(tiny), "turboquant3") == path
    assert "cannot be used" in caplog.text and path.read_bytes() == good  # deterministic re-fit
    # a turboquant4 fit (4-bit values) where the turboquant3 file (2-bit values) belongs
    shutil.copy(C.ensure_auto_calibration(str(tiny), "turboquant4"), path)
    caplog.clear()
    assert C.ensure_auto_calibration(str(tiny), "turboquant3") == path
    assert "cannot be used" in caplog.text
    load_registry(path, preset="turboquant3", head_dim=64, num_layers=4, num_kv_heads=2)


def test_auto_calibration_falls_back_with_a_warning(tiny, cache, monkeypatch, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="vllm.vllm_turboquant")
    assert C.ensure_auto_calibration(str(tiny), "turboquant3_qjl") is None  # the paper's algorithm: data-oblivious
    monkeypatch.setattr(C, "AUTO_MAX_WEIGHT_BYTES", 0)
    assert C.ensure_auto_calibration(str(tiny), "turboquant3") is None
    assert "too large to calibrate at start-up" in caplog.text and "python -m vllm_turboquant.calibrate" in caplog.text
    monkeypatch.setattr(C, "AUTO_MAX_WEIGHT_BYTES", 1 << 40)
    broken = tmp_path / "broken"
    shutil.copytree(tiny, broken)
    (broken / "config.json").write_text("{not json")
    caplog.clear()
    assert C.ensure_auto_calibration(str(broken), "turboquant3") is None
    assert "automatic calibration of" in caplog.text and "failed" in caplog.text
    assert not list((cache / "calibration").glob("broken-*.safetensors"))  # nothing half-written is kept


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty local Hugging Face cache of the test's own (read at call time, and by subprocesses)."""
    import huggingface_hub.constants as hf

    folder = (tmp_path / "hf").resolve()
    folder.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(folder))
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(folder))
    return folder


def test_a_hub_id_of_unknown_size_does_not_trigger_calibration(cache, hf_cache, tmp_path, monkeypatch, caplog):
    """A hub ID that is neither a local folder nor in the local Hugging Face cache (the hubs are not asked) has no
    known size: it is served with data-oblivious codebooks after one warning naming the command, and no
    calibration subprocess starts -- neither from ``ensure_auto_calibration`` nor from the engine's start-up
    decision (``EngineState.calibration_file``, once per engine)."""
    from vllm_turboquant.backend.engine import EngineState, ModelFacts

    caplog.set_level(logging.INFO, logger="vllm.vllm_turboquant")

    def no_subprocess(*a, **k):
        raise AssertionError("a model of unknown size must not be calibrated at start-up")

    monkeypatch.setattr(C, "_launch", no_subprocess)
    hub = "vllm-turboquant-tests/never-downloaded"
    assert C.local_model_folder(hub) is None and C.weight_bytes(hub) is None
    assert C.ensure_auto_calibration(hub, "turboquant3") is None
    def ours():
        return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name == C.logger.name]

    warned = ours()
    assert len(warned) == 1, warned
    assert "cannot be determined" in warned[0] and "data-oblivious" in warned[0]
    assert f"python -m vllm_turboquant.calibrate --model {hub} --preset turboquant3" in warned[0]
    assert not (cache / "calibration").exists() or not list((cache / "calibration").iterdir())
    caplog.clear()
    engine = EngineState(PRESETS["turboquant3"], Settings(calibration="auto"), ModelFacts(hub, 4, 2, 2, 256))
    assert engine.calibration_file() is None and engine.calibration_file() is None
    assert engine.registry(64).layer(0).key_mean.abs().max() == 0  # the data-oblivious tables
    assert len(ours()) == 1 and "cannot be determined" in ours()[0]  # decided once per engine
    # a local folder without weight files has no known size either
    bare = tmp_path / "config-only"
    bare.mkdir()
    (bare / "config.json").write_text("{}")
    assert C.weight_bytes(str(bare)) is None and C.ensure_auto_calibration(str(bare), "turboquant3") is None


def test_a_hub_id_in_the_local_cache_is_calibrated_offline(tiny, cache, hf_cache, monkeypatch, caplog):
    """A hub ID whose weights are in the local Hugging Face cache has a known size (its snapshot's weight files):
    it is calibrated from those files with the hubs off (HF_HUB_OFFLINE=1), unless it is over the limit."""
    caplog.set_level(logging.INFO, logger="vllm.vllm_turboquant")
    hub, commit = "vllm-turboquant-tests/tiny", "0123456789abcdef0123456789abcdef01234567"
    repo = hf_cache / "models--vllm-turboquant-tests--tiny"
    shutil.copytree(tiny, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    assert C.local_model_folder(hub) == repo / "snapshots" / commit
    assert C.weight_bytes(hub) == C.weight_bytes(str(tiny)) > 0
    real, launched = C._launch, []

    def launch(cmd, env):
        launched.append((cmd, env))
        return real(cmd, env)

    monkeypatch.setattr(C, "_launch", launch)
    monkeypatch.setattr(C, "AUTO_MAX_WEIGHT_BYTES", C.weight_bytes(hub) - 1)
    assert C.ensure_auto_calibration(hub, "turboquant3") is None and launched == []
    assert "too large to calibrate at start-up" in caplog.text
    monkeypatch.setattr(C, "AUTO_MAX_WEIGHT_BYTES", C.weight_bytes(hub))
    path = C.ensure_auto_calibration(hub, "turboquant3")
    assert path is not None and path.is_file(), caplog.text
    (cmd, env), = launched
    assert cmd[cmd.index("--model") + 1] == hub and env["HF_HUB_OFFLINE"] == "1"
    reg = load_registry(path, preset="turboquant3", head_dim=64, num_layers=4, num_kv_heads=2)
    assert reg.layer(0).key_mean.abs().max() > 0  # calibrated


def test_engine_start_loads_the_automatic_calibration(tiny, cache, monkeypatch):
    pytest.importorskip("vllm")
    from vllm import SamplingParams

    from vllm_turboquant.backend.inprocess import attention_layers, in_process_llm

    monkeypatch.setenv("VLLM_TURBOQUANT_CALIBRATION", "auto")
    with in_process_llm(str(tiny), kv_cache_dtype="turboquant3") as llm:
        out = llm.generate(["w5 w6 w7 w8"], SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)
        impl = attention_layers(llm)[1][1]
        assert len(out[0].outputs[0].token_ids) == 4
    path = C.auto_calibration_file(str(tiny), "turboquant3", 0)
    assert path.exists()
    reg = load_registry(path, preset="turboquant3", head_dim=64, num_layers=4, num_kv_heads=2)
    torch.testing.assert_close(impl.packed.registry.layer(1).key_mean, reg.layer(1).key_mean)
    torch.testing.assert_close(impl.packed.tables.key_centroids.cpu(), reg.layer(1).key_centroids)


def test_capture_device_uses_the_gpu_in_the_model_dtype_when_there_is_one(monkeypatch):
    """Calibration runs the model where vLLM does: a visible GPU in the model's own dtype ("auto"), else the
    CPU in float32; a bad or unavailable device is refused naming the accepted values."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert C.capture_device() == (torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match=r"'cuda'.*no CUDA device.*'cpu' or 'auto'"):
        C.capture_device("cuda")
    with pytest.raises(ValueError, match=r"'tpu'.*accepted 'auto', 'cpu', 'cuda' or 'cuda:N'"):
        C.capture_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert C.capture_device() == (torch.device("cuda"), "auto")
    assert C.capture_device("cuda:1") == (torch.device("cuda:1"), "auto")
    assert C.capture_device("cpu") == (torch.device("cpu"), torch.float32)
