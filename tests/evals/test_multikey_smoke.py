"""The multi-key needle suite (``python -m evals.run --suite multikey``, issue #18 item 1(b)) end to end: one runner
worker serves SmolLM2 with ``turboquant3`` as served and answers 2 RULER ``niah_multikey_2`` prompts of 1K tokens
through lm-eval; each sample's score is checked against its own expected value (RULER string_match_all
recomputed here) and the record renders into the hits table. ~1-2 min on 2 CPU cores once the assets are cached.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from evals import report, suites

REPO = Path(__file__).resolve().parents[2]


def test_multikey_suite_sizes():
    cfg = suites.suite_config("multikey", "gemma3")
    assert cfg["ruler_tasks"] == ["tq_niah_multikey_2"] and cfg["ruler_lengths"] == [2048, 4096, 8192, 16384]
    assert cfg["ruler_samples"] == 50 and cfg["ppl_windows"] == 0 and "facts_n" not in cfg
    cfg = suites.suite_config("multikey", "smollm2", {"ruler_samples": 7, "ruler_lengths": [1024]})
    assert (cfg["ruler_samples"], cfg["ruler_lengths"]) == (7, [1024])
    with pytest.raises(ValueError, match="RULER"):
        suites.suite_config("facts", "smollm2", {"ruler_samples": 3})


def test_multikey_smoke_smollm2(tmp_path):
    pytest.importorskip("vllm")
    pytest.importorskip("lm_eval")
    out = tmp_path / "turboquant3.json"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    cmd = [sys.executable, "-m", "evals.run", "--worker", "turboquant3", "--model", "smollm2", "--suite", "multikey",
           "--ruler-samples", "2", "--ruler-lengths", "1024", "--json", str(out)]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])
    rec = json.loads(out.read_text())
    assert rec["errors"] == [] and rec["prefill"] == "compressed"
    part = rec["ruler"]["tq_niah_multikey_2@1024"]
    assert part["n"] == 2 and len(part["samples"]) == 2
    for s in part["samples"].values():
        expected = re.findall(r"\d+", str(s["expected"]))
        assert expected, s                                      # one number asked per prompt
        assert s["score"] == sum(v in s["answer"] for v in expected) / len(expected), s
    assert part["score"] == pytest.approx(sum(s["score"] for s in part["samples"].values()) / 2)
    report.write_report([rec], tmp_path / "M.md", {"total_s": 1}, plots=False)
    text = (tmp_path / "M.md").read_text()
    hits = sum(s["score"] == 1.0 for s in part["samples"].values())
    assert f"| `turboquant3` | niah_multikey_2@1024 | {hits}/2 |" in text
