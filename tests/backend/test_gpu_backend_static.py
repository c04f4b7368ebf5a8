"""vllm_turboquant/backend/gpu.py and platform.py are for vLLM 0.33 on CUDA, which cannot run here: check them
statically (tests/backend/test_gpu_glue.py runs their glue against vLLM 0.33's own classes on the CPU).

The file is parsed with ``ast`` (never imported) and compared with the vLLM 0.33 sources found
the way tests/test_vllm_names.py finds them (``vllm033_root``):

* every ``vllm.*`` import names a module and a name that exist in 0.33;
* every method a backend class defines overrides a method of its 0.33 base classes (or is one
  of the duck-typed hooks vLLM calls, compared with a stock backend's), keeping the parameter
  names in order (extra trailing parameters must have defaults), and the class attributes it
  sets exist on the bases;
* ``Enum.MEMBER``-style reads of vLLM classes (``KVCacheLayout.LBHNC``...) and the
  ``CommonAttentionMetadata`` fields the builder reads exist.

The platform plugin (``platform.py``): its vLLM imports exist in 0.33, its class's overrides keep
``CudaPlatform``'s parameters, the entry point is declared; the backend declares only block-compact layouts
and only the head sizes the kernel tests cover.

And the CPU build never imports the module: no other module imports it, and a CPU ``register()``
leaves it out of ``sys.modules``; on the CPU build the platform plugin is loaded by vLLM and answers None.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from support import vllm033_root  # noqa: E402  (same source location logic)

PACKAGE = Path(__file__).resolve().parents[2] / "vllm_turboquant"
GPU_BACKEND = PACKAGE / "backend" / "gpu.py"
PLATFORM = PACKAGE / "backend" / "platform.py"

# Hooks vLLM calls by name without declaring them on AttentionImpl: compare with a stock backend.
HOOKS = {"do_kv_cache_update": ("v1.attention.backends.triton_attn", "TritonAttentionImpl")}
_STOP_BASES = {"ABC", "Generic", "Protocol", "object", "Enum", "str", "int", "IntEnum"}


@pytest.fixture(scope="module")
def root() -> Path:
    found = vllm033_root()
    if found is None:
        pytest.skip("vLLM 0.33 source not available (pip download failed and VLLM033_SRC unset)")
    return found


@pytest.fixture(scope="module")
def ours() -> ast.Module:
    return ast.parse(GPU_BACKEND.read_text())


# -- reading the 0.33 tree -------------------------------------------------------------------

class Tree:
    def __init__(self, root: Path):
        self.root = root
        self._cache: dict[str, ast.Module | None] = {}

    def path(self, module: str) -> Path | None:
        parts = module.split(".")
        assert parts[0] == "vllm", module
        base = self.root.joinpath(*parts[1:])
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate
        return None

    def module(self, module: str) -> ast.Module | None:
        if module not in self._cache:
            path = self.path(module)
            self._cache[module] = ast.parse(path.read_text()) if path else None
        return self._cache[module]

    def top_level(self, module: str) -> dict[str, ast.AST]:
        """Names bound at module level (also inside top-level if/try), imports included."""
        names: dict[str, ast.AST] = {}
        tree = self.module(module)

        def visit(body):
            for node in body:
                if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    names[node.name] = node
                elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                    for t in targets:
                        for n in ast.walk(t):
                            if isinstance(n, ast.Name):
                                names[n.id] = node
                elif isinstance(node, (ast.Import, ast.ImportFrom)):
                    for alias in node.names:
                        names[(alias.asname or alias.name).split(".")[0]] = node
                elif isinstance(node, ast.If):
                    visit(node.body)
                    visit(node.orelse)
                elif isinstance(node, ast.Try):
                    visit(node.body)
                    for h in node.handlers:
                        visit(h.body)
                    visit(node.orelse)

        if tree is not None:
            visit(tree.body)
        return names

    def resolve_class(self, module: str, name: str, depth: int = 0) -> tuple[str, ast.ClassDef] | None:
        """Follow re-exports to the ClassDef of ``name`` as seen from ``module``."""
        node = self.top_level(module).get(name)
        if isinstance(node, ast.ClassDef):
            return module, node
        if isinstance(node, ast.ImportFrom) and depth < 5:
            src = _absolute(module, node, self.path(module))
            if src and src.startswith("vllm"):
                real = next(a.name for a in node.names if (a.asname or a.name) == name)
                return self.resolve_class(src, real, depth + 1)
        return None

    def chain(self, module: str, name: str) -> list[tuple[str, ast.ClassDef]]:
        """The class and its vLLM base classes, depth first (a simple MRO)."""
        found = self.resolve_class(module, name)
        if found is None:
            return []
        out = [found]
        for base in found[1].bases:
            base_name = _base_name(base)
            if base_name and base_name not in _STOP_BASES:
                for item in self.chain(found[0], base_name):
                    if item not in out:
                        out.append(item)
        return out


def _absolute(module: str, node: ast.ImportFrom, path: Path | None) -> str | None:
    if node.level == 0:
        return node.module
    package = module.split(".") if path is not None and path.name == "__init__.py" else module.split(".")[:-1]
    package = package[: len(package) - (node.level - 1)]
    return ".".join(package + ([node.module] if node.module else []))


def _base_name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Subscript):
        node = node.value
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def _members(chain) -> dict[str, ast.AST]:
    """Methods and class-level attributes along a chain; the first definition wins."""
    out: dict[str, ast.AST] = {}
    for _, cls in chain:
        for item in cls.body:
            names = []
            if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                names = [item.name]
            elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                names = [item.target.id]
            elif isinstance(item, ast.Assign):
                names = [t.id for t in item.targets if isinstance(t, ast.Name)]
            for n in names:
                out.setdefault(n, item)
    return out


def _params(fn: ast.FunctionDef) -> tuple[list[str], set[str], bool]:
    """Parameter names (self/cls dropped), the names that have defaults, and whether **kwargs/*args exist."""
    args = fn.args
    positional = args.posonlyargs + args.args
    names = [a.arg for a in positional]
    with_default = {a.arg for a in positional[len(positional) - len(args.defaults):]} if args.defaults else set()
    names += [a.arg for a in args.kwonlyargs]
    with_default |= {a.arg for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True) if d is not None}
    if names and names[0] in ("self", "cls") and not _is_static(fn):
        names = names[1:]
    return names, with_default, bool(args.vararg or args.kwarg)


def _is_static(fn: ast.FunctionDef) -> bool:
    return any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in fn.decorator_list)


def _kind(fn: ast.FunctionDef) -> str:
    decorators = {d.id for d in fn.decorator_list if isinstance(d, ast.Name)}
    return "static" if "staticmethod" in decorators else "class" if "classmethod" in decorators else "instance"


def _vllm_imports(tree: ast.Module) -> dict[str, tuple[str, str]]:
    """Local name -> (vllm module, imported name) for every ``from vllm... import`` in the file."""
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and \
                (node.module == "vllm" or node.module.startswith("vllm.")):
            for alias in node.names:
                out[alias.asname or alias.name] = (node.module, alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("vllm.") or alias.name == "vllm":
                    out[alias.asname or alias.name] = (alias.name, "")
    return out


# -- the checks ------------------------------------------------------------------------------

def test_every_vllm_import_exists_in_033(root, ours):
    tree = Tree(root)
    imports = _vllm_imports(ours)
    assert imports, "backend/gpu.py imports nothing from vLLM?"
    missing = []
    for _local, (module, name) in sorted(imports.items()):
        if tree.path(module) is None:
            missing.append(f"module {module}")
        elif name and name not in tree.top_level(module) and tree.path(f"{module}.{name}") is None:
            missing.append(f"{module}.{name}")
    assert missing == [], f"not in vLLM 0.33: {missing}"


def _our_classes(ours):
    return [node for node in ours.body if isinstance(node, ast.ClassDef)]


def test_overrides_match_the_033_base_classes(root, ours):
    tree = Tree(root)
    imports = _vllm_imports(ours)
    problems, checked = [], 0
    for cls in _our_classes(ours):
        chain = []
        for base in cls.bases:
            name = _base_name(base)
            if name in imports:
                module, real = imports[name]
                found = tree.chain(module, real)
                assert found, f"{cls.name}: base {name} not found in 0.33 {module}"
                chain += found
        if not chain:
            continue
        inherited = _members(chain)
        is_dataclass = any(_base_name(d) == "dataclass" for d in cls.decorator_list)
        for item in cls.body:
            if isinstance(item, ast.FunctionDef):
                name = item.name
                if name.startswith("__") and name != "__init__":
                    continue
                base_fn = inherited.get(name)
                if base_fn is None and name in HOOKS:
                    hook_module, hook_cls = HOOKS[name]
                    base_fn = _members(tree.chain(f"vllm.{hook_module}", hook_cls)).get(name)
                    assert base_fn is not None, f"reference hook {hook_cls}.{name} missing in 0.33"
                if base_fn is None:
                    if not name.startswith("_"):
                        problems.append(f"{cls.name}.{name} overrides nothing in 0.33 (typo?)")
                    continue
                if not isinstance(base_fn, ast.FunctionDef):
                    problems.append(f"{cls.name}.{name} is not a method in 0.33")
                    continue
                checked += 1
                mine, my_defaults, _ = _params(item)
                theirs, _, _ = _params(base_fn)
                if mine[: len(theirs)] != theirs:
                    problems.append(f"{cls.name}.{name}{tuple(mine)} vs 0.33 {tuple(theirs)}")
                extra = [p for p in mine[len(theirs):] if p not in my_defaults]
                if extra:
                    problems.append(f"{cls.name}.{name}: extra parameters without defaults {extra}")
                if _kind(item) != _kind(base_fn):
                    problems.append(f"{cls.name}.{name} is a {_kind(item)} method, 0.33 has a {_kind(base_fn)} one")
            elif not is_dataclass and isinstance(item, (ast.Assign, ast.AnnAssign)):
                targets = item.targets if isinstance(item, ast.Assign) else [item.target]
                for t in targets:
                    if isinstance(t, ast.Name) and t.id not in inherited:
                        problems.append(f"{cls.name}.{t.id} is not an attribute of its 0.33 bases (typo?)")
    assert problems == [], problems
    assert checked >= 15  # backend hooks, builder, impl __init__/forward/do_kv_cache_update


def test_enum_members_and_metadata_fields_exist_in_033(root, ours):
    tree = Tree(root)
    imports = _vllm_imports(ours)
    missing = []
    for node in ast.walk(ours):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in imports:
            module, real = imports[node.value.id]
            chain = tree.chain(module, real)
            if chain and node.attr not in _members(chain):
                missing.append(f"{real}.{node.attr}")
    # Fields the builders read from CommonAttentionMetadata (as ``cam`` or ``common_attn_metadata``): ours
    # hands it to layer.plan_step, the exact-copy companion's builder (exact.py) reads it too.
    cam_fields = _members(tree.chain("vllm.v1.attention.backend", "CommonAttentionMetadata"))
    readers = [ours] + [ast.parse((PACKAGE / "backend" / f).read_text()) for f in ("layer.py", "exact.py")]
    read = {node.attr for module in readers for node in ast.walk(module) if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name) and node.value.id in ("cam", "common_attn_metadata")}
    assert {"query_start_loc", "query_start_loc_cpu", "seq_lens", "block_table_tensor", "slot_mapping",
            "num_actual_tokens", "max_query_len", "max_seq_len", "num_reqs"} <= read
    missing += [f"CommonAttentionMetadata.{f}" for f in sorted(read - set(cam_fields))]
    # Config and registry names the backend and the plugin's CUDA branch rely on.
    for module, cls, attr in [("vllm.config.compilation", "CompilationConfig", "static_forward_context"),
                              ("vllm.v1.attention.backends.registry", "AttentionBackendEnum", "CUSTOM"),
                              ("vllm.platforms.interface", "Platform", "is_cuda"),
                              ("vllm.config.attention", "AttentionConfig", "backend"),
                              ("vllm.engine.arg_utils", "EngineArgs", "attention_backend")]:
        if attr not in _members(tree.chain(module, cls)):
            missing.append(f"{cls}.{attr}")
    assert missing == [], f"not in vLLM 0.33: {missing}"


def test_the_backend_answers_to_its_enum_name(ours):
    getter = next(fn for cls in _our_classes(ours) if cls.name == "TurboQuantGPUBackend"
                  for fn in cls.body if isinstance(fn, ast.FunctionDef) and fn.name == "get_name")
    returned = [n.value.value for n in ast.walk(getter) if isinstance(n, ast.Return)]
    assert returned == ["CUSTOM"]
    plugin = (PACKAGE / "backend" / "plugin.py").read_text()
    assert '"vllm_turboquant.backend.gpu.TurboQuantGPUBackend"' in plugin
    assert "TurboQuantGPUBackend" in {c.name for c in _our_classes(ours)}


# -- the platform plugin, layouts and head sizes ------------------------------------------------

def test_platform_plugin_imports_and_overrides_exist_in_033(root):
    tree = Tree(root)
    module = ast.parse(PLATFORM.read_text())
    imports = _vllm_imports(module)
    assert {"CudaPlatform", "AttentionBackendEnum", "cuda_platform_plugin", "get_current_vllm_config_or_none"} \
        <= set(imports)
    missing = [f"{m}.{n}" for _, (m, n) in sorted(imports.items())
               if tree.path(m) is None or (n and n not in tree.top_level(m) and tree.path(f"{m}.{n}") is None)]
    assert missing == [], f"not in vLLM 0.33: {missing}"
    # CudaPlatform is NvmlCudaPlatform or NonNvmlCudaPlatform (chosen at import); both derive CudaPlatformBase
    assert isinstance(tree.top_level("vllm.platforms.cuda")["CudaPlatform"], ast.Assign)
    inherited = _members(tree.chain("vllm.platforms.cuda", "NvmlCudaPlatform"))
    cls = next(n for n in ast.walk(module) if isinstance(n, ast.ClassDef) and n.name == "TurboQuantCudaPlatform")
    methods = [item for item in cls.body if isinstance(item, ast.FunctionDef)]
    assert {m.name for m in methods} == {"get_attn_backend_cls", "check_and_update_config"}
    for method in methods:
        base = inherited[method.name]
        assert _params(method)[0] == _params(base)[0] and _kind(method) == _kind(base) == "class", method.name
    assert "AttentionSelectorConfig" in ast.unparse(inherited["get_attn_backend_cls"])


def test_platform_entry_point_is_declared_under_our_plugin_name():
    import tomllib

    meta = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["project"]["entry-points"]
    assert meta["vllm.platform_plugins"] == {"turboquant": "vllm_turboquant.backend.platform:detect"}
    assert set(meta["vllm.general_plugins"]) == {"turboquant"}  # one name: VLLM_PLUGINS=turboquant keeps both


def test_detect_answers_only_for_vllm_033_on_cuda(monkeypatch, caplog):
    """The entry point's answer for each situation it can meet (vLLM's own CUDA detection stubbed)."""
    pytest.importorskip("vllm")
    import vllm.platforms

    from vllm_turboquant.backend import platform

    def answer(version="0.33.0", cuda=True, others=(), **env):
        monkeypatch.setattr(platform, "_installed_vllm", lambda: version)
        monkeypatch.setattr(platform, "_other_platform_plugins", lambda: list(others))
        monkeypatch.setattr(vllm.platforms, "cuda_platform_plugin", lambda: "vllm.platforms.cuda.CudaPlatform"
                            if cuda is True else cuda())
        for key in ("VLLM_TARGET_DEVICE", platform.DISABLE_ENV):
            monkeypatch.delenv(key, raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        return platform.detect()

    assert answer() == platform.PLATFORM_CLASS == "vllm_turboquant.backend.platform.TurboQuantCudaPlatform"
    assert answer(cuda=lambda: None) is None  # vLLM 0.33 on a machine without an NVIDIA GPU (e.g. ROCm)
    assert answer(version=None) is None  # the CPU build: no distribution named vllm
    assert answer(version="0.32.0") is None and answer(version="0.33.0+cpu") is None
    assert answer(version="0.33.1+rocm631") is None
    assert answer(VLLM_TARGET_DEVICE="cpu") is None
    assert answer(VLLM_TURBOQUANT_PLATFORM="0") is None

    def broken():
        raise RuntimeError("NVML exploded")

    assert answer(cuda=broken) is None  # never breaks vLLM's start-up
    with caplog.at_level("WARNING", logger="vllm.vllm_turboquant"):
        assert answer(others=["vendor (vendor_plugin:detect)"]) is None
    assert "--attention-backend CUSTOM" in caplog.text and "vendor" in caplog.text


def _assigned(module: ast.Module, name: str) -> ast.expr:
    return next(n.value for n in module.body if isinstance(n, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == name for t in n.targets))


def test_declared_layouts_are_the_block_compact_ones(root, ours):
    """Padded pages (the exact-copy companions', and unified pages) need L and B outermost (0.33's
    ``compute_layout_strides`` asserts otherwise); every block-compact layout is declared."""
    layouts = {}
    for node in ast.parse((root / "v1" / "kv_cache_layout.py").read_text()).body:
        if isinstance(node, ast.ClassDef) and node.name == "KVCacheLayout":
            layouts = {t.targets[0].id: ast.literal_eval(t.value) for t in node.body
                       if isinstance(t, ast.Assign) and isinstance(t.value, ast.Tuple)}
    declared = [e.attr for e in _assigned(ours, "LAYOUTS").elts]
    compact = {name for name, order in layouts.items() if set(order[:2]) == {0, 1}}
    assert set(declared) == compact and len(compact) == 4 and declared[0] == "LBHNC"


def test_gpu_head_sizes_are_the_ones_the_kernel_tests_cover(ours):
    """The head sizes both attention kernels (decode and prefill) are tested at; no other is accepted."""
    kernel_tests = ast.parse((PACKAGE.parent / "tests" / "support.py").read_text())  # the kernel test matrices
    covered = [{ast.literal_eval(case.elts[1]) for case in _assigned(kernel_tests, name).elts}
               for name in ("KERNEL_DECODE_CASES", "KERNEL_PREFILL_CASES")]
    covered = covered[0] & covered[1]
    sizes = ast.literal_eval(_assigned(ours, "TESTED_HEAD_SIZES"))
    assert set(sizes) == covered, (sorted(sizes), sorted(covered))


# -- never on the CPU build ------------------------------------------------------------------

def _imports_gpu_backend(tree: ast.Module) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if (module.endswith("backend.gpu") or (node.level and module == "gpu")
                    or any(a.name == "gpu" for a in node.names)):
                return True
        elif isinstance(node, ast.Import) and any(a.name.endswith("backend.gpu") for a in node.names):
            return True
    return False


def test_no_module_imports_the_gpu_backend():
    offenders = [p.name for p in PACKAGE.rglob("*.py")
                 if p != GPU_BACKEND and _imports_gpu_backend(ast.parse(p.read_text()))]
    assert offenders == []


CPU_SCRIPT = """
import sys
from importlib.metadata import entry_points
from vllm_turboquant.backend.plugin import register
register()
import vllm_turboquant.backend.cpu, vllm_turboquant.backend.layer
from vllm.v1.attention.backends import registry
from vllm.platforms import current_platform
import vllm_turboquant.backend.platform as platform
assert "vllm_turboquant.backend.gpu" not in sys.modules, "the CPU path imported backend.gpu"
assert registry.AttentionBackendEnum.CUSTOM not in registry._ATTN_OVERRIDES, "CUSTOM registered on CPU"
# the platform plugin: installed, loaded by vLLM (it answered None), never built, CUDA never imported
installed = {ep.name: ep.value for ep in entry_points(group="vllm.platform_plugins")}
assert installed.get("turboquant") == "vllm_turboquant.backend.platform:detect", installed
assert type(current_platform).__name__ == "CpuPlatform", type(current_platform)
assert platform.detect() is None and "_cls" not in vars(platform) and "vllm.platforms.cuda" not in sys.modules
print("CPU-OK")
"""


def test_the_cpu_plugin_path_never_imports_the_gpu_backend(tmp_path):
    pytest.importorskip("vllm")
    done = subprocess.run([sys.executable, "-c", CPU_SCRIPT], capture_output=True, text=True, cwd=tmp_path,
                          timeout=300)
    assert "CPU-OK" in done.stdout, done.stderr[-3000:]
