"""A streamed answer's relay through the real daemon (Granian + the front door)
and a real fake-engine subprocess: piece for piece as the engine paces it, and
many streams at once (appliance/gateway/relay.py, proxy.EngineStream)."""

from __future__ import annotations

import asyncio
import json
import re
import socket

import httpx
import pytest

from .conftest import DaemonFactory, fake_model

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
