"""The results index ``evals/results/README.md``: one row per report (suite x model) with its headline numbers,
date and the command that reproduces it, made from every ``evals/results/<suite>/<model>.json``.

    python -m evals.index            # rewrite evals/results/README.md (``python -m evals.run`` does it too)
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from evals.paths import REPO, RESULTS_DIR, default_out
from evals.report import (
    _sizes,
    agreement,
    divergence_summary,
    facts_summary,
    is_exact_prefill,
    mean_ruler,
    ruler_summary,
)
from evals.spec import PLAIN_PRESETS
from evals.suites import suite_config

#: Row order: the runner's suites first, then the studies made with them (folder name -> runner suite, note).
ORDER = ["quick", "ppl", "ppl_long", "loglik", "needle", "multikey", "facts", "divergence", "full", "smoke",
         "protected", "frontier", "levers", "prefill_modes", "ops", "ops_fp16_values"]
STUDIES = {"protected": "S / W sweep", "frontier": "encoders per budget", "levers": "accuracy levers",
           "prefill_modes": "compressed vs exact prefill", "ops": "Triton vs torch ops",
           "ops_fp16_values": "Triton ops, single fp16 value operands"}
MIN_RULER_HITS_SAMPLES = 10  # fewer samples per length: pooled hits say little, the index shows the means only
SHORT_PPL = 1000  # fewer scored tokens: the suite's perplexity is a sanity check, not a headline


def _ppl(rec: dict | None) -> float | None:
    return ((rec or {}).get("ppl") or {}).get("ppl")


def headline(records: list[dict]) -> str:
    """The numbers a reader looks for first: bf16 perplexity and the plain presets' Δ (unless the suite's
    perplexity is a short check), their answer agreement with bf16 (loglik tasks), RULER means, and per byte
    budget the spec with the lowest perplexity where that is not the plain preset."""
    base = next((r for r in records if r["spec"] == "auto"), None)
    by_spec = {r["spec"]: r for r in records}
    plain = [by_spec[p + mode] for p in ("turboquant4", "turboquant3", "turboquant2") for mode in ("", "+exactprefill")
             if p + mode in by_spec]
    parts = []
    if _ppl(base) and (base["ppl"].get("tokens") or 0) >= SHORT_PPL:
        b = _ppl(base)
        deltas = [f"`{r['spec']}` {100 * (_ppl(r) / b - 1):+.1f}%" for r in plain if _ppl(r)]
        parts.append(f"ppl bf16 {b:.2f}" + (f", Δ {', '.join(deltas)}" if deltas else ""))
    tasks = records[0]["config"]["loglik_tasks"] if records else []
    if base and tasks:
        agree = [(r["spec"], agreement(r, base, tasks)) for r in plain]
        cells = [f"`{s}` {a:.2f}" for s, (a, _) in agree if a is not None]
        if cells:
            parts.append(f"loglik answers as bf16 ({agree[0][1][1]} examples): " + ", ".join(cells))
    if records and records[0]["config"]["ruler_tasks"]:
        means = [(r["spec"], mean_ruler(r)) for r in ([base] if base else []) + plain]
        parts.append("RULER mean " + ", ".join(f"`{s}` {m:.2f}" for s, m in means if m is not None))
        keys = list(records[0].get("ruler", {}))
        hits = [(r["spec"], [ruler_summary(r, None, k) for k in keys]) for r in ([base] if base else []) + plain]
        cells = [f"`{s}` {sum(x['hits'] for x in sm)}/{sum(x['n'] for x in sm)}" for s, sm in hits
                 if sm and all(sm)]
        if cells and records[0]["config"]["ruler_samples"] >= MIN_RULER_HITS_SAMPLES:
            parts.append("RULER hits (lengths pooled) " + ", ".join(cells))
    for length in sorted({k for r in records for k in (r.get("facts_results") or {})}, key=int):
        cells = []
        for r in ([base] if base else []) + plain:
            sm = facts_summary(r, base, length)
            if sm:
                cells.append(f"`{r['spec']}` {sm['hits']}/{sm['n']}"
                             + (f" (same hit as bf16 {sm['same_hit']}/{sm['paired']})" if "paired" in sm else ""))
        if cells:
            parts.append(f"facts @{length}: " + ", ".join(cells))
    if base and base.get("divergence"):
        cells = [f"`{r['spec']}` {sm['mean']:.1f}" for r in plain if (sm := divergence_summary(r, base))]
        if cells:
            parts.append("greedy tokens before divergence from bf16: " + ", ".join(cells))
    if _ppl(base) and len(records) > 1 + len(plain) + ("fp8" in by_spec):
        best: dict[str, dict] = {}
        for r in records:
            s = _sizes(r)
            if r is base or not s or not s.get("plain") or not _ppl(r) or is_exact_prefill(r):
                continue
            if s["plain"] not in best or _ppl(r) < _ppl(best[s["plain"]]):
                best[s["plain"]] = r
        cells = [f"`{p}` budget: `{best[p]['spec']}` {100 * (_ppl(best[p]) / _ppl(base) - 1):+.1f}%"
                 for p in PLAIN_PRESETS[::-1] if p in best and best[p]["spec"] != p]
        if cells:
            parts.append("lowest ppl per budget: " + ", ".join(cells))
    return "; ".join(parts) or "—"


def reproduce_command(records: list[dict], report: Path) -> str:
    """The ``python -m evals.run`` command that measures these records again and writes ``report``."""
    first = records[0]
    cmd = ["python", "-m", "evals.run", "--model", first["model"], "--suite", first["suite"],
           "--kv-cache-dtype", ",".join(r["spec"] for r in records)]
    if any(r.get("engines") == 2 for r in records):
        cmd.append("--two-engines")   # records of a runner that had it (before compressed prefill was the default)
    cfg = first.get("config") or {}
    default = suite_config(first["suite"], first["model"])
    if cfg.get("facts_n") and cfg["facts_n"] != default.get("facts_n"):
        cmd += ["--facts-n", str(cfg["facts_n"])]
    if cfg.get("facts_lengths") and cfg["facts_lengths"] != default.get("facts_lengths"):
        cmd += ["--facts-lengths", ",".join(map(str, cfg["facts_lengths"]))]
    if report.resolve() != default_out(first["suite"], first["model"]).resolve():
        cmd += ["--out", report.resolve().relative_to(REPO).as_posix()]
    return " ".join(shlex.quote(c) for c in cmd)


def screen_headline(summary: list[dict]) -> str:
    """An offline lever screen's numbers: per kind, each lever's held-out error as a ratio to what is served,
    by bits (``evals.screen.summarise`` rows)."""
    parts = []
    for kind in ("key", "value"):
        rows = sorted((s for s in summary if s["kind"] == kind), key=lambda s: s["bits"])
        if rows:
            bits = "/".join(str(s["bits"]) for s in rows)
            levers = ", ".join(f"`{m}` " + "/".join(f"{s[m + '_ratio']:.2f}" for s in rows) for m in ("vq2", "klt"))
            parts.append(f"{kind}s, b = {bits}: {levers}")
    return "MSE vs served at equal bytes, " + "; ".join(parts)


def _row_key(path: Path) -> tuple:
    suite = path.parent.name
    return (ORDER.index(suite) if suite in ORDER else len(ORDER), suite, path.stem)


def render_index(results_dir: Path = RESULTS_DIR) -> str:
    reports = sorted((p for p in results_dir.glob("*/*.json") if p.with_suffix(".md").exists()), key=_row_key)
    L = ["# Evaluation results\n",
         "One report per suite and model, written by `python -m evals.run` (`evals/README.md` documents the suites "
         "and flags): `<suite>/<model>.md` with its raw records (`.json`) and plots (`.png`) beside it. "
         "`protected` and `frontier` are studies run with `--suite ppl`. Δ = perplexity change against the bf16 "
         "cache (`auto`) of the same run, compressed-prefill mode. The commands re-run every worker (hours on "
         "2 CPU cores); `--report-only` re-renders a report from the worker results kept in `--workdir`. "
         "This file is rewritten by `python -m evals.index`.\n",
         "| suite | model | headline | date | command |", "|---|---|---|---|---|"]
    for path in reports:
        doc = json.loads(path.read_text())
        suite = path.parent.name
        label = f"[{suite}]({suite}/{path.stem}.md)" + (f" ({STUDIES[suite]})" if suite in STUDIES else "")
        if doc.get("kind") == "screen":  # python -m evals.screen: the command is stored whole
            L.append(f"| {label} | {doc['model']} | {screen_headline(doc['summary'])} | {doc['meta']['date'][:10]} | "
                     f"`{doc['meta']['command']}` |")
            continue
        records = doc.get("records") or []
        if not records:
            continue
        date = str(doc.get("meta", {}).get("date", ""))[:10]
        L.append(f"| {label} | {records[0]['model']} | {headline(records)} | {date} | "
                 f"`{reproduce_command(records, path.with_suffix('.md'))}` |")
    L.append("")
    return "\n".join(L)


def write_index(results_dir: Path = RESULTS_DIR) -> Path:
    out = results_dir / "README.md"
    out.write_text(render_index(results_dir))
    return out


def main(argv: list[str] | None = None) -> int:
    print(write_index())
    return 0


if __name__ == "__main__":
    sys.exit(main())
