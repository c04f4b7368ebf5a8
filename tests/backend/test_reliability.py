"""Start-up and calibration never take the engine down; bad options are refused before weights load.

* options: every bad value is refused naming the option, the value and the accepted values -- by
  ``load_settings``, by ``vllm-turboquant serve`` in seconds (before vLLM is imported), and by ``LLM(...)``
  when vLLM validates the engine's config (before an engine process starts); ``ops=triton`` without a
  Triton driver is refused there too;
* the automatic calibration fails with one warning and data-oblivious codebooks, whatever fails: a read-only
  or full cache folder, a lock that cannot be had, the subprocess killed, the time limit; an engine launches
  at most one calibration subprocess (counted), and the workers of one engine share a failure;
* SIGTERM / SIGINT during a calibration kill the subprocess and stop the process within seconds, and a
  calibration whose engine was killed with SIGKILL stops by itself;
* calibration files are written with the umask's mode, at most 0644.

Read-only and full folders are real: a read-only / 16 KiB tmpfs mount when running as root (skipped where
mounting is not allowed), a 0555 folder otherwise. Engine tests: one in-process engine, one server.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import vllm_turboquant.calibrate  # noqa: F401  (the module, not registry.calibrate)
from support import build_llama
from vllm_turboquant.backend.cli import check_argv
from vllm_turboquant.backend.settings import check_usable, load_settings
from vllm_turboquant.cache import replace_atomically
from vllm_turboquant.registry import CodebookRegistry

C = sys.modules["vllm_turboquant.calibrate"]
ROOT = Path(__file__).resolve().parents[2]
FAILED = re.compile(r"automatic calibration of .* failed")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = build_llama(tmp_path_factory.mktemp("rel") / "llama", head_dim=64, num_heads=4, num_kv_heads=2)
    (path / "chat_template.jinja").write_text("{% for message in messages %}{{ message['content'] }} {% endfor %}")
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_TURBOQUANT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def launches(monkeypatch):
    """Every calibration subprocess this process starts (Popen objects), counted at the one launch point."""
    started: list[subprocess.Popen] = []
    real = C._launch

    def launch(cmd, env):
        proc = real(cmd, env)
        started.append(proc)
        return proc

    monkeypatch.setattr(C, "_launch", launch)
    return started


def _mount(path: Path, options: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@contextlib.contextmanager
def read_only_folder(path: Path, files: dict[str, bytes] | None = None):
    """``path`` as a read-only folder holding ``files``: a read-only tmpfs as root, a 0555 folder otherwise."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        if not _mount(path, "size=1m"):
            pytest.skip("running as root without permission to mount a read-only tmpfs")
        try:
            for name, data in (files or {}).items():
                (path / name).parent.mkdir(parents=True, exist_ok=True)
                (path / name).write_bytes(data)
            subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
            yield path
        finally:
            subprocess.run(["umount", "-l", str(path)], check=False)
    else:
        for name, data in (files or {}).items():
            (path / name).parent.mkdir(parents=True, exist_ok=True)
            (path / name).write_bytes(data)
        for d in [path, *[p for p in path.rglob("*") if p.is_dir()]]:
            d.chmod(0o555)
        try:
            yield path
        finally:
            for d in [path, *[p for p in path.rglob("*") if p.is_dir()]]:
                d.chmod(0o755)


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and FAILED.search(r.getMessage())]


# ------------------------------------------------------------------------------------ options
@pytest.mark.parametrize("section,needle", [
    ({"window": "abc"}, r"window='abc' \(from --additional-config\): accepted: an integer >= 0"),
    ({"sink": -1}, r"sink=-1 .*accepted: an integer >= 0"),
    ({"sink": 4.7}, r"sink=4\.7 .*accepted: an integer >= 0"),
    ({"bogus": 1}, r"unknown turboquant option\(s\) \['bogus'\]; accepted: compressed_prefill, .*window"),
    ({"ops": "bogus"}, r"ops='bogus' .*accepted: 'auto', 'torch', 'triton', 'cpu'"),
    ({"calibration": "/no/such.safetensors"}, r"calibration='/no/such.safetensors': no such file; accepted: 'auto'"),
    ({"calibration_timeout": 0}, r"calibration_timeout=0 .*accepted: a number of seconds > 0"),
    ({"calibration_timeout": "soon"}, r"calibration_timeout='soon' .*accepted: a number of seconds > 0"),
    ({"compressed_prefill": "maybe"}, r"compressed_prefill='maybe' .*accepted: true or false"),
])
def test_settings_refuse_bad_values_naming_them(section, needle):
    with pytest.raises(ValueError, match=needle):
        load_settings({"turboquant": section}, environ={})


def test_settings_section_must_be_an_object_and_timeout_parses():
    with pytest.raises(ValueError, match="'turboquant' must be an object of options, got 'compressed_prefill'"):
        load_settings({"turboquant": "compressed_prefill"}, environ={})
    with pytest.raises(ValueError, match="must be a JSON object"):
        load_settings(["turboquant"], environ={})
    assert load_settings({}, environ={}).calibration_timeout == 600.0
    assert load_settings({}, environ={"VLLM_TURBOQUANT_CALIBRATION_TIMEOUT": "2.5"}).calibration_timeout == 2.5
    assert load_settings({"turboquant": {"calibration_timeout": 30}}, environ={}).calibration_timeout == 30.0
    with pytest.raises(ValueError, match="VLLM_TURBOQUANT_CALIBRATION_TIMEOUT"):
        load_settings({}, environ={"VLLM_TURBOQUANT_CALIBRATION_TIMEOUT": "inf"})


def test_ops_triton_needs_a_driver_or_the_interpreter():
    pytest.importorskip("triton")
    triton = load_settings({"turboquant": {"ops": "triton"}}, environ={})
    with pytest.raises(ValueError, match=r"ops='triton' \(from X\): .*CUDA driver.*cpu platform.*TRITON_INTERPRET=1"):
        check_usable(triton, "cpu", "X", environ={})
    check_usable(triton, "cpu", "X", environ={"TRITON_INTERPRET": "1"})
    check_usable(triton, "cuda", "X", environ={})
    with pytest.raises(ValueError, match="ops='cpu'.*CPU platform only"):
        check_usable(load_settings({"turboquant": {"ops": "cpu"}}, environ={}), "cuda", "X", environ={})
    check_usable(load_settings({}, environ={}), "cpu", environ={})
    # the kernels' launch overrides are checked here, before the engine starts, not at the first launch
    interp = {"TRITON_INTERPRET": "1"}
    for text, match in (("{bad", "VLLM_TURBOQUANT_TRITON_CONFIG=.*is not JSON"),
                        ('{"attn": {}}', "keyed by store, decode, prefill"),
                        ('{"prefill": {"BLOCK_M": 64}}', "prefill has no launch setting 'BLOCK_M'; accepted: "
                                                         "BLOCK_N, BLOCK_R, num_stages, num_warps"),
                        ('{"decode": {"BLOCK_N": 48}}', r"decode.BLOCK_N=48; accepted: a power of two"),
                        ('{"store": {"num_warps": 0}}', r"store.num_warps=0; accepted: a positive integer")):
        with pytest.raises(ValueError, match=match):
            check_usable(triton, "cpu", "X", environ={**interp, "VLLM_TURBOQUANT_TRITON_CONFIG": text})
        with pytest.raises(ValueError, match=match):   # auto on CUDA runs the kernels too
            check_usable(load_settings({}, environ={}), "cuda", "X",
                         environ={"VLLM_TURBOQUANT_TRITON_CONFIG": text})
    check_usable(triton, "cpu", "X", environ={**interp, "VLLM_TURBOQUANT_TRITON_CONFIG":
                                              '{"prefill": {"BLOCK_R": 128, "BLOCK_N": 128}, "decode": {}}'})
    check_usable(load_settings({}, environ={}), "cpu", "X", environ={"VLLM_TURBOQUANT_TRITON_CONFIG": "{bad"})
    # a preset only the torch ops encode (Preset.lsq_scale) is refused before the engine starts, naming the fix
    from vllm_turboquant.presets import Preset

    lsq = Preset("t_lsq", 3, 1, lsq_scale=True)
    with pytest.raises(ValueError, match=r"ops='auto' \(from X\): .*'t_lsq'.*set ops='torch'"):
        check_usable(load_settings({}, environ={}), "cpu", "X", environ={}, preset=lsq)
    check_usable(load_settings({"turboquant": {"ops": "torch"}}, environ={}), "cpu", "X", environ={}, preset=lsq)


def test_check_argv_reads_the_command_line_and_environment(tmp_path):
    base = ["serve", "M", "--kv-cache-dtype", "turboquant3"]
    assert check_argv(base, {}) is None
    assert check_argv(["serve", "M", "--kv-cache-dtype", "auto", "--additional-config",
                       '{"turboquant": {"window": "abc"}}'], {}) is None  # not ours
    assert "window='abc'" in check_argv([*base, "--additional-config={\"turboquant\": {\"window\": \"abc\"}}"], {})
    env_abc = {"VLLM_TURBOQUANT_WINDOW": "abc"}
    assert "window='abc'" in check_argv(["serve", "M", "--kv_cache_dtype=turboquant3"], env_abc)
    assert "not valid JSON" in check_argv([*base, "--additional-config", "{window"], {})
    # --additional-config wins over the environment, as in the engine
    sink_x = {"VLLM_TURBOQUANT_SINK": "x"}
    assert check_argv([*base, "--additional-config", '{"turboquant": {"sink": 2}}'], sink_x) is None
    assert check_argv([*base, "--config", str(tmp_path / "c.yaml")], sink_x) is None  # vLLM reads those


CLI_CASES = {
    "window": (["--additional-config", '{"turboquant": {"window": "abc"}}'], {},
               ["window", "'abc'", "an integer >= 0"]),
    "sink": (["--additional-config", '{"turboquant": {"sink": -1}}'], {}, ["sink=-1", "an integer >= 0"]),
    "unknown key": (["--additional-config", '{"turboquant": {"windw": 8}}'], {}, ["'windw'", "window"]),
    "missing calibration file": ([], {"VLLM_TURBOQUANT_CALIBRATION": "/no/such.safetensors"},
                                 ["calibration=", "/no/such.safetensors", "no such file", "'auto'"]),
    "ops=bogus": (["--additional-config", '{"turboquant": {"ops": "bogus"}}'], {}, ["ops='bogus'", "'triton'"]),
    "ops=triton without a driver": ([], {"VLLM_TURBOQUANT_OPS": "triton", "TRITON_INTERPRET": "0"},
                                    ["ops='triton'", "VLLM_TURBOQUANT_OPS", "TRITON_INTERPRET=1"]),
}


@pytest.fixture
def import_seconds() -> float:
    """What starting Python and importing the package costs on this machine right now (torch is most of it)."""
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-c", "import vllm_turboquant.backend.cli"], check=True, timeout=120)
    return time.monotonic() - t0


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_serve_refuses_bad_options_in_seconds_with_the_message_last(tiny, tmp_path, case, import_seconds):
    """Refused in < 10 s (or, on a machine too loaded for that, within 1.5 x the time of importing the package
    plus 2 s: vLLM, which alone takes ~10 s to import on an idle 2-core machine, is never imported)."""
    if case.startswith("ops=triton"):
        pytest.importorskip("vllm")
        from vllm_turboquant.backend.cli import _device_type

        if _device_type() != "cpu":
            pytest.skip("the CPU build decides this before vLLM starts; elsewhere the engine config check does")
    args, env, words = CLI_CASES[case]
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "vllm_turboquant", "serve", str(tiny), "--kv-cache-dtype",
                           "turboquant3", *args], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env})
    elapsed = time.monotonic() - t0
    out = (done.stdout + done.stderr).strip()
    assert done.returncode == 2, out[-2000:]
    limit = max(10.0, 1.5 * import_seconds + 2.0)
    assert elapsed < limit, f"refused after {elapsed:.1f} s ({import_seconds:.1f} s to import the package)"
    last = out.splitlines()[-1]
    assert last.startswith("error: vllm-turboquant: "), out[-2000:]
    for word in words:
        assert word in last, (word, last)


def test_llm_refuses_bad_options_before_an_engine_starts(tiny, tmp_path, monkeypatch):
    """``LLM(...)``: the check runs when vLLM builds the engine's config, before any engine process or weight."""
    pytest.importorskip("vllm")
    from vllm import LLM

    from vllm_turboquant.backend.plugin import OptionError

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    with pytest.raises(OptionError, match=r"window='abc' \(from --additional-config\): accepted: an integer >= 0"):
        LLM(str(tiny), kv_cache_dtype="turboquant3", enforce_eager=True, max_model_len=256,
            additional_config={"turboquant": {"window": "abc"}})
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("VLLM_TURBOQUANT_OPS", "triton")
    from vllm.platforms import current_platform

    if current_platform.is_cpu() and importlib.util.find_spec("triton") is not None:
        with pytest.raises(OptionError, match=r"ops='triton' \(from VLLM_TURBOQUANT_OPS\).*TRITON_INTERPRET=1"):
            LLM(str(tiny), kv_cache_dtype="turboquant3", enforce_eager=True, max_model_len=256)
        # a typo in the kernels' launch overrides: refused here, not at the first kernel launch
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        monkeypatch.setenv("VLLM_TURBOQUANT_TRITON_CONFIG", '{"decode": {"BLOCK_M": 64}}')
        with pytest.raises(OptionError, match=r"TRITON_CONFIG: decode has no launch setting 'BLOCK_M'; accepted: "
                                              r"BLOCK_N, num_stages, num_warps"):
            LLM(str(tiny), kv_cache_dtype="turboquant3", enforce_eager=True, max_model_len=256)
        monkeypatch.delenv("VLLM_TURBOQUANT_TRITON_CONFIG")
    monkeypatch.setenv("VLLM_TURBOQUANT_OPS", "auto")
    calib = tmp_path / "wrong-layers.safetensors"  # 3 layers for a 4-layer model
    CodebookRegistry.default("turboquant3", 64, 3, 2).save(calib)
    with pytest.raises(OptionError, match="num_layers"):
        LLM(str(tiny), kv_cache_dtype="turboquant3", enforce_eager=True, max_model_len=256,
            additional_config={"turboquant": {"calibration": str(calib)}})


# ------------------------------------------------------------------------------------ files
@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o644)])
def test_calibration_files_get_the_umask_mode_at_most_0644(tmp_path, mask, mode):
    reg = CodebookRegistry.default("turboquant3", 64, 2, 2)
    old = os.umask(mask)
    try:
        out = C.write_registry_file(reg, tmp_path / "x.safetensors")
    finally:
        os.umask(old)
    assert (out.stat().st_mode & 0o777) == mode
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]  # no temporary file left


def test_a_failed_write_leaves_nothing(tmp_path):
    def write(tmp):
        tmp.write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        replace_atomically(tmp_path / "x.safetensors", write)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------ calibration failures
def test_read_only_cache_folder_warns_once_and_launches_nothing(tiny, tmp_path, monkeypatch, launches, caplog):
    caplog.set_level(logging.INFO, logger="vllm.vllm_turboquant")
    with read_only_folder(tmp_path / "ro") as ro:
        monkeypatch.setenv("VLLM_TURBOQUANT_CACHE", str(ro))
        assert C.ensure_auto_calibration(str(tiny), "turboquant3", timeout=60) is None
    warned = _warnings(caplog)
    assert len(warned) == 1 and "cannot write to the cache folder" in warned[0], caplog.text
    assert "VLLM_TURBOQUANT_CACHE" in warned[0] and "python -m vllm_turboquant.calibrate" in warned[0]
    assert launches == []


def test_a_calibration_in_a_read_only_cache_is_used(tiny, tmp_path, monkeypatch, launches):
    """A container image may ship the cache read-only with the calibration already in it."""
    monkeypatch.setenv("VLLM_TURBOQUANT_CACHE", str(tmp_path / "made"))
    made = C.auto_calibration_file(str(tiny), "turboquant3", 0)
    C.write_registry_file(CodebookRegistry.default("turboquant3", 64, 4, 2), made)
    with read_only_folder(tmp_path / "ro", {f"calibration/{made.name}": made.read_bytes()}) as ro:
        monkeypatch.setenv("VLLM_TURBOQUANT_CACHE", str(ro))
        assert C.ensure_auto_calibration(str(tiny), "turboquant3") == ro / "calibration" / made.name
    assert launches == []


def test_full_cache_folder_fails_once_with_the_reason(tiny, tmp_path, monkeypatch, launches, caplog):
    caplog.set_level(logging.INFO, logger="vllm.vllm_turboquant")
    full = tmp_path / "full"
    full.mkdir()
    if not _mount(full, "size=16k"):
        pytest.skip("needs root and permission to mount a tmpfs")
    try:
        with contextlib.suppress(OSError), open(full / "filler", "wb") as f:
            f.write(b"\0" * 65536)
        monkeypatch.setenv("VLLM_TURBOQUANT_CACHE", str(full))
        assert C.ensure_auto_calibration(str(tiny), "turboquant3", timeout=300) is None
        assert not list((full / "calibration").glob("*.safetensors")) and not list(full.rglob("*.tmp*"))
    finally:
        subprocess.run(["umount", "-l", str(full)], check=False)
    warned = _warnings(caplog)
    assert len(warned) == 1 and "No space left on device" in warned[0], caplog.text
    assert "VLLM_TURBOQUANT_CACHE" in warned[0]
    assert len(launches) == 1


def test_a_held_lock_is_waited_for_only_until_the_time_limit(tiny, cache, launches, caplog):
    caplog.set_level(logging.INFO, logger="vllm.vllm_turboquant")
    path = C.auto_calibration_file(str(tiny), "turboquant3", 0)
    with open(path.with_suffix(".lock"), "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        t0 = time.monotonic()
        assert C.ensure_auto_calibration(str(tiny), "turboquant3", timeout=1.5) is None
        assert time.monotonic() - t0 < 5
    warned = _warnings(caplog)
    assert len(warned) == 1 and "held the lock" in warned[0] and "calibration_timeout = 1.5 s" in warned[0]
    assert launches == []


def test_time_limit_stops_the_subprocess(tiny, cache, launches, caplog):
    caplog.set_level(logging.INFO, logger="vllm.vllm_turboquant")
    t0 = time.monotonic()
    assert C.ensure_auto_calibration(str(tiny), "turboquant3", timeout=2) is None
    assert time.monotonic() - t0 < 2 + C.KILL_GRACE + 3
    assert len(launches) == 1 and launches[0].poll() is not None  # stopped and reaped
    warned = _warnings(caplog)
    assert len(warned) == 1 and "did not finish within calibration_timeout = 2 s" in warned[0]
    assert "VLLM_TURBOQUANT_CALIBRATION_TIMEOUT" in warned[0]
    assert not list((cache / "calibration").glob("*.safetensors"))


def test_a_killed_subprocess_is_a_failure_not_a_crash(tiny, cache, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="vllm.vllm_turboquant")
    real = C._launch
    started = []

    def launch_and_kill(cmd, env):
        proc = real(cmd, env)
        started.append(proc)
        time.sleep(0.5)
        proc.send_signal(signal.SIGKILL)  # as the OOM killer would
        return proc

    monkeypatch.setattr(C, "_launch", launch_and_kill)
    assert C.ensure_auto_calibration(str(tiny), "turboquant3") is None
    warned = _warnings(caplog)
    assert len(started) == 1 and len(warned) == 1 and "killed by SIGKILL (out of memory?)" in warned[0]


SCRIPT = textwrap.dedent("""
    import logging, signal, sys, time
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stdout)
    from vllm_turboquant import calibrate as C
    model, engine, handler = sys.argv[1], sys.argv[2], sys.argv[3]
    if handler == "vllm":  # vLLM's engine core during start-up: only records the request
        signal.signal(signal.SIGTERM, lambda s, f: print("RECORDED", s, flush=True))
    else:  # Python's own: a test run started in the background inherits SIGINT ignored
        signal.signal(signal.SIGINT, signal.default_int_handler)
    real = C._launch
    def launch(cmd, env):
        proc = real(cmd, env)
        print("LAUNCHED", proc.pid, flush=True)
        return proc
    C._launch = launch
    try:
        print("RESULT", C.ensure_auto_calibration(model, "turboquant3", timeout=300, engine_id=engine), flush=True)
    except BaseException as exc:
        print("RAISED", type(exc).__name__, flush=True)
        raise
""")


def _script(tmp_path: Path, model: Path, engine: str, handler: str = "default") -> subprocess.Popen:
    script = tmp_path / "calibrate_once.py"
    script.write_text(SCRIPT)
    return subprocess.Popen([sys.executable, str(script), str(model), engine, handler], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=tmp_path, env=dict(os.environ))


def _wait_line(proc: subprocess.Popen, prefix: str, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if line.startswith(prefix):
            return line
    raise AssertionError(f"no {prefix!r} line:\n{''.join(seen)}")


def _gone(pid: int, timeout: float) -> bool:
    """Whether process ``pid`` ends (or is a zombie) within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.1)
    return False


def _lock_held(path: Path) -> bool:
    try:
        with open(path, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("later", [False, True])
def test_workers_of_one_engine_share_a_failure(tiny, cache, tmp_path, later):
    """Two processes calibrating a model transformers cannot load. One that waits on the lock while the
    first fails (a worker of the same engine) takes that failure: 1 launch in all. An engine started
    after the failure tries again: 2 launches."""
    broken = tmp_path / "broken"
    shutil.copytree(tiny, broken)
    config = (tiny / "config.json").read_text()
    assert '"model_type": "llama"' in config
    (broken / "config.json").write_text(config.replace('"model_type": "llama"', '"model_type": "no_such_model"'))
    lock = C.auto_calibration_file(str(broken), "turboquant3", 0).with_suffix(".lock")
    first = _script(tmp_path, broken, "engine-A")
    _wait_line(first, "LAUNCHED")
    assert _lock_held(lock)
    if later:
        out_first, _ = first.communicate(timeout=300)
        second = _script(tmp_path, broken, "engine-B")
    else:
        second = _script(tmp_path, broken, "engine-A")
        out_first, _ = first.communicate(timeout=300)
    out_second, _ = second.communicate(timeout=300)
    out = out_first + out_second
    assert out.count("RESULT None") == 2, out
    assert 1 + out.count("LAUNCHED") == (2 if later else 1), out  # the first LAUNCHED line was read above
    assert len(FAILED.findall(out)) == 2, out  # one warning per process
    assert "no_such_model" in out_second
    if not later:
        assert "of the same engine, which this one waited for; not repeated" in out_second, out_second


@pytest.mark.parametrize("sig,handler,raised", [(signal.SIGTERM, "vllm", "CalibrationInterrupted"),
                                                (signal.SIGINT, "default", "KeyboardInterrupt")])
def test_a_signal_during_calibration_kills_it_and_stops_the_process(tiny, cache, tmp_path, sig, handler, raised):
    proc = _script(tmp_path, tiny, "engine-S", handler)
    child = int(_wait_line(proc, "LAUNCHED").split()[1])
    time.sleep(1.0)
    t0 = time.monotonic()
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=30)
    assert time.monotonic() - t0 < 10, out
    assert f"RAISED {raised}" in out, out
    assert proc.returncode != 0
    assert _gone(child, 1.0), "the calibration subprocess outlived the signal"
    assert not list((cache / "calibration").glob("*.safetensors"))


def test_a_calibration_whose_engine_was_killed_stops_by_itself(tiny, cache, tmp_path):
    proc = _script(tmp_path, tiny, "engine-K")
    child = int(_wait_line(proc, "LAUNCHED").split()[1])
    proc.kill()
    proc.wait(timeout=10)
    assert _gone(child, 5.0), "the calibration subprocess outlived its engine"
    assert not list((cache / "calibration").glob("*.safetensors"))
    lock = C.auto_calibration_file(str(tiny), "turboquant3", 0).with_suffix(".lock")
    assert not _lock_held(lock)  # the next start is not blocked


# ------------------------------------------------------------------------------------ engines
def test_an_engine_launches_one_calibration_however_many_layers(tiny, cache, monkeypatch, launches, caplog):
    """A calibration that fails (here: its time limit) is tried once per engine, not once per layer; the
    engine serves with the data-oblivious codebooks."""
    pytest.importorskip("vllm")
    from vllm import SamplingParams

    from vllm_turboquant.backend.inprocess import attention_layers, in_process_llm

    caplog.set_level(logging.INFO, logger="vllm.vllm_turboquant")
    monkeypatch.setenv("VLLM_TURBOQUANT_CALIBRATION", "auto")
    monkeypatch.setenv("VLLM_TURBOQUANT_CALIBRATION_TIMEOUT", "1")
    with in_process_llm(str(tiny), kv_cache_dtype="turboquant3") as llm:
        out = llm.generate(["w5 w6 w7 w8"], SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)
        layers = attention_layers(llm)
        registry = layers[0][1].packed.registry
    assert len(out[0].outputs[0].token_ids) == 4
    assert len(layers) == 4 and len(launches) == 1, f"{len(launches)} calibration launches for {len(layers)} layers"
    assert len(_warnings(caplog)) == 1, caplog.text
    default = CodebookRegistry.default("turboquant3", 64, 4, 2, seed=0, model=str(tiny))
    torch.testing.assert_close(registry.layer(1).key_centroids, default.layer(1).key_centroids)
    assert registry.layer(1).key_mean.abs().max() == 0


def test_a_server_with_a_read_only_cache_answers(tiny, tmp_path):
    """`vllm-turboquant serve ... --kv-cache-dtype turboquant3` with the cache on a read-only file system:
    up, one calibration warning, no calibration launched, answers a chat request."""
    pytest.importorskip("vllm")
    openai = pytest.importorskip("openai")
    from vllm_turboquant.demo import Server, free_port

    with read_only_folder(tmp_path / "ro") as ro:
        env = {**os.environ, "VLLM_TURBOQUANT_CACHE": str(ro), "VLLM_TURBOQUANT_CALIBRATION": "auto",
               "VLLM_CPU_KVCACHE_SPACE": "1"}
        server = Server(tiny, "turboquant3", free_port(), tmp_path / "logs" / "server.log", max_model_len=256,
                        env=env, extra_args=("--served-model-name", "tiny", "--chat-template",
                                             str(tiny / "chat_template.jinja")))
        with server:
            server.wait_ready(300)
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="EMPTY", timeout=120, max_retries=0)
            reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "w5 w6"}],
                                                   max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
            assert reply.choices[0].message.content.strip()
            log = server.log_text()
    assert len(FAILED.findall(log)) == 1, server.log_tail(60)
    assert "Read-only file system" in log and "vllm-turboquant: calibrating" not in log
