"""The reliability suite: load and faults against real ``vllm-turboquant serve`` servers on loopback.

    python benchmarks/reliability/run.py [--model DIR] [--out DIR] [--budget-min 60] [--only ROW ...]

Rows (one server at a time, except the two-server row):

* soak turboquant3 / soak auto: 500 mixed OpenAI requests (chat and completions, 35% streamed, 8-64 tokens),
  100 in flight: errors, empty answers, p50 / p95 latency, requests per second;
* cancellations: 30 streams closed after 3 chunks; nothing left running, the next request answered;
* bad requests: 24 malformed requests, each a 4xx or a valid answer, and the server still serves;
* preemption: a 12 MiB KV cache (``--kv-cache-memory-bytes``, ~900 tokens), 16 requests of 256 tokens at once;
* calibration faults: read-only cache folder, full cache folder (16 KiB tmpfs; root only), SIGKILL of the
  calibrating worker then a restart, SIGTERM during calibration, two servers on one fresh cache, the
  calibration time limit; bad options refused by ``serve`` in < 10 s.

The model is SmolLM2-135M-Instruct (fetched and cached by ``vllm_turboquant.assets``) unless ``--model``.
Every row has its own time limits and the whole run stops starting rows after ``--budget-min`` minutes
(the rows not run are SKIP). Prints one summary table (Markdown) and writes ``summary.json`` and the
server logs to ``--out``. Exit status 0 when every row that ran passed. Needs ``aiohttp`` and ``psutil``
(both come with vLLM).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import faults  # noqa: E402
import load  # noqa: E402

from vllm_turboquant.demo import Server, free_port  # noqa: E402

NAME = "model"


def _serve(model: Path, dtype: str, out: Path, cache: Path, extra: tuple[str, ...] = ()) -> Server:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_TURBOQUANT_CACHE": str(cache)}
    srv = Server(model, dtype, free_port(), out / f"serve-{dtype}{'-small-kv' if extra else ''}.log",
                 max_model_len=1024, env=env, extra_args=("--served-model-name", NAME, *extra))
    if "--kv-cache-memory-bytes" in extra:
        srv.env.pop("VLLM_CPU_KVCACHE_SPACE")  # the CPU platform lets it override --kv-cache-memory-bytes
    return srv


def _fmt(row: str, result: dict | None) -> tuple[str, str]:
    """(status, detail) of a row for the summary table."""
    if result is None:
        return "SKIP", "not run (time budget or --only)"
    if "error" in result and result.get("ok") is False and "traceback" in result:
        return "FAIL", " ".join(result["error"].split())[:240]
    ok = result.get("ok")
    status = "PASS" if ok else ("SKIP" if ok is None else "FAIL")
    r = result
    if row.startswith("soak"):
        detail = (f"{r['ok_count']}/{r['requests']} ok, {r['errors']} errors ({r['empty']} empty), "
                  f"p50 {r['p50_s']:.2f} s, p95 {r['p95_s']:.2f} s, {r['req_per_s']:.2f} req/s")
    elif row == "cancellations":
        detail = (f"{r['streams']} streams cut after {r['cut_after_chunks']}+ chunks; running after: "
                  f"{r['running_after']:g}; next request ok: {r['ok_after']}")
    elif row == "bad requests":
        detail = (f"{r['answered_ok']}/{r['requests']} answered 4xx or valid; serving after: {r['ok_after']}"
                  + (f"; failures: {r['failures']}" if r["failures"] else ""))
    elif row == "preemption":
        detail = (f"{r['completed']}/{r['requests']} completed, {r['preemptions']:g} preemptions, "
                  f"{r['wall_s']:.0f} s (KV cache {r.get('kv_cache_tokens')} tokens)")
    elif row == "read-only cache":
        detail = (f"{r['how']}: up in {r['ready_s']:.0f} s, answered {r['answered']}, {r['warnings']} warning, "
                  f"{r['launches']} launches ({r['reason'][:60]})")
    elif row == "full cache":
        detail = r.get("skipped") or (f"up in {r['ready_s']:.0f} s, answered {r['answered']}, {r['launches']} "
                                      f"launch, {r['warnings']} warning, leftovers {r['leftovers']}")
    elif row == "SIGKILL during calibration":
        exit_s = "none within 60 s" if r["server_exit_s"] is None else f"after {r['server_exit_s']:.1f} s"
        detail = (f"calibration left {r['calibration_left']}, server exit {exit_s}, processes left "
                  f"{r['processes_left']}, files left {r['files_left']}, lock free {r['lock_free']}; restart up in "
                  f"{r['restart_ready_s']:.0f} s, calibrated {r['restart_calibrated']}, answered {r['answered']}")
    elif row == "SIGTERM during calibration":
        exit_s = "no exit" if r["server_exit_s"] is None else f"{r['server_exit_s']:.1f} s"
        detail = (f"server exit after {exit_s}, all processes gone after {r['all_gone_s']:.1f} s, "
                  f"left {r['processes_left']}")
    elif row == "two servers, one fresh cache":
        detail = (f"up in {r['ready_s'][0]:.0f} / {r['ready_s'][1]:.0f} s, {r['launches']} calibration launch, "
                  f"same file on both: {r['calibration_files'][0] == r['calibration_files'][1]}, answered "
                  f"{r['answered']}")
    elif row == "calibration time limit":
        detail = f"up in {r['ready_s']:.0f} s, {r['warnings']} warning ({r['reason'][:64]}), answered {r['answered']}"
    elif row == "bad options":
        bad = [k for k, v in r["cases"].items() if not v["ok"]]
        detail = f"{len(r['cases']) - len(bad)}/{len(r['cases'])} refused in < 10 s (slowest {r['slowest_s']} s)"
        detail += f"; failed: {bad}" if bad else ""
    else:
        detail = json.dumps(r)[:160]
    return status, detail


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a local model folder (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/reliability"))
    parser.add_argument("--budget-min", type=float, default=60.0, help="start no row after this many minutes")
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--only", nargs="*", help="run only these rows (names as in the table)")
    args = parser.parse_args(argv)

    if args.model is None:
        from vllm_turboquant.assets import fetch_model

        model = fetch_model("smollm2")
    else:
        model = args.model.expanduser().resolve()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + 60 * args.budget_min
    results: dict[str, dict | None] = {}

    def want(row: str) -> bool:
        return (not args.only or row in args.only) and time.monotonic() < deadline

    def run(row: str, fn) -> None:
        if not want(row):
            results[row] = None
            return
        print(f"[reliability] {row} ...", flush=True)
        t0 = time.monotonic()
        try:
            results[row] = fn()
        except Exception as exc:
            results[row] = {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[-300:]}",
                            "traceback": traceback.format_exc()[-2000:]}
        print(f"[reliability] {row}: {_fmt(row, results[row])[0]} ({time.monotonic() - t0:.0f} s)", flush=True)

    warm = out / "cache"  # the load servers' cache: calibrated once, then reused

    def with_server(dtype: str, rows: list[tuple[str, object]], extra: tuple[str, ...] = ()) -> None:
        rows = [(r, f) for r, f in rows if want(r)]
        for r, _ in rows:
            results[r] = None
        if not rows:
            return
        srv = _serve(model, dtype, out, warm, extra)
        try:
            srv.start()
            srv.wait_ready(900)
            for r, f in rows:
                run(r, lambda f=f, srv=srv: asyncio.run(f(srv.url)))
                if isinstance(results.get(r), dict):
                    results[r]["kv_cache_tokens"] = srv.kv_cache_tokens()
        except Exception as exc:
            for r, _ in rows:
                if results.get(r) is None:
                    results[r] = {"ok": False, "error": f"server: {type(exc).__name__}: {str(exc)[:300]}",
                                  "traceback": ""}
        finally:
            srv.stop()

    n, c = args.requests, args.concurrency
    with_server("turboquant3", [
        ("soak turboquant3", lambda url: load.soak(url, NAME, n, c)),
        ("cancellations", lambda url: load.cancellations(url, NAME)),
        ("bad requests", lambda url: load.bad_requests(url, NAME)),
    ])
    with_server("auto", [("soak auto", lambda url: load.soak(url, NAME, n, c))])
    # a 12 MiB KV cache (~900 tokens of SmolLM2 at turboquant3, protected-token copies included): three of the
    # 16 requests (prompt + 256 tokens) fit at a time. (--num-gpu-blocks-override counts the blocks of every
    # KV-cache group, the exact copies' too, so its token capacity is not blocks x block size.)
    with_server("turboquant3", [("preemption", lambda url: load.preemption(url, NAME, 16, 256))],
                extra=("--kv-cache-memory-bytes", str(12 << 20), "--max-model-len", "384"))
    work = out / "faults"
    work.mkdir(exist_ok=True)
    run("bad options", lambda: faults.bad_options(model, work))
    run("read-only cache", lambda: faults.read_only_cache(model, work))
    run("full cache", lambda: faults.full_cache(model, work))
    run("SIGTERM during calibration", lambda: faults.sigterm_during_calibration(model, work))
    run("SIGKILL during calibration", lambda: faults.sigkill_during_calibration(model, work))
    run("two servers, one fresh cache", lambda: faults.two_servers_one_cache(model, work))
    run("calibration time limit", lambda: faults.calibration_timeout(model, work))

    (out / "summary.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"\nReliability suite: {model.name}, {time.strftime('%Y-%m-%d')}, logs in {out}\n")
    print("| check | result | measured |\n|---|---|---|")
    failed = False
    for row, result in results.items():
        status, detail = _fmt(row, result)
        failed |= status == "FAIL"
        print(f"| {row} | {status} | {detail} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
