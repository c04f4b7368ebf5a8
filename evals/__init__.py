"""Evaluation harness for vllm-turboquant (offline data, lm-eval task YAMLs, perplexity).

Run the modules from the repository root as ``python -m evals.<module>`` or call them
by path; they import only the installed ``vllm_turboquant`` package and never the
repository's top-level ``kernels/`` folder.
"""
