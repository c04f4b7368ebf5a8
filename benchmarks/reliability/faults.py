"""Start-up and calibration faults against real servers: read-only and full cache folders, SIGKILL and
SIGTERM during a calibration, two servers on one fresh cache, the calibration time limit, bad options.

Every function takes the model folder and a work folder, starts what it needs (one ``vllm-turboquant
serve`` at a time, except the two-server check) and returns a dict with ``ok`` and the measurements."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from vllm_turboquant.demo import Server, ask, free_port

CALIBRATING = re.compile(r"vllm-turboquant: calibrating ")
FAILED = re.compile(r"vllm-turboquant: the automatic calibration of .* failed: ([^\n]*)")
BACKEND = re.compile(r"vllm-turboquant: \S+ attention on .*calibration=(\S+)\)")
START_TIMEOUT = 600


def server(model: Path, log: Path, cache: Path, dtype: str = "turboquant3", env: dict | None = None,
           extra: tuple[str, ...] = ()) -> Server:
    env = {**os.environ, "VLLM_TURBOQUANT_CACHE": str(cache), "VLLM_TURBOQUANT_CALIBRATION": "auto",
           "VLLM_CPU_KVCACHE_SPACE": "1", **(env or {})}
    return Server(model, dtype, free_port(), log, max_model_len=1024, env=env, extra_args=extra)


def _ask(srv: Server) -> bool:
    _, answer, tokens, _ = ask(srv.url, "What is the capital of France?", 16, 120)
    return bool(answer) and tokens > 0


def _alive(procs: list[psutil.Process]) -> list[int]:
    out = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p.pid)
    return out


def _wait_gone(procs: list[psutil.Process], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _alive(procs):
        time.sleep(0.2)
    return _alive(procs)


def _calibration_procs(srv: Server) -> list[psutil.Process]:
    with contextlib.suppress(psutil.Error):
        return [p for p in psutil.Process(srv.proc.pid).children(recursive=True)
                if "vllm_turboquant.calibrate" in " ".join(p.cmdline())]
    return []


def _lock_free(cache: Path) -> bool:
    for lock in (cache / "calibration").glob("*.lock"):
        with open(lock, "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
    return True


def _mount_tmpfs(path: Path, options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                                                capture_output=True).returncode == 0


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def read_only_cache(model: Path, work: Path) -> dict:
    """Cache folder on a read-only file system (a container's read-only root): the server comes up,
    answers, and logs exactly one calibration warning; no calibration is launched."""
    ro = work / "ro-cache"
    if _mount_tmpfs(ro, "ro,size=1m"):
        how = "read-only tmpfs"
    else:
        ro.mkdir(parents=True, exist_ok=True)
        ro.chmod(0o555)
        how = "0555 folder"
    try:
        with server(model, work / "read-only.log", ro) as srv:
            ready = srv.wait_ready(START_TIMEOUT)
            answered = _ask(srv)
            log = srv.log_text()
    finally:
        if how.startswith("read-only"):
            _umount(ro)
        else:
            ro.chmod(0o755)
    warnings = FAILED.findall(log)
    return {"how": how, "ready_s": ready, "answered": answered, "warnings": len(warnings),
            "reason": warnings[0][:120] if warnings else "", "launches": len(CALIBRATING.findall(log)),
            "ok": answered and len(warnings) == 1 and not CALIBRATING.search(log)}


def full_cache(model: Path, work: Path) -> dict:
    """Cache folder on a full 16 KiB tmpfs: one calibration launch fails writing its file, one warning,
    the server comes up and answers (in about the time of one attempt)."""
    full = work / "full-cache"
    if not _mount_tmpfs(full, "size=16k"):
        return {"ok": None, "skipped": "needs root and permission to mount a tmpfs"}
    try:
        with contextlib.suppress(OSError), open(full / "filler", "wb") as f:
            f.write(b"\0" * 65536)
        with server(model, work / "full.log", full) as srv:
            ready = srv.wait_ready(START_TIMEOUT)
            answered = _ask(srv)
            log = srv.log_text()
        leftovers = [p.name for p in (full / "calibration").glob("*") if p.suffix != ".lock"]
    finally:
        _umount(full)
    warnings = FAILED.findall(log)
    return {"ready_s": ready, "answered": answered, "launches": len(CALIBRATING.findall(log)),
            "warnings": len(warnings), "reason": warnings[0][:120] if warnings else "", "leftovers": leftovers,
            "ok": answered and len(warnings) == 1 and len(CALIBRATING.findall(log)) == 1 and not leftovers}


def sigkill_during_calibration(model: Path, work: Path) -> dict:
    """SIGKILL of the worker that runs a calibration (as the OOM killer would): the calibration subprocess
    stops by itself, the server exits, nothing half-written or locked is left, and the next start
    calibrates and serves."""
    cache = work / "sigkill-cache"
    shutil.rmtree(cache, ignore_errors=True)
    srv = server(model, work / "sigkill.log", cache).start()
    try:
        srv.wait_for_log(CALIBRATING, START_TIMEOUT)
        time.sleep(2)
        calib = _calibration_procs(srv)
        worker = calib[0].parent() if calib else None
        tree = psutil.Process(srv.proc.pid).children(recursive=True) + [psutil.Process(srv.proc.pid)]
        if worker is None:
            return {"ok": False, "error": "no calibration subprocess found"}
        t0 = time.monotonic()
        worker.kill()
        calib_left = _wait_gone(calib, 10)
        try:
            srv.proc.wait(timeout=60)
            exited = time.monotonic() - t0
        except subprocess.TimeoutExpired:
            exited = None
        tree_left = _wait_gone(tree, 10)
    finally:
        srv.stop()
    files = sorted(p.name for p in (cache / "calibration").glob("*") if p.suffix != ".lock")
    lock_free = _lock_free(cache)
    with server(model, work / "sigkill-restart.log", cache) as again:
        ready = again.wait_ready(START_TIMEOUT)
        answered = _ask(again)
        relog = again.log_text()
    backend = BACKEND.search(relog)
    calibrated = bool(backend and backend.group(1) != "none")
    return {"calibration_left": calib_left, "server_exit_s": exited, "processes_left": tree_left, "files_left": files,
            "lock_free": lock_free, "restart_ready_s": ready, "restart_calibrated": calibrated, "answered": answered,
            "ok": not calib_left and exited is not None and not tree_left and not files and lock_free and calibrated
            and answered}


def sigterm_during_calibration(model: Path, work: Path, limit: float = 15.0) -> dict:
    """SIGTERM to the server while its worker calibrates: the server and every process of it, the
    calibration subprocess included, are gone within ``limit`` seconds."""
    cache = work / "sigterm-cache"
    shutil.rmtree(cache, ignore_errors=True)
    srv = server(model, work / "sigterm.log", cache).start()
    try:
        srv.wait_for_log(CALIBRATING, START_TIMEOUT)
        time.sleep(2)
        calib = _calibration_procs(srv)
        tree = psutil.Process(srv.proc.pid).children(recursive=True)
        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        try:
            srv.proc.wait(timeout=60)
            exited = time.monotonic() - t0
        except subprocess.TimeoutExpired:
            exited = None
        left = _wait_gone(tree, max(0.0, limit - (time.monotonic() - t0)))
        gone_s = time.monotonic() - t0
    finally:
        srv.stop()
    return {"calibration_running": bool(calib), "server_exit_s": exited, "all_gone_s": gone_s, "processes_left": left,
            "ok": bool(calib) and exited is not None and exited <= limit and not left}


def two_servers_one_cache(model: Path, work: Path) -> dict:
    """Two servers started together on one fresh cache: one calibrates, the other waits on the lock and
    loads its file; both serve with the calibration."""
    cache = work / "shared-cache"
    shutil.rmtree(cache, ignore_errors=True)
    a = server(model, work / "two-a.log", cache)
    b = server(model, work / "two-b.log", cache)
    try:
        a.start()
        b.start()
        ready = [a.wait_ready(START_TIMEOUT), b.wait_ready(START_TIMEOUT)]
        answered = _ask(a) and _ask(b)
        logs = [a.log_text(), b.log_text()]
    finally:
        a.stop()
        b.stop()
    launches = sum(len(CALIBRATING.findall(t)) for t in logs)
    files = [m.group(1) if (m := BACKEND.search(t)) else None for t in logs]
    return {"ready_s": ready, "launches": launches, "calibration_files": files, "answered": answered,
            "ok": answered and launches == 1 and files[0] == files[1] and files[0] not in (None, "none")}


def calibration_timeout(model: Path, work: Path, seconds: float = 3.0) -> dict:
    """``VLLM_TURBOQUANT_CALIBRATION_TIMEOUT`` shorter than the calibration: abandoned with one warning,
    the server comes up with data-oblivious codebooks and answers."""
    cache = work / "timeout-cache"
    shutil.rmtree(cache, ignore_errors=True)
    with server(model, work / "timeout.log", cache, env={"VLLM_TURBOQUANT_CALIBRATION_TIMEOUT": str(seconds)}) as srv:
        ready = srv.wait_ready(START_TIMEOUT)
        answered = _ask(srv)
        log = srv.log_text()
    warnings = FAILED.findall(log)
    return {"ready_s": ready, "answered": answered, "warnings": len(warnings),
            "reason": warnings[0][:100] if warnings else "",
            "ok": answered and len(warnings) == 1 and "calibration_timeout" in warnings[0]}


OPTION_CASES = {
    "window=abc": (["--additional-config", '{"turboquant": {"window": "abc"}}'], {}, ["window", "'abc'", ">= 0"]),
    "sink=-1": (["--additional-config", '{"turboquant": {"sink": -1}}'], {}, ["sink=-1", ">= 0"]),
    "sink=4.7": (["--additional-config", '{"turboquant": {"sink": 4.7}}'], {}, ["sink=4.7", ">= 0"]),
    "unknown key": (["--additional-config", '{"turboquant": {"windw": 8}}'], {}, ["'windw'", "accepted"]),
    "section not an object": (["--additional-config", '{"turboquant": "compressed_prefill"}'], {},
                              ["must be an object", "accepted keys"]),
    "missing calibration file": ([], {"VLLM_TURBOQUANT_CALIBRATION": "/no/such.safetensors"},
                                 ["/no/such.safetensors", "no such file"]),
    "ops=bogus": (["--additional-config", '{"turboquant": {"ops": "bogus"}}'], {}, ["ops='bogus'", "'triton'"]),
    "ops=triton on CPU": ([], {"VLLM_TURBOQUANT_OPS": "triton", "TRITON_INTERPRET": "0"},
                          ["ops='triton'", "TRITON_INTERPRET=1"]),
}


def bad_options(model: Path, work: Path) -> dict:
    """``vllm-turboquant serve MODEL --kv-cache-dtype turboquant3`` with each bad option: non-zero exit in
    < 10 s, the last line naming the option, the value and the accepted values."""
    rows = {}
    for name, (args, env, words) in OPTION_CASES.items():
        t0 = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "vllm_turboquant", "serve", str(model), "--kv-cache-dtype",
                               "turboquant3", *args], capture_output=True, text=True, timeout=120, cwd=work,
                              env={**os.environ, **env})
        seconds = time.monotonic() - t0
        lines = (done.stdout + done.stderr).strip().splitlines()
        last = lines[-1] if lines else ""
        rows[name] = {"rc": done.returncode, "seconds": round(seconds, 1), "last_line": last[:160],
                      "ok": done.returncode != 0 and seconds < 10 and all(w in last for w in words)}
    return {"cases": rows, "slowest_s": max(r["seconds"] for r in rows.values()),
            "ok": all(r["ok"] for r in rows.values())}
