"""Builds the compiled CPU attention ops (vllm_turboquant/csrc) with the package; everything else about
the package is in pyproject.toml.

The result is a plain shared library, ``vllm_turboquant/_tq_cpu*.so``, that ``vllm_turboquant.cpu_ops``
loads with ctypes: no Python or torch headers, so no ABI coupling. On x86-64 the kernels are compiled
three times (AVX-512, AVX2 + FMA, portable) and the library picks one at run time from the CPU's
features; elsewhere (aarch64, ...) the portable kernels alone. No -ffast-math, no FMA contraction: the
kernels spell out every fused multiply-add, so every ISA gives the same bits. The extension is optional:
without a C++17 compiler the install still succeeds and the torch reference serves (with a warning).
"""

from __future__ import annotations

import os
import platform
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

CSRC = Path("vllm_turboquant") / "csrc"
COMMON_FLAGS = ["-std=c++17", "-O3", "-g0", "-fPIC", "-fvisibility=hidden", "-ffp-contract=off", "-fno-fast-math",
                "-fno-finite-math-only"]
X86_KERNELS = {  # source -> ISA flags; a compiler that refuses one leaves that ISA out
    "tq_avx512.cpp": ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mfma", "-mf16c"],
    "tq_avx2.cpp": ["-mavx2", "-mfma", "-mf16c"],
}


class BuildSharedLibrary(build_ext):
    """Compile every kernel source with its own ISA flags (in parallel: they are independent) and link one
    shared library."""

    def build_extension(self, ext: Extension) -> None:
        x86 = platform.machine().lower() in ("x86_64", "amd64", "x86-64")
        base = [] if x86 else ["-DTQ_GENERIC_ONLY"]
        isa_sources = X86_KERNELS if x86 else {}
        self.mkpath(str(Path(self.build_temp) / CSRC))
        with ThreadPoolExecutor(max(1, min(len(isa_sources) + 1, os.cpu_count() or 1))) as pool:
            generic = pool.submit(self._compile, "tq_generic.cpp", base)
            isa = {source: pool.submit(self._compile, source, flags) for source, flags in isa_sources.items()}
            objects, defines = generic.result(), list(base)
            for source, job in isa.items():
                try:
                    objects += job.result()
                except Exception as exc:  # noqa: BLE001 - a compiler without this ISA: build without it
                    self.warn(f"vllm-turboquant: {source} does not compile here ({exc}); built without it")
                    defines.append(f"-DTQ_WITHOUT_{source[3:-4].upper()}")
        objects += self._compile("tq_api.cpp", defines)  # the dispatcher: knows which ISAs made it
        self.compiler.link_shared_object(objects, self.get_ext_fullpath(ext.name), extra_postargs=["-lpthread"],
                                         target_lang="c++")

    def _compile(self, source: str, flags: list[str]) -> list[str]:
        return self.compiler.compile([str(CSRC / source)], output_dir=self.build_temp,
                                     extra_postargs=COMMON_FLAGS + flags,
                                     depends=[str(p) for p in CSRC.glob("*") if p.suffix in (".h", ".inc")])


setup(
    ext_modules=[Extension("vllm_turboquant._tq_cpu", sources=[str(p) for p in sorted(CSRC.glob("*.cpp"))],
                           optional=True)],
    cmdclass={"build_ext": BuildSharedLibrary},
)
