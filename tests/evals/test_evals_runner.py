"""The runner's modules on fake results (``evals.spec``, ``evals.report``, ``evals.engine``, ``evals.run``) and the
stored results in ``evals/results`` (no engine, no model; a few seconds)."""

from __future__ import annotations

import json
import re

import pytest

from evals import engine, report, suites
from evals import spec as specs


def _record(spec: str, ppl: float, acc: float, ruler: float, preds_flip: int = 0) -> dict:
    cfg = suites.suite_config("smoke", "smollm2")
    dtype, calibrated = specs.split_dtype(spec)
    preds = {str(i): (1 - i % 2 if i < preds_flip else i % 2) for i in range(10)}
    return {
        "spec": spec, "kv_cache_dtype": dtype, "calibrated": calibrated, "model": "smollm2",
        "model_path": "/models/smollm2", "suite": "smoke", "config": cfg,
        "facts": {"head_dim": 64, "model_type": "llama", "num_layers": 30, "num_kv_heads": 3, "dtype": "bfloat16"},
        "bytes_per_token_head": specs.spec_bytes(spec, 64, 30)["bytes"],
        "timings": {"engine": 10.0, "ppl": 5.0, "loglik": 20.0, "ruler": 30.0, "process": 70.0},
        "errors": [], "engines": 1, "protected": specs.effective_protected(spec),
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
    assert specs.bytes_per_token_head("auto", 64) == 256
    assert specs.bytes_per_token_head("fp8", 64) == 128
    assert specs.bytes_per_token_head("turboquant3", 64) == 52
    assert specs.split_dtype("turboquant3+calibrated") == ("turboquant3", True)
    with pytest.raises(ValueError):
        specs.split_dtype("turboquant3+foo")


def test_protected_token_specs():
    assert specs.split_dtype("turboquant3+calibrated+s0w32") == ("turboquant3", True)
    assert specs.spec_protected("turboquant3+s4w128") == (4, 128) and specs.spec_protected("turboquant3") is None
    assert specs.effective_protected("turboquant3") == (4, 64)          # the preset's defaults
    assert specs.effective_protected("turboquant3_qjl") == (0, 0)
    assert specs.effective_protected("turboquant2+s0w0") == (0, 0)
    assert specs.effective_protected("auto") is None
    with pytest.raises(ValueError, match="sSwW"):
        specs.split_dtype("turboquant3+s4")


def test_report_on_fake_results(tmp_path):
    records = [_record("auto", 36.0, 0.6, 1.0), _record("turboquant3", 40.0, 0.5, 0.5, preds_flip=2)]
    out = tmp_path / "R.md"
    paths = report.write_report(records, out, {"command": "python -m evals.run --suite smoke", "total_s": 120})
    text = out.read_text()
    assert "compressed-prefill mode" in text and "realistic mode" in text
    assert "| `turboquant3` | 52 | 4.92× |" in text
    assert "40.00 | +4.00, +11.1%" in text           # perplexity delta vs the auto baseline
    assert "| `turboquant3` | 4 / 64 | 52 |" in text  # protected tokens (the preset's defaults)
    assert "| 4 / 64 | `turboquant3` | " in text      # capacity vs bf16 with the protected tokens, per max_model_len
    assert "0.500 (-0.100)" in text                   # loglik delta
    assert "0.800 (20)" in text                       # answer agreement: 2 of 10 flipped, 2 tasks pooled
    assert "0.50 (-0.50)" in text                     # RULER delta
    assert "| 0.50 (-0.50) | 1/2 |" in text            # RULER, paired: sample 0 found by both, sample 1 lost
    # RULER hits with a Wilson interval (evals.facts.wilson) and the pairing with auto
    assert "| `auto` | niah_single_1@1024 | 2/2 | 1.000 | [0.342, 1.000] |  | — | — |" in text
    assert "| `turboquant3` | niah_single_1@1024 | 1/2 | 0.500 | [0.095, 0.905] | -1 | 1/2 | 1 / 0 (p 1.00) |" in text
    for png in ("R_perplexity.png", "R_accuracy.png"):
        assert (tmp_path / png).stat().st_size > 1000 and png in text
    assert json.loads((tmp_path / "R.json").read_text())["records"][1]["spec"] == "turboquant3"
    assert len(paths) == 4


def test_adhoc_spec_parser_presets_and_bytes():
    """tq:kKvV[+qjlR[*]] specs become ad-hoc Presets with the asked fields; bytes from the slot layout."""
    s = specs.parse_spec("tq:k4v2")
    p = s.preset
    assert s.adhoc and s.turboquant and s.dtype == p.name == "adhoc_k4v2"
    assert (p.key_bits, p.value_bits, p.qjl_ratio, p.qjl_scale, p.sink, p.window) == (4, 2, 0.0, "unbiased", 0, 0)
    assert specs.spec_bytes(s, 64) == {"slot": 52, "bytes": 52, "plain": "turboquant3", "plain_bytes": 52,
                                     "ratio_to_plain": 1.0}
    # the paper's turboquant3_qjl with lambda* instead of lambda = 1: same fields except the scale
    s = specs.parse_spec("tq:k2v3+qjl1.0*+s4w64")
    p, paper = s.preset, specs.parse_spec("turboquant3_qjl").preset
    assert (p.key_bits, p.value_bits, p.qjl_ratio, p.qjl_scale) == (2, 3, 1.0, "optimal")
    assert (paper.key_bits, paper.value_bits, paper.qjl_ratio, paper.qjl_scale) == (2, 3, 1.0, "unbiased")
    assert p.qjl_dim(64) == 64 and p.qjl_lambda(64) == pytest.approx(1 / (1 + 3.141592653589793 / 2))
    assert s.protected == (4, 64) and specs.effective_protected(s.spec) == (4, 64)
    assert specs.spec_bytes(s, 64)["slot"] == 54 == specs.spec_bytes("turboquant3_qjl", 64)["slot"]
    assert specs.spec_bytes(s, 64)["ratio_to_plain"] == pytest.approx(54 / 52, abs=1e-4)
    # m = d/2 on top of 3-bit codes: 24 + 4 signs + n + gamma + 24 + n_v = 58 B (d = 64), 214 B (d = 256)
    s = specs.parse_spec("tq:k3v3+qjl0.5*")
    assert (s.preset.qjl_ratio, s.preset.qjl_scale, s.preset.qjl_dim(64)) == (0.5, "optimal", 32)
    assert s.dtype == "adhoc_k3v3_qjl0.5opt" and specs.effective_protected("tq:k3v3+qjl0.5*") == (0, 0)
    assert [specs.spec_bytes(s, d)["slot"] for d in (64, 256)] == [58, 214]
    assert specs.encoding(s.preset) == "K3+QJL m=d/2 λ* / V3"
    assert specs.parse_spec("tq:k2v3+qjl1").preset.qjl_scale == "unbiased"
    # K4V3 (60 B) sits halfway between turboquant3 (52) and turboquant4 (68): compared with the larger
    assert specs.spec_bytes("tq:k4v3", 64)["plain"] == "turboquant4"
    assert specs.spec_bytes("tq:k1v3+s4w128", 64)["plain"] == "turboquant2"
    # suffixes compose; the vLLM dtype name and calibrated flag come through split_dtype
    assert specs.split_dtype("tq:k4v2+calibrated+s0w0") == ("adhoc_k4v2", True)
    assert specs.spec_filename("tq:k2v3+qjl1*+s4w64") == "tq-k2v3+qjl1opt+s4w64"
    # +nocal: data-oblivious codebooks; the plain spec runs as served (automatic calibration)
    nocal = specs.parse_spec("turboquant3+nocal+s0w0")
    assert (nocal.dtype, nocal.nocal, nocal.calibrated, nocal.protected) == ("turboquant3", True, False, (0, 0))
    assert not specs.parse_spec("turboquant3").nocal and specs.parse_spec("turboquant3").preset.auto_calibrate
    # +nocenter: a +calibrated fit without key centring (centring measured apart from the codebooks)
    assert specs.parse_spec("tq:k4v2+calibrated+nocenter+s4w64").center is False
    assert specs.parse_spec("tq:k4v2+calibrated+s4w64").center is True
    # +autocal: an ad-hoc encoder calibrated the way a plain preset is served
    auto = specs.parse_spec("tq:k3v1+autocal+s4w128")
    assert (auto.autocal, auto.calibrated, auto.nocal, auto.protected) == (True, False, False, (4, 128))
    # +opsIMPL: the attention ops a worker's engine runs (the implementations compared on the same tokens)
    assert [specs.parse_spec(f"turboquant3+ops{o}").ops for o in ("torch", "triton", "cpu")] == \
        ["torch", "triton", "cpu"]
    assert specs.parse_spec("turboquant3").ops is None and specs.parse_spec("tq:k4v2+opstorch").ops == "torch"
    # +lsq: least-squares scales, on the torch ops (the only ones that encode them)
    lsq = specs.parse_spec("tq:k3v1+lsq+s4w128")
    assert (lsq.dtype, lsq.preset.lsq_scale, lsq.ops, lsq.protected) == ("adhoc_k3v1_lsq", True, "torch", (4, 128))
    assert specs.encoding(lsq.preset) == "K3 / V1 (LSQ scales)" and not specs.parse_spec("tq:k3v1").preset.lsq_scale
    assert specs.spec_bytes(lsq, 64)["slot"] == specs.spec_bytes("turboquant2", 64)["slot"]
    for bad in ("turboquant2+lsq", "tq:k2v3+qjl1+lsq", "tq:k3v1+lsq+opscpu",
                "auto+opstorch", "turboquant3+opscuda", "turboquant3+opstorch+opstriton",
                "tq:k5v2", "tq:k3", "turboquant3+qjl1*", "tq:k3v3+qjl0", "auto+edge1", "auto+calibrated",
                "tq:k3v3+s4w64+s0w0", "tq:k3v3+qjl1x", "auto+nocal", "turboquant3+calibrated+nocal",
                "turboquant3+nocal+nocal", "turboquant3+nocenter", "tq:k4v2+nocal+nocenter",
                "turboquant3+autocal", "tq:k3v1+autocal+calibrated", "tq:k3v1+autocal+nocal"):
        with pytest.raises(ValueError):
            specs.parse_spec(bad)


def test_boundary_layer_specs_average_bytes():
    """+edgeN keeps N first and N last layers at bf16 (vLLM's kv_cache_dtype_skip_layers); bytes are averaged."""
    s = specs.parse_spec("turboquant3+edge1+s0w0")
    assert (s.dtype, s.edge, s.protected, s.adhoc) == ("turboquant3", 1, (0, 0), False)
    assert specs.skip_layers(1, 30) == ["0", "29"] and specs.skip_layers(2, 18) == ["0", "1", "16", "17"]
    assert specs.spec_bytes(s, 64, 30)["bytes"] == pytest.approx((28 * 52 + 2 * 256) / 30, abs=0.01)
    assert specs.spec_bytes(s, 256, 18)["bytes"] == (16 * 196 + 2 * 1024) / 18 == 288
    assert specs.spec_bytes(s, 64, 30)["slot"] == 52
    with pytest.raises(ValueError):
        specs.spec_bytes(s, 64)  # needs the layer count


def test_register_adhoc_preset_in_process():
    """The worker's hook: the record lands in PRESETS (what layout/backend read) under its generated name."""
    pytest.importorskip("vllm")
    from vllm_turboquant.layout import slot_layout
    from vllm_turboquant.presets import PRESETS

    s = specs.parse_spec("tq:k1v3+qjl0.5*")
    try:
        engine.register_adhoc(s.preset)
        assert PRESETS[s.dtype] is s.preset and slot_layout(s.dtype, 64).slot_bytes == 8 + 4 + 4 + 24 + 2
        assert specs.is_turboquant(s.dtype)
        engine.register_adhoc(s.preset)  # idempotent
    finally:
        PRESETS.pop(s.dtype, None)


def test_report_shows_bytes_ratio_and_frontier(tmp_path):
    records = [_record("auto", 36.0, 0.6, 1.0), _record("turboquant3", 40.0, 0.5, 0.5),
               _record("tq:k4v2+s4w64", 38.0, 0.5, 0.5), _record("tq:k3v3+qjl0.5*+s4w64", 39.0, 0.5, 0.5)]
    records[1]["sizes"] = specs.spec_bytes("turboquant3", 64, 30)  # stored by the worker; recomputed if absent
    report.write_report(records, tmp_path / "F.md", {"total_s": 1}, plots=False)
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
    paths = report.write_report(records, tmp_path / "P.md", {"total_s": 1})
    assert [p.name for p in paths] == ["P.md", "P.json", "P_perplexity.png"]
    assert "P_accuracy.png" not in (tmp_path / "P.md").read_text()


def test_reports_record_no_absolute_path(tmp_path):
    """The model folder, calibration files, the command line and error messages are written repository- or
    home-relative (or as a ``<NAME>`` placeholder), in the markdown and in the raw JSON."""
    from pathlib import Path

    from evals.paths import REPO, display_path, portable_text

    home_file = str(Path.home() / ".cache" / "vllm-turboquant" / "evals" / "calibration" / "x.safetensors")
    records = [_record("auto", 36.0, 0.6, 1.0), _record("turboquant3+calibrated", 40.0, 0.5, 0.5)]
    records[1]["calibration_file"] = home_file
    records[1]["engine_args"] = {"additional_config": {"turboquant": {"calibration": home_file}}}
    records[1]["errors"] = ["ruler: OSError: no such file /scratch/run/x.json"]
    command = f"python -m evals.run --workdir /scratch/runs/w1 --out {REPO / 'evals' / 'results' / 'x' / 'y.md'}"
    report.write_report(records, tmp_path / "R.md", {"command": command, "total_s": 1}, plots=False)
    for name in ("R.md", "R.json"):
        text = (tmp_path / name).read_text()
        for absolute in ("/scratch", "/models", str(REPO), str(Path.home())):
            assert absolute not in text, (name, absolute)
    md = (tmp_path / "R.md").read_text()
    assert "--workdir <w1> --out evals/results/x/y.md" in md and "(`<smollm2>`)" in md
    assert "no such file <x.json>" in md
    raw = json.loads((tmp_path / "R.json").read_text())["records"][1]
    assert raw["calibration_file"] == "~/.cache/vllm-turboquant/evals/calibration/x.safetensors"
    assert raw["engine_args"]["additional_config"]["turboquant"]["calibration"] == raw["calibration_file"]
    assert records[1]["calibration_file"] == home_file  # the caller's records are left as they were
    assert display_path(REPO / "evals" / "run.py") == "evals/run.py" and display_path("rel/x") == "rel/x"
    assert portable_text(portable_text(command)) == portable_text(command)  # idempotent
    assert portable_text("S / W and https://example.org/a") == "S / W and https://example.org/a"


def test_stored_results_layout_and_index():
    """evals/results/<suite>/<model>.md with its JSON and plots beside it; every image link resolves, no report
    holds an absolute path, and the index lists every report; the runner writes there by default."""
    from evals.index import render_index
    from evals.paths import REPO, RESULTS_DIR, default_out

    assert default_out("quick", "smollm2") == REPO / "evals" / "results" / "quick" / "smollm2.md"
    assert not list((REPO / "evals").glob("RESULTS*")), "results belong in evals/results/<suite>/"
    reports = sorted(p for p in RESULTS_DIR.glob("*/*.md"))
    assert reports, "no stored reports"
    index = (RESULTS_DIR / "README.md").read_text()
    assert index == render_index(), "evals/results/README.md is stale: run python -m evals.index"
    for md in reports:
        rel = md.relative_to(RESULTS_DIR).as_posix()
        assert md.with_suffix(".json").exists() and f"]({rel})" in index, rel
        text = md.read_text()
        links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
        assert all((md.parent / link).exists() for link in links), (rel, links)
        for f in (md, md.with_suffix(".json")):
            assert not re.search(r"/root|/home|/tmp|/work", f.read_text()), f


def test_report_only_reproduces_a_stored_report(tmp_path):
    """``python -m evals.run --report-only`` on the stored records of a report writes the same report (all but
    the line naming the command, date and versions of this invocation). The report: the SmolLM2 perplexity of
    the prefill-mode comparison (made by this runner, both modes, ``+exactprefill`` included)."""
    from evals import run
    from evals.paths import RESULTS_DIR

    stored = RESULTS_DIR / "prefill_modes" / "ppl_smollm2.md"
    doc = json.loads(stored.with_suffix(".json").read_text())
    workdir, model = tmp_path / "work", tmp_path / "smollm2"   # a model folder: nothing is fetched
    workdir.mkdir()
    model.mkdir()
    for rec in doc["records"]:
        (workdir / f"{specs.spec_filename(rec['spec'])}.json").write_text(json.dumps(rec))
    out = tmp_path / "out" / stored.name
    argv = ["--report-only", "--model", str(model), "--suite", doc["records"][0]["suite"], "--workdir", str(workdir),
            "--out", str(out), "--kv-cache-dtype", ",".join(r["spec"] for r in doc["records"])]
    assert run.main(argv) == 0
    got, want = out.read_text().splitlines(), stored.read_text().splitlines()
    assert got[:2] == want[:2] and got[3:] == want[3:]
    assert "--report-only" in got[2] and str(tmp_path) not in got[2]
    assert sorted(p.name for p in out.parent.iterdir()) == ["ppl_smollm2.json", "ppl_smollm2.md",
                                                            "ppl_smollm2_perplexity.png"]


def test_only_the_engine_module_touches_the_plugin():
    """The vLLM wing (``vllm_turboquant.backend``) is reached through evals/engine.py only, by its public names."""
    from evals.paths import REPO

    plugin_import = re.compile(r"^\s*(from|import) vllm_turboquant\.backend", re.M)
    users = sorted(p.name for p in (REPO / "evals").rglob("*.py") if plugin_import.search(p.read_text()))
    assert users == ["engine.py"]
    source = (REPO / "evals" / "engine.py").read_text()
    imported = set(re.findall(r"from vllm_turboquant\.backend import (\w+)", source))
    assert imported == {"register_preset"}   # the prefill mode is an engine argument (additional_config)
    assert "PRESETS" not in source and ".settings" not in source and "supported_kv_cache_dtypes" not in source


def test_ops_rows_paired_against_the_torch_ops(tmp_path):
    """``+opsIMPL`` rows get Δ perplexity against the ``+opstorch`` row with a paired 95% interval over windows
    (Student t on per-window log ratios; 3 windows: t_0.975(2) = 4.3027)."""
    import math

    torch_rec, triton_rec = _record("turboquant3+opstorch", 40.0, 0.5, 0.5), _record("turboquant3+opstriton", 40.2,
                                                                                      0.5, 0.5)
    torch_rec["ppl"]["window_ppl"], triton_rec["ppl"]["window_ppl"] = [30.0, 40.0, 50.0], [30.3, 40.0, 50.5]
    torch_rec["ops"], triton_rec["ops"] = "torch", "triton"
    d = [math.log(1.01), 0.0, math.log(1.01)]
    mean, sd = sum(d) / 3, math.sqrt(sum((x - sum(d) / 3) ** 2 for x in d) / 2)
    lo, hi = (40.0 * (math.exp(mean + s * 4.302652729911275 * sd / math.sqrt(3)) - 1) for s in (-1, 1))
    got = report.paired_ppl_delta(triton_rec, torch_rec)
    assert got[0] == pytest.approx(0.2) and got[1] == pytest.approx(lo) and got[2] == pytest.approx(hi)
    assert report.paired_ppl_delta(triton_rec, {"ppl": {"ppl": 40.0, "window_ppl": [40.0]}}) is None
    out = tmp_path / "R.md"
    report.write_report([_record("auto", 36.0, 0.6, 1.0), torch_rec, triton_rec], out,
                        {"command": "python -m evals.run --suite smoke", "total_s": 1}, plots=False)
    assert f"| `turboquant3+opstriton` | `turboquant3+opstorch` | +0.200 | [{lo:+.3f}, {hi:+.3f}] |" in out.read_text()
