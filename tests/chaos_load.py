"""A steady-rate load generator that judges every answer, for the chaos tests
and bench/chaos.py. Loopback only, bounded in time and in request count.

Each request ends as exactly one of:

- ok: 200 with a complete body (unary: JSON with choices; stream: every event
  is JSON and the stream ends with ``data: [DONE]``)
- error: a well-formed error: a status >= 400 with the OpenAI envelope, or a
  stream that ends with an SSE ``data: {"error": ...}`` event
- refused: the connection was refused (nothing listened: the daemon was down)
- lost: anything else: no answer within the timeout (hung), a connection cut
  mid-answer, a malformed body, a stream without its end
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

OUTCOMES = ("ok", "error", "refused", "lost")


def _envelope_ok(data: object) -> bool:
    if not isinstance(data, dict) or set(data) != {"error"} or not isinstance(data["error"], dict):
        return False
    err = data["error"]
    return (isinstance(err.get("message"), str) and bool(err["message"]) and isinstance(err.get("type"), str)
            and "param" in err and "code" in err)


def classify_unary(status: int, body: bytes) -> tuple[str, str]:
    """(outcome, detail) of a whole answer."""
    try:
        data = json.loads(body)
    except ValueError:
        return "lost", f"{status} with a body that is not JSON: {body[:80]!r}"
    if status == 200:
        if isinstance(data, dict) and isinstance(data.get("choices"), list) and data["choices"]:
            return "ok", "200"
        return "lost", f"200 without choices: {body[:80]!r}"
    if status >= 400 and _envelope_ok(data):
        return "error", f"{status} {data['error'].get('code')}"
    return "lost", f"{status} not in the error envelope: {body[:80]!r}"


def classify_stream(status: int, body: bytes) -> tuple[str, str]:
    """(outcome, detail) of a streamed answer, read to its end."""
    if status != 200:
        return classify_unary(status, body)
    events = [e for e in body.decode("utf-8", "replace").split("\n\n") if e.strip()]
    done = False
    for event in events:
        lines = [ln for ln in event.splitlines() if not ln.startswith(":")]  # comments: keepalive
        if not lines:
            continue
        if len(lines) != 1 or not lines[0].startswith("data: "):
            return "lost", f"malformed SSE event: {event[:80]!r}"
        payload = lines[0][6:]
        if payload == "[DONE]":
            done = True
            continue
        try:
            data = json.loads(payload)
        except ValueError:
            return "lost", f"SSE event is not JSON: {payload[:80]!r}"
        if isinstance(data, dict) and "error" in data:
            return ("error", f"sse {data['error'].get('code')}") if _envelope_ok(data) else (
                "lost", f"SSE error not in the envelope: {payload[:80]!r}")
    return ("ok", "200 stream") if done else ("lost", "stream ended without [DONE]")


@dataclass
class Tally:
    counts: Counter = field(default_factory=Counter)
    details: Counter = field(default_factory=Counter)
    lost_examples: list[str] = field(default_factory=list)

    def add(self, outcome: str, detail: str) -> None:
        self.counts[outcome] += 1
        self.details[f"{outcome}: {detail}"] += 1
        if outcome == "lost" and len(self.lost_examples) < 5:
            self.lost_examples.append(detail)

    @property
    def sent(self) -> int:
        return sum(self.counts.values())

    def __getitem__(self, outcome: str) -> int:
        return self.counts[outcome]

    def summary(self) -> str:
        return ", ".join(f"{k}={self.counts[k]}" for k in OUTCOMES) + f" ({dict(self.details)})"


def chat(model: str, stream: bool = False, max_tokens: int = 4) -> dict:
    return {"model": model, "stream": stream, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": "Say hi"}]}


async def one_request(client: httpx.AsyncClient, body: dict) -> tuple[str, str]:
    stream = bool(body.get("stream"))
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
            data = await resp.aread()
        return (classify_stream if stream else classify_unary)(resp.status_code, data)
    except httpx.ConnectError as exc:
        return "refused", f"connect: {type(exc).__name__}"
    except httpx.TimeoutException as exc:
        return "lost", f"hung: {type(exc).__name__}"
    except httpx.HTTPError as exc:
        return "lost", f"cut: {type(exc).__name__}"


class Load:
    """Requests at a steady rate from a background thread until stopped; then
    waits for the ones in flight. ``with Load(url, bodies, rate=20) as load: ...``"""

    def __init__(self, url: str, bodies: list[dict], rate: float = 20.0, timeout: float = 30.0,
                 max_requests: int = 10_000, max_seconds: float = 600.0) -> None:
        assert url.startswith(("http://127.0.0.1:", "http://localhost:")), "loopback only"
        self.url, self.bodies, self.rate, self.timeout = url, bodies, rate, timeout
        self.max_requests, self.max_seconds = max_requests, max_seconds
        self.tally = Tally()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> Tally:
        self._stop.set()
        self._thread.join(self.timeout + 30)
        return self.tally

    def wait_for(self, n: int, timeout: float = 30.0) -> None:
        """Block until at least n requests have finished."""
        deadline = time.monotonic() + timeout
        while self.tally.sent < n and time.monotonic() < deadline:
            time.sleep(0.05)

    async def _run(self) -> None:
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=0)  # a fresh connection each
        async with httpx.AsyncClient(base_url=self.url, timeout=self.timeout, limits=limits) as client:
            tasks: set[asyncio.Task] = set()
            start = time.monotonic()
            i = 0
            while not self._stop.is_set() and i < self.max_requests and time.monotonic() - start < self.max_seconds:
                body = self.bodies[i % len(self.bodies)]
                task = asyncio.create_task(one_request(client, body))
                task.add_done_callback(lambda t: self.tally.add(*t.result()))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                i += 1
                await asyncio.sleep(max(0.0, start + i / self.rate - time.monotonic()))
            if tasks:
                await asyncio.wait(set(tasks))
