"""Teach vLLM our ``--kv-cache-dtype`` names.

vLLM 0.33 has a public registry (``register_kv_cache_dtype``): one handler per name.

vLLM 0.32 has none: it validates the name against the ``CacheDType`` Literal in four places
(the pydantic ``CacheConfig``, whose validator is built at import; the ``EngineArgs`` field,
whose argparse ``choices`` come from it through a cached helper; a copy of the Literal imported
by the attention selector; and the name -> torch dtype map). ``_widen_literal_032`` is the
version shim that rebuilds them; it goes when 0.32 support does.
``add_kv_cache_dtypes`` does whichever the running vLLM needs; it is idempotent.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Literal, get_args

import torch

#: vLLM dispatches on these prefixes/suffixes itself; our names must avoid them.
_RESERVED_PREFIXES = ("turboquant_", "fp8", "nvfp4", "octave_")
_RESERVED_SUFFIXES = ("per_token_head",)


def check_name(name: str) -> None:
    """Raise ValueError if vLLM's in-tree dtype dispatch would claim ``name``."""
    if name.startswith(_RESERVED_PREFIXES) or name.endswith(_RESERVED_SUFFIXES):
        raise ValueError(f"kv-cache dtype name {name!r} collides with vLLM's in-tree names "
                         f"(prefixes {_RESERVED_PREFIXES}, suffixes {_RESERVED_SUFFIXES})")


def add_kv_cache_dtypes(names: Iterable[str]) -> tuple[str, ...]:
    """Make ``names`` valid kv-cache dtypes (stored as uint8) everywhere vLLM checks; returns all accepted names."""
    import vllm.config.cache as cache_mod

    names = tuple(names)
    for name in names:
        check_name(name)
    if hasattr(cache_mod, "register_kv_cache_dtype"):
        return _register_with_registry(cache_mod, names)
    return _widen_literal_032(cache_mod, names)


def _widen_literal_032(cache_mod, names: tuple[str, ...]) -> tuple[str, ...]:
    """The vLLM 0.32 shim: rebuild the ``CacheDType`` Literal and everything that captured it."""
    from pydantic.dataclasses import rebuild_dataclass
    from vllm.engine import arg_utils
    from vllm.utils import torch_utils

    for name in names:
        torch_utils.STR_DTYPE_TO_TORCH_DTYPE.setdefault(name, torch.uint8)
    old = cache_mod.CacheDType
    current = get_args(old)
    missing = tuple(n for n in names if n not in current)
    if not missing:
        return current
    wide = Literal[current + missing]  # type: ignore[valid-type]
    cache_mod.CacheDType = wide
    for cls, field in ((cache_mod.CacheConfig, "cache_dtype"), (arg_utils.EngineArgs, "kv_cache_dtype")):
        cls.__dataclass_fields__[field].type = wide
        cls.__annotations__[field] = wide
    rebuild_dataclass(cache_mod.CacheConfig, force=True)
    for name, module in list(sys.modules.items()):  # e.g. vllm.v1.attention.selector holds its own copy
        # vars(), not getattr: lazy modules (transformers) would import on attribute access
        if name.split(".")[0] == "vllm" and vars(module).get("CacheDType") is old:
            module.CacheDType = wide
    arg_utils._compute_kwargs.cache_clear()  # argparse choices are cached per config class
    return get_args(wide)


def _register_with_registry(cache_mod, names: tuple[str, ...]) -> tuple[str, ...]:
    """vLLM 0.33: one handler per name (uint8 storage, no vLLM-side quantisation)."""
    from vllm.v1.kv_cache_interface import KVQuantMode

    for name in names:
        if name in cache_mod.KV_CACHE_DTYPES:
            continue

        class Handler:
            def torch_dtype(self):
                return torch.uint8

            def quant_mode(self):
                # Not KVQuantMode.CUSTOM: in 0.33 it has the value of OCTAVE_K3V4 and so aliases it.
                return KVQuantMode.NONE

        Handler.name = name
        cache_mod.register_kv_cache_dtype(name)(Handler)
    return tuple(cache_mod.KV_CACHE_DTYPES)
