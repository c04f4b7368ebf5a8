"""Teacher-forced perplexity through vLLM on held-out Shakespeare text.

Each of ``windows`` windows is ``window_tokens`` tokens of the held-out text
(``data/text/shakespeare_heldout.txt``, see ``evals/assets.py``), spread evenly over
the whole text; a window starts with BOS when the tokenizer adds one. vLLM scores
them with ``SamplingParams(max_tokens=1, prompt_logprobs=0)``: for every prompt
position vLLM returns the log-probability of the actual next token, so the first
token of a window is context only and ``window_tokens - 1`` tokens per window are
scored. ``ppl = exp(-sum(logprob) / scored tokens)``.

By default a window is prefilled in one step (``max_num_batched_tokens`` >= the model
length), so no chunk of a window reads earlier chunks back from the cache. What the
KV-cache format then changes depends on the attention backend: on GPU backends prefill
attends to the fresh bf16 K/V (so use the plugin's compressed-prefill switch,
passed through ``extra_engine_args``); vLLM 0.32's stock CPU kernel reads every token,
the new ones included, from the paged cache, so ``fp8`` already moves CPU perplexity
(SmolLM2, 2 x 512 tokens: auto 36.95, fp8 39.34).

Library: ``perplexity(model="smollm2", kv_cache_dtype="auto", windows=4, ...)``.
CLI:     ``python -m evals.perplexity --model smollm2 --kv-cache-dtype fp8 --windows 2 --window-tokens 512``
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_WINDOW_TOKENS = {"smollm2": 2048, "gemma3": 8192}


@dataclass
class PerplexityResult:
    model: str
    kv_cache_dtype: str
    ppl: float
    nll: float                     # mean negative log-likelihood per scored token (nats)
    tokens: int                    # scored tokens (windows * (window_tokens - 1))
    windows: int
    window_tokens: int
    window_ppl: list[float]
    wall_s: float                  # whole call: tokenising, engine start, scoring
    engine_s: float                # LLM(...) construction (0 when an engine was passed in)
    score_s: float                 # the LLM.generate call
    text: str
    bos: bool = False              # windows start with BOS
    engine_args: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _assets():
    """``evals.assets``; loaded by path when this file runs as a script outside the package."""
    try:
        from evals import assets
    except ImportError:
        import importlib.util

        spec = importlib.util.spec_from_file_location("_vllm_turboquant_evals_assets",
                                                      Path(__file__).with_name("assets.py"))
        assets = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = assets
        spec.loader.exec_module(assets)
    return assets


def resolve_model(model: str) -> tuple[str, str]:
    """(name, local folder) for a model name of ``vllm_turboquant.assets.MODELS`` or a path."""
    if os.path.isdir(model):
        return Path(model).name, str(model)
    from vllm_turboquant.assets import MODELS, fetch_model

    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}: give a folder or one of {', '.join(MODELS)}")
    return model, str(fetch_model(model))


def make_windows(token_ids: list[int], windows: int, window_tokens: int, bos_id: int | None) -> list[list[int]]:
    """``windows`` non-overlapping windows of ``window_tokens`` tokens, spread evenly over ``token_ids``."""
    body = window_tokens - (1 if bos_id is not None else 0)
    if windows < 1 or body < 1:
        raise ValueError("need windows >= 1 and window_tokens >= 2")
    if windows * body > len(token_ids):
        raise ValueError(f"the text has {len(token_ids)} tokens, fewer than {windows} windows x {body}")
    gap = (len(token_ids) - windows * body) // windows
    out = []
    for i in range(windows):
        start = i * (body + gap)
        chunk = token_ids[start:start + body]
        out.append(([bos_id] if bos_id is not None else []) + chunk)
    return out


def _bos_id(tokenizer, model_path: str, add_bos: bool | None) -> int | None:
    """The BOS id to start each window with, or None.

    ``add_bos=None`` (auto): when the tokenizer prepends BOS to plain text, or the model is a
    Gemma (it needs BOS; the GGUF-converted tokenizer in the cache does not add it: Gemma-3-270M
    scores 86 without and 44 with BOS on 2 x 1024 held-out tokens).
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None or add_bos is False:
        return None
    if add_bos:
        return bos
    ids = tokenizer("a").input_ids
    if ids and ids[0] == bos:
        return bos
    try:
        model_type = json.loads((Path(model_path) / "config.json").read_text()).get("model_type", "")
    except (OSError, ValueError):
        model_type = ""
    return bos if model_type.startswith("gemma") else None


def _score(outputs, prompts: list[list[int]]) -> list[tuple[float, int]]:
    """(sum of logprobs, scored tokens) per window."""
    scores = []
    for out, ids in zip(outputs, prompts, strict=True):  # vLLM returns one output per prompt
        plp = out.prompt_logprobs
        if plp is None or len(plp) != len(ids):
            got = None if plp is None else len(plp)
            raise RuntimeError(f"vLLM returned {got} prompt logprobs for {len(ids)} tokens")
        total = 0.0
        for pos in range(1, len(ids)):
            entry = plp[pos]
            total += entry[ids[pos]].logprob
        scores.append((total, len(ids) - 1))
    return scores


def perplexity(model: str = "smollm2", kv_cache_dtype: str = "auto", windows: int = 4,
               window_tokens: int | None = None, text: str = "shakespeare_heldout",
               extra_engine_args: dict[str, Any] | None = None, llm=None, use_tqdm: bool = False,
               add_bos: bool | None = None) -> PerplexityResult:
    """Teacher-forced perplexity of ``model`` with ``kv_cache_dtype`` over ``windows`` windows of held-out text.

    ``model``: a name of ``vllm_turboquant.assets.MODELS`` (fetched on first use) or a local folder.
    ``window_tokens``: tokens per window including BOS (default 2048 for smollm2, 8192 for gemma3, else 2048).
    ``extra_engine_args``: more ``vllm.LLM`` keyword arguments (they override the defaults below).
    ``llm``: an existing ``vllm.LLM`` to reuse (then ``kv_cache_dtype``/``extra_engine_args`` are only recorded).
    ``add_bos``: start windows with BOS; None = auto (tokenizer default, always for Gemma).
    """
    from vllm import LLM, SamplingParams, TokensPrompt

    ensure_text_file = _assets().ensure_text_file

    t0 = time.perf_counter()
    name, path = resolve_model(model)
    window_tokens = int(window_tokens or DEFAULT_WINDOW_TOKENS.get(name, 2048))
    engine_args: dict[str, Any] = {
        "model": path, "kv_cache_dtype": kv_cache_dtype, "enforce_eager": True, "seed": 0,
        "max_model_len": window_tokens + 1,             # + the one generated token
        # One window per engine step, prefilled whole: with several sequences a step's leftover
        # token budget would start the next window, which then reads its first chunk back from the cache.
        "max_num_batched_tokens": max(window_tokens + 1, 2048),
        "max_num_seqs": 1,
    }
    engine_args.update(extra_engine_args or {})

    engine_s = 0.0
    if llm is None:
        t1 = time.perf_counter()
        llm = LLM(**engine_args)
        engine_s = time.perf_counter() - t1
    tokenizer = llm.get_tokenizer()
    body_text = ensure_text_file(text).read_text(encoding="utf-8")
    token_ids = tokenizer(body_text, add_special_tokens=False).input_ids
    bos = _bos_id(tokenizer, path, add_bos)
    prompts = make_windows(token_ids, windows, window_tokens, bos)

    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
    t2 = time.perf_counter()
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=use_tqdm)
    score_s = time.perf_counter() - t2
    scores = _score(outputs, prompts)
    total_lp = sum(s for s, _ in scores)
    total_n = sum(n for _, n in scores)
    nll = -total_lp / total_n
    recorded = {k: v for k, v in engine_args.items() if k != "model"}
    return PerplexityResult(
        model=name, kv_cache_dtype=kv_cache_dtype, ppl=math.exp(nll), nll=nll, tokens=total_n, windows=windows,
        window_tokens=window_tokens, window_ppl=[math.exp(-s / n) for s, n in scores],
        wall_s=time.perf_counter() - t0, engine_s=engine_s, score_s=score_s, text=text, bos=bos is not None,
        engine_args=recorded)


def _parse_engine_arg(item: str) -> tuple[str, Any]:
    key, sep, value = item.partition("=")
    if not sep:
        raise ValueError(f"--engine-arg wants KEY=VALUE, got {item!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m evals.perplexity", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="smollm2, gemma3 or a local model folder")
    parser.add_argument("--kv-cache-dtype", default="auto")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--window-tokens", type=int, default=None, help="default 2048 (smollm2) / 8192 (gemma3)")
    parser.add_argument("--text", default="shakespeare_heldout")
    parser.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="extra vllm.LLM argument (VALUE parsed as JSON when it can be); repeatable")
    parser.add_argument("--bos", choices=["auto", "yes", "no"], default="auto",
                        help="start windows with BOS (auto: tokenizer default, always for Gemma)")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    result = perplexity(args.model, args.kv_cache_dtype, args.windows, args.window_tokens, args.text,
                        dict(_parse_engine_arg(a) for a in args.engine_arg), use_tqdm=True,
                        add_bos={"auto": None, "yes": True, "no": False}[args.bos])
    print(f"model={result.model} kv_cache_dtype={result.kv_cache_dtype} ppl={result.ppl:.4f} "
          f"tokens={result.tokens} bos={result.bos} windows={result.windows}x{result.window_tokens} "
          f"window_ppl={[round(p, 3) for p in result.window_ppl]} "
          f"wall={result.wall_s:.1f}s engine={result.engine_s:.1f}s score={result.score_s:.1f}s")
    if args.json:
        args.json.write_text(json.dumps(result.to_dict(), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
