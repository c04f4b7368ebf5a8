"""Greedy divergence from bf16 (``python -m evals.run --suite divergence``): the same 16 chat prompts as
``benchmarks/smollm2_checks.py divergence``, answered greedily (128 new tokens) by every dtype; the report
counts, per prompt, the generated tokens before the first one that differs from ``auto``'s answer
(``first_divergence``). Everything but ``run_divergence`` runs without a model."""

from __future__ import annotations

import math
from typing import Any

CHAT_PROMPTS = [
    "What is the capital of France?", "Explain photosynthesis in two sentences.",
    "Write a haiku about the sea.", "What is 17 times 23? Show your work.",
    "Give three tips for learning a new language.", "Why is the sky blue?",
    "Summarise the plot of Romeo and Juliet.", "What is a prime number? Give examples.",
    "How do vaccines work?", "Write a short poem about autumn leaves.",
    "What are the main causes of climate change?", "Describe how a bicycle works.",
    "What is the difference between weather and climate?", "List the planets of the solar system in order.",
    "How do I make a cup of tea?", "What does a CPU do in a computer?",
]


def first_divergence(a: list[int], b: list[int]) -> int:
    """Tokens before the first position where ``a`` and ``b`` differ (the shorter length if one is a prefix)."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def mean_interval(xs: list[float], z: float = 1.959964) -> tuple[float, float, float]:
    """(mean, low, high): the mean and its normal-approximation 95% interval (z * sample sd / sqrt(n))."""
    n = len(xs)
    if not n:
        return (float("nan"),) * 3
    m = sum(xs) / n
    if n < 2:
        return (m, m, m)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    return (m, m - z * sd / math.sqrt(n), m + z * sd / math.sqrt(n))


def run_divergence(llm, cfg: dict[str, Any]) -> dict[str, Any]:
    """Greedy answers to the first ``divergence_n`` chat prompts, ``divergence_tokens`` new tokens each (chat
    template when the model has one, else ``Question: ... / Answer:``); all prompts submitted at once."""
    from vllm import SamplingParams

    prompts = CHAT_PROMPTS[: cfg["divergence_n"]]
    params = SamplingParams(max_tokens=cfg["divergence_tokens"], temperature=0.0, seed=0)
    tokenizer = llm.get_tokenizer()
    if getattr(tokenizer, "chat_template", None):
        outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params, use_tqdm=False)
    else:
        outs = llm.generate([f"Question: {p}\nAnswer:" for p in prompts], params, use_tqdm=False)
    return {str(i): {"prompt": p, "token_ids": list(o.outputs[0].token_ids), "text": o.outputs[0].text[:400]}
            for i, (p, o) in enumerate(zip(prompts, outs, strict=True))}
