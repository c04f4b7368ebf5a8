"""The two-criterion frontier (``evals.frontier``): the rule on made-up candidates, and its inputs read back
from the stored reports."""

from __future__ import annotations

import pytest

from evals import frontier as fr


def _cand(spec, ppl, facts, plain="turboquant3", protected=(4, 64)):
    return fr.Candidate(spec, ratio={m: 1.0 for m in fr.MODELS}, plain={m: plain for m in fr.MODELS},
                        protected=protected, ppl=dict(zip(fr.MODELS, ppl, strict=True)),
                        facts=dict(zip(fr.MODELS, facts, strict=True)) if facts else {})


def test_rule_selects_the_smallest_worst_normalised_loss():
    """turboquant3 budget: perplexity / 2%, retrieval / 2 hits. A beats B on perplexity but loses more facts;
    C has no retrieval yet and its perplexity bound is below the selection (undecided); D's bound is above
    it (out); E is fitted on the eval's domain; F keeps a longer window (not in the budget)."""
    cands = {c.spec: c for c in [
        _cand("A", (1.0, 1.0), (8, 2)),               # worst 4.0
        _cand("B", (3.0, 2.0), (2, 4)),               # worst 2.0
        _cand("C", (1.0, 1.0), None),                 # >= 0.5
        _cand("D", (9.0, 1.0), None),                 # >= 4.5
        _cand("tq:k4v2+calibrated+s4w64", (0.1, 0.1), (0, 0)),
        _cand("F", (0.1, 0.1), (0, 0), protected=(4, 256)),
    ]}
    rows = {c.spec: (score, verdict) for c, score, verdict in fr.frontier(cands)["turboquant3"]}
    assert rows["B"] == (pytest.approx(2.0), "**selected**")
    assert rows["A"] == (pytest.approx(4.0), "out")
    assert rows["C"] == (pytest.approx(0.5), "undecided")
    assert rows["D"] == (pytest.approx(4.5), "out")
    assert rows["tq:k4v2+calibrated+s4w64"][1] == "not servable"
    assert "F" not in rows


def test_inputs_match_the_stored_reports():
    """Losses come from the reports' own auto rows: the fact-retrieval report has auto 53, turboquant3 47 on
    SmolLM2 (100 x 1K), the ppl-suite reports turboquant3 at +3.2% / +1.5%."""
    c = fr.collect()["turboquant3"]
    assert c.facts["smollm2"] == 6
    assert c.ppl["smollm2"] == pytest.approx(3.2, abs=0.05) and c.ppl["gemma3"] == pytest.approx(1.5, abs=0.05)
    assert "| `turboquant3` | K4 / V2 |" in fr.render(fr.frontier(fr.collect()))
