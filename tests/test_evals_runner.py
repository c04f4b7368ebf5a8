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
        "bytes_per_token_head": run.bytes_per_token_head(dtype, 64),
        "timings": {"engine": 10.0, "ppl": 5.0, "loglik": 20.0, "ruler": 30.0, "process": 70.0},
        "errors": [], "engines": 1, "protected": run.effective_protected(spec),
        "ppl": {"ppl": ppl, "nll": 3.6, "tokens": 510, "windows": 2, "window_tokens": 256,
                "window_ppl": [ppl - 1, ppl + 1], "bos": False},
        "loglik": {t: {"metrics": {"acc": acc, "acc_norm": acc, "perplexity": 20.0}, "n": 10, "preds": preds}
                   for t in cfg["loglik_tasks"]},
        "ruler": {f"{t}@{n}": {"task": t, "length": n, "score": ruler, "metrics": {"score": ruler}, "n": 3}
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
    for png in ("R_perplexity.png", "R_accuracy.png"):
        assert (tmp_path / png).stat().st_size > 1000 and png in text
    assert json.loads((tmp_path / "R.json").read_text())["records"][1]["spec"] == "turboquant3"
    assert len(paths) == 4
