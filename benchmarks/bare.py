"""Run a script or module as on a bare GPU box: with the packages such a box lacks made unimportable.

    python benchmarks/bare.py benchmarks/gpu_bench.py --dry-run
    python benchmarks/bare.py -m pytest --collect-only -q tests/kernels

``gpu_check.sh --dry-run`` uses it to prove that the GPU check needs nothing beyond torch, triton, numpy and
pytest (and this checkout): an import of vLLM, scipy, safetensors, transformers and the other packages
listed in ``ABSENT`` raises ImportError, as it would there.
"""

from __future__ import annotations

import runpy
import sys

ABSENT = ("vllm", "scipy", "safetensors", "transformers", "tokenizers", "huggingface_hub", "tqdm", "lm_eval",
          "hypothesis", "xdist", "pandas", "pyarrow", "matplotlib", "numba", "openai", "accelerate")


def main() -> None:
    for name in ABSENT:
        sys.modules[name] = None  # `import name` now raises ImportError
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    if sys.argv[1] == "-m":
        sys.argv = sys.argv[2:]
        runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
    else:
        sys.argv = sys.argv[1:]
        sys.path.insert(0, sys.argv[0].rsplit("/", 1)[0] if "/" in sys.argv[0] else ".")
        runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
