"""Smoke test of the evaluation harness (evals/): offline data and vLLM perplexity on SmolLM2.

Runs in CI: it fetches SmolLM2 and the eval data on first use (idempotent; both are
reused from the cache folder), then starts one small vLLM engine
(``enforce_eager``, 2 windows of 256 tokens) in a subprocess. About 40-60 s on 2 CPU cores
once the assets are cached.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def asset_env():
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return env


@pytest.fixture(scope="module")
def eval_data(asset_env):
    done = subprocess.run([sys.executable, "-m", "evals.assets"], cwd=REPO, env=asset_env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return Path(done.stdout.strip().splitlines()[-1])


def test_eval_data_converted(eval_data):
    manifest = json.loads((eval_data / "manifest.json").read_text())
    hellaswag = eval_data / "lm_eval" / "hellaswag" / "validation.jsonl"
    assert "lm_eval/hellaswag/validation.jsonl" in manifest["files"]
    assert manifest["files"]["lm_eval/hellaswag/validation.jsonl"]["rows"] == 10042
    with hellaswag.open() as f:
        row = json.loads(f.readline())
    assert set(row) == {"activity_label", "ctx_a", "ctx_b", "endings", "label"}
    assert len(row["endings"]) == 4 and row["label"] in {"0", "1", "2", "3"}
    gsm8k = json.loads((eval_data / "lm_eval" / "gsm8k" / "test.jsonl").open().readline())
    assert set(gsm8k) == {"question", "answer"} and "####" in gsm8k["answer"]
    heldout = eval_data / "text" / "shakespeare_heldout.txt"
    assert heldout.stat().st_size > 500_000


def test_perplexity_smollm2_auto(asset_env, eval_data, tmp_path):
    out = tmp_path / "ppl.json"
    cmd = [sys.executable, "-m", "evals.perplexity", "--model", "smollm2", "--kv-cache-dtype", "auto",
           "--windows", "2", "--window-tokens", "256", "--json", str(out)]
    done = subprocess.run(cmd, cwd=REPO, env=asset_env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])
    result = json.loads(out.read_text())
    assert result["tokens"] == 2 * 255
    assert all(3.0 < p < 200.0 for p in result["window_ppl"]), result
    assert 3.0 < result["ppl"] < 200.0, result
