"""The one module of the runner that touches the vLLM plugin (``vllm_turboquant.backend``).

Everything the plugin is told goes through here, through its public functions only: an ad-hoc preset is
registered (``register_preset``) before the engine starts; the engine arguments carry the plugin's options
(``additional_config["turboquant"]``: protected tokens, calibration, ``compressed_prefill``: true as served,
false for a ``+exactprefill`` spec, for the whole run) and vLLM's ``kv_cache_dtype_skip_layers``; one
in-process engine is started (lm-eval's vLLM model, ``evals.lmeval``) and stopped.
"""

from __future__ import annotations

from typing import Any

from evals.spec import Spec, skip_layers


def register_adhoc(preset) -> None:
    """Make an ad-hoc preset (a ``tq:`` spec) a kv-cache dtype in THIS process, before its engine starts.
    Idempotent for the same record; ValueError for a name taken by another record."""
    from vllm_turboquant.backend import register_preset

    register_preset(preset)


def engine_args(spec: Spec, facts: dict[str, Any], cfg: dict[str, Any], plugin_options: dict[str, Any]
                ) -> dict[str, Any]:
    """The ``vllm.LLM`` arguments (beyond lm-eval's defaults) of one spec's engine for a suite ``cfg``:
    a model length for the longest window, needle or fact passage, the Gemma BOS fix, the plugin's options
    (TurboQuant specs; ``compressed_prefill`` stated explicitly: true as served, false for ``+exactprefill``)
    and the bf16 edge layers (``+edgeN``)."""
    max_ruler = max(cfg["ruler_lengths"]) if cfg["ruler_tasks"] else 0
    max_facts = max(cfg.get("facts_lengths") or [0]) + cfg.get("facts_gen_toks", 0) + 128 if cfg.get("facts_n") else 0
    max_len = max(cfg["ppl_window_tokens"] + 1, 2048, max_ruler + 256, max_facts)
    args: dict[str, Any] = {"max_model_len": max_len, "distributed_executor_backend": "uni"}
    if facts["model_type"].startswith("gemma"):
        args["add_bos_token"] = True   # the GGUF-converted Gemma tokenizer does not add it
    if spec.turboquant:
        args["additional_config"] = {"turboquant": {**plugin_options, "compressed_prefill": not spec.exact_prefill}}
    if spec.edge:
        args["kv_cache_dtype_skip_layers"] = skip_layers(spec.edge, facts["num_layers"])
    return args


def start(model_path: str, dtype: str, args: dict[str, Any]):
    """One in-process engine, wrapped as lm-eval's vLLM model (``lm.model`` is the ``vllm.LLM``)."""
    from evals.lmeval import make_lm

    return make_lm(model_path, dtype, **args)


def stop(lm) -> None:
    """Shut an engine from ``start`` down and free it (best effort)."""
    import contextlib
    import gc

    with contextlib.suppress(Exception):  # best effort
        lm.model.llm_engine.engine_core.shutdown()
    del lm
    gc.collect()

