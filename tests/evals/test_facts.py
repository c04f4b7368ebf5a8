"""The facts and divergence suites and the ``+exactprefill`` mode of the runner: passage building, scoring and
intervals without a model (a whitespace tokenizer), the report on fake records, and one end-to-end smoke
(``test_facts_smoke_smollm2``: SmolLM2 with a bf16 cache, 3 passages of 256 tokens, ~30-50 s on 2 CPU cores once
the model is cached; it needs no lm-eval)."""

from __future__ import annotations

import json
import os
import re
import zlib

import pytest

from evals import engine, facts, generation, report, suites
from evals import spec as specs

FILLER = "\n".join(f"Line {i} of the filler: the quick brown fox jumps over the lazy dog number {i % 7}."
                   for i in range(400))


class WordTokenizer:
    """Tokens = whitespace-separated words (ids from a growing vocabulary); no chat template."""

    chat_template = None
    bos_token_id = 0

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def _ids(self, text: str) -> list[int]:
        return [self.vocab.setdefault(w, len(self.vocab) + 1) for w in text.split()]

    def __call__(self, text, add_special_tokens=False):
        class Out:
            pass

        out = Out()
        out.input_ids = [self._ids(t) for t in text] if isinstance(text, list) else self._ids(text)
        return out


def test_design_balances_depth_kind_and_fact_count():
    combos = [(d, k.name, n) for d, k, n in map(facts.design, range(24))]
    assert len(set(combos)) == 24   # 3 depths x 4 kinds x {1, 3} facts, each once per 24 samples
    assert [c[0] for c in combos[:3]] == ["start", "middle", "end"]


def test_samples_are_seeded_and_place_the_facts():
    tok = WordTokenizer()
    a = facts.build_samples(tok, FILLER, [200, 400], 6, seed=0)
    b = facts.build_samples(WordTokenizer(), FILLER, [200, 400], 6, seed=0)
    c = facts.build_samples(WordTokenizer(), FILLER, [200], 6, seed=1)
    assert [s.prompt_sha for s in a] == [s.prompt_sha for s in b]         # same seed: same prompts
    assert [s.prompt_sha for s in a[:6]] != [s.prompt_sha for s in c]     # another seed: others
    assert [s.id for s in a] == [f"L{n}-{i:03d}" for n in (200, 400) for i in range(6)]
    for s in a:
        assert abs(s.tokens - s.length) <= 25, (s.id, s.tokens)          # about the target length
        assert len(s.distractors) == s.n_facts - 1 and s.expected not in s.distractors
        assert s.question.endswith("?")
        frac = facts.DEPTHS[s.depth]
        assert abs(s.fact_positions[0] / s.tokens - frac) < 0.15          # the asked fact at its depth
    s = a[0]
    assert s.depth == "start" and s.kind == "code" and s.n_facts == 1 and re.fullmatch(r"\d{4}", s.expected)


def test_values_never_occur_in_the_filler():
    with pytest.raises(ValueError, match="Nairobi"):
        facts.build_samples(WordTokenizer(), FILLER + "\nto Nairobi!", [200], 1)


def test_score_answer():
    assert facts.score_answer("The access code of the blue door is 7341.", "7341")
    assert not facts.score_answer("The code is 73410.", "7341")                     # inside a longer number
    assert not facts.score_answer("It is 7341 or 1234.", "7341", ["1234"])          # a distractor too
    assert facts.score_answer("the keeper is named ingrid", "Ingrid")               # case-insensitive
    assert not facts.score_answer("Ingridson", "Ingrid")                            # whole word only
    assert not facts.score_answer("", "Oslo")


def test_wilson_interval():
    lo, hi = facts.wilson(5, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.2366, 0.7634)
    lo, hi = facts.wilson(0, 10)
    assert lo == 0.0 and round(hi, 4) == 0.2775
    assert facts.wilson(48, 48)[1] == 1.0 and facts.wilson(0, 0) == (0.0, 1.0)


def test_first_divergence_and_interval():
    assert generation.first_divergence([1, 2, 3], [1, 2, 4]) == 2
    assert generation.first_divergence([1, 2, 3], [1, 2, 3]) == 3
    assert generation.first_divergence([1, 2], [1, 2, 3]) == 2
    m, lo, hi = generation.mean_interval([2.0, 4.0, 6.0])
    assert m == 4.0 and lo < 4.0 < hi


def test_exactprefill_spec_and_engine_args():
    s = specs.parse_spec("turboquant3+exactprefill")
    assert s.exact_prefill and s.dtype == "turboquant3" and specs.prefill_mode(s) == "exact"
    assert specs.prefill_mode("turboquant3") == "compressed" and specs.prefill_mode("auto") == "compressed"
    assert specs.parse_spec("tq:k4v2+s4w64+exactprefill").exact_prefill
    with pytest.raises(ValueError, match="exactprefill"):
        specs.parse_spec("auto+exactprefill")
    with pytest.raises(ValueError, match="twice"):
        specs.parse_spec("turboquant3+exactprefill+exactprefill")
    model = {"model_type": "llama", "num_layers": 30}
    cfg = suites.suite_config("facts", "smollm2", {"facts_n": 4, "facts_lengths": [1024]})
    served = engine.engine_args(specs.parse_spec("turboquant3"), model, cfg, {})
    exact = engine.engine_args(specs.parse_spec("turboquant3+exactprefill"), model, cfg, {})
    assert served["additional_config"]["turboquant"]["compressed_prefill"] is True    # as served: stated
    assert exact["additional_config"]["turboquant"]["compressed_prefill"] is False
    assert "additional_config" not in engine.engine_args(specs.parse_spec("auto"), model, cfg, {})
    assert served["max_model_len"] >= 1024 + cfg["facts_gen_toks"]


def test_suite_sizes_and_overrides():
    cfg = suites.suite_config("facts", "gemma3")
    assert cfg["facts_n"] == 100 and cfg["facts_lengths"] == [1024, 4096] and cfg["ppl_windows"] == 0
    cfg = suites.suite_config("facts", "smollm2", {"facts_n": 48, "facts_lengths": [1024]})
    assert cfg["facts_n"] == 48 and cfg["facts_lengths"] == [1024]
    assert suites.suite_config("divergence", "smollm2")["divergence_n"] == 16
    assert "facts_n" not in suites.suite_config("ppl", "smollm2")
    with pytest.raises(ValueError, match="facts"):
        suites.suite_config("ppl", "smollm2", {"facts_n": 3})


def _fact_record(spec: str, hits: list[bool], gen: list[list[int]]) -> dict:
    cfg = suites.suite_config("facts", "smollm2", {"facts_n": len(hits), "facts_lengths": [1024]})
    cfg.update(divergence_n=len(gen), divergence_tokens=4)
    samples = {}
    for i, hit in enumerate(hits):
        depth, kind, n_facts = facts.design(i)
        samples[f"L1024-{i:03d}"] = {"id": f"L1024-{i:03d}", "length": 1024, "depth": depth, "kind": kind.name,
                                     "n_facts": n_facts, "expected": "7341", "distractors": [], "question": "?",
                                     "prompt_sha": f"sha{i}", "tokens": 1030, "fact_positions": [100],
                                     "answer": "7341" if hit else "no idea", "hit": hit}
    return {"spec": spec, "kv_cache_dtype": specs.parse_spec(spec).dtype, "calibrated": False, "model": "smollm2",
            "model_path": "/models/smollm2", "suite": "facts", "config": cfg,
            "facts": {"head_dim": 64, "model_type": "llama", "num_layers": 30, "num_kv_heads": 3,
                      "dtype": "bfloat16"},
            "bytes_per_token_head": specs.spec_bytes(spec, 64, 30)["bytes"], "timings": {"facts": 10.0},
            "errors": [], "engines": 1, "protected": specs.effective_protected(spec), "ppl": None, "loglik": {},
            "ruler": {}, "prefill": specs.prefill_mode(spec), "ops": "torch" if spec != "auto" else None,
            "facts_results": {"1024": {"length": 1024, "n": len(hits), "hits": sum(hits), "samples": samples}},
            "divergence": {str(i): {"prompt": "p", "token_ids": ids, "text": ""} for i, ids in enumerate(gen)}}


def test_sign_test_is_the_exact_binomial_tail():
    # 9 lost, 3 gained: 2 P(X <= 3), X ~ Binomial(12, 1/2) = 2 (1 + 12 + 66 + 220) / 4096
    assert facts.sign_test(9, 3) == pytest.approx(2 * 299 / 4096)
    assert facts.sign_test(3, 9) == facts.sign_test(9, 3)
    assert facts.sign_test(0, 0) == 1.0 and facts.sign_test(1, 0) == 1.0
    assert facts.sign_test(10, 0) == pytest.approx(2 / 1024)
    assert (facts.fmt_p(0.146), facts.fmt_p(0.003)) == ("0.15", "3e-03")


class HashTokenizer(WordTokenizer):
    """Word tokens with fixed ids (a hash), as a real tokenizer has: a text's ids do not depend on what was
    tokenised before (WordTokenizer's growing vocabulary does)."""

    def _ids(self, text: str) -> list[int]:
        return [zlib.crc32(w.encode()) % 50_000 + 1 for w in text.split()]


class PromptEchoLLM:
    """A stand-in engine: the answer of a prompt is its sample's expected value when the prompt's token count
    is even, else "no idea" -- a deterministic function of the prompt, so a run's hits are reproducible."""

    def __init__(self, tokenizer, samples):
        self.tokenizer = tokenizer
        self.expected = {tuple(s.prompt_ids): s.expected for s in samples}
        self.generated: list[int] = []

    def get_tokenizer(self):
        return self.tokenizer

    def generate(self, prompts, params, use_tqdm=False):
        self.generated += [len(p["prompt_token_ids"]) for p in prompts]

        class Out:
            def __init__(self, text):
                self.outputs = [type("C", (), {"text": text})()]

        return [Out(self.expected[tuple(p["prompt_token_ids"])] if len(p["prompt_token_ids"]) % 2 == 0
                    else "no idea") for p in prompts]


def _facts_run(n, first=0, seed=0):
    pytest.importorskip("vllm")
    tok = HashTokenizer()
    cfg = {"facts_lengths": [200, 300], "facts_n": n, "facts_seed": seed, "facts_gen_toks": 8}
    llm = PromptEchoLLM(tok, facts.build_samples(tok, FILLER, cfg["facts_lengths"], n, seed))
    if first:
        cfg["facts_first"] = first
    out = facts.run_facts(llm, "m", cfg, FILLER, None)
    return {"config": cfg, "errors": [], "facts_results": out, "timings": {"facts": 1.0, "process": 2.0}}, llm


def test_extending_a_facts_run_equals_the_whole_run():
    whole, _ = _facts_run(7)
    stored, _ = _facts_run(4)
    part, llm = _facts_run(7, first=4)
    assert len(llm.generated) == 2 * 3                        # only passages 4..6 of each length generated
    assert sorted(part["facts_results"]["200"]["samples"]) == ["L200-004", "L200-005", "L200-006"]
    merged = facts.extend_facts_record(stored, part)
    assert merged["facts_results"] == whole["facts_results"]
    assert 0 < merged["facts_results"]["200"]["hits"] < 7      # the stand-in hits some passages, not all
    assert merged["config"] == whole["config"] and merged["extended"] == [4, 3]
    assert merged["timings"] == {"facts": 2.0, "process": 4.0}
    # what the runner may extend: the same sizes but more passages, no errors
    assert facts.extendable_facts(stored, whole["config"]) == 4
    assert facts.extendable_facts(whole, stored["config"]) == 0                       # fewer passages
    assert facts.extendable_facts(stored, {**whole["config"], "facts_seed": 1}) == 0   # another design
    assert facts.extendable_facts({**stored, "errors": ["facts: boom"]}, whole["config"]) == 0


def test_extending_refuses_other_passages():
    other, _ = _facts_run(4, seed=1)                           # another seed: other prompts for 0..3
    part, _ = _facts_run(7, first=4)
    with pytest.raises(ValueError, match="not the first 4 of this design"):
        facts.extend_facts_record(other, part)
    stored, _ = _facts_run(4)
    del stored["facts_results"]["200"]["samples"]["L200-003"]
    with pytest.raises(ValueError, match="length 200"):
        facts.extend_facts_record(stored, part)


def test_report_of_the_facts_and_divergence_suites(tmp_path):
    records = [_fact_record("auto", [True, True, False, True], [[1, 2, 3, 4], [5, 6, 7, 8]]),
               _fact_record("turboquant3", [True, False, False, True], [[1, 2, 3, 4], [5, 9, 7, 8]]),
               _fact_record("turboquant3+exactprefill", [True, True, True, True], [[1, 2, 0, 4], [5, 6, 7, 8]])]
    paths = report.write_report(records, tmp_path / "F.md", {"command": "python -m evals.run --suite facts",
                                                             "total_s": 60, "load": {"start": [3.9, 4, 4],
                                                                                     "end": [4.2, 4, 4]}})
    text = (tmp_path / "F.md").read_text()
    assert "realistic mode" not in text and "compressed prefill" in text and "`+exactprefill` =" in text
    assert "`VLLM_TURBOQUANT_OPS=torch` (the torch reference ops)" in text
    assert "machine load (1/5/15-min averages) 3.9/4.0/4.0 at the start" in text
    assert "## (d) Fact retrieval — realistic, as served" in text
    assert "| `auto` | 1024 | 1030 | 3/4 | 0.750 | [0.301, 0.954] |  | — | — | — |" in text
    assert "| `turboquant3` | 1024 | 1030 | 2/4 | 0.500 | [0.150, 0.850] | -1 | 3/4 | 3/4 | 1 / 0 (p 1.00) |" in text
    assert ("| `turboquant3+exactprefill` | 1024 | 1030 | 4/4 | 1.000 | [0.510, 1.000] | +1 | 3/4 | 3/4 | "
            "0 / 1 (p 1.00) |" in text)
    assert "| L1024-001 | `turboquant3` | middle | code | 1 | 7341 | 7341 | no idea |" in text  # auto hit, tq3 not
    # divergence: tq3 diverges at 4 (identical) and 1; exact prefill at 2 and 4
    assert re.search(r"\| `turboquant3` \| 2 \| 2\.5 \| \[.*\] \| 4 \| 1/2 \| 4, 1 \|", text)
    assert re.search(r"\| `turboquant3\+exactprefill` \| 2 \| 3\.0 \| \[.*\] \| 4 \| 1/2 \| 2, 4 \|", text)
    assert "## (a) Perplexity" not in text
    assert [p.name for p in paths] == ["F.md", "F.json", "F_accuracy.png"]


def test_facts_smoke_smollm2(tmp_path):
    """The facts suite end to end on SmolLM2 (bf16 cache, in-process engine, no lm-eval): 3 passages of 256
    tokens, answers generated and scored, the record rendered."""
    pytest.importorskip("vllm")
    from evals.assets import ensure_text_file
    from evals.worker import model_facts
    from vllm_turboquant.assets import fetch_model

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM

    path = str(fetch_model("smollm2"))
    text = ensure_text_file("shakespeare_heldout").read_text(encoding="utf-8")
    cfg = suites.suite_config("facts", "smollm2", {"facts_n": 3, "facts_lengths": [256]})
    llm = LLM(path, kv_cache_dtype="auto", enforce_eager=True, max_model_len=512, seed=0,
              distributed_executor_backend="uni")
    try:
        out = facts.run_facts(llm, path, cfg, text, None)
    finally:
        llm.llm_engine.engine_core.shutdown()
    part = out["256"]
    assert part["n"] == 3 and len(part["samples"]) == 3
    for s in part["samples"].values():
        assert 230 <= s["tokens"] <= 300 and isinstance(s["hit"], bool) and s["answer"]
        assert s["hit"] == facts.score_answer(s["answer"], s["expected"], s["distractors"])
    assert part["hits"] >= 1, part   # the model reads a fact out of a short passage
    rec = {"spec": "auto", "kv_cache_dtype": "auto", "calibrated": False, "model": "smollm2", "model_path": path,
           "suite": "facts", "config": cfg, "facts": model_facts(path), "bytes_per_token_head": 256,
           "timings": {}, "errors": [], "ppl": None, "loglik": {}, "ruler": {}, "prefill": "compressed",
           "facts_results": out}
    report.write_report([rec], tmp_path / "S.md", {"total_s": 1}, plots=False)
    assert "| `auto` | 256 |" in (tmp_path / "S.md").read_text()
    assert json.loads((tmp_path / "S.json").read_text())["records"][0]["facts_results"]["256"]["n"] == 3
