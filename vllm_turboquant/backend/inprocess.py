"""Run a vLLM engine inside this process (engine core and worker included).

For tests, benchmarks and evaluations: an in-process engine starts in seconds
instead of spawning processes, and its model and attention layers can be inspected.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def in_process_llm(model: str, **kwargs) -> Iterator[vllm.LLM]:  # noqa: F821
    """An ``LLM`` whose engine core and worker live in this process; shut down on exit.

    Defaults: enforce_eager, max_model_len 1024, seed 0; ``VLLM_CPU_KVCACHE_SPACE`` 1 GiB unless set.
    """
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM

    kwargs = {"enforce_eager": True, "max_model_len": 1024, "seed": 0, "distributed_executor_backend": "uni",
              **kwargs}
    llm = LLM(model, **kwargs)
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def worker_model(llm):
    """The model module of an in-process engine."""
    return llm.llm_engine.model_executor.driver_worker.worker.model_runner.model


def attention_layers(llm) -> list:
    """(layer module, impl) of every attention layer, in layer order."""
    from vllm.model_executor.layers.attention import Attention

    return [(m, m.impl) for m in worker_model(llm).modules() if isinstance(m, Attention)]


def kv_cache_tokens(llm) -> int:
    """vLLM's KV capacity in tokens (what it logs as 'KV cache size': requests of max_model_len tokens
    that fit at once, times max_model_len, every KV-cache group counted)."""
    return int(llm.llm_engine.vllm_config.cache_config.kv_cache_size_tokens)
