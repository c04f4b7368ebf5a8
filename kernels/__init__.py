"""Triton kernels for the packed TurboQuant layout (installed as ``vllm_turboquant.kernels``).

Never import this folder as a top-level ``kernels`` package: that name belongs
to another PyPI distribution. The package ``vllm_turboquant/kernels`` is a link
to this folder.
"""
