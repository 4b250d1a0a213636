"""A streamed answer's relay through the real daemon (Granian + the front door)
and a real fake-engine subprocess: piece for piece as the engine paces it, and
many streams at once (appliance/gateway/relay.py, proxy.EngineStream)."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess

import httpx
import pytest

from .conftest import FAKE_ENGINE, PY, ROOT, DaemonFactory, fake_model, free_port, wait_until

PACED_CHUNKS = 5
SIMULTANEOUS = 64
READ_TIMEOUT_S = 1


@pytest.fixture(scope="module")
def relay_daemon(tmp_path_factory):
    factory = DaemonFactory(tmp_path_factory.mktemp("relay"))
    models = (fake_model("paced", "--chunks", str(PACED_CHUNKS), "--chunk-delay", "0.25")
              + fake_model("many", "--chunks", "20", "--chunk-delay", "0.02")
              + fake_model("unhurried", "--chunks", "4", "--chunk-delay", "0.7")
              + fake_model("stalls", "--chunks", "5", "--stall-mid-stream", "2"))
    daemon = factory.start(models, extra=f"[upstream]\nread_timeout_s = {READ_TIMEOUT_S}\n")
    yield daemon
    factory.cleanup()


def _reads(sock: socket.socket) -> list[bytes]:
    """What came off the socket, one entry per recv (HTTP framing and all)."""
    reads = []
    while got := sock.recv(65536):
        reads.append(got)
    return reads


def test_paced_chunks_are_relayed_one_for_one_and_none_held_behind_a_later_one(relay_daemon):
    body = json.dumps({"model": "paced", "messages": [{"role": "user", "content": "hi"}], "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", relay_daemon.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        reads = _reads(sock)
    content = [r for r in reads if b'"delta"' in r]
    # Each event the engine sent alone (a quarter second apart) reached the client
    # alone, in order: none merged into a later one's piece, as one held back would be.
    assert [r.count(b"data: {") for r in content] == [1] * PACED_CHUNKS
    assert re.findall(rb'"content": "(tok\d+) "', b"".join(content)) == [b"tok%d" % i for i in range(PACED_CHUNKS)]
    assert b"data: [DONE]\n\n" in b"".join(reads)


def test_64_simultaneous_streams_are_all_answered_in_full(relay_daemon):
    async def one(client: httpx.AsyncClient) -> list[str]:
        events = []
        async with client.stream("POST", "/v1/chat/completions", json={
                "model": "many", "messages": [{"role": "user", "content": "hi"}], "stream": True}) as resp:
            assert resp.status_code == 200
            async for line in resp.aiter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
        return events

    async def all_at_once() -> list[list[str]]:
        limits = httpx.Limits(max_connections=SIMULTANEOUS)
        async with httpx.AsyncClient(base_url=relay_daemon.url, timeout=30, limits=limits) as client:
            return await asyncio.gather(*(one(client) for _ in range(SIMULTANEOUS)))

    answers = asyncio.run(all_at_once())
    assert len(answers) == SIMULTANEOUS
    for events in answers:
        assert events[-1] == "[DONE]"
        texts = [json.loads(e)["choices"][0]["delta"]["content"] for e in events[:-1]]
        assert texts == [f"tok{i} " for i in range(20)]


def _stream_events(daemon, model: str) -> list[str]:
    with daemon.client() as c, c.stream("POST", "/v1/chat/completions", json={
            "model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True}) as resp:
        assert resp.status_code == 200
        return [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]


def test_an_engine_that_falls_silent_mid_stream_ends_it_with_the_error_event(relay_daemon):
    events = _stream_events(relay_daemon, "stalls")
    assert [json.loads(e)["choices"][0]["delta"]["content"] for e in events[:2]] == ["tok0 ", "tok1 "]
    error = json.loads(events[-1])["error"]
    assert "broke mid-stream" in error["message"] and "Timeout" in error["message"]
    assert len(events) == 3


def test_a_stream_longer_than_the_read_timeout_is_not_cut_while_its_engine_keeps_sending(relay_daemon):
    # Each silence (0.7 s) is under read_timeout_s; the whole answer (2.8 s) is not.
    events = _stream_events(relay_daemon, "unhurried")
    assert events[-1] == "[DONE]" and len(events) == 5


def test_64_streams_starting_together_are_all_answered_and_none_sets_up_a_task_before_its_first_chunk(tmp_path):
    # Each stream's start-up work runs one after another on the one loop: a task (and a
    # wait) set up per stream before its first chunk is work that every other stream
    # starting at the same time waits behind. In process, through the real front door
    # to a real fake engine: every stream is answered in full, and no task is created
    # between the first request's arrival and the last stream's first chunk (the relay
    # runs in the request's own task; the client is watched only once a stream outlives
    # relay.WATCH_AFTER_S).
    from appliance.api.app import create_app, front_door
    from appliance.config import parse_config

    port = free_port()
    engine = subprocess.Popen([PY, str(FAKE_ENGINE), "--port", str(port), "--chunks", "3", "--chunk-delay", "0.01"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: _answers(f"http://127.0.0.1:{port}/health"), 15, what="the fake engine")
        cfg = parse_config(
            f'[paths]\nstate_dir = "{tmp_path}/state"\ncache_dir = "{tmp_path}/cache"\nlog_dir = "{tmp_path}/log"\n'
            f'[[models]]\nname = "fake"\nserver = "openai"\nurl = "http://127.0.0.1:{port}"\n')
        answers, created_before_first_chunks = asyncio.run(_simultaneous_in_process(front_door, create_app(cfg)))
    finally:
        engine.terminate()
        engine.wait(timeout=10)
    assert len(answers) == SIMULTANEOUS
    for events in answers:
        assert events[-1] == b"[DONE]"
        assert [json.loads(e)["choices"][0]["delta"]["content"] for e in events[:-1] if b'"delta"' in e] == [
            "tok0 ", "tok1 ", "tok2 "]
    assert created_before_first_chunks == []


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


APPLIANCE = str(ROOT / "appliance")


async def _simultaneous_in_process(front_door, app) -> tuple[list[list[bytes]], list[str]]:
    """SIMULTANEOUS streams through the app's front door at once: each one's SSE events,
    and the appliance's own tasks (their coroutines' names) created before the last first chunk went out."""
    loop = asyncio.get_running_loop()
    created: list[str] = []
    waiting_first = {"n": SIMULTANEOUS}

    def counting_factory(loop, coro, **kwargs):
        code = getattr(coro, "cr_code", None)  # the appliance's own tasks (aiohttp's writer has one too)
        if waiting_first["n"] > 0 and code is not None and code.co_filename.startswith(APPLIANCE):
            created.append(coro.__qualname__)
        return asyncio.Task(coro, loop=loop, **kwargs)

    lifespan: asyncio.Queue = asyncio.Queue()
    up, down = asyncio.Event(), asyncio.Event()
    await lifespan.put({"type": "lifespan.startup"})

    async def lifespan_send(message: dict) -> None:
        (up if message["type"] == "lifespan.startup.complete" else down).set()

    life = asyncio.create_task(app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, lifespan.get,
                                   lifespan_send))
    await up.wait()
    body = json.dumps({"model": "fake", "messages": [{"role": "user", "content": "hi"}], "stream": True}).encode()

    async def one() -> list[bytes]:
        messages = [{"type": "http.request", "body": body, "more_body": False}]
        sent: list[bytes] = []

        async def receive() -> dict:
            if messages:
                return messages.pop()
            await asyncio.Event().wait()  # the client stays until its answer ends
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            if message["type"] == "http.response.body" and message["body"]:
                if not sent:
                    waiting_first["n"] -= 1
                sent.append(message["body"])

        scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "query_string": b"",
                 "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))],
                 "http_version": "1.1", "scheme": "http", "root_path": "", "raw_path": b"/v1/chat/completions"}
        await front_door(app)(scope, receive, send)
        return [e.removeprefix(b"data: ") for e in b"".join(sent).split(b"\n\n") if e]

    deployment = app.state.runtime.supervisor.deployment("fake")
    for _ in range(200):  # the external engine found READY, as on a running server
        if deployment.ready:
            break
        await asyncio.sleep(0.05)
    await asyncio.gather(*(one() for _ in range(SIMULTANEOUS)))  # warm-up: the pool's connections open
    waiting_first["n"] = SIMULTANEOUS
    requests = [asyncio.ensure_future(one()) for _ in range(SIMULTANEOUS)]  # the server's own request tasks
    loop.set_task_factory(counting_factory)
    try:
        answers = await asyncio.gather(*requests)
    finally:
        loop.set_task_factory(None)
    await lifespan.put({"type": "lifespan.shutdown"})
    await down.wait()
    await life
    return answers, created


def test_an_audited_streams_text_is_kept_up_to_max_answer_bytes_and_marked_cut():
    # Regression: on an audited route (audit.include_text, a regulated route) the relay
    # kept a stream's whole text in memory for its row, however long the stream.
    import asyncio

    from appliance.gateway import deadlines, relay
    from appliance.gateway.capabilities import ENDPOINTS
    from appliance.gateway.request import ProxyRequest

    class Stream:
        def __init__(self, pieces):
            self.pieces = list(pieces)

        async def read(self):
            return self.pieces.pop(0) if self.pieces else b""

        def close(self):
            pass

    async def send(message):
        pass

    async def relayed(cap: int) -> bytes:
        req = ProxyRequest("r", 0.0, 0.0, ENDPOINTS["/v1/embeddings"], None)
        req.response_text, req.response_text_cap = b"", cap
        await relay._pump(Stream([b"x" * 1000] * 10), send, req, deadlines.sends(60))
        return req.response_text

    assert asyncio.run(relayed(2500)) == b"x" * 2500 + relay.TEXT_CUT
    assert asyncio.run(relayed(10000)) == b"x" * 10000


def test_the_audit_text_cap_is_the_configs_max_answer_bytes_set_with_the_collection():
    # The cap on an audited answer's kept text has one owner: upstream.max_answer_bytes.
    # The front door sets it whenever it starts collecting; a request that collects
    # nothing carries no cap (and no default of its own to drift from the config's).
    from appliance.api.app import with_body
    from appliance.config import AuditConfig, Config, UpstreamConfig
    from appliance.gateway.capabilities import ENDPOINTS
    from appliance.gateway.request import ProxyRequest

    body = b'{"model": "m", "messages": []}'
    cap = 3 * 1024 * 1024
    cfg = Config(upstream=UpstreamConfig(max_answer_bytes=cap), audit=AuditConfig(include_text=True))
    collecting = ProxyRequest("r", 0.0, 0.0, ENDPOINTS["/v1/chat/completions"], None)
    with_body(cfg, collecting, body, {})
    assert (collecting.response_text, collecting.response_text_cap) == (b"", cap)

    quiet = ProxyRequest("q", 0.0, 0.0, ENDPOINTS["/v1/chat/completions"], None)
    with_body(Config(upstream=UpstreamConfig(max_answer_bytes=cap)), quiet, body, {})
    assert (quiet.response_text, quiet.response_text_cap) == (None, 0)


def test_a_client_that_stops_reading_the_model_is_loading_comments_is_dropped_at_send_timeout(monkeypatch):
    # Regression: while a stream was held through a cold start, its keep-alive comments
    # were sent under no deadline: a client that stopped reading held the request (and,
    # once the model was up, its replica slot) for as long as it kept the connection.
    import asyncio
    from types import SimpleNamespace

    from appliance.fleet.hold import ClientGone
    from appliance.gateway import relay
    from appliance.gateway.capabilities import ENDPOINTS
    from appliance.gateway.request import ProxyRequest

    async def still_loading(rt, req):
        await asyncio.Future()

    monkeypatch.setattr(relay, "_open", still_loading)
    rt = SimpleNamespace(cfg=SimpleNamespace(queue=SimpleNamespace(keepalive_s=0.01),
                                             server=SimpleNamespace(send_timeout_s=0.05)))
    req = ProxyRequest("r", 0.0, 0.0, ENDPOINTS["/v1/chat/completions"], None)
    req.deployment = SimpleNamespace(pick_ready=lambda: None)
    sent = []

    async def stops_reading(message):
        sent.append(message)
        if len(sent) > 2:  # the head and one comment taken, then nothing
            await asyncio.Future()

    async def held():
        with pytest.raises(ClientGone):
            await asyncio.wait_for(relay._open_with_keepalive(rt, req, stops_reading), 30)

    asyncio.run(held())
    assert sent[1]["body"] == b": model is loading\n\n"
