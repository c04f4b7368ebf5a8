"""What each runner suite measures: perplexity sizes, loglikelihood tasks and RULER needles per model (``SUITES``)."""

from __future__ import annotations

from typing import Any

LOGLIK_TASKS = ["tq_hellaswag", "tq_piqa", "tq_arc_easy", "tq_arc_challenge", "tq_winogrande", "tq_lambada",
                "tq_boolq"]
RULER_TASKS = ["tq_niah_single_1", "tq_niah_multikey_2", "tq_niah_multikey_3", "tq_niah_shakespeare"]
# The one accuracy metric per task shown in the tables (lm-eval's usual headline metric).
PRIMARY_METRIC = {"tq_hellaswag": "acc_norm", "tq_piqa": "acc_norm", "tq_arc_easy": "acc_norm",
                  "tq_arc_challenge": "acc_norm", "tq_winogrande": "acc", "tq_lambada": "acc", "tq_boolq": "acc"}

# Per suite: perplexity (windows, tokens per window; 0 windows = none) per model; loglik tasks and examples
# per task (None = all); RULER tasks, context lengths per model, samples per length; fact-retrieval passage
# lengths and passages per length (``evals.facts``); greedy-divergence chats and tokens (``evals.generation``).
# Keys a suite does not name take ``_DEFAULTS``.
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
    # needle retrieval at the context lengths (realistic mode), plus a short perplexity check
    "needle": {
        "ppl": {"smollm2": (1, 256), "gemma3": (1, 256)},
        "loglik_tasks": [], "loglik_limit": 0,
        "ruler_tasks": ["tq_niah_single_1"],
        "ruler_lengths": {"smollm2": [2048, 4096], "gemma3": [2048, 4096, 8192, 16384]},
        "ruler_samples": 2, "ruler_gen_toks": 32,
    },
    # loglikelihood accuracy with more examples than quick (7 tasks x 20), plus a short perplexity check
    "loglik": {
        "ppl": {"smollm2": (1, 256), "gemma3": (1, 256)},
        "loglik_tasks": LOGLIK_TASKS, "loglik_limit": 20, "ruler_tasks": [],
        "ruler_lengths": {"smollm2": [], "gemma3": []}, "ruler_samples": 0,
    },
    # perplexity only: the protected-token (S, W) and preset sweeps
    "ppl": {
        "ppl": {"smollm2": (4, 1024), "gemma3": (2, 2048)},
        "loglik_tasks": [], "loglik_limit": 0, "ruler_tasks": [],
        "ruler_lengths": {"smollm2": [], "gemma3": []}, "ruler_samples": 0,
    },
    # perplexity at the window lengths (2K SmolLM2, 8K Gemma-3). A window is prefilled in
    # chunks of vLLM's default 4096 tokens; in compressed-prefill mode (and for the stock CPU
    # attention) a chunk reads earlier chunks from the cache exactly as one whole-window step would,
    # and protected tokens are defined per query position, so chunking changes nothing computed.
    # Gemma-3's 262K vocabulary makes a 4096-token chunk's prompt logprobs ~9 GB: one Gemma worker at a time.
    "ppl_long": {
        "ppl": {"smollm2": (4, 2048), "gemma3": (2, 8192)},
        "loglik_tasks": [], "loglik_limit": 0, "ruler_tasks": [],
        "ruler_lengths": {"smollm2": [], "gemma3": []}, "ruler_samples": 0,
    },
    # the ops implementations compared on the same tokens: torch reference against the Triton kernels under
    # TRITON_INTERPRET=1 (~10^3 x slower than CUDA: ~1 min per window and model with the worker's interpreter
    # tiles). 16 short windows, not 1: a 1e-6 change of attention outputs flips a few codes at cell boundaries
    # in later layers, which moves one 256-token window's perplexity by up to ~0.15 (docs/results.md); the
    # per-window differences give the spread of the mean
    "ppl_ops": {
        "ppl": {"smollm2": (16, 256), "gemma3": (16, 256)},
        "loglik_tasks": [], "loglik_limit": 0, "ruler_tasks": [],
        "ruler_lengths": {"smollm2": [], "gemma3": []}, "ruler_samples": 0,
    },
    # fact retrieval (issue #18 item 1(a)): seeded passages of 1K / 4K tokens with 1 or 3 facts at the
    # start / middle / end, a question about one, the answer generated after the prompt; no perplexity
    "facts": {
        "ppl": {"smollm2": (0, 0), "gemma3": (0, 0)},
        "loglik_tasks": [], "loglik_limit": 0, "ruler_tasks": [],
        "ruler_lengths": {"smollm2": [], "gemma3": []}, "ruler_samples": 0,
        "facts_lengths": {"smollm2": [1024, 4096], "gemma3": [1024, 4096]}, "facts_n": 100,
    },
    # multi-key needles (issue #18 item 1(b)): RULER niah_multikey_2 -- a haystack made only of "One of the
    # special magic numbers for <key> is: <number>." lines, one key asked, every other line a distractor key --
    # at 2K/4K (SmolLM2) and 2K-16K (Gemma-3); one answer per sample, so a sample's score is a hit or a miss
    "multikey": {
        "ppl": {"smollm2": (0, 0), "gemma3": (0, 0)},
        "loglik_tasks": [], "loglik_limit": 0,
        "ruler_tasks": ["tq_niah_multikey_2"],
        "ruler_lengths": {"smollm2": [2048, 4096], "gemma3": [2048, 4096, 8192, 16384]},
        "ruler_samples": 50, "ruler_gen_toks": 32,
    },
    # greedy divergence from bf16: 16 chats x 128 tokens, first generated token that differs from auto's
    "divergence": {
        "ppl": {"smollm2": (0, 0), "gemma3": (0, 0)},
        "loglik_tasks": [], "loglik_limit": 0, "ruler_tasks": [],
        "ruler_lengths": {"smollm2": [], "gemma3": []}, "ruler_samples": 0,
        "divergence_n": 16, "divergence_tokens": 128,
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
_DEFAULTS: dict[str, Any] = {"ruler_gen_toks": 128, "facts_lengths": None, "facts_n": 0, "facts_gen_toks": 32,
                             "facts_seed": 0, "divergence_n": 0, "divergence_tokens": 128}
# the sizes a command line may change (``python -m evals.run --facts-n / --facts-lengths / --ruler-samples /
# --ruler-lengths``)
OVERRIDABLE = ("facts_n", "facts_lengths", "ruler_samples", "ruler_lengths")


def suite_config(suite: str, model: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The concrete sizes of ``suite`` for ``model`` (a name of ``SUITES`` entries or any other); ``overrides``
    (keys of ``OVERRIDABLE``, None values ignored) replace the suite's sizes."""
    s = {**_DEFAULTS, **SUITES[suite]}
    key = model if model in s["ppl"] else DEFAULT_MODEL_SIZES
    windows, window_tokens = s["ppl"][key]
    facts_lengths = s["facts_lengths"]
    cfg = {"suite": suite, "ppl_windows": windows, "ppl_window_tokens": window_tokens,
           "loglik_tasks": list(s["loglik_tasks"]), "loglik_limit": s["loglik_limit"],
           "ruler_tasks": list(s["ruler_tasks"]), "ruler_lengths": list(s["ruler_lengths"][key]),
           "ruler_samples": s["ruler_samples"], "ruler_gen_toks": s["ruler_gen_toks"]}
    if s["facts_n"]:
        cfg.update(facts_lengths=list(facts_lengths[key]), facts_n=s["facts_n"], facts_gen_toks=s["facts_gen_toks"],
                   facts_seed=s["facts_seed"])
    if s["divergence_n"]:
        cfg.update(divergence_n=s["divergence_n"], divergence_tokens=s["divergence_tokens"])
    for k, v in (overrides or {}).items():
        if k not in OVERRIDABLE:
            raise ValueError(f"{k!r} cannot be overridden; accepted: {', '.join(OVERRIDABLE)}")
        if v is None:
            continue
        if k not in cfg:
            raise ValueError(f"--{k.replace('_', '-')} applies to a suite that measures it (facts)")
        if k.startswith("ruler_") and not cfg["ruler_tasks"]:
            raise ValueError(f"--{k.replace('_', '-')} applies to a suite that runs RULER tasks "
                             "(smoke, quick, needle, multikey, full)")
        cfg[k] = list(v) if isinstance(v, (list, tuple)) else v
    return cfg
