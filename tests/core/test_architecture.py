"""The package's shape: the core imports no vLLM, every vLLM import lives in ``vllm_turboquant/backend/``,
the core never reaches into the backend or the kernels, and no test module imports another."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "vllm_turboquant"
CORE = ("presets", "layout", "codebook", "rotation", "registry", "protected", "reference", "ops")


def _imports(path: Path) -> list[tuple[int, str]]:
    """(level, absolute-or-relative module) of every import statement in a file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(0, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append((node.level, node.module or ""))
    return out


def _is_vllm(level: int, module: str) -> bool:
    return level == 0 and (module == "vllm" or module.startswith("vllm."))


def test_only_the_backend_imports_vllm():
    offenders = [str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py")
                 if "backend" not in p.relative_to(PACKAGE).parts and any(_is_vllm(*i) for i in _imports(p))]
    assert offenders == []
    assert any(_is_vllm(*i) for p in (PACKAGE / "backend").rglob("*.py") for i in _imports(p))  # the check can fail


def test_core_modules_stay_below_the_backend_and_the_kernels():
    for name in CORE:
        for level, module in _imports(PACKAGE / f"{name}.py"):
            parts = module.split(".")
            reach = parts[0] if level else parts[1] if parts[0] == "vllm_turboquant" and len(parts) > 1 else ""
            assert reach not in ("backend", "kernels", "cpu_ops"), f"{name}.py imports {module}"


def test_no_test_module_imports_another():
    tests = ROOT / "tests"
    names = {p.stem for p in tests.rglob("test_*.py")}
    offenders = [(str(p.relative_to(ROOT)), m) for p in tests.rglob("*.py") for _, m in _imports(p)
                 if m.split(".")[0] in names]
    assert offenders == []
