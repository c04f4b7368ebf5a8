"""Launch introspection for tests and benchmarks (not used on the serving path).

``record_launches(*kernels)`` records every launch of the given Triton kernels (compiled
``JITFunction``s or, under ``TRITON_INTERPRET=1``, interpreted ones): grid, arguments, and
``compile_key`` -- the key Triton's JIT cache files the launch under (its constexprs, the type and
divisibility specialisation of every other argument, and the launch options). Distinct keys are
distinct compiled variants, so a test can count them without a GPU. ``compiled_variants`` counts
the variants a compiled kernel really holds on a device.

Relies on Triton's runtime internals (``triton.runtime.jit``); where they are missing,
``compile_key`` raises ``NotImplementedError``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Launch:
    """One recorded launch: the kernel object, its grid and its arguments as passed."""

    kernel: Any
    grid: Any
    args: tuple
    kwargs: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return getattr(self.kernel, "__name__", None) or self.kernel.fn.__name__

    def key(self) -> str:
        return compile_key(self.kernel, self.args, self.kwargs)


@contextlib.contextmanager
def record_launches(*kernels, run: bool = True) -> Iterator[list[Launch]]:
    """Record the launches of ``kernels`` made inside the block (appended to the yielded list).
    With ``run=False`` the launches are recorded but not executed (outputs stay unwritten)."""
    launches: list[Launch] = []

    def wrap(kernel, original):
        def recorded(*args, grid, warmup, **kwargs):
            if not warmup:
                launches.append(Launch(kernel, grid, args, dict(kwargs)))
            return original(*args, grid=grid, warmup=warmup, **kwargs) if run else None
        return recorded

    for k in kernels:
        k.run = wrap(k, k.run)
    try:
        yield launches
    finally:
        for k in kernels:
            del k.run  # the class's run again


def jit_function(kernel):
    """A ``JITFunction`` for ``kernel``: itself, or a twin of an interpreted kernel (same Python
    function and specialisation settings), which can compute keys but not run."""
    from triton.runtime.jit import JITFunction

    if isinstance(kernel, JITFunction):
        return kernel
    opts = getattr(kernel, "kwargs", {})
    return JITFunction(kernel.fn, do_not_specialize=opts.get("do_not_specialize"),
                       do_not_specialize_on_alignment=opts.get("do_not_specialize_on_alignment"))


def compile_key(kernel, args: tuple, kwargs: dict) -> str:
    """The specialisation a launch of ``kernel`` with these arguments compiles for (as a string)."""
    try:
        from triton.backends.compiler import BaseBackend
        from triton.runtime.jit import create_function_from_signature
    except ImportError as e:  # older / newer Triton internals
        raise NotImplementedError(f"this Triton has no create_function_from_signature: {e}") from e
    jf = jit_function(kernel)
    binder = create_function_from_signature(jf.signature, jf.params, BaseBackend)
    _, specialization, options = binder(*args, **kwargs)
    return repr((specialization, sorted(options.items())))


def compiled_variants(kernel) -> int | None:
    """Variants a compiled ``JITFunction`` holds on the current device (None under the interpreter)."""
    caches = getattr(kernel, "device_caches", None)
    if caches is not None:
        return sum(len(c[0]) for c in caches.values())
    cache = getattr(kernel, "cache", None)  # older Triton
    return None if cache is None else sum(len(c) for c in cache.values())
