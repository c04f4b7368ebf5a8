"""Calibrate a model's codebook registry: ``python -m vllm_turboquant.calibrate``.

Runs the model in vLLM (in this process, bf16 KV cache) over a few thousand
tokens of text, captures every layer's post-RoPE keys and values as they are
written to the cache, fits per-head Lloyd-Max codebooks and key means
(``registry.calibrate``) and writes the registry file. Serve with it through
``VLLM_TURBOQUANT_CALIBRATION=FILE`` (or ``--additional-config
'{"turboquant": {"calibration": "FILE"}}'``); the file is checked against the
model at engine start.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from .presets import PRESETS


def capture_kv(model: str, text: str, tokens: int = 4096, chunk: int = 512, **engine_args
               ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Post-RoPE keys and values, (N, H, d) per layer, of ``tokens`` tokens of ``text`` run through ``model``."""
    from tqdm import tqdm
    from vllm import SamplingParams

    from .inprocess import attention_layers, in_process_llm

    with in_process_llm(model, kv_cache_dtype="auto", max_model_len=max(chunk + 16, 1024),
                        enable_prefix_caching=False, **engine_args) as llm:
        ids = llm.get_tokenizer()(text)["input_ids"]
        if len(ids) < tokens:
            raise ValueError(f"the calibration text has {len(ids)} tokens, {tokens} are asked for; "
                             "pass a longer --text or fewer --tokens")
        layers = attention_layers(llm)
        keys: list[list[torch.Tensor]] = [[] for _ in layers]
        values: list[list[torch.Tensor]] = [[] for _ in layers]
        for i, (_, impl) in enumerate(layers):
            original = impl.do_kv_cache_update

            def capture(layer, key, value, kv_cache, slot_mapping, _i=i, _orig=original):
                n = int((slot_mapping >= 0).sum())
                keys[_i].append(key[:n].float().cpu())
                values[_i].append(value[:n].float().cpu())
                return _orig(layer, key, value, kv_cache, slot_mapping)

            impl.do_kv_cache_update = capture
        params = SamplingParams(max_tokens=1)
        for start in tqdm(range(0, tokens, chunk), desc="capturing K/V", unit="chunk"):
            llm.generate([{"prompt_token_ids": ids[start:start + chunk]}], params, use_tqdm=False)
    return [torch.cat(k) for k in keys], [torch.cat(v) for v in values]


def _default_text() -> str:
    from .cache import cache_dir

    candidates = sorted(cache_dir("data").rglob("shakespeare_train.txt"))
    if not candidates:
        raise SystemExit("error: no --text given and no cached Shakespeare text; pass --text FILE "
                         "(or fetch the eval data first: python -m evals.assets)")
    return candidates[0].read_text(errors="ignore")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vllm_turboquant.calibrate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a local Hugging Face model folder")
    parser.add_argument("--preset", default="turboquant3", choices=list(PRESETS), help="preset to calibrate for")
    parser.add_argument("--out", required=True, help="the registry file to write (.safetensors)")
    parser.add_argument("--text", help="plain-text file to calibrate on (default: cached Shakespeare train text)")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens of text to run (default 4096)")
    parser.add_argument("--seed", type=int, default=0, help="rotation seed; serve with the same (default 0)")
    parser.add_argument("--no-center-keys", action="store_true", help="fit codebooks without key-mean subtraction")
    args = parser.parse_args(argv)
    from .registry import calibrate

    text = Path(args.text).read_text(errors="ignore") if args.text else _default_text()
    t = time.time()
    keys, values = capture_kv(args.model, text, args.tokens)
    print(f"captured {keys[0].shape[0]} tokens x {len(keys)} layers x {keys[0].shape[1]} KV heads "
          f"(head_dim {keys[0].shape[2]}) in {time.time() - t:.1f} s", file=sys.stderr)
    registry = calibrate(keys, values, args.preset, center_keys=not args.no_center_keys, seed=args.seed,
                         model=args.model)
    registry.save(args.out)
    print(f"wrote {args.out} ({args.preset}, {len(keys)} layers) in {time.time() - t:.1f} s total", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
