"""Every vLLM name the plugin touches, checked in the installed vLLM (0.32, CPU) and, when its
source is present, in vLLM 0.33 (the GPU release, which cannot run here): the wheel is fetched
with ``pip download --no-deps vllm==0.33.0`` into the cache folder and its Python files are read.

Set VLLM033_SRC to an unpacked ``vllm`` package folder to use another copy; the 0.33 half of the
test is skipped when neither that nor the download is available."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

vllm = pytest.importorskip("vllm")

from support import vllm033_root  # noqa: E402

# (file, kind, name): kind "class", "def" (module-level or method, anywhere in the file) or "assign".
COMMON = [
    ("config/cache.py", "class", "CacheConfig"),
    ("utils/torch_utils.py", "assign", "STR_DTYPE_TO_TORCH_DTYPE"),
    ("v1/attention/backends/registry.py", "class", "AttentionBackendEnum"),
    ("v1/attention/backends/registry.py", "def", "register_backend"),
    ("v1/attention/backends/cpu_attn.py", "class", "CPUAttentionBackend"),
    ("v1/attention/backends/cpu_attn.py", "class", "CPUAttentionBackendImpl"),
    ("v1/attention/backends/cpu_attn.py", "class", "CPUAttentionMetadataBuilder"),
    ("v1/attention/backends/cpu_attn.py", "class", "CPUAttentionMetadata"),
    ("v1/attention/backend.py", "def", "customize_spec"),
    ("v1/attention/backend.py", "def", "supports_kv_cache_dtype"),
    ("v1/kv_cache_interface.py", "class", "KVQuantMode"),
    ("v1/kv_cache_interface.py", "class", "AttentionSpec"),
    ("config/vllm.py", "def", "get_current_vllm_config_or_none"),
    ("config/vllm.py", "def", "set_current_vllm_config"),
    ("distributed/parallel_state.py", "def", "model_parallel_is_initialized"),
    ("distributed/parallel_state.py", "def", "get_tensor_model_parallel_rank"),
    ("distributed/parallel_state.py", "def", "get_tensor_model_parallel_world_size"),
    ("model_executor/models/utils.py", "def", "extract_layer_index"),
    ("model_executor/layers/attention/attention.py", "class", "Attention"),
    ("entrypoints/cli/main.py", "def", "main"),
    ("plugins/__init__.py", "def", "load_general_plugins"),
    ("forward_context.py", "def", "get_forward_context"),
]
ONLY_032 = [("config/cache.py", "assign", "CacheDType"), ("engine/arg_utils.py", "def", "_compute_kwargs")]
ONLY_033 = [("config/cache.py", "def", "register_kv_cache_dtype"), ("config/cache.py", "assign", "KV_CACHE_DTYPES")]
# Signatures our subclasses override must keep their parameter names.
SIGNATURES = [
    ("v1/attention/backends/cpu_attn.py", "CPUAttentionBackendImpl", "__init__"),
    ("v1/attention/backends/cpu_attn.py", "CPUAttentionBackendImpl", "forward"),
    ("v1/attention/backends/cpu_attn.py", "CPUAttentionBackendImpl", "do_kv_cache_update"),
    ("v1/attention/backends/cpu_attn.py", "CPUAttentionMetadataBuilder", "__init__"),
    ("v1/attention/backends/cpu_attn.py", "CPUAttentionMetadataBuilder", "build"),
]
# Metadata fields and spec fields the backend reads.
FIELDS = [("v1/attention/backends/cpu_attn.py", "CPUAttentionMetadata",
           ["query_start_loc", "seq_lens", "block_table", "slot_mapping", "num_actual_tokens"]),
          ("v1/kv_cache_interface.py", "AttentionSpec", ["state_content_bytes", "kv_quant_mode", "dtype", "head_size",
                                                           "page_size_padded"])]


def _tree(root: Path, rel: str) -> ast.Module:
    return ast.parse((root / rel).read_text())


def _has(tree: ast.Module, kind: str, name: str) -> bool:
    for node in ast.walk(tree):
        if kind == "class" and isinstance(node, ast.ClassDef) and node.name == name:
            return True
        if kind == "def" and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            return True
        if kind == "assign" and isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                return True
    return False


def _method_params(tree, cls, method):
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == cls:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == method:
                    return [a.arg for a in item.args.args + item.args.kwonlyargs]
    return None


def _class_fields(tree, cls):
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == cls:
            return {item.target.id for item in node.body if isinstance(item, ast.AnnAssign)
                    and isinstance(item.target, ast.Name)}
    return set()


def _check(root: Path, names) -> list[str]:
    missing = [f"{rel}: {kind} {name}" for rel, kind, name in names if not _has(_tree(root, rel), kind, name)]
    for rel, cls, wanted in FIELDS:
        have = _class_fields(_tree(root, rel), cls)
        missing += [f"{rel}: {cls}.{f}" for f in wanted if f not in have]
    return missing


def installed_root() -> Path:
    return Path(vllm.__file__).parent


def test_names_exist_in_the_installed_vllm():
    assert vllm.__version__.startswith("0.32.")
    assert _check(installed_root(), COMMON + ONLY_032) == []


def test_names_exist_with_the_same_meaning_in_vllm_033():
    root = vllm033_root()
    if root is None:
        pytest.skip("vLLM 0.33 source not available (pip download failed and VLLM033_SRC unset)")
    assert "0.33" in (root / "_version.py").read_text() or "0.33" in str(root)
    assert _check(root, COMMON + ONLY_033) == []
    here = installed_root()
    for rel, cls, method in SIGNATURES:
        assert _method_params(_tree(root, rel), cls, method) == _method_params(_tree(here, rel), cls, method), \
            f"{cls}.{method} changed its parameters in 0.33"
    # 0.33 bug our dtype handler avoids: KVQuantMode.CUSTOM has the value of OCTAVE_K3V4 (an alias).
    text = (root / "v1/kv_cache_interface.py").read_text()
    assert "CUSTOM = 12" in text and "OCTAVE_K3V4 = 12" in text
