"""Command line: ``vllm-turboquant`` (or ``python -m vllm_turboquant``).

``presets`` prints every preset's bits, bytes per token per KV head and
compression against bf16; ``memory`` prints a model's KV-cache size for bf16,
fp8 and each preset; ``demo`` serves a real small model with turboquant3,
answers one chat request and compares its KV capacity with bf16. Every other command (``serve``, ``chat``, ``complete``,
``bench`` ...) is vLLM's own CLI with this plugin loaded, so
``vllm-turboquant serve MODEL --kv-cache-dtype turboquant3`` takes exactly the
arguments of ``vllm serve``.
"""

from __future__ import annotations

import argparse
import sys

from . import demo
from .layout import check_head_dim, slot_layout
from .memory import bf16_bytes_per_token_head, estimate_memory
from .presets import PRESETS, get_preset


def _gib(n: int) -> str:
    return f"{n / 2**30:.3f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def cmd_presets(args: argparse.Namespace) -> None:
    d = args.head_dim
    check_head_dim(d)
    bf16 = bf16_bytes_per_token_head(d)
    print(f"TurboQuant presets at head_dim {d} (bf16 K+V: {bf16} bytes per token per KV head)")
    header = (f"{'preset':<18}{'key bits':>9}{'QJL m':>7}{'λ':>9}{'value bits':>11}{'bytes':>7}{'pad':>5}{'vs bf16':>9}"
              f"{'sink':>6}{'window':>8}{'calib':>7}  description")
    print(header)
    print("-" * len(header))
    for p in PRESETS.values():
        lay = slot_layout(p, d)
        lam = f"{p.qjl_lambda(d):.3f}" if lay.has_qjl else "-"
        print(f"{p.name:<18}{p.key_bits:>9}{lay.qjl_dim:>7}{lam:>9}{p.value_bits:>11}{lay.payload_bytes:>7}"
              f"{lay.pad_bytes:>5}{bf16 / lay.slot_bytes:>8.2f}x{p.sink:>6}{p.window:>8}"
              f"{'auto' if p.auto_calibrate else '-':>7}  {p.description}")
    print("bytes: codes + fp16 norms (+ QJL signs and γ) per token per KV head, K and V; "
          "pad: alignment bytes added to each slot")
    print("sink / window: protected tokens attended exactly (the first S and the W most recent of each sequence); "
          "their bf16 copies add (S + W) x bf16 bytes per max_model_len tokens")
    print("calib: auto = codebooks and key means fitted to the model at its first start and cached "
          "(calibration=none turns it off); - = data-oblivious (the paper's algorithm)")


def cmd_memory(args: argparse.Namespace) -> None:
    names = [get_preset(args.preset).name] if args.preset else list(PRESETS)
    est = [estimate_memory(args.layers, args.kv_heads, args.seq_len, args.head_dim, n) for n in names]
    print(f"KV cache for {args.seq_len} tokens, {args.layers} layers, {args.kv_heads} KV heads, "
          f"head_dim {args.head_dim} (per sequence)")
    print(f"{'dtype':<18}{'size':>14}{'vs bf16':>9}")
    print(f"{'bf16 / auto':<18}{_gib(est[0].bf16_bytes):>14}{1.0:>8.2f}x")
    print(f"{'fp8':<18}{_gib(est[0].fp8_bytes):>14}{2.0:>8.2f}x")
    for e in est:
        print(f"{e.preset:<18}{_gib(e.preset_bytes):>14}{e.ratio:>8.2f}x")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vllm-turboquant",
        description="TurboQuant KV-cache compression for vLLM: inspect presets and KV-cache sizes. "
                    "Any other command (serve, chat, complete, bench, ...) runs vLLM's own CLI with "
                    "the plugin loaded, e.g. 'vllm-turboquant serve MODEL --kv-cache-dtype turboquant3'.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{presets,memory,demo}")
    p = sub.add_parser("presets", help="list presets with bits, bytes per token per KV head and ratio vs bf16")
    p.add_argument("--head-dim", type=int, default=128, help="attention head size (default 128)")
    p.set_defaults(func=cmd_presets)
    m = sub.add_parser("memory", help="KV-cache size of a model for bf16, fp8 and each preset")
    m.add_argument("--layers", type=int, required=True, help="attention layers")
    m.add_argument("--kv-heads", type=int, required=True, help="KV heads per layer")
    m.add_argument("--head-dim", type=int, required=True, help="attention head size")
    m.add_argument("--seq-len", type=int, required=True, help="tokens of context")
    m.add_argument("--preset", help="one preset (default: all)")
    m.set_defaults(func=cmd_memory)
    d = sub.add_parser("demo", help="serve a real small model with turboquant3, answer a request, compare KV "
                       "capacity with bf16", description=demo.DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_arguments(d)
    d.set_defaults(func=demo.run)
    return parser


OWN_COMMANDS = ("presets", "memory", "demo")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] not in OWN_COMMANDS and not argv[0].startswith("-"):
        from .backend.cli import run_vllm_cli

        return run_vllm_cli(argv)
    args = build_parser().parse_args(argv)
    for name in ("layers", "kv_heads", "seq_len"):
        if getattr(args, name, 1) < 1:
            print(f"error: --{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}", file=sys.stderr)
            return 2
    try:
        result = args.func(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
