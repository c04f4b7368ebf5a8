# GPU serving image: the official vLLM OpenAI server (0.33.x) with the vllm-turboquant plugin installed.
#
#   docker build -t vllm-turboquant .
#   docker run --gpus all -p 8000:8000 vllm-turboquant --model M --kv-cache-dtype turboquant3
#
# The image's own ENTRYPOINT (vLLM's OpenAI server) is kept, so every argument after the image
# name goes to vLLM unchanged; vLLM loads the plugin through its `vllm.general_plugins` entry point, and
# its `vllm.platform_plugins` entry point selects the TurboQuant attention backend for the TurboQuant
# names (no --attention-backend flag needed). The GPU backend (vllm_turboquant/backend/gpu.py, Triton
# kernels) has not yet run on a GPU.
FROM vllm/vllm-openai:v0.33.0

# Only what the wheel needs (pyproject.toml names README.md): no .venv/, tests or benchmarks.
WORKDIR /opt/vllm-turboquant
COPY pyproject.toml README.md ./
COPY vllm_turboquant ./vllm_turboquant

# --no-deps: never touch the image's torch/vLLM/numpy; add only the small pure-Python
# dependencies the image may lack. Then check that vLLM will find the plugin.
RUN python3 -c "import scipy, safetensors" 2>/dev/null \
        || python3 -m pip install --no-cache-dir "scipy>=1.10" "safetensors>=0.4" \
    && python3 -m pip install --no-cache-dir --no-deps . \
    && python3 -c "from importlib.metadata import entry_points; \
assert any(e.value == 'vllm_turboquant.backend.plugin:register' for e in entry_points(group='vllm.general_plugins')), \
'vllm-turboquant plugin entry point missing'" \
    && rm -rf /opt/vllm-turboquant

# Back to the base image's working directory; ENTRYPOINT and CMD are inherited unchanged.
WORKDIR /vllm-workspace
