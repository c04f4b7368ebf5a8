"""The two-criterion preset frontier (accuracy frontier II), computed from the stored reports.

    python -m evals.frontier            # print the three budgets' tables (markdown) and what each selects

The rule (``docs/results.md``): at each byte budget (a candidate's slot within ±6% of the plain preset's at both
head sizes), a candidate's losses are its compressed-prefill perplexity Δ% against ``auto`` divided by the
budget's perplexity target, and its fact-retrieval loss (``auto``'s hits minus its hits per 100 passages)
divided by the budget's retrieval target, on each eval model; its score is the worst of them. The budget selects
the servable candidate with every loss measured and the smallest score; a score <= 1 meets every target.
A candidate with losses missing has a lower bound (the worst measured): it is out when that bound is above the
selection's score, undecided otherwise. Servable = what a preset can hold: automatic calibration or none, not
a calibration fitted on the eval's own domain (``+calibrated``: Shakespeare train text) and no reference-only
encoder (``+lsq``: the Triton and CPU ops do not encode it).

Each Δ is against the ``auto`` row of the same report. Sources per criterion are read in order; the first
report holding a spec wins (newest measurements first).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field

from evals.paths import RESULTS_DIR
from evals.spec import parse_spec

MODELS = {"smollm2": 64, "gemma3": 256}  # eval model -> head_dim
#: per budget: (perplexity target in %, retrieval target in hits per 100 passages), from the frontier issue
TARGETS = {"turboquant4": (0.5, 1.0), "turboquant3": (2.0, 2.0), "turboquant2": (8.0, 6.0)}
BYTES_TOLERANCE = 0.06
#: compressed-prefill perplexity reports of the ``ppl`` suite (SmolLM2 4 x 1024, Gemma-3 2 x 2048 tokens)
PPL_SOURCES = ("levers/ppl_{model}_34bit", "levers/ppl_{model}_3bit", "levers/ppl_{model}", "frontier/{model}",
               "ppl/{model}")
#: fact-retrieval reports (100 passages of 1K tokens)
FACTS_SOURCES = ("facts/{model}_1k", "levers/facts_{model}_34bit", "levers/facts_{model}_3bit", "levers/facts_{model}",
                 "frontier/facts_{model}_1k")
FACTS_LENGTH = "1024"


@dataclass
class Candidate:
    spec: str
    encoding: str = ""
    ratio: dict[str, float] = field(default_factory=dict)  # model -> bytes / plain preset's bytes
    plain: dict[str, str] = field(default_factory=dict)    # model -> the plain preset nearest in bytes
    protected: tuple[int, int] = (0, 0)                    # (S, W)
    ppl: dict[str, float] = field(default_factory=dict)    # model -> perplexity Δ% vs auto
    facts: dict[str, int] = field(default_factory=dict)    # model -> auto's hits - its hits (per 100)

    def servable(self) -> bool:
        s = parse_spec(self.spec)
        return not s.calibrated and "+lsq" not in self.spec and s.edge == 0

    def losses(self, budget: str) -> dict[str, float]:
        tp, tf = TARGETS[budget]
        out = {f"ppl {m}": v / tp for m, v in self.ppl.items()}
        out.update({f"facts {m}": v / tf for m, v in self.facts.items()})
        return out

    def complete(self) -> bool:
        return all(m in self.ppl and m in self.facts for m in MODELS)


def _records(path: str) -> list[dict]:
    f = RESULTS_DIR / f"{path}.json"
    return json.loads(f.read_text())["records"] if f.exists() else []


def _budget(c: Candidate) -> str | None:
    """The plain preset nearest in bytes (as each report recorded it) when this spec's slot bytes are within
    BYTES_TOLERANCE of its at every eval head size measured and it keeps no more exact copies (S + W) than
    that preset: a longer window is bought with bytes the slot does not show (a lever, not a candidate)."""
    from vllm_turboquant.presets import PRESETS

    plains = set(c.plain.values())
    if len(plains) != 1 or any(abs(r - 1) > BYTES_TOLERANCE for r in c.ratio.values()):
        return None
    plain = plains.pop()
    return plain if sum(c.protected) <= PRESETS[plain].sink + PRESETS[plain].window else None


def collect() -> dict[str, Candidate]:
    """Every TurboQuant spec with a measurement in the sources, its losses filled in where measured."""
    cands: dict[str, Candidate] = {}

    def cand(rec: dict, model: str) -> Candidate:
        c = cands.setdefault(rec["spec"], Candidate(rec["spec"], rec.get("encoding") or "",
                                                    protected=tuple(rec.get("protected") or (0, 0))))
        sizes = rec.get("sizes") or {}
        c.ratio[model], c.plain[model] = sizes.get("ratio_to_plain") or 1.0, sizes.get("plain")
        return c

    for model in MODELS:
        for src in PPL_SOURCES:
            recs = _records(src.format(model=model))
            base = next((r for r in recs if r["spec"] == "auto" and r.get("ppl")), None)
            for r in recs:
                if base and r["spec"] != "auto" and r.get("ppl") and parse_spec(r["spec"]).turboquant:
                    c = cand(r, model)
                    c.ppl.setdefault(model, 100 * (r["ppl"]["ppl"] / base["ppl"]["ppl"] - 1))
        for src in FACTS_SOURCES:
            recs = _records(src.format(model=model))
            hits = {r["spec"]: (r.get("facts_results") or {}).get(FACTS_LENGTH, {}).get("hits") for r in recs}
            if hits.get("auto") is None:
                continue
            for r in recs:
                if r["spec"] != "auto" and hits[r["spec"]] is not None and parse_spec(r["spec"]).turboquant:
                    cand(r, model).facts.setdefault(model, hits["auto"] - hits[r["spec"]])
    return cands


def frontier(cands: dict[str, Candidate]) -> dict[str, list[tuple[Candidate, float, str]]]:
    """Per budget: (candidate, score or lower bound, verdict) sorted by score; verdicts: selected, out,
    undecided, not servable."""
    out: dict[str, list] = {}
    for budget in TARGETS:
        rows = [c for c in cands.values() if _budget(c) == budget and c.ppl]
        scored = [(c, max(c.losses(budget).values())) for c in rows]
        complete = [(c, s) for c, s in scored if c.complete() and c.servable()]
        best = min(complete, key=lambda cs: cs[1], default=None)
        table = []
        for c, s in sorted(scored, key=lambda cs: cs[1]):
            if not c.servable():
                verdict = "not servable"
            elif best is not None and c is best[0]:
                verdict = "**selected**"
            elif best is not None and s > best[1]:
                verdict = "out"
            elif c.complete():
                verdict = "tie" if best is not None and math.isclose(s, best[1]) else "out"
            else:
                verdict = "undecided"
            table.append((c, s, verdict))
        out[budget] = table
    return out


def render(result: dict[str, list[tuple[Candidate, float, str]]]) -> str:
    def cell(d: dict, m: str, fmt: str) -> str:
        return fmt.format(d[m]) if m in d else "—"

    lines = []
    for budget, rows in result.items():
        tp, tf = TARGETS[budget]
        lines.append(f"**`{budget}` budget** (targets: perplexity ≤ +{tp:g}%, retrieval within {tf:g} of `auto`)\n")
        lines.append("| spec | encoding | bytes × plain (d = 64 / 256) | ppl Δ SmolLM2 / Gemma-3 "
                     "| facts lost SmolLM2 / Gemma-3 | worst normalised loss | verdict |")
        lines.append("|---|---|---|---:|---:|---:|---|")
        for c, score, verdict in rows:
            ratio = " / ".join(f"{c.ratio.get(m, 1.0):.2f}" for m in MODELS)
            ppl = " / ".join(cell(c.ppl, m, "{:+.1f}%") for m in MODELS)
            facts = " / ".join(cell(c.facts, m, "{:d}") for m in MODELS)
            bound = "" if c.complete() else "≥ "
            lines.append(f"| `{c.spec}` | {c.encoding} | {ratio} | {ppl} | {facts} | {bound}{score:.2f} | {verdict} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    if argv:
        print(__doc__)
        return 0 if argv[0] in ("-h", "--help") else 2
    print(render(frontier(collect())))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
