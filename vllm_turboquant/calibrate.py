"""Calibrate a model's codebook registry: ``python -m vllm_turboquant.calibrate``.

Runs the model (Hugging Face ``transformers``, on the CPU, float32) over a few
thousand tokens of text in independent chunks, captures every layer's post-RoPE
keys and values as its attention receives them, fits per-head Lloyd-Max codebooks
and key means (``registry.calibrate``) and writes the registry file. The first
``SKIP`` tokens of every chunk are left out of the fit: they are attention sinks
with outlying keys, and the protected-token pool serves them exactly anyway.

Automatic calibration: with the default ``calibration = "auto"``, a preset that asks
for it (``Preset.auto_calibrate``: the plain ``turboquantN`` names, not the paper's
``_qjl`` ones) is calibrated once per model at the first engine start, on the text
shipped in ``data/calibration.txt`` (Python standard-library docstrings, so
evaluations on other text measure it out of domain), in a subprocess, and the
file is cached in ``cache_dir("calibration")`` under a digest of the model's
config and weight files. Later starts load it in milliseconds. Serve with a file of
your own through ``VLLM_TURBOQUANT_CALIBRATION=FILE`` (or ``--additional-config
'{"turboquant": {"calibration": "FILE"}}'``; ``"none"`` turns calibration off); a
file is checked against the model at engine start.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import logging
import os
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import torch

from .presets import PRESETS, Preset, get_preset

logger = logging.getLogger("vllm.vllm_turboquant")

CHUNK = 512  # tokens per independent calibration sequence
SKIP = 4  # leading tokens of every chunk left out of the fit (attention sinks)
AUTO_TOKENS = 4096  # tokens of the built-in text an automatic calibration runs
AUTO_VERSION = 1  # bump when the automatic procedure changes (old cache files are then ignored)
#: Automatic calibration is skipped (with a warning naming the command) for weights larger than this.
AUTO_MAX_WEIGHT_BYTES = 8 << 30
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
_SAMPLE = 1 << 16


def builtin_text() -> str:
    """The text automatic calibration runs on (shipped with the package)."""
    return resources.files("vllm_turboquant").joinpath("data", "calibration.txt").read_text(encoding="utf-8")


def capture_kv(model: str, text: str, tokens: int = AUTO_TOKENS, chunk: int = CHUNK,
               dtype: torch.dtype = torch.float32) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Post-RoPE keys and values, (N, H, d) float32 per layer, of the first ``tokens`` tokens of
    ``text`` run through ``model`` (a local folder or hub id) in independent ``chunk``-token sequences.

    Captured where ``transformers`` hands K/V to the attention function (after the key norm
    and RoPE, before GQA repetition): what vLLM writes to its cache, up to bf16 rounding."""
    from tqdm import tqdm
    from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    tokenizer = AutoTokenizer.from_pretrained(model)
    ids = tokenizer(text)["input_ids"]
    if len(ids) < tokens:
        raise ValueError(f"the calibration text has {len(ids)} tokens, {tokens} are asked for; "
                         "pass a longer --text or fewer --tokens")
    keys: dict[int, list[torch.Tensor]] = {}
    values: dict[int, list[torch.Tensor]] = {}

    def record(module, query, key, value, attention_mask, **kwargs):
        layer = getattr(module, "layer_idx", None)
        if layer is None:
            raise ValueError(f"cannot calibrate {model}: its attention module {type(module).__name__} has no layer_idx")
        keys.setdefault(layer, []).append(key[0].transpose(0, 1).float().cpu())  # (T, H, d)
        values.setdefault(layer, []).append(value[0].transpose(0, 1).float().cpu())
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("vllm_turboquant_capture", record)
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=dtype, attn_implementation="vllm_turboquant_capture")
    with torch.inference_mode():
        for start in tqdm(range(0, tokens, chunk), desc="capturing K/V", unit="chunk"):
            lm(torch.tensor([ids[start:min(start + chunk, tokens)]]), use_cache=False)
    del lm
    layers = sorted(keys)
    if layers != list(range(len(layers))):
        raise ValueError(f"cannot calibrate {model}: captured attention layers {layers}, expected 0..{len(layers) - 1}")
    return [torch.cat(keys[i]) for i in layers], [torch.cat(values[i]) for i in layers]


def fit_registry(keys: list[torch.Tensor], values: list[torch.Tensor], preset: str | Preset, *, seed: int = 0,
                 center_keys: bool = True, chunk: int = CHUNK, skip: int = SKIP, model: str = ""):
    """``registry.calibrate`` on captured K/V, leaving out the first ``skip`` tokens of every chunk."""
    from .registry import calibrate

    pos = torch.arange(keys[0].shape[0])
    keep = pos % chunk >= skip
    return calibrate([k[keep] for k in keys], [v[keep] for v in values], preset, center_keys=center_keys,
                     seed=seed, model=model)


def calibrate_to_file(model: str, text: str, out: str | Path, preset: str | Preset, *, tokens: int = AUTO_TOKENS,
                      seed: int = 0, center_keys: bool = True) -> Path:
    """Capture ``tokens`` tokens of ``text`` through ``model``, fit, and write the registry file ``out``
    (atomically: a partial file never carries the final name). Returns ``out``."""
    out = Path(out)
    keys, values = capture_kv(model, text, tokens)
    registry = fit_registry(keys, values, preset, seed=seed, center_keys=center_keys, model=model)
    tmp = out.with_name(f"{out.stem}.{os.getpid()}.tmp{out.suffix}")
    registry.save(tmp)
    os.replace(tmp, out)
    return out


# ------------------------------------------------------------------------------------ automatic
def model_digest(model: str) -> str:
    """A short digest of a model: for a local folder its config and, per weight file, the size
    and three 64 KiB samples (so a fine-tune with the base's config is told apart); else the name."""
    h = hashlib.sha256(f"v{AUTO_VERSION}".encode())
    folder = Path(model)
    if not folder.is_dir():
        h.update(model.encode())
        return h.hexdigest()[:16]
    for f in sorted(folder.iterdir()):
        if f.name == "config.json":
            h.update(f.read_bytes())
        elif f.suffix in _WEIGHT_SUFFIXES:
            size = f.stat().st_size
            h.update(f"{f.name}:{size}".encode())
            with open(f, "rb") as fh:
                for at in (0, size // 2, max(0, size - _SAMPLE)):
                    fh.seek(at)
                    h.update(fh.read(_SAMPLE))
    return h.hexdigest()[:16]


def weight_bytes(model: str) -> int:
    """Bytes of a local model folder's weight files (0 when unknown)."""
    folder = Path(model)
    if not folder.is_dir():
        return 0
    return sum(f.stat().st_size for f in folder.iterdir() if f.suffix in _WEIGHT_SUFFIXES)


def auto_calibration_file(model: str, preset: str | Preset, seed: int) -> Path:
    """Where the automatic calibration of (model, preset, seed) is cached. The name carries the
    preset's encoding (``Preset.encoding_tag``), so a preset whose bits change in a later release
    never picks up a file fitted for the old ones."""
    from .cache import cache_dir

    preset = get_preset(preset)
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(model.rstrip("/")).name)[:60]
    name = f"{slug}-{model_digest(model)}-{preset.name}-{preset.encoding_tag}-seed{seed}.safetensors"
    return cache_dir("calibration") / name


def _usable(path: Path, preset: Preset) -> bool:
    """Whether a cached automatic calibration file loads for ``preset``; an unusable one is
    removed with a warning (it is remade: the cache is ours, the user's files are never touched)."""
    from .registry import CalibrationError, load_registry

    try:
        load_registry(path, preset=preset.name)
        return True
    except CalibrationError as exc:
        logger.warning("vllm-turboquant: the cached automatic calibration cannot be used (%s); making it again", exc)
        path.unlink(missing_ok=True)
        return False


def ensure_auto_calibration(model: str, preset: str | Preset, seed: int = 0) -> Path | None:
    """The cached automatic calibration file of (model, preset, seed), made now if missing.

    Runs this module's command in a subprocess on the CPU (one worker at a time: a file
    lock; the others then load its file). Returns None, with a warning that says why and
    how to calibrate by hand, when the preset does not calibrate, the model is too large
    for a start-up calibration, or the calibration fails; the engine then serves with
    the data-oblivious codebooks."""
    preset = get_preset(preset)
    if not preset.auto_calibrate:
        return None
    path = auto_calibration_file(model, preset, seed)
    if path.exists() and _usable(path, preset):
        logger.debug("vllm-turboquant: using the cached calibration %s", path)
        return path
    manual = (f"python -m vllm_turboquant.calibrate --model {model} --preset {preset.name} --out FILE, then "
              f"serve with VLLM_TURBOQUANT_CALIBRATION=FILE")
    size = weight_bytes(model)
    if size > AUTO_MAX_WEIGHT_BYTES:
        logger.warning("vllm-turboquant: %s has %.1f GiB of weights, too large to calibrate at start-up (limit "
                       "%.0f GiB); serving %s with data-oblivious codebooks. To calibrate it: %s", model,
                       size / 2**30, AUTO_MAX_WEIGHT_BYTES / 2**30, preset.name, manual)
        return None
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another worker may be calibrating the same model
        if path.exists():
            return path
        logger.info("vllm-turboquant: calibrating %s for %s on the built-in text (%d tokens; once per model, "
                    "cached in %s; turn off with calibration=none)", model, preset.name, AUTO_TOKENS, path)
        t = time.perf_counter()
        cmd = [sys.executable, "-m", "vllm_turboquant.calibrate", "--model", model, "--preset", preset.name,
               "--seed", str(seed), "--out", str(path), "--tokens", str(AUTO_TOKENS)]
        # the command writes the file atomically (calibrate_to_file): a failure leaves no file behind
        proc = subprocess.run(cmd, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
            logger.warning("vllm-turboquant: automatic calibration of %s failed (exit %d):\n%s\nserving %s with "
                           "data-oblivious codebooks. To calibrate by hand: %s", model, proc.returncode, tail,
                           preset.name, manual)
            return None
        logger.info("vllm-turboquant: calibrated %s for %s in %.1f s", model, preset.name, time.perf_counter() - t)
        return path


# ------------------------------------------------------------------------------------------ CLI
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vllm_turboquant.calibrate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a local Hugging Face model folder (or hub id)")
    parser.add_argument("--preset", default="turboquant3", choices=list(PRESETS), help="preset to calibrate for")
    parser.add_argument("--out", required=True, help="the registry file to write (.safetensors)")
    parser.add_argument("--text", help="plain-text file to calibrate on (default: the built-in text)")
    parser.add_argument("--tokens", type=int, default=AUTO_TOKENS, help=f"tokens of text to run (default {AUTO_TOKENS})")
    parser.add_argument("--seed", type=int, default=0, help="rotation seed; serve with the same (default 0)")
    parser.add_argument("--no-center-keys", action="store_true", help="fit codebooks without key-mean subtraction")
    args = parser.parse_args(argv)
    if args.tokens < CHUNK:
        parser.error(f"--tokens {args.tokens}: at least {CHUNK}")

    text = Path(args.text).read_text(errors="ignore") if args.text else builtin_text()
    t = time.time()
    calibrate_to_file(args.model, text, args.out, args.preset, tokens=args.tokens, seed=args.seed,
                      center_keys=not args.no_center_keys)
    print(f"wrote {args.out} ({args.preset}, {args.tokens} tokens) in {time.time() - t:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
