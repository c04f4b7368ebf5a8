"""One dtype spec's measurement, in its own process (``python -m evals.run --worker SPEC``): one engine, in the
spec's prefill mode for the whole run (as served: compressed prefill, every token read back from the cache;
``+exactprefill``: a prompt chunk attends to its own fresh K/V), measuring what the suite asks: (a) perplexity,
(b) loglikelihood tasks, (c) RULER needles, (d) fact retrieval and (e) greedy generation for the divergence
from ``auto``; the result record is written as JSON (the report is made from these records, ``evals.report``)."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

from evals import engine
from evals.calibration import served_calibration
from evals.spec import effective_protected, encoding, parse_spec, prefill_mode, spec_bytes
from evals.suites import suite_config

#: Launch settings (``vllm_turboquant.kernels.common.CONFIG_ENV``) for Triton ops run under TRITON_INTERPRET=1:
#: one tile per 256 query rows / keys / tokens, ~4x faster there than the GPU tiles (the kernel tests cover those).
INTERPRETER_TILES = json.dumps({"prefill": {"BLOCK_R": 256, "BLOCK_N": 256}, "store": {"BLOCK_T": 64},
                                "decode": {"BLOCK_N": 256}})


def model_facts(model_path: str) -> dict[str, Any]:
    """head_dim, model_type, layer and KV-head counts and weight dtype from a model folder's ``config.json``."""
    cfg = json.loads((Path(model_path) / "config.json").read_text())
    cfg = cfg.get("text_config", cfg) if "head_dim" not in cfg and "text_config" in cfg else cfg
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return {"head_dim": int(head_dim), "model_type": cfg.get("model_type", ""),
            "num_layers": cfg.get("num_hidden_layers"), "num_kv_heads": cfg.get("num_key_value_heads"),
            "dtype": str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16")}


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


def run_worker(spec: str, model: str, suite: str, json_path: Path, overrides: dict[str, Any] | None = None,
               facts_first: int = 0) -> dict:
    """Measure (a)-(e) for one dtype spec (what the suite asks; ``overrides``: ``suites.OVERRIDABLE`` sizes);
    writes and returns the result record. ``facts_first = k``: generate facts passages ``k ..`` only (the
    runner extending a stored result; ``evals.facts.run_facts``); recorded as ``config["facts_first"]``."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"   # engine core in this process (fast start, inspectable)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    t_start = time.perf_counter()
    parsed = parse_spec(spec)
    if parsed.ops:   # before anything imports Triton: the interpreter is chosen when a kernel is defined
        os.environ["VLLM_TURBOQUANT_OPS"] = parsed.ops
        if parsed.ops == "triton":
            import torch

            if not torch.cuda.is_available():
                os.environ["TRITON_INTERPRET"] = "1"
                # the interpreter costs per operation, not per element: the largest tiles, same maths
                os.environ.setdefault("VLLM_TURBOQUANT_TRITON_CONFIG", INTERPRETER_TILES)
    from evals.lmeval import evaluate
    from evals.perplexity import perplexity, resolve_model

    name, path = resolve_model(model)
    facts = model_facts(path)
    cfg = suite_config(suite, name, overrides)
    if facts_first:
        if not cfg.get("facts_n") or not 0 < facts_first < cfg["facts_n"]:
            raise ValueError(f"--facts-first {facts_first}: needs a facts suite with more passages than that")
        cfg["facts_first"] = facts_first
    dtype, calibrated, tq = parsed.dtype, parsed.calibrated, parsed.turboquant
    if parsed.adhoc:
        engine.register_adhoc(parsed.preset)   # before the engine is built
    sizes = spec_bytes(parsed, facts["head_dim"], facts["num_layers"], facts["dtype"])
    rec: dict[str, Any] = {"spec": spec, "kv_cache_dtype": dtype, "calibrated": calibrated, "model": name,
                           "model_path": path, "suite": suite, "config": cfg, "facts": facts,
                           "bytes_per_token_head": sizes["bytes"], "sizes": sizes,
                           "preset": dataclasses.asdict(parsed.preset) if tq else None,
                           "encoding": encoding(parsed.preset), "edge": parsed.edge,
                           "timings": {}, "errors": [], "loglik": {}, "ruler": {}, "ppl": None,
                           "facts_results": {}, "divergence": {}, "protected": effective_protected(spec),
                           "prefill": prefill_mode(parsed),
                           "ops": os.environ.get("VLLM_TURBOQUANT_OPS", "auto") if tq else None,
                           "triton_config": os.environ.get("VLLM_TURBOQUANT_TRITON_CONFIG") if tq else None}
    timings = rec["timings"]
    options: dict[str, Any] = {}   # the plugin's options (additional_config["turboquant"])
    if parsed.protected:
        options["sink"], options["window"] = parsed.protected
    calibration, notes, seconds = served_calibration(parsed, name, path)
    if calibration is not None:
        options["calibration"] = calibration
    if seconds is not None:
        timings["calibrate"] = seconds
    rec.update(notes)

    engine_args = engine.engine_args(parsed, facts, cfg, options)
    rec["engine_args"] = engine_args

    t = time.perf_counter()
    lm = engine.start(path, dtype, engine_args)
    timings["engine"] = time.perf_counter() - t
    rec["engines"] = 1
    mode = f"{rec['prefill']} prefill"   # one mode for every part of the run
    rec["modes"] = {"ppl": mode, "loglik": mode, "ruler": mode, "facts": mode, "divergence": mode}

    # (a) perplexity
    t = time.perf_counter()
    if cfg["ppl_windows"]:
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

    # (c) RULER: the answer generated after the long prompt
    t = time.perf_counter()
    if cfg["ruler_tasks"]:
        try:
            for length in cfg["ruler_lengths"]:
                out = evaluate(lm, cfg["ruler_tasks"], metadata={"max_seq_lengths": [length],
                                                                 "num_samples": cfg["ruler_samples"]},
                               log_samples=True, gen_kwargs={"max_gen_toks": cfg["ruler_gen_toks"]})
                for task in cfg["ruler_tasks"]:
                    metrics = _metrics(out["results"].get(task, {}))
                    score = metrics.get("score", metrics.get(str(length)))
                    samples = out.get("samples", {}).get(task, [])
                    rec["ruler"][f"{task}@{length}"] = {
                        "task": task, "length": length, "score": score, "metrics": metrics,
                        "n": len(samples) or cfg["ruler_samples"],
                        # per sample: its score, the start of the answer and the expected values (paired
                        # comparison with auto)
                        "samples": {str(x["doc_id"]): {"score": x.get(str(length), x.get("score")),
                                                       "answer": str((x.get("filtered_resps") or [""])[0])[:400],
                                                       "expected": x.get("target")}
                                    for x in samples}}
        except Exception as exc:  # noqa: BLE001
            rec["errors"].append(f"ruler: {type(exc).__name__}: {exc}")
    timings["ruler"] = time.perf_counter() - t

    # (d) fact retrieval
    t = time.perf_counter()
    if cfg.get("facts_n"):
        try:
            from evals.assets import ensure_text_file
            from evals.facts import run_facts
            from evals.perplexity import _bos_id

            text = ensure_text_file("shakespeare_heldout").read_text(encoding="utf-8")
            tokenizer = lm.model.get_tokenizer()
            bos = _bos_id(tokenizer, path, None)
            rec["facts_results"] = run_facts(lm.model, path, cfg, text, bos)
            rec["facts_chat_template"] = bool(getattr(tokenizer, "chat_template", None))
        except Exception as exc:  # noqa: BLE001
            rec["errors"].append(f"facts: {type(exc).__name__}: {exc}")
    timings["facts"] = time.perf_counter() - t

    # (e) greedy generation (divergence from auto, computed by the report)
    t = time.perf_counter()
    if cfg.get("divergence_n"):
        try:
            from evals.generation import run_divergence

            rec["divergence"] = run_divergence(lm.model, cfg)
        except Exception as exc:  # noqa: BLE001
            rec["errors"].append(f"divergence: {type(exc).__name__}: {exc}")
    timings["divergence"] = time.perf_counter() - t
    engine.stop(lm)
    timings["worker_total"] = time.perf_counter() - t_start
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(rec, indent=1))
    return rec
