"""A client that stops reading its answer (server.send_timeout_s): a stream's engine
request is closed (its replica slot freed), the tokens relayed so far charged as for a
client that left, its row says 499; a large whole answer left unread is given up
(its rest never sent, so never held). Real sockets that stop reading (a small receive buffer), a fake engine
streaming as fast as it can, the real daemon, alone and with workers."""

from __future__ import annotations

import json
import socket

import pytest

from .conftest import DaemonFactory, fake_model, wait_until
from .test_keys import keys_cli
from .test_ledger import engine_stats, query

SEND_TIMEOUT_S = 2
MODELS = (fake_model("firehose", "--chunks", "5000000")
          + fake_model("bulky", "--pad-bytes", str(48 * 1024 * 1024)))


@pytest.fixture(scope="module", params=[1, 2], ids=["alone", "workers"])
def stalling(request, tmp_path_factory):
    factory = DaemonFactory(tmp_path_factory.mktemp(f"stall{request.param}"))
    daemon = factory.start(MODELS, extra="[keys]\nrequired = true\n\n[queue]\nkeepalive_s = 0\n",
                           server=f"workers = {request.param}\nsend_timeout_s = {SEND_TIMEOUT_S}")
    yield daemon
    factory.cleanup()


def stalled_client(daemon, token: str, body: dict) -> socket.socket:
    """A connection that sends its request, reads the first bytes of the answer, and
    never reads again (a receive buffer of a few KiB: the daemon's sends fill it)."""
    payload = json.dumps(body).encode()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", daemon.port))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 b"Authorization: Bearer " + token.encode() + b"\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(payload) + payload)
    assert sock.recv(1024).startswith(b"HTTP/1.1 200")
    return sock


def rest_until_closed(sock: socket.socket) -> bytes:
    """What the connection still holds, read until the daemon closes it (a hang fails the test)."""
    sock.settimeout(60)
    data = bytearray()
    try:
        while piece := sock.recv(1 << 20):
            data += piece
    except ConnectionResetError:
        pass
    return bytes(data)


def test_a_stream_whose_client_stops_reading_frees_its_engine_slot_and_is_charged_what_was_relayed(stalling):
    # Regression: a client that stopped reading kept its replica slot, and its engine
    # generating into a full socket, for as long as it held the connection open.
    token = keys_cli(stalling, "create", "--name", "stops-reading")
    key_id = token.split("-")[1]
    cancelled = engine_stats(stalling, "firehose")["streams_cancelled"]
    sock = stalled_client(stalling, token, {"model": "firehose", "stream": True, "max_tokens": 5000000,
                                            "messages": [{"role": "user", "content": "hi"}]})
    try:
        wait_until(lambda: engine_stats(stalling, "firehose")["streams_cancelled"] > cancelled, 60,
                   what="the engine's request to be closed")
        [(status, completion)] = wait_until(
            lambda: query(stalling, "SELECT status, completion_tokens FROM audit WHERE key_id = ?", key_id),
            30, what="the audit row")
        assert status == 499 and completion > 0
        assert wait_until(lambda: stalling.replicas("firehose")[0]["inflight"] == 0, 30, what="the slot freed")
        [(tokens,)] = query(stalling, "SELECT coalesce(sum(tokens), 0) FROM usage_ledger WHERE key_id = ?", key_id)
        assert tokens >= completion
        rest_until_closed(sock)  # the daemon dropped the connection: no hang
    finally:
        sock.close()
    assert "server.send_timeout_s" in stalling.log_text()


def test_a_large_whole_answer_left_unread_is_given_up(stalling):
    # Regression: a client that never read a large answer held the whole answer in the
    # daemon's memory for as long as it kept the connection open.
    token = keys_cli(stalling, "create", "--name", "never-reads")
    sock = stalled_client(stalling, token, {"model": "bulky", "messages": [{"role": "user", "content": "hi"}]})
    try:
        wait_until(lambda: "bytes) for 2s" in stalling.log_text(), 60, what="the daemon to give up on the client")
        received = rest_until_closed(sock)
    finally:
        sock.close()
    assert len(received) < 48 * 1024 * 1024  # given up before its end: the rest never sent


def test_a_workers_stall_log_line_names_the_request_id_its_client_and_audit_row_know(caplog):
    # Regression: a worker relaying the daemon's answer logged its own number for the
    # request ("request 7 (worker 0)"), which no client, access log or audit row knows.
    import asyncio

    from appliance.dataplane.protocol import Mailbox, Start, WorkerSettings
    from appliance.dataplane.worker_client import ClientSide

    class Writer:
        def __init__(self):
            self.frames = []

        def write(self, frame):
            self.frames.append(frame)

    async def client_that_stops_reading(message):
        if message["type"] == "http.response.body":
            await asyncio.Future()  # never taken

    async def relay():
        settings = WorkerSettings(0, 10.0, 1 << 20, 8, send_timeout_s=0.05)
        worker = ClientSide(settings, Writer(), None)
        answer = Mailbox()
        answer.put(Start(7, 200, [(b"x-request-id", b"req-the-client-knows")], b"first", True))
        await worker._answer(7, answer, client_that_stops_reading)
        return worker.out.frames

    with caplog.at_level("WARNING"):
        frames = asyncio.run(relay())
    assert [type(f).__name__ for f in frames] == ["Gone"]
    [line] = [r.getMessage() for r in caplog.records if "server.send_timeout_s" in r.getMessage()]
    assert "req-the-client-knows" in line
