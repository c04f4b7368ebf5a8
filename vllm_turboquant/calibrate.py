"""Calibrate a model's codebook registry: ``python -m vllm_turboquant.calibrate``.

Runs the model (Hugging Face ``transformers``; on a GPU when there is one, in the model's own dtype,
else on the CPU in float32: ``capture_device``) over a few
thousand tokens of text in independent chunks, captures every layer's post-RoPE
keys and values as its attention receives them, fits per-head Lloyd-Max codebooks
and key means (``registry.calibrate``) and writes the registry file. The first
``SKIP`` tokens of every chunk are left out of the fit: they are attention sinks
with outlying keys, and the protected-token pool serves them exactly anyway.

Automatic calibration: with the default ``calibration = "auto"``, a preset that asks
for it (``Preset.auto_calibrate``: the plain ``turboquantN`` names, not the paper's
``_qjl`` ones) is calibrated once per model at the first engine start, on the text
shipped in ``data/calibration.txt`` (Python standard-library docstrings, so
evaluations on other text measure it out of domain), in a subprocess, and the
file is cached in ``cache_dir("calibration")`` under a digest of the model's
config and weight files. Later starts load it in milliseconds. It is made only for a model whose
size is known on this machine and at most ``AUTO_MAX_WEIGHT_BYTES`` (8 GiB) of weight files: a local
folder, or a hub ID whose weights are in the local Hugging Face cache (looked up offline; on the first
start of a hub model vLLM downloads them after this decision, so it is calibrated at the next start);
any other model -- a hub ID of unknown size included -- gets one warning naming the command to
calibrate it by hand and serves the data-oblivious codebooks. The subprocess runs with
``HF_HUB_OFFLINE=1``: it never downloads. Serve with a file of
your own through ``VLLM_TURBOQUANT_CALIBRATION=FILE`` (or ``--additional-config
'{"turboquant": {"calibration": "FILE"}}'``; ``"none"`` turns calibration off); a
file is checked against the model at engine start.

An automatic calibration can fail but never stops the engine: whatever goes wrong (a read-only
or full cache folder, a lock that cannot be had, a model ``transformers`` cannot load, the
subprocess killed, ``calibration_timeout`` seconds passed) it logs one warning that says what
failed and what to run, and the engine serves the data-oblivious codebooks. The outcome is
decided once per model x preset x seed per engine: ``EngineState.calibration_file`` asks once,
and the workers of one engine (which wait on the same file lock) take the first one's failure
instead of repeating it. SIGTERM / SIGINT while the subprocess runs kill it and stop the
process (``CalibrationInterrupted``, a ``SystemExit``). Files are written atomically with the
umask's mode, at most 0644 (``cache.replace_atomically``).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from importlib import resources
from pathlib import Path

import torch

from .presets import PRESETS, Preset, get_preset

logger = logging.getLogger("vllm.vllm_turboquant")

CHUNK = 512  # tokens per independent calibration sequence
SKIP = 4  # leading tokens of every chunk left out of the fit (attention sinks)
AUTO_TOKENS = 4096  # tokens of the built-in text an automatic calibration runs
AUTO_VERSION = 1  # bump when the automatic procedure changes (old cache files are then ignored)
#: Automatic calibration is skipped (with a warning naming the command) for weights larger than this, and for
#: weights of unknown size (``weight_bytes`` is None: a hub ID not in the local Hugging Face cache).
AUTO_MAX_WEIGHT_BYTES = 8 << 30
#: Default time limit of an automatic calibration in seconds (settings ``calibration_timeout``).
AUTO_TIMEOUT = 600.0
#: Seconds a killed calibration subprocess gets between SIGTERM and SIGKILL.
KILL_GRACE = 2.0
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
_SAMPLE = 1 << 16


def builtin_text() -> str:
    """The text automatic calibration runs on (shipped with the package)."""
    return resources.files("vllm_turboquant").joinpath("data", "calibration.txt").read_text(encoding="utf-8")


def capture_device(device: str = "auto") -> tuple[torch.device, torch.dtype | str]:
    """Where and in what dtype to run the model for calibration: ``auto`` = the first visible CUDA device
    in the model's own dtype (``"auto"``, as vLLM serves it: what its cache receives), else the CPU in
    float32 (CPU half-precision GEMMs are slow and not what vLLM's CPU build runs either); ``cpu`` /
    ``cuda[:N]`` force the device (float32 on the CPU, the model's dtype on CUDA).

    Raises ValueError for any other ``device``, or ``cuda`` without a CUDA device."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"calibration device {device!r}: accepted 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"calibration device {device!r}: no CUDA device is visible; use 'cpu' or 'auto'")
    return torch.device(device), ("auto" if device.startswith("cuda") else torch.float32)


def capture_kv(model: str, text: str, tokens: int = AUTO_TOKENS, chunk: int = CHUNK,
               device: str = "auto") -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Post-RoPE keys and values, (N, H, d) float32 on the CPU per layer, of the first ``tokens`` tokens of
    ``text`` run through ``model`` (a local folder or hub id) in independent ``chunk``-token sequences,
    on ``device`` (``capture_device``).

    Captured where ``transformers`` hands K/V to the attention function (after the key norm
    and RoPE, before GQA repetition): what vLLM writes to its cache, up to bf16 rounding."""
    from tqdm import tqdm
    from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    tokenizer = AutoTokenizer.from_pretrained(model)
    ids = tokenizer(text)["input_ids"]
    if len(ids) < tokens:
        raise ValueError(f"the calibration text has {len(ids)} tokens, {tokens} are asked for; "
                         "pass a longer --text or fewer --tokens")
    keys: dict[int, list[torch.Tensor]] = {}
    values: dict[int, list[torch.Tensor]] = {}

    def record(module, query, key, value, attention_mask, **kwargs):
        layer = getattr(module, "layer_idx", None)
        if layer is None:
            raise ValueError(f"cannot calibrate {model}: its attention module {type(module).__name__} has no layer_idx")
        keys.setdefault(layer, []).append(key[0].transpose(0, 1).float().cpu())  # (T, H, d)
        values.setdefault(layer, []).append(value[0].transpose(0, 1).float().cpu())
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("vllm_turboquant_capture", record)
    where, dtype = capture_device(device)
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=dtype, attn_implementation="vllm_turboquant_capture")
    lm.to(where)
    with torch.inference_mode():
        for start in tqdm(range(0, tokens, chunk), desc=f"capturing K/V on {where}", unit="chunk"):
            lm(torch.tensor([ids[start:min(start + chunk, tokens)]], device=where), use_cache=False)
    del lm
    if where.type == "cuda":
        torch.cuda.empty_cache()
    layers = sorted(keys)
    if layers != list(range(len(layers))):
        raise ValueError(f"cannot calibrate {model}: captured attention layers {layers}, expected 0..{len(layers) - 1}")
    return [torch.cat(keys[i]) for i in layers], [torch.cat(values[i]) for i in layers]


def fit_registry(keys: list[torch.Tensor], values: list[torch.Tensor], preset: str | Preset, *, seed: int = 0,
                 center_keys: bool = True, chunk: int = CHUNK, skip: int = SKIP, model: str = ""):
    """``registry.calibrate`` on captured K/V, leaving out the first ``skip`` tokens of every chunk."""
    from .registry import calibrate

    pos = torch.arange(keys[0].shape[0])
    keep = pos % chunk >= skip
    return calibrate([k[keep] for k in keys], [v[keep] for v in values], preset, center_keys=center_keys,
                     seed=seed, model=model)


def calibrate_to_file(model: str, text: str, out: str | Path, preset: str | Preset, *, tokens: int = AUTO_TOKENS,
                      seed: int = 0, center_keys: bool = True, device: str = "auto") -> Path:
    """Capture ``tokens`` tokens of ``text`` through ``model`` on ``device`` (``capture_device``), fit, and
    write the registry file ``out`` (atomically: a partial file never carries the final name). Returns ``out``."""
    keys, values = capture_kv(model, text, tokens, device=device)
    registry = fit_registry(keys, values, preset, seed=seed, center_keys=center_keys, model=model)
    return write_registry_file(registry, out)


def write_registry_file(registry, out: str | Path) -> Path:
    """Save ``registry`` to ``out`` atomically (a partial file never carries the final name; a failed write
    leaves nothing behind) with the umask's mode, at most 0644 (``cache.replace_atomically``)."""
    from .cache import replace_atomically

    return replace_atomically(out, registry.save)


# ------------------------------------------------------------------------------------ automatic
def model_digest(model: str) -> str:
    """A short digest of a model: for a local folder its config and, per weight file, the size
    and three 64 KiB samples (so a fine-tune with the base's config is told apart); else the name."""
    h = hashlib.sha256(f"v{AUTO_VERSION}".encode())
    folder = Path(model)
    if not folder.is_dir():
        h.update(model.encode())
        return h.hexdigest()[:16]
    for f in sorted(folder.iterdir()):
        if f.name == "config.json":
            h.update(f.read_bytes())
        elif f.suffix in _WEIGHT_SUFFIXES:
            size = f.stat().st_size
            h.update(f"{f.name}:{size}".encode())
            with open(f, "rb") as fh:
                for at in (0, size // 2, max(0, size - _SAMPLE)):
                    fh.seek(at)
                    h.update(fh.read(_SAMPLE))
    return h.hexdigest()[:16]


def local_model_folder(model: str) -> Path | None:
    """The folder on this machine that holds ``model``: the model itself when it is a folder, else -- for a hub ID
    -- its snapshot in the local Hugging Face cache (``HF_HUB_CACHE``, the ``main`` revision), looked up offline;
    None when neither exists. Never reaches the network."""
    folder = Path(model)
    if folder.is_dir():
        return folder
    try:
        from huggingface_hub import snapshot_download

        found = Path(snapshot_download(model, local_files_only=True))
    except Exception:  # noqa: BLE001 -- not a valid hub ID, not cached, no huggingface_hub: not here
        return None
    return found if found.is_dir() else None


def weight_bytes(model: str) -> int | None:
    """Bytes of the model's weight files on this machine (``local_model_folder``); None when unknown: no local
    folder, or one without weight files (a hub model whose weights are not downloaded yet)."""
    folder = local_model_folder(model)
    if folder is None:
        return None
    sizes = [f.stat().st_size for f in folder.iterdir() if f.suffix in _WEIGHT_SUFFIXES and f.is_file()]
    return sum(sizes) if sizes else None


def auto_calibration_file(model: str, preset: str | Preset, seed: int, *, create: bool = True) -> Path:
    """Where the automatic calibration of (model, preset, seed) is cached. The name carries the
    preset's encoding (``Preset.encoding_tag``), so a preset whose bits change in a later release
    never picks up a file fitted for the old ones. ``create``: make the folder (OSError if it cannot be)."""
    from .cache import cache_dir

    preset = get_preset(preset)
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(model.rstrip("/")).name)[:60]
    name = f"{slug}-{model_digest(model)}-{preset.name}-{preset.encoding_tag}-seed{seed}.safetensors"
    return cache_dir("calibration", create=create) / name


class CalibrationInterrupted(SystemExit):
    """SIGTERM or SIGINT arrived while an automatic calibration ran: the subprocess was killed and the
    process stops (a SystemExit, so vLLM's start-up code shuts down instead of reporting a failure)."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum


class _Failed(Exception):
    """An automatic calibration that cannot be made: ``what`` failed, ``fix`` says what to run."""

    def __init__(self, what: str, fix: str | None = None):
        super().__init__(what)
        self.what, self.fix = what, fix


def _launch(cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
    """Start the calibration command (the one place a calibration process is started)."""
    return subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def _unusable(path: Path, preset: Preset) -> str | None:
    """Why a cached automatic calibration file cannot be loaded for ``preset`` (None: it can)."""
    from .registry import CalibrationError, load_registry

    try:
        load_registry(path, preset=preset.name)
        return None
    except CalibrationError as exc:
        return str(exc)


def _oserror(exc: OSError) -> str:
    return f"{exc.strerror or exc} ({errno.errorcode.get(exc.errno, exc.errno)})" if exc.errno else str(exc)


class _Lock:
    """The lock file of one calibration file: an exclusive ``flock`` while held, and a one-line JSON status
    in the file itself, so a process that waited on the lock learns how the holder's attempt ended."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # the umask narrows it
            self.writable = True
        except PermissionError:  # another user's lock in a shared cache: lock it read-only
            self.fd = os.open(path, os.O_RDONLY)
            self.writable = False

    def acquire(self, deadline: float) -> bool:
        """Wait for the lock until ``deadline`` (time.monotonic); False if it was not had by then."""
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.1)

    def status(self) -> dict:
        try:
            return json.loads(os.pread(self.fd, 4096, 0).decode() or "{}")
        except (OSError, ValueError):
            return {}

    def set_status(self, **status) -> None:
        """Best effort (a read-only lock file, a full disk): the status only saves repeating a failure."""
        if not self.writable:
            return
        data = json.dumps(status).encode()[:4000]
        with contextlib.suppress(OSError):
            os.pwrite(self.fd, data, 0)
            os.ftruncate(self.fd, len(data))

    def close(self) -> None:
        os.close(self.fd)  # releases the flock


@contextlib.contextmanager
def _stop_on_signals():
    """While the block runs in the main thread, SIGTERM and SIGINT first go to the handler that was
    installed (vLLM's engine core only records a shutdown request during start-up), then raise
    ``CalibrationInterrupted`` unless that handler raised already or the signal is ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: dict[int, object] = {}

    def handler(signum, frame):
        before = previous.get(signum)
        if before == signal.SIG_IGN:
            return
        if callable(before):
            before(signum, frame)  # may raise (KeyboardInterrupt, vLLM workers' SystemExit)
        raise CalibrationInterrupted(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(ValueError, OSError):
            previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, before in previous.items():
            signal.signal(sig, before if before is not None else signal.SIG_DFL)


def _stop(proc: subprocess.Popen) -> None:
    """End the calibration subprocess: SIGTERM, then SIGKILL after ``KILL_GRACE`` seconds; reaped."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=KILL_GRACE)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _exception_line(lines) -> str:
    """The exception a Python traceback in ``lines`` ends with (``ValueError: ...``), else the last line."""
    lines = [ln.strip() for ln in lines if ln.strip()]
    for line in reversed(lines):
        if re.match(r"^([A-Za-z_][\w]*\.)*[A-Za-z_]\w*(Error|Exception|Exit)(:|$)", line):
            return line[:300]
    return lines[-1][:300] if lines else "no output"


def _run(cmd: list[str], timeout: float, manual: str) -> None:
    """Run the calibration command within ``timeout`` seconds; raise _Failed saying how it failed."""
    # on the CPU, from files already here (the size check measured them): never a download
    proc = _launch(cmd, {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"})
    tail: deque[str] = deque(maxlen=40)

    def drain():  # the command's stderr (progress bars included), last lines kept for the warning
        for raw in iter(proc.stderr.readline, b""):
            for line in raw.decode(errors="replace").replace("\r", "\n").splitlines():
                if line.strip():
                    tail.append(line.rstrip())

    reader = threading.Thread(target=drain, name="vllm-turboquant-calibration-log", daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    try:
        with _stop_on_signals():
            while True:
                try:
                    rc = proc.wait(timeout=0.2)
                    break
                except subprocess.TimeoutExpired:
                    if time.monotonic() >= deadline:
                        raise _Failed(f"it did not finish within calibration_timeout = {timeout:g} s and was "
                                      "stopped", f"Allow it more time (VLLM_TURBOQUANT_CALIBRATION_TIMEOUT or "
                                      f"--additional-config '{{\"turboquant\": {{\"calibration_timeout\": "
                                      f"SECONDS}}}}') or calibrate by hand: {manual}") from None
    finally:
        _stop(proc)
        reader.join(timeout=1.0)
    if rc < 0:
        name = signal.Signals(-rc).name if -rc in signal.Signals._value2member_map_ else str(-rc)
        hint = " (out of memory?)" if -rc == signal.SIGKILL else ""
        raise _Failed(f"the calibration subprocess was killed by {name}{hint}")
    if rc != 0:
        text = "\n".join(tail)
        logger.debug("vllm-turboquant: the calibration command's last output:\n%s", text)
        last = _exception_line(tail)
        full = any(s in text for s in ("No space left", "Read-only file system", "Permission denied",
                                       "Disk quota exceeded"))
        raise _Failed(f"the calibration command exited with status {rc} ({last})",
                      f"Point VLLM_TURBOQUANT_CACHE to a writable folder with a few MB free, or calibrate by hand "
                      f"into one: {manual}" if full else None)


def ensure_auto_calibration(model: str, preset: str | Preset, seed: int = 0, *, timeout: float = AUTO_TIMEOUT,
                            engine_id: str | None = None) -> Path | None:
    """The cached automatic calibration file of (model, preset, seed), made now if missing.

    Runs this module's command in a subprocess on the CPU, one process at a time (a file lock; the
    others then load its file), within ``timeout`` seconds (waiting for the lock included).
    Returns None -- after one warning that says what failed and what to run -- when the preset does
    not calibrate, the model's size is unknown on this machine (``weight_bytes``: a hub ID not in the local
    Hugging Face cache) or above ``AUTO_MAX_WEIGHT_BYTES``, or the calibration cannot be made (see the
    module docstring); the engine then serves the data-oblivious codebooks. A process
    that waited on the lock while another one failed takes that failure instead of repeating it when
    both give the same ``engine_id`` (the workers of one engine) or the failure came after it began
    waiting. Raises ``CalibrationInterrupted`` on SIGTERM / SIGINT during the calibration."""
    preset = get_preset(preset)
    if not preset.auto_calibrate:
        return None
    manual = (f"python -m vllm_turboquant.calibrate --model {model} --preset {preset.name} --seed {seed} "
              f"--out FILE, then serve with VLLM_TURBOQUANT_CALIBRATION=FILE (or calibration=none to skip it)")

    def failed(what: str, fix: str | None = None) -> None:
        logger.warning("vllm-turboquant: the automatic calibration of %s for %s failed: %s. Serving %s with "
                       "data-oblivious codebooks (this engine does not try again). %s", model, preset.name, what,
                       preset.name, fix or f"To calibrate by hand: {manual}")

    try:
        path = auto_calibration_file(model, preset, seed, create=False)
        if path.is_file():
            problem = _unusable(path, preset)
            if problem is None:
                logger.debug("vllm-turboquant: using the cached calibration %s", path)
                return path
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                raise _Failed(f"the cached file {path} cannot be used ({problem}) nor removed ({_oserror(exc)})",
                              f"Remove it, point VLLM_TURBOQUANT_CACHE to a writable folder, or calibrate by "
                              f"hand: {manual}") from None
            logger.warning("vllm-turboquant: the cached automatic calibration cannot be used (%s); making it "
                           "again", problem)
        size = weight_bytes(model)
    except OSError as exc:  # the model folder cannot be read for its digest
        failed(f"cannot read the model's files ({_oserror(exc)})")
        return None
    except _Failed as exc:
        failed(exc.what, exc.fix)
        return None
    if size is None:  # a hub ID not in the local cache (or without its weights yet): never guessed small
        logger.warning("vllm-turboquant: the size of %s's weights cannot be determined on this machine (not a local "
                       "model folder, nor a hub ID whose weight files are in the local Hugging Face cache), so it "
                       "is not calibrated at start-up (only models of known size up to %.0f GiB are); serving %s "
                       "with data-oblivious codebooks. To calibrate it: %s", model, AUTO_MAX_WEIGHT_BYTES / 2**30,
                       preset.name, manual)
        return None
    if size > AUTO_MAX_WEIGHT_BYTES:
        logger.warning("vllm-turboquant: %s has %.1f GiB of weights, too large to calibrate at start-up (limit "
                       "%.0f GiB); serving %s with data-oblivious codebooks. To calibrate it: %s", model,
                       size / 2**30, AUTO_MAX_WEIGHT_BYTES / 2**30, preset.name, manual)
        return None
    try:
        return _calibrate_locked(model, preset, seed, path, timeout, engine_id, manual)
    except _Failed as exc:
        failed(exc.what, exc.fix)
        return None


def _calibrate_locked(model: str, preset: Preset, seed: int, path: Path, timeout: float, engine_id: str | None,
                      manual: str) -> Path:
    """``ensure_auto_calibration`` from the lock on; raises _Failed."""
    writable = (f"Point VLLM_TURBOQUANT_CACHE to a writable folder with a few MB free, or calibrate by hand "
                f"into one: {manual}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = _Lock(path.with_suffix(".lock"))
    except OSError as exc:
        raise _Failed(f"cannot write to the cache folder {path.parent} ({_oserror(exc)})", writable) from None
    try:
        began = time.time()
        try:
            with _stop_on_signals():  # waiting for another process's calibration stops on SIGTERM too
                got = lock.acquire(time.monotonic() + timeout)
            if not got:
                raise _Failed(f"another process held the lock {lock.path} for longer than calibration_timeout = "
                              f"{timeout:g} s")
        except OSError as exc:
            raise _Failed(f"cannot lock {lock.path} ({_oserror(exc)})", writable) from None
        if path.is_file() and _unusable(path, preset) is None:
            return path  # made by the process we waited for
        before = lock.status()
        if before.get("state") == "failed" and (
                (engine_id is not None and before.get("engine") == engine_id) or before.get("time", 0) >= began):
            raise _Failed(f"{before.get('reason', 'unknown')} (in process {before.get('pid')} of the same "
                          f"{'engine' if before.get('engine') == engine_id else 'start'}, which this one waited "
                          "for; not repeated)", before.get("fix"))
        # written now, before the subprocess can fill the disk: a later failure status fits in place
        lock.set_status(state="running", pid=os.getpid(), engine=engine_id, time=time.time())
        logger.info("vllm-turboquant: calibrating %s for %s on the built-in text (%d tokens; once per model, "
                    "cached in %s; at most %g s; turn off with calibration=none)", model, preset.name, AUTO_TOKENS,
                    path, timeout)
        t = time.perf_counter()
        cmd = [sys.executable, "-m", "vllm_turboquant.calibrate", "--model", model, "--preset", preset.name,
               "--seed", str(seed), "--out", str(path), "--tokens", str(AUTO_TOKENS), "--parent-pid", str(os.getpid())]
        try:
            # the command writes the file atomically (write_registry_file): a failure leaves no file behind
            _run(cmd, timeout, manual)
            if not path.is_file():
                raise _Failed(f"the calibration command succeeded but {path} is missing")
        except _Failed as exc:
            lock.set_status(state="failed", pid=os.getpid(), engine=engine_id, time=time.time(), reason=exc.what,
                            fix=exc.fix)
            raise
        lock.set_status(state="done", pid=os.getpid(), engine=engine_id, time=time.time())
        logger.info("vllm-turboquant: calibrated %s for %s in %.1f s", model, preset.name, time.perf_counter() - t)
        return path
    finally:
        lock.close()


def _exit_with_parent(parent: int) -> None:
    """Stop this process (exit 3) once ``parent`` is no longer its parent: an engine killed with SIGKILL
    leaves no calibration running behind it."""
    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(3)

    threading.Thread(target=watch, name="vllm-turboquant-parent-watch", daemon=True).start()


# ------------------------------------------------------------------------------------------ CLI
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vllm_turboquant.calibrate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a local Hugging Face model folder (or hub id)")
    parser.add_argument("--preset", default="turboquant3", choices=list(PRESETS), help="preset to calibrate for")
    parser.add_argument("--out", required=True, help="the registry file to write (.safetensors)")
    parser.add_argument("--text", help="plain-text file to calibrate on (default: the built-in text)")
    parser.add_argument("--tokens", type=int, default=AUTO_TOKENS,
                        help=f"tokens of text to run (default {AUTO_TOKENS})")
    parser.add_argument("--seed", type=int, default=0, help="rotation seed; serve with the same (default 0)")
    parser.add_argument("--no-center-keys", action="store_true", help="fit codebooks without key-mean subtraction")
    parser.add_argument("--device", default="auto",
                        help="auto (default: the GPU in the model's dtype when there is one, else the CPU in "
                        "float32), cpu, cuda or cuda:N")
    parser.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)  # the engine's automatic calibration
    args = parser.parse_args(argv)
    if args.tokens < CHUNK:
        parser.error(f"--tokens {args.tokens}: at least {CHUNK}")
    try:
        capture_device(args.device)
    except ValueError as e:
        parser.error(str(e))
    if args.parent_pid:
        _exit_with_parent(args.parent_pid)

    text = Path(args.text).read_text(errors="ignore") if args.text else builtin_text()
    t = time.time()
    calibrate_to_file(args.model, text, args.out, args.preset, tokens=args.tokens, seed=args.seed,
                      center_keys=not args.no_center_keys, device=args.device)
    print(f"wrote {args.out} ({args.preset}, {args.tokens} tokens) in {time.time() - t:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
