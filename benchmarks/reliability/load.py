"""Load checks against a running OpenAI-compatible server: mixed soak, mid-stream cancellations, the
bad-request matrix, and a preemption run. Each returns a dict of measurements and ``ok``."""

from __future__ import annotations

import asyncio
import json
import random
import re
import statistics
import time

import aiohttp

QUESTIONS = [
    "What is the capital of France?", "Name three primary colours.", "Explain what a CPU does in one sentence.",
    "Write a haiku about rain.", "What is 17 times 3?", "Give a synonym for 'happy'.",
    "Why is the sky blue? Answer briefly.", "List two uses of copper.", "Translate 'good morning' into Spanish.",
    "What does HTTP stand for?", "Summarise the water cycle in two sentences.", "Who wrote Hamlet?",
    "Describe a cat to someone who has never seen one.", "What is the boiling point of water in Celsius?",
    "Suggest a name for a small bakery.", "Count from one to ten in words.",
]


def _metric(text: str, name: str) -> float:
    """The sum of a Prometheus metric's samples (``name`` or ``name_total``) in /metrics text."""
    total, found = 0.0, False
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(?:_total)?(?:\{{[^}}]*\}})?\s+([0-9.eE+-]+)$", line)
        if m:
            total += float(m.group(1))
            found = True
    return total if found else float("nan")


async def _metrics(session: aiohttp.ClientSession, url: str) -> str:
    async with session.get(url + "/metrics") as r:
        return await r.text()


def _request(rng: random.Random, model: str) -> tuple[str, dict, bool]:
    """(endpoint, body, stream) of one mixed request."""
    q = rng.choice(QUESTIONS)
    stream = rng.random() < 0.35
    body = {"model": model, "max_tokens": rng.randint(8, 64), "temperature": rng.choice([0.0, 0.7]),
            "min_tokens": 1, "stream": stream}
    if rng.random() < 0.6:
        return "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": q}]}, stream
    return "/v1/completions", {**body, "prompt": f"Question: {q}\nAnswer:"}, stream


async def _one(session, url: str, endpoint: str, body: dict, stream: bool) -> tuple[bool, str, float]:
    """(ok, error, seconds): ok = HTTP 200 and a non-empty answer."""
    t0 = time.monotonic()
    try:
        async with session.post(url + endpoint, json=body) as r:
            if r.status != 200:
                return False, f"HTTP {r.status}: {(await r.text())[:200]}", time.monotonic() - t0
            if not stream:
                data = await r.json()
                c = data["choices"][0]
                text = c.get("text") if "text" in c else (c.get("message") or {}).get("content")
                return bool(text and text.strip()), "" if text and text.strip() else "empty answer", \
                    time.monotonic() - t0
            pieces = []
            async for raw in r.content:
                line = raw.decode().strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                c = json.loads(line[5:])["choices"]
                if c:
                    pieces.append(c[0].get("text") or (c[0].get("delta") or {}).get("content") or "")
            text = "".join(pieces)
            return bool(text.strip()), "" if text.strip() else "empty answer", time.monotonic() - t0
    except Exception as exc:  # connection errors, bad JSON
        return False, f"{type(exc).__name__}: {exc}"[:200], time.monotonic() - t0


async def soak(url: str, model: str, requests: int = 500, concurrency: int = 100, seed: int = 0,
               timeout: float = 900) -> dict:
    """``requests`` mixed chat / completion requests (35% streamed), ``concurrency`` in flight."""
    rng = random.Random(seed)
    plan = [_request(rng, model) for _ in range(requests)]
    sem = asyncio.Semaphore(concurrency)
    conn = aiohttp.TCPConnector(limit=concurrency + 10)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        async def go(item):
            async with sem:
                return await _one(session, url, *item)

        t0 = time.monotonic()
        results = await asyncio.gather(*(go(p) for p in plan))
        wall = time.monotonic() - t0
    lat = sorted(r[2] for r in results if r[0])
    errors = [r[1] for r in results if not r[0]]
    return {"requests": requests, "ok_count": len(lat), "errors": len(errors), "error_samples": errors[:5],
            "empty": sum(e == "empty answer" for e in errors),
            "p50_s": statistics.median(lat) if lat else float("nan"),
            "p95_s": lat[int(0.95 * (len(lat) - 1))] if lat else float("nan"),
            "req_per_s": requests / wall, "wall_s": wall, "ok": not errors}


async def cancellations(url: str, model: str, streams: int = 30, timeout: float = 120) -> dict:
    """Open ``streams`` long streams, close each after a few chunks; then nothing may stay running and
    a normal request must work."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        async def cut(i):
            body = {"model": model, "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                    "max_tokens": 400, "min_tokens": 400, "stream": True}
            got = 0
            async with session.post(url + "/v1/chat/completions", json=body) as r:
                async for raw in r.content:
                    if raw.startswith(b"data:"):
                        got += 1
                        if got >= 3:
                            break  # leaving the block closes the connection mid-stream
            return got

        chunks = await asyncio.gather(*(cut(i) for i in range(streams)))
        running = float("nan")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            running = _metric(await _metrics(session, url), "vllm:num_requests_running")
            if running == 0:
                break
            await asyncio.sleep(0.5)
        ok_after, err, _ = await _one(session, url, "/v1/chat/completions",
                                      {"model": model, "messages": [{"role": "user", "content": "Say hi."}],
                                       "max_tokens": 8, "min_tokens": 1}, False)
    return {"streams": streams, "cut_after_chunks": min(chunks), "running_after": running, "ok_after": ok_after,
            "ok": running == 0 and ok_after and min(chunks) >= 3, "error": err}


def _bad_requests(model: str) -> list[tuple[str, str, str, object]]:
    """(name, method, path, body): body is a dict (JSON), bytes (raw) or None."""
    chat = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    comp = {"model": model, "prompt": "Hi", "max_tokens": 4}
    return [
        ("invalid JSON", "POST", "/v1/chat/completions", b"{not json"),
        ("not UTF-8", "POST", "/v1/chat/completions", b"\xff\xfe\xfa"),
        ("missing messages", "POST", "/v1/chat/completions", {"model": model}),
        ("unknown model", "POST", "/v1/chat/completions", {**chat, "model": "no-such-model"}),
        ("messages not a list", "POST", "/v1/chat/completions", {**chat, "messages": "Hi"}),
        ("empty messages", "POST", "/v1/chat/completions", {**chat, "messages": []}),
        ("unknown role", "POST", "/v1/chat/completions", {**chat, "messages": [{"role": "wizard", "content": "x"}]}),
        ("content null", "POST", "/v1/chat/completions", {**chat, "messages": [{"role": "user", "content": None}]}),
        ("max_tokens -1", "POST", "/v1/chat/completions", {**chat, "max_tokens": -1}),
        ("max_tokens 10^9", "POST", "/v1/chat/completions", {**chat, "max_tokens": 10**9}),
        ("temperature -1", "POST", "/v1/chat/completions", {**chat, "temperature": -1}),
        ("temperature string", "POST", "/v1/chat/completions", {**chat, "temperature": "hot"}),
        ("top_p 2", "POST", "/v1/chat/completions", {**chat, "top_p": 2}),
        ("n 0", "POST", "/v1/chat/completions", {**chat, "n": 0}),
        ("logprobs 1000", "POST", "/v1/completions", {**comp, "logprobs": 1000}),
        ("stop wrong type", "POST", "/v1/completions", {**comp, "stop": 123}),
        ("stream string", "POST", "/v1/completions", {**comp, "stream": "yes"}),
        ("seed string", "POST", "/v1/completions", {**comp, "seed": "abc"}),
        ("prompt past max_model_len", "POST", "/v1/completions", {**comp, "prompt": "hello " * 20000}),
        ("empty prompt", "POST", "/v1/completions", {**comp, "prompt": ""}),
        ("prompt token ids out of vocab", "POST", "/v1/completions", {**comp, "prompt": [10**9, 5]}),
        ("GET on a POST route", "GET", "/v1/chat/completions", None),
        ("unknown route", "POST", "/v1/nothing-here", comp),
        ("5 MB body", "POST", "/v1/completions", {**comp, "prompt": "x" * (5 << 20)}),
    ]


def _valid_answer(text: str) -> bool:
    """A completion: a JSON body with choices, or a stream (``"stream": "yes"`` is read as true) whose
    events carry choices."""
    try:
        if text.lstrip().startswith("data:"):
            events = [ln[5:].strip() for ln in text.splitlines() if ln.startswith("data:")]
            return any(json.loads(e).get("choices") for e in events if e != "[DONE]")
        return bool(json.loads(text).get("choices"))
    except ValueError:
        return False


async def bad_requests(url: str, model: str, timeout: float = 120) -> dict:
    """Every malformed request gets a 4xx or a valid answer (never a 5xx or a dropped connection), and
    the server keeps serving."""
    rows = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        for name, method, path, body in _bad_requests(model):
            kwargs = {"json": body} if isinstance(body, dict) else {"data": body} if body is not None else {}
            if isinstance(body, bytes):
                kwargs["headers"] = {"Content-Type": "application/json"}
            try:
                async with session.request(method, url + path, **kwargs) as r:
                    text = await r.text(errors="replace")
                    valid = r.status == 200 and _valid_answer(text)
                    rows.append((name, r.status, (400 <= r.status < 500) or valid))
            except Exception as exc:
                rows.append((name, f"{type(exc).__name__}", False))
        ok_after, err, _ = await _one(session, url, "/v1/completions",
                                      {"model": model, "prompt": "Hello", "max_tokens": 4, "min_tokens": 1}, False)
    bad = [r for r in rows if not r[2]]
    return {"requests": len(rows), "answered_ok": len(rows) - len(bad), "failures": bad, "ok_after": ok_after,
            "statuses": {r[0]: r[1] for r in rows}, "ok": not bad and ok_after, "error": err}


async def preemption(url: str, model: str, requests: int = 16, tokens: int = 384, timeout: float = 900) -> dict:
    """``requests`` long generations at once against a tiny KV cache: all must complete; preemptions counted."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        before = _metric(await _metrics(session, url), "vllm:num_preemptions")
        t0 = time.monotonic()
        results = await asyncio.gather(*(
            _one(session, url, "/v1/completions",
                 {"model": model, "prompt": f"Story {i}: once upon a time", "max_tokens": tokens,
                  "min_tokens": tokens, "temperature": 0.0}, False) for i in range(requests)))
        wall = time.monotonic() - t0
        after = _metric(await _metrics(session, url), "vllm:num_preemptions")
    done = sum(r[0] for r in results)
    return {"requests": requests, "completed": done, "preemptions": after - before, "wall_s": wall,
            "errors": [r[1] for r in results if not r[0]][:3], "ok": done == requests}
