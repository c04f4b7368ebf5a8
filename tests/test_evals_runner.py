"""The report writer of ``evals/run.py`` on fake results (no engine, no model; a few seconds)."""

from __future__ import annotations

import json

import pytest

from evals import run


def _record(spec: str, ppl: float, acc: float, ruler: float, preds_flip: int = 0) -> dict:
    cfg = run.suite_config("smoke", "smollm2")
    dtype, calibrated = run.split_dtype(spec)
    preds = {str(i): (1 - i % 2 if i < preds_flip else i % 2) for i in range(10)}
    return {
        "spec": spec, "kv_cache_dtype": dtype, "calibrated": calibrated, "model": "smollm2",
        "model_path": "/models/smollm2", "suite": "smoke", "config": cfg,
        "facts": {"head_dim": 64, "model_type": "llama", "num_layers": 30, "num_kv_heads": 3, "dtype": "bfloat16"},
        "bytes_per_token_head": run.spec_bytes(spec, 64, 30)["bytes"],
        "timings": {"engine": 10.0, "ppl": 5.0, "loglik": 20.0, "ruler": 30.0, "process": 70.0},
        "errors": [], "engines": 1, "protected": run.effective_protected(spec),
        "ppl": {"ppl": ppl, "nll": 3.6, "tokens": 510, "windows": 2, "window_tokens": 256,
                "window_ppl": [ppl - 1, ppl + 1], "bos": False},
        "loglik": {t: {"metrics": {"acc": acc, "acc_norm": acc, "perplexity": 20.0}, "n": 10, "preds": preds}
                   for t in cfg["loglik_tasks"]},
        "ruler": {f"{t}@{n}": {"task": t, "length": n, "score": ruler, "metrics": {"score": ruler}, "n": 2,
                               "samples": {"0": {"score": 1.0, "answer": "1234"},
                                           "1": {"score": 2 * ruler - 1.0, "answer": "?"}}}
                  for t in cfg["ruler_tasks"] for n in cfg["ruler_lengths"]},
    }


def test_bytes_per_token_head():
    assert run.bytes_per_token_head("auto", 64) == 256
    assert run.bytes_per_token_head("fp8", 64) == 128
    assert run.bytes_per_token_head("turboquant3", 64) == 52
    assert run.split_dtype("turboquant3+calibrated") == ("turboquant3", True)
    with pytest.raises(ValueError):
        run.split_dtype("turboquant3+foo")


def test_protected_token_specs():
    assert run.split_dtype("turboquant3+calibrated+s0w32") == ("turboquant3", True)
    assert run.spec_protected("turboquant3+s4w128") == (4, 128) and run.spec_protected("turboquant3") is None
    assert run.effective_protected("turboquant3") == (4, 64)          # the preset's defaults
    assert run.effective_protected("turboquant3_qjl") == (0, 0)
    assert run.effective_protected("turboquant2+s0w0") == (0, 0)
    assert run.effective_protected("auto") is None
    with pytest.raises(ValueError, match="sSwW"):
        run.split_dtype("turboquant3+s4")


def test_report_on_fake_results(tmp_path):
    records = [_record("auto", 36.0, 0.6, 1.0), _record("turboquant3", 40.0, 0.5, 0.5, preds_flip=2)]
    out = tmp_path / "R.md"
    paths = run.write_report(records, out, {"command": "python -m evals.run --suite smoke", "total_s": 120})
    text = out.read_text()
    assert "compressed-prefill mode" in text and "realistic mode" in text
    assert "| `turboquant3` | 52 | 4.92× |" in text
    assert "40.00 | +4.00, +11.1%" in text           # perplexity delta vs the auto baseline
    assert "| `turboquant3` | 4 / 64 | 52 |" in text  # protected tokens (the preset's defaults)
    assert "| 4 / 64 | 4.25 | 0.53 | 0.13 | 1.0% |" in text  # pool bytes per token/KV head at 4K, 32K, 128K; share
    assert "0.500 (-0.100)" in text                   # loglik delta
    assert "0.800 (20)" in text                       # answer agreement: 2 of 10 flipped, 2 tasks pooled
    assert "0.50 (-0.50)" in text                     # RULER delta
    assert "| 0.50 (-0.50) | 1/2 |" in text            # RULER, paired: sample 0 found by both, sample 1 lost
    for png in ("R_perplexity.png", "R_accuracy.png"):
        assert (tmp_path / png).stat().st_size > 1000 and png in text
    assert json.loads((tmp_path / "R.json").read_text())["records"][1]["spec"] == "turboquant3"
    assert len(paths) == 4


def test_adhoc_spec_parser_presets_and_bytes():
    """tq:kKvV[+qjlR[*]] specs become ad-hoc Presets with the asked fields; bytes from the slot layout."""
    s = run.parse_spec("tq:k4v2")
    p = s.preset
    assert s.adhoc and s.turboquant and s.dtype == p.name == "adhoc_k4v2"
    assert (p.key_bits, p.value_bits, p.qjl_ratio, p.qjl_scale, p.sink, p.window) == (4, 2, 0.0, "unbiased", 0, 0)
    assert run.spec_bytes(s, 64) == {"slot": 52, "bytes": 52, "plain": "turboquant3", "plain_bytes": 52,
                                     "ratio_to_plain": 1.0}
    # the paper's turboquant3_qjl with lambda* instead of lambda = 1: same fields except the scale
    s = run.parse_spec("tq:k2v3+qjl1.0*+s4w64")
    p, paper = s.preset, run.parse_spec("turboquant3_qjl").preset
    assert (p.key_bits, p.value_bits, p.qjl_ratio, p.qjl_scale) == (2, 3, 1.0, "optimal")
    assert (paper.key_bits, paper.value_bits, paper.qjl_ratio, paper.qjl_scale) == (2, 3, 1.0, "unbiased")
    assert p.qjl_dim(64) == 64 and p.qjl_lambda(64) == pytest.approx(1 / (1 + 3.141592653589793 / 2))
    assert s.protected == (4, 64) and run.effective_protected(s.spec) == (4, 64)
    assert run.spec_bytes(s, 64)["slot"] == 54 == run.spec_bytes("turboquant3_qjl", 64)["slot"]
    assert run.spec_bytes(s, 64)["ratio_to_plain"] == pytest.approx(54 / 52, abs=1e-4)
    # m = d/2 on top of 3-bit codes: 24 + 4 signs + n + gamma + 24 + n_v = 58 B (d = 64), 214 B (d = 256)
    s = run.parse_spec("tq:k3v3+qjl0.5*")
    assert (s.preset.qjl_ratio, s.preset.qjl_scale, s.preset.qjl_dim(64)) == (0.5, "optimal", 32)
    assert s.dtype == "adhoc_k3v3_qjl0.5opt" and run.effective_protected("tq:k3v3+qjl0.5*") == (0, 0)
    assert [run.spec_bytes(s, d)["slot"] for d in (64, 256)] == [58, 214]
    assert run.encoding(s.preset) == "K3+QJL m=d/2 λ* / V3"
    assert run.parse_spec("tq:k2v3+qjl1").preset.qjl_scale == "unbiased"
    # K4V3 (60 B) sits halfway between turboquant3 (52) and turboquant4 (68): compared with the larger
    assert run.spec_bytes("tq:k4v3", 64)["plain"] == "turboquant4"
    assert run.spec_bytes("tq:k1v3+s4w128", 64)["plain"] == "turboquant2"
    # suffixes compose; the vLLM dtype name and calibrated flag come through split_dtype
    assert run.split_dtype("tq:k4v2+calibrated+s0w0") == ("adhoc_k4v2", True)
    assert run.spec_filename("tq:k2v3+qjl1*+s4w64") == "tq-k2v3+qjl1opt+s4w64"
    # +nocal: data-oblivious codebooks; the plain spec runs as served (automatic calibration)
    nocal = run.parse_spec("turboquant3+nocal+s0w0")
    assert (nocal.dtype, nocal.nocal, nocal.calibrated, nocal.protected) == ("turboquant3", True, False, (0, 0))
    assert not run.parse_spec("turboquant3").nocal and run.parse_spec("turboquant3").preset.auto_calibrate
    # +nocenter: a +calibrated fit without key centring (centring measured apart from the codebooks)
    assert run.parse_spec("tq:k4v2+calibrated+nocenter+s4w64").center is False
    assert run.parse_spec("tq:k4v2+calibrated+s4w64").center is True
    # +autocal: an ad-hoc encoder calibrated the way a plain preset is served
    auto = run.parse_spec("tq:k3v1+autocal+s4w128")
    assert (auto.autocal, auto.calibrated, auto.nocal, auto.protected) == (True, False, False, (4, 128))
    for bad in ("tq:k5v2", "tq:k3", "turboquant3+qjl1*", "tq:k3v3+qjl0", "auto+edge1", "auto+calibrated",
                "tq:k3v3+s4w64+s0w0", "tq:k3v3+qjl1x", "auto+nocal", "turboquant3+calibrated+nocal",
                "turboquant3+nocal+nocal", "turboquant3+nocenter", "tq:k4v2+nocal+nocenter",
                "turboquant3+autocal", "tq:k3v1+autocal+calibrated", "tq:k3v1+autocal+nocal"):
        with pytest.raises(ValueError):
            run.parse_spec(bad)


def test_boundary_layer_specs_average_bytes():
    """+edgeN keeps N first and N last layers at bf16 (vLLM's kv_cache_dtype_skip_layers); bytes are averaged."""
    s = run.parse_spec("turboquant3+edge1+s0w0")
    assert (s.dtype, s.edge, s.protected, s.adhoc) == ("turboquant3", 1, (0, 0), False)
    assert run.skip_layers(1, 30) == ["0", "29"] and run.skip_layers(2, 18) == ["0", "1", "16", "17"]
    assert run.spec_bytes(s, 64, 30)["bytes"] == pytest.approx((28 * 52 + 2 * 256) / 30, abs=0.01)
    assert run.spec_bytes(s, 256, 18)["bytes"] == (16 * 196 + 2 * 1024) / 18 == 288
    assert run.spec_bytes(s, 64, 30)["slot"] == 52
    with pytest.raises(ValueError):
        run.spec_bytes(s, 64)  # needs the layer count


def test_register_adhoc_preset_in_process():
    """The worker's hook: the record lands in PRESETS (what layout/backend read) under its generated name."""
    pytest.importorskip("vllm")
    from vllm_turboquant.layout import slot_layout
    from vllm_turboquant.presets import PRESETS

    s = run.parse_spec("tq:k1v3+qjl0.5*")
    try:
        run.register_adhoc(s.preset)
        assert PRESETS[s.dtype] is s.preset and slot_layout(s.dtype, 64).slot_bytes == 8 + 4 + 4 + 24 + 2
        assert run.is_turboquant(s.dtype)
        run.register_adhoc(s.preset)  # idempotent
    finally:
        PRESETS.pop(s.dtype, None)


def test_report_shows_bytes_ratio_and_frontier(tmp_path):
    records = [_record("auto", 36.0, 0.6, 1.0), _record("turboquant3", 40.0, 0.5, 0.5),
               _record("tq:k4v2+s4w64", 38.0, 0.5, 0.5), _record("tq:k3v3+qjl0.5*+s4w64", 39.0, 0.5, 0.5)]
    records[1]["sizes"] = run.spec_bytes("turboquant3", 64, 30)  # stored by the worker; recomputed if absent
    run.write_report(records, tmp_path / "F.md", {"total_s": 1}, plots=False)
    text = (tmp_path / "F.md").read_text()
    assert "| `tq:k4v2+s4w64` | 4 / 64 | 52 | 1.00× `turboquant3` | K4 / V2 | 38.00 |" in text
    assert "| `tq:k3v3+qjl0.5*+s4w64` | 4 / 64 | 58 | 1.12× `turboquant3` | K3+QJL m=d/2 λ* / V3 | 39.00 |" in text
    frontier = text.split("## Frontier per byte budget")[1].split("\n## ")[0]
    order = [line.split("`")[3] for line in frontier.splitlines() if line.startswith("| `turboquant3`")]
    assert order == ["tq:k4v2+s4w64", "tq:k3v3+qjl0.5*+s4w64", "turboquant3"]  # lowest perplexity first
    assert "| `turboquant3` | 4 / 64 | `tq:k4v2+s4w64` | K4 / V2 | 52 | 1.00× | +5.6% |" in frontier


def test_perplexity_only_report_has_no_empty_accuracy_plot(tmp_path):
    records = [_record("auto", 36.0, 0.6, 1.0), _record("turboquant3", 40.0, 0.5, 0.5)]
    for r in records:
        r["loglik"], r["ruler"] = {}, {}
    paths = run.write_report(records, tmp_path / "P.md", {"total_s": 1})
    assert [p.name for p in paths] == ["P.md", "P.json", "P_perplexity.png"]
    assert "P_accuracy.png" not in (tmp_path / "P.md").read_text()
