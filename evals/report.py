"""The report of one run: markdown (per-dtype tables, the frontier per byte budget), the raw-records JSON and
the PNG plots beside it (``write_report``); computed from the workers' result records only."""

from __future__ import annotations

import json
import math
from pathlib import Path

from evals.calibration import CALIBRATION_TOKENS
from evals.paths import display_path, portable_record, portable_text
from evals.spec import PLAIN_PRESETS, bytes_per_token_head, encoding, is_turboquant, parse_spec, spec_bytes
from evals.suites import PRIMARY_METRIC


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


def _paired(pairs) -> tuple[int, int]:
    """(items equal in both, items in both) over ``(a, b)`` dicts keyed by doc id, pooled."""
    same = total = 0
    for a, b in pairs:
        for doc in set(a) & set(b):
            total += 1
            same += a[doc] == b[doc]
    return same, total


def agreement(rec: dict, base: dict, tasks: list[str]) -> tuple[float | None, int]:
    """Fraction of loglik examples where ``rec`` picks the same answer as ``base`` (all tasks pooled)."""
    def preds(r: dict, task: str) -> dict:
        return r.get("loglik", {}).get(task, {}).get("preds", {})

    same, total = _paired((preds(rec, t), preds(base, t)) for t in tasks)
    return (same / total if total else None), total


def ruler_agreement(rec: dict, base: dict) -> tuple[int | None, int]:
    """(samples whose RULER score equals ``base``'s on the same sample, samples compared); lengths pooled."""
    def scores(r: dict, key: str) -> dict:
        return {d: x["score"] for d, x in (r.get("ruler", {}).get(key, {}).get("samples") or {}).items()}

    same, total = _paired((scores(rec, k), scores(base, k)) for k in rec.get("ruler", {}))
    return (same if total else None), total


def _paired_hits(hit: dict[str, bool], base_hit: dict[str, bool]) -> dict[str, int]:
    """The pairing of two runs' hits on the samples both have: how many, scored alike, lost and gained (``base``
    hit and this run missed / the reverse)."""
    common = set(hit) & set(base_hit)
    return {"paired": len(common), "same_hit": sum(hit[k] == base_hit[k] for k in common),
            "lost": sum(base_hit[k] and not hit[k] for k in common),
            "gained": sum(hit[k] and not base_hit[k] for k in common)}


def ruler_summary(rec: dict, base: dict | None, key: str) -> dict | None:
    """Hits (samples with score 1: every expected value in the answer), their Wilson 95% interval and the pairing
    with ``base`` on the same samples, for one record's RULER ``key`` (``task@length``); None without per-sample
    records."""
    from evals.facts import wilson

    def hits_of(r: dict) -> dict[str, bool]:
        samples = (r.get("ruler", {}).get(key) or {}).get("samples") or {}
        return {d: x["score"] is not None and x["score"] >= 1.0 for d, x in samples.items()}

    hit = hits_of(rec)
    if not hit:
        return None
    n, hits = len(hit), sum(hit.values())
    out = {"n": n, "hits": hits, "rate": hits / n, "ci": wilson(hits, n)}
    bhit = hits_of(base) if base is not None and base is not rec else None
    if bhit:
        out.update(_paired_hits(hit, bhit), base_hits=sum(bhit[k] for k in set(hit) & set(bhit)))
    return out


def _lost_gained(sm: dict) -> str:
    """``lost / gained (p)``: the discordant pairs against ``auto`` and their two-sided exact sign test."""
    from evals.facts import fmt_p, sign_test

    return f"{sm['lost']} / {sm['gained']} (p {fmt_p(sign_test(sm['lost'], sm['gained']))})"


def _ruler_hits_table(records: list[dict], base: dict | None, keys: list[str]) -> list[str]:
    rows = []
    for k in keys:
        for r in records:
            sm = ruler_summary(r, base, k)
            if sm is None:
                continue
            d = f"{sm['hits'] - sm['base_hits']:+d}" if "paired" in sm else ""
            paired = ("—", "—") if "paired" not in sm else (f"{sm['same_hit']}/{sm['paired']}", _lost_gained(sm))
            rows.append(f"| `{r['spec']}` | {k.replace('tq_', '')} | {sm['hits']}/{sm['n']} | {sm['rate']:.3f} | "
                        f"[{sm['ci'][0]:.3f}, {sm['ci'][1]:.3f}] | {d} | " + " | ".join(paired) + " |")
    if not rows:
        return []
    return ["Hits per task and length: a hit = score 1 (every expected value in the answer). `95% CI` = Wilson "
            "interval of the hit rate; `Δ vs auto`, `same hit` and `lost` / `gained` pair each sample with "
            "`auto`'s answer to the same prompt; `p` = two-sided exact sign test of lost against gained.\n",
            "| dtype | task@length | hits | rate | 95% CI | Δ vs auto | same hit | lost / gained |",
            "|---|---|---:|---:|---|---:|---:|---:|", *rows, ""]


def mean_ruler(rec: dict) -> float | None:
    vals = [r["score"] for r in rec.get("ruler", {}).values() if r.get("score") is not None]
    return sum(vals) / len(vals) if vals else None


def is_legacy(records: list[dict]) -> bool:
    """Records measured before compressed prefill became the plugin's default (no ``prefill`` field): their
    RULER part ran with compressed prefill switched off, the rest with it on."""
    return not any("prefill" in r for r in records)


def is_exact_prefill(rec: dict) -> bool:
    """A ``+exactprefill`` record: compressed_prefill = false for its whole run."""
    return rec.get("prefill") == "exact"


def _mode_lines(records: list[dict]) -> list[str]:
    ops = sorted({r.get("ops") or "auto" for r in records if is_turboquant_spec(r)})
    lines = ["- Modes: every dtype runs **as served** unless its spec says `+exactprefill`: **compressed prefill** "
             "(the plugin's default) = prefill attention reads every token back from the cache (packed codes, or "
             "the exact bf16 copy of a protected token: the first S and last W of each sequence), which is what "
             "decode sees, so an answer does not depend on prefix-cache hits or chunking. vLLM 0.32's stock CPU "
             "attention (`auto`, `fp8`) also reads every token from the paged cache."]
    if any(is_exact_prefill(r) for r in records):
        lines.append("- `+exactprefill` = `additional_config={\"turboquant\": {\"compressed_prefill\": false}}` "
                     "for the whole run (vLLM's usual semantics: a prompt chunk attends to its own fresh K/V and "
                     "reads only earlier chunks from the cache; every decode step reads the cache).")
    lines.append("- **Realistic** parts ((c) needles, (d) facts, (e) generation) = the answer generated after the "
                 "prompt, greedy, in the dtype's mode above.")
    lines.append("- Engines: one in-process vLLM engine per dtype (`enforce_eager`), its mode fixed at start-up"
                 + (f"; TurboQuant attention: `VLLM_TURBOQUANT_OPS={'/'.join(ops)}`"
                    + (" (the torch reference ops)" if ops == ["torch"] else "") if ops else "") + ".")
    tiles = sorted({r["triton_config"] for r in records if r.get("triton_config") and r.get("ops") == "triton"})
    if tiles:
        lines.append(f"- Triton launch settings `VLLM_TURBOQUANT_TRITON_CONFIG={' / '.join(tiles)}` (under "
                     "`TRITON_INTERPRET=1`: the interpreter costs per operation, so larger tiles run faster; the "
                     "same kernels, only the order of fp32 merges changes).")
    return lines


def mean_facts(rec: dict) -> float | None:
    """Hit rate of a record's fact retrieval, all lengths pooled."""
    parts = (rec.get("facts_results") or {}).values()
    n = sum(p["n"] for p in parts)
    return sum(p["hits"] for p in parts) / n if n else None


def write_plots(records: list[dict], out: Path) -> list[Path]:
    """Perplexity and mean accuracy against bytes per token per KV head; PNGs beside ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    model = records[0]["model"] if records else ""
    tasks = records[0]["config"]["loglik_tasks"] if records else []

    def scatter(ax, ys, label, marker):
        pts = [(r["bytes_per_token_head"], y, r["spec"]) for r, y in zip(records, ys, strict=True) if y is not None]
        if not pts:
            return
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker, label=label)
        for x, y, spec in pts:
            ax.annotate(spec, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)

    has_ppl = any((r.get("ppl") or {}).get("ppl") for r in records)
    has_accuracy = any(mean_loglik(r, tasks) is not None or mean_ruler(r) is not None or mean_facts(r) is not None
                       for r in records)
    for kind in ("perplexity",) * has_ppl + ("accuracy",) * has_accuracy:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        if kind == "perplexity":
            scatter(ax, [(r.get("ppl") or {}).get("ppl") for r in records], "perplexity (compressed-prefill)", "o")
            ax.set_ylabel("perplexity (held-out Shakespeare, lower is better)")
        else:
            scatter(ax, [mean_loglik(r, tasks) for r in records], "mean loglik-task accuracy (compressed-prefill)", "o")
            scatter(ax, [mean_ruler(r) for r in records], "mean RULER score (realistic)", "s")
            scatter(ax, [mean_facts(r) for r in records], "fact-retrieval hit rate (realistic)", "^")
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


def _sizes(rec: dict) -> dict | None:
    """A record's ``spec_bytes`` (stored by the worker; recomputed for older records)."""
    if rec.get("sizes"):
        return rec["sizes"]
    try:
        f = rec["facts"]
        return spec_bytes(rec["spec"], f["head_dim"], f.get("num_layers"), f.get("dtype", "bfloat16"))
    except Exception:  # noqa: BLE001 - e.g. a preset renamed since
        return None


def _vs_plain(rec: dict) -> str:
    s = _sizes(rec)
    return "—" if not s or not s.get("plain") else f"{s['ratio_to_plain']:.2f}× `{s['plain']}`"


def _encoding(rec: dict) -> str:
    enc = rec.get("encoding")
    if enc is None:
        try:
            enc = encoding(parse_spec(rec["spec"]).preset)
        except Exception:  # noqa: BLE001
            return "?"
    nocenter = "+nocenter" in rec.get("spec", "")
    cal = (f" calibrated (Shakespeare{', keys not centred' if nocenter else ''})" if rec.get("calibrated") else
           " auto-calibrated" if "+autocal" in rec.get("spec", "") else
           " auto-calibrated" if rec.get("calibration") == "auto" and rec.get("calibration_file") else "")
    return enc + cal + (f", edge {rec['edge']} bf16" if rec.get("edge") else "")


def _frontier_section(records: list[dict], base: dict | None) -> list[str]:
    """Perplexity per byte budget (nearest plain preset) and protected-token setting, best first."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        s = _sizes(r)
        if s and s.get("plain") and (r.get("ppl") or {}).get("ppl") and not is_exact_prefill(r):
            groups.setdefault((s["plain_bytes"], s["plain"], tuple(r.get("protected") or ())), []).append(r)
    if not base or not (base.get("ppl") or {}).get("ppl") or not any(len(g) > 1 for g in groups.values()):
        return []
    b = base["ppl"]["ppl"]
    L = ["## Frontier per byte budget\n",
         "Configurations grouped by the plain preset nearest in bytes and by protected tokens, lowest "
         "perplexity first (Δ % vs `auto`).\n",
         "| budget | S / W | dtype | encoding | bytes | vs plain | Δ ppl % |", "|---|---|---|---|---:|---:|---:|"]
    for (_, plain, sw), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][2])):
        for r in sorted(rs, key=lambda r: r["ppl"]["ppl"]):
            s = _sizes(r)
            L.append(f"| `{plain}` | {'{} / {}'.format(*sw) if sw else '—'} | `{r['spec']}` | {_encoding(r)} | "
                     f"{r['bytes_per_token_head']} | {s['ratio_to_plain']:.2f}× | "
                     f"{100 * (r['ppl']['ppl'] / b - 1):+.1f}% |")
    L.append("")
    return L


def paired_ppl_delta(rec: dict, ref: dict) -> tuple[float, float, float] | None:
    """Perplexity of ``rec`` minus ``ref``'s on the same windows, with a 95% interval from the per-window
    differences of log perplexity (Student t over the windows; windows hold equal token counts). None with
    fewer than two windows or different windows."""
    from scipy import stats

    a, b = (rec.get("ppl") or {}).get("window_ppl"), (ref.get("ppl") or {}).get("window_ppl")
    if not a or not b or len(a) != len(b) or len(a) < 2:
        return None
    d = [math.log(x) - math.log(y) for x, y in zip(a, b, strict=True)]
    n = len(d)
    mean = sum(d) / n
    half = stats.t.ppf(0.975, n - 1) * math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1) / n)
    base = ref["ppl"]["ppl"]
    return rec["ppl"]["ppl"] - base, base * (math.exp(mean - half) - 1), base * (math.exp(mean + half) - 1)


def _ops_section(records: list[dict]) -> list[str]:
    """Each TurboQuant row against the ``+opstorch`` row of the same encoding, paired over windows."""
    refs = {r["spec"].replace("+opstorch", ""): r for r in records if r["spec"].endswith("+opstorch")}
    rows = []
    for r in records:
        ops = parse_spec(r["spec"]).ops if is_turboquant_spec(r) else None
        ref = refs.get(r["spec"].replace(f"+ops{ops}", "")) if ops and ops != "torch" else None
        got = paired_ppl_delta(r, ref) if ref else None
        if got:
            rows.append(f"| `{r['spec']}` | `{ref['spec']}` | {got[0]:+.3f} | [{got[1]:+.3f}, {got[2]:+.3f}] |")
    if not rows:
        return []
    return ["Against the torch reference ops on the same windows (Δ perplexity; 95% interval of the mean from "
            "the per-window differences of log perplexity, Student t):\n",
            "| dtype | reference | Δ perplexity | 95% interval |", "|---|---|---:|---|", *rows, ""]


def _perplexity_section(records: list[dict], base: dict | None, cfg: dict, facts: dict, legacy: bool) -> list[str]:
    L: list[str] = []
    L.append("## (a) Perplexity — compressed-prefill mode\n" if legacy else
             "## (a) Perplexity — as served (compressed prefill)\n")
    L.append(f"Held-out Shakespeare (`shakespeare_heldout.txt`), {cfg['ppl_windows']} windows × "
             f"{cfg['ppl_window_tokens']} tokens, teacher-forced (`evals/perplexity.py`).\n")
    L.append("S / W = protected tokens (sink, recent window) read exactly; the packed slot bytes are shown, "
             "the exact copies' blocks cost what the capacity table below shows.\n")
    L.append("`vs plain` = these bytes / the slot of the plain preset (turboquant2/3/4) nearest in bytes "
             "(`+edgeN`: bytes averaged over layers, N first and N last layers at bf16).\n")
    L.append("| dtype | S / W | bytes/token/KV head | vs plain | encoding | perplexity | Δ vs auto | scored tokens "
             "| per window |")
    L.append("|---|---|---:|---|---|---:|---:|---:|---|")
    bp = (base or {}).get("ppl") or {}
    for r in records:
        p = r.get("ppl") or {}
        sw = "—" if not r.get("protected") else "{} / {}".format(*r["protected"])
        head = f"| `{r['spec']}` | {sw} | {r['bytes_per_token_head']} | {_vs_plain(r)} | {_encoding(r)} |"
        if not p:
            L.append(f"{head} failed | | | |")
            continue
        d = _delta(p["ppl"], bp.get("ppl"), 2, pct=True).strip(" ()") if bp and r is not base else ""
        L.append(f"{head} {p['ppl']:.2f} | {d} | {p['tokens']} | "
                 f"{', '.join(f'{w:.1f}' for w in p['window_ppl'])} |")
    L.append("")
    L.extend(_ops_section(records))
    if any(is_exact_prefill(r) for r in records):
        L.append("`+exactprefill` rows: each window is prefilled in one step and attends to its own fresh K/V, so "
                 "no scored token reads the cache: their perplexity measures the attention path, not the cache "
                 "format (it should match `auto`).\n")
    L.extend(_frontier_section(records, base))
    sws = sorted({tuple(r["protected"]) for r in records if r.get("protected") and sum(r["protected"])})
    if sws:
        from vllm_turboquant.memory import packed_capacity_ratio

        lens = (4096, 32768, 131072)
        names = sorted({r["kv_cache_dtype"] for r in records
                        if r.get("protected") and r["kv_cache_dtype"] in PLAIN_PRESETS})
        L.append("KV capacity vLLM reports against bf16 in the same space, with each protected-token setting "
                 "(a running request's sink and window copies are bf16 rows in blocks vLLM counts; block size "
                 f"128, head_dim {facts['head_dim']}; `memory.packed_capacity_ratio`):\n")
        L.append("| S / W | dtype | " + " | ".join(f"{n // 1024}K" for n in lens) + " |")
        L.append("|---|---|" + "---:|" * len(lens))
        for S, W in sws:
            for name in names:
                ratios = [packed_capacity_ratio(name, facts["head_dim"], n, 128, S, W) for n in lens]
                L.append(f"| {S} / {W} | `{name}` | " + " | ".join(f"{x:.2f}x" for x in ratios) + " |")
        L.append("")

    return L


def facts_summary(rec: dict, base: dict | None, length: str) -> dict | None:
    """Hits, Wilson 95% interval and the pairing with ``base`` of one record's facts at one length."""
    from evals.facts import wilson

    part = (rec.get("facts_results") or {}).get(length)
    if not part:
        return None
    n, hits = part["n"], part["hits"]
    out = {"n": n, "hits": hits, "rate": hits / n if n else None, "ci": wilson(hits, n)}
    bpart = (base or {}).get("facts_results", {}).get(length) if base is not None and base is not rec else None
    if bpart:
        a, b = part["samples"], bpart["samples"]
        common = set(a) & set(b)
        out.update(_paired_hits({k: x["hit"] for k, x in a.items()}, {k: x["hit"] for k, x in b.items()}))
        out["same_answer"] = sum(a[k]["answer"] == b[k]["answer"] for k in common)
        out["prompts_match"] = all(a[k]["prompt_sha"] == b[k]["prompt_sha"] for k in common)
    return out


def _facts_section(records: list[dict], base: dict | None, cfg: dict) -> list[str]:
    from evals.facts import DEPTHS

    L = ["## (d) Fact retrieval — realistic, as served (compressed prefill; `+exactprefill` rows: exact prefill)\n",
         f"`evals/facts.py`: {cfg['facts_n']} seeded passages per length (seed {cfg.get('facts_seed', 0)}) of "
         "held-out Shakespeare with 1 or 3 facts (access codes, names, cities, weights) at 10% / 50% / 90% of "
         "the passage, a question about one of them after the passage (the model's chat template when it has "
         f"one), greedy, up to {cfg.get('facts_gen_toks', 24)} new tokens. Hit = the asked value in the answer "
         "as a whole word and no distractor's value. `95% CI` = Wilson interval of the hit rate. `same hit` = "
         "samples scored as `auto` scored them; `same answer` = identical answer text; `lost` / `gained` = "
         "`auto` hit and this dtype missed / the reverse (the paired difference is `gained − lost`; `p` = two-sided "
         "exact sign test of lost against gained).\n"]
    lengths = sorted({k for r in records for k in (r.get("facts_results") or {})}, key=int)
    L.append("| dtype | length | tokens (mean) | hits | rate | 95% CI | Δ vs auto | same hit | same answer | "
             "lost / gained |")
    L.append("|---|---:|---:|---:|---:|---|---:|---:|---:|---:|")
    for length in lengths:
        for r in records:
            sm = facts_summary(r, base, length)
            if sm is None:
                continue
            toks = [x["tokens"] for x in r["facts_results"][length]["samples"].values()]
            bsm = facts_summary(base, None, length) if base else None
            d = "" if r is base or not bsm else f"{sm['hits'] - bsm['hits']:+d}"
            paired = ("—", "—", "—") if "paired" not in sm else (
                f"{sm['same_hit']}/{sm['paired']}", f"{sm['same_answer']}/{sm['paired']}",
                _lost_gained(sm))
            L.append(f"| `{r['spec']}` | {length} | {sum(toks) / len(toks):.0f} | {sm['hits']}/{sm['n']} | "
                     f"{sm['rate']:.3f} | [{sm['ci'][0]:.3f}, {sm['ci'][1]:.3f}] | {d} | " + " | ".join(paired) + " |")
    L.append("")
    # hits by depth
    L.append("Hits by the asked fact's depth (and by the number of facts in the passage):\n")
    L.append("| dtype | length | " + " | ".join(DEPTHS) + " | 1 fact | 3 facts |")
    L.append("|---|---:|" + "---:|" * (len(DEPTHS) + 2))
    for length in lengths:
        for r in records:
            part = (r.get("facts_results") or {}).get(length)
            if not part:
                continue
            smp = part["samples"].values()
            cells = []
            for pred in [lambda x, d=d: x["depth"] == d for d in DEPTHS] + [lambda x: x["n_facts"] == 1,
                                                                             lambda x: x["n_facts"] > 1]:
                sel = [x for x in smp if pred(x)]
                cells.append(f"{sum(x['hit'] for x in sel)}/{len(sel)}")
            L.append(f"| `{r['spec']}` | {length} | " + " | ".join(cells) + " |")
    L.append("")
    # samples whose hit differs from auto's
    if base:
        rows = []
        for length in lengths:
            b = (base.get("facts_results") or {}).get(length, {}).get("samples", {})
            for r in records:
                if r is base:
                    continue
                for sid, x in sorted(((r.get("facts_results") or {}).get(length, {}).get("samples") or {}).items()):
                    if sid in b and x["hit"] != b[sid]["hit"]:
                        rows.append(f"| {sid} | `{r['spec']}` | {x['depth']} | {x['kind']} | {x['n_facts']} | "
                                    f"{x['expected']} | {_cell(b[sid]['answer'])} | {_cell(x['answer'])} |")
        if rows:
            L.append("<details><summary>samples scored differently from auto "
                     f"({len(rows)}; every sample's record is in the JSON)</summary>\n")
            L.append("| sample | dtype | depth | kind | facts | expected | auto's answer | this answer |")
            L.append("|---|---|---|---|---:|---|---|---|")
            L.extend(rows)
            L.append("\n</details>\n")
    return L


def _cell(text: str, n: int = 60) -> str:
    t = " ".join(str(text).split())
    t = t[:n] + ("…" if len(t) > n else "")
    return t.replace("|", "\\|") or "(empty)"


def divergence_summary(rec: dict, base: dict) -> dict | None:
    """Tokens before the first divergence from ``base``'s greedy answer, per prompt, and their mean with a 95%
    interval; prompts identical over all generated tokens."""
    from evals.generation import first_divergence, mean_interval

    a, b = rec.get("divergence") or {}, base.get("divergence") or {}
    common = sorted(set(a) & set(b), key=int)
    if not common or rec is base:
        return None
    firsts = [first_divergence(b[k]["token_ids"], a[k]["token_ids"]) for k in common]
    identical = sum(a[k]["token_ids"] == b[k]["token_ids"] for k in common)
    m, lo, hi = mean_interval([float(x) for x in firsts])
    return {"n": len(common), "firsts": firsts, "mean": m, "ci": (lo, hi), "identical": identical,
            "median": sorted(firsts)[len(firsts) // 2]}


def _divergence_section(records: list[dict], base: dict | None, cfg: dict) -> list[str]:
    L = ["## (e) Greedy divergence from bf16 — realistic, as served (compressed prefill; `+exactprefill` rows: "
         "exact prefill)\n",
         f"`evals/generation.py`: {cfg['divergence_n']} chat prompts (those of `benchmarks/smollm2_checks.py "
         f"divergence`), greedy, {cfg['divergence_tokens']} new tokens; per prompt the generated tokens before the "
         "first one that differs from `auto`'s answer. 95% CI: normal approximation of the mean over prompts.\n"]
    if not base:
        return L + ["No `auto` record: nothing to compare.\n"]
    L.append("| dtype | prompts | mean tokens before first divergence | 95% CI | median | identical to bf16 "
             "(all tokens) | per prompt |")
    L.append("|---|---:|---:|---|---:|---:|---|")
    for r in records:
        sm = divergence_summary(r, base)
        if sm is None:
            continue
        L.append(f"| `{r['spec']}` | {sm['n']} | {sm['mean']:.1f} | [{sm['ci'][0]:.1f}, {sm['ci'][1]:.1f}] | "
                 f"{sm['median']} | {sm['identical']}/{sm['n']} | {', '.join(map(str, sm['firsts']))} |")
    L.append("")
    return L


def render_report(records: list[dict], meta: dict, plot_names: list[str] | None = None) -> str:
    """The markdown report of one run (records: one per dtype spec, ``auto`` first when present)."""
    if not records:
        return "# KV-cache dtype evaluation\n\nNo results.\n"
    base = next((r for r in records if r["spec"] == "auto"), None)
    first = records[0]
    cfg, facts = first["config"], first["facts"]
    bf16_bytes = bytes_per_token_head("auto", facts["head_dim"], "bfloat16")
    tasks = cfg["loglik_tasks"]
    legacy = is_legacy(records)
    L: list[str] = []
    L.append(f"# KV-cache dtype evaluation: {first['model']} ({cfg['suite']} suite)\n")
    L.append(f"Generated by `{portable_text(meta.get('command', 'python -m evals.run'))}` on {meta.get('date', '')} "
             f"({meta.get('machine', '')}; vLLM {meta.get('vllm', '?')}, lm-eval {meta.get('lm_eval', '?')}). "
             f"Total wall time {meta.get('total_s', 0) / 60:.1f} min"
             + (f" (this invocation; its {len(records)} dtype workers took {meta['workers_s'] / 60:.1f} min, "
                "some measured by an earlier invocation and reused)"
                if meta.get("workers_s", 0) > meta.get("total_s", 0) + 60 else "")
             + (f"; machine load (1/5/15-min averages) {'/'.join(f'{x:.1f}' for x in meta['load']['start'])} at "
                f"the start, {'/'.join(f'{x:.1f}' for x in meta['load']['end'])} at the end"
                if meta.get("load") else "") + ".\n")
    L.append(f"- Model: `{first['model']}` (`{display_path(first['model_path'])}`), head_dim {facts['head_dim']}, "
             f"{facts.get('num_layers')} layers, {facts.get('num_kv_heads')} KV heads; weights dequantised from "
             "a GGUF (compare dtypes with each other, not with leaderboards).")
    L.append("- Baseline: `auto` (bf16 KV cache) measured in this same run; every Δ is against it."
             if base else "- **No `auto` baseline in this run: no deltas.**")
    if legacy:
        L.append("- Modes: **compressed-prefill** = prefill attention reads every earlier token's K/V "
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
    else:
        L.extend(_mode_lines(records))
    if any(r.get("calibrated") for r in records):
        L.append(f"- `+calibrated`: per-head codebooks fitted on {CALIBRATION_TOKENS} tokens of the Shakespeare "
                 "*train* split (`vllm_turboquant.calibrate`), cached per model and preset (in-domain for the "
                 "perplexity text); keys centred on the fitted per-head means unless `+nocenter`.")
    if any(r.get("calibration") == "auto" for r in records):
        L.append("- Plain presets run as served: **auto-calibrated** = codebooks and key means fitted at first "
                 "start on the package's built-in text (`vllm_turboquant/data/calibration.txt`: prose, a chat "
                 "and Python docstrings; out of domain for every eval here); its one-off cost is the `calibrate` "
                 "time. `+nocal` = data-oblivious codebooks (`calibration=none`).")
    L.append("")

    # Sizes and wall time
    L.append("## Cache size and wall time\n")
    extra = [(k, h) for k, h in (("facts", "(d) facts s"), ("divergence", "(e) generation s"))
             if any(k in r.get("timings", {}) and cfg.get(f"{k}_n") for r in records)]
    L.append("Bytes per token per KV head = key + value storage in the cache (TurboQuant: the packed slot, "
             f"metadata and padding included; bf16 = {bf16_bytes}). Wall time: the dtype's worker process "
             "(engine start + (a) + (b) + (c)" + "".join(f" + {h.split()[0]}" for _, h in extra) + ").\n")
    L.append("| dtype | bytes/token/KV head | compression vs bf16 | engine s | (a) ppl s | (b) loglik s "
             "| (c) RULER s |" + "".join(f" {h} |" for _, h in extra) + " total s |")
    L.append("|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(extra) + "---:|")
    for r in records:
        t = r.get("timings", {})
        b = r["bytes_per_token_head"]
        eng = t.get("engine", 0) + t.get("engine2", 0) + t.get("calibrate", 0)
        total = t.get("process", t.get("worker_total", 0))
        L.append(f"| `{r['spec']}` | {b} | {bf16_bytes / b:.2f}× | {eng:.0f} | {t.get('ppl', 0):.0f} | "
                 f"{t.get('loglik', 0):.0f} | {t.get('ruler', 0):.0f} |"
                 + "".join(f" {t.get(k, 0):.0f} |" for k, _ in extra) + f" {total:.0f} |")
    L.append("")

    # (a) perplexity
    if cfg["ppl_windows"]:
        L.extend(_perplexity_section(records, base, cfg, facts, legacy))

    # (b) loglik
    if tasks:
        n_per = {t: (base or first).get("loglik", {}).get(t, {}).get("n") for t in tasks}
        limit = cfg["loglik_limit"]
        L.append("## (b) Loglikelihood tasks — compressed-prefill mode\n" if legacy else
                 "## (b) Loglikelihood tasks — as served (compressed prefill)\n")
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
        L.append("## (c) Needle retrieval (RULER) — realistic mode\n" if legacy else
                 "## (c) Needle retrieval (RULER) — realistic, as served (compressed prefill; `+exactprefill` rows: "
                 "exact prefill)\n")
        L.append(f"lm-eval RULER generators (`tq_ruler` tasks), context lengths {cfg['ruler_lengths']} tokens, "
                 f"{cfg['ruler_samples']} samples per task and length, greedy, up to "
                 f"{cfg.get('ruler_gen_toks', 128)} new tokens (the answers are < 32 tokens); "
                 "score = RULER string_match_all. Cells: score (Δ vs auto).\n")
        paired = any(v.get("samples") for r in records for v in r.get("ruler", {}).values())
        if paired:
            L.append("`same` = samples (all lengths pooled) whose score equals `auto`'s on the same sample.\n")
        L.append("| dtype | " + " | ".join(k.replace("tq_", "") for k in keys) + " | mean |"
                 + (" same |" if paired else ""))
        L.append("|---|" + "---:|" * (len(keys) + 1 + paired))
        for r in records:
            cells = []
            for k in keys:
                v = r.get("ruler", {}).get(k, {}).get("score")
                bv = base.get("ruler", {}).get(k, {}).get("score") if base else None
                cells.append(_fmt(v, 2) + (_delta(v, bv, 2) if base and r is not base else ""))
            m = mean_ruler(r)
            mb = mean_ruler(base) if base else None
            same = ""
            if paired:
                ag, tot = ruler_agreement(r, base) if base and r is not base else (None, 0)
                same = " — |" if ag is None else f" {ag}/{tot} |"
            L.append(f"| `{r['spec']}` | " + " | ".join(cells) + f" | {_fmt(m, 2)}"
                     + (_delta(m, mb, 2) if base and r is not base else "") + " |" + same)
        L.append("")
        L.extend(_ruler_hits_table(records, base, keys))

    if cfg.get("facts_n"):
        L.extend(_facts_section(records, base, cfg))
    if cfg.get("divergence_n"):
        L.extend(_divergence_section(records, base, cfg))

    if plot_names:
        L.append("## Plots\n")
        for name in plot_names:
            L.append(f"![{name}]({name})")
        L.append("")
    errs = [(r["spec"], e) for r in records for e in r.get("errors", [])]
    if errs:
        L.append("## Errors\n")
        for spec, e in errs:
            L.append(f"- `{spec}`: {portable_text(e)}")
        L.append("")
    return "\n".join(L)


def is_turboquant_spec(rec: dict) -> bool:
    try:
        return is_turboquant(rec["kv_cache_dtype"])
    except Exception:  # noqa: BLE001
        return rec["kv_cache_dtype"].startswith("turboquant")


def write_report(records: list[dict], out: Path, meta: dict, plots: bool = True) -> list[Path]:
    """Write ``out`` (markdown), ``<out stem>.json`` (raw records) and the PNG plots; returns the paths.

    Neither file records an absolute path (``evals.paths.portable_record``): the command line, model folder,
    calibration files and error messages are shown relative to the repository or the home folder."""
    records = [portable_record(r) for r in records]
    meta = {**meta, "command": portable_text(meta["command"])} if "command" in meta else dict(meta)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pngs = write_plots(records, out) if plots and records else []
    out.write_text(render_report(records, meta, [p.name for p in pngs]))
    raw = out.with_suffix(".json")
    raw.write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    return [out, raw, *pngs]

