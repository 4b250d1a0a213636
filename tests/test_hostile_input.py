"""Hostile input: schemathesis against the daemon's own OpenAPI document (OpenAI
and admin routes), then targeted abuse. Every bad request gets a clear 4xx in the
OpenAI envelope, nothing gets a 5xx, and the daemon keeps serving others."""

from __future__ import annotations

import json
import socket
import sqlite3
import time

import httpx
import hypothesis
import hypothesis.errors
import pytest
import schemathesis
from schemathesis import GenerationMode
from schemathesis.checks import positive_data_acceptance

from .conftest import DaemonFactory, fake_model, wait_until

CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def hostile_daemon(tmp_path_factory):
    factory = DaemonFactory(tmp_path_factory.mktemp("hostile"))
    models = (fake_model("fake", "--chunks", "2", extra="[models.autoscaling]\nmin_replicas = 1\nmax_replicas = 2\n")
              + fake_model("embedder", embeddings=True))
    daemon = factory.start(models, server="max_body_bytes = 65536\nheader_read_timeout_s = 2\nbody_read_timeout_s = 2",
                           extra="[queue]\ntimeout_s = 20\nkeepalive_s = 0\n")
    yield daemon
    factory.cleanup()


@pytest.fixture(scope="module")
def api_schema(hostile_daemon):
    return schemathesis.openapi.from_url(f"{hostile_daemon.url}/openapi.json")


def _fuzz(api_schema, mode: GenerationMode, examples: int) -> list[str]:
    failures = []
    for result in api_schema.get_all_operations():
        op = result.ok()

        @hypothesis.given(case=op.as_strategy(generation_mode=mode))
        @hypothesis.settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                             suppress_health_check=list(hypothesis.HealthCheck),
                             phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate])
        def run(case) -> None:
            # Not positive_data_acceptance: JSON Schema counts 2.0 as an integer, msgspec
            # (like OpenAI) answers 400 for it; every other check runs.
            case.call_and_validate(timeout=30, excluded_checks=[positive_data_acceptance])

        try:
            run()
        except hypothesis.errors.Unsatisfiable:
            continue  # nothing in this operation can be made invalid (no parameters, no body)
        except Exception as exc:  # one failing operation must not hide the others
            failures.append(f"{op.label} ({mode.value}): {exc}")
    return failures


def test_generated_valid_requests_get_no_5xx_and_answers_match_the_document(api_schema):
    failures = _fuzz(api_schema, GenerationMode.POSITIVE, 50)
    assert not failures, "\n\n".join(failures)


def test_generated_invalid_requests_get_a_4xx_in_the_envelope(api_schema):
    failures = _fuzz(api_schema, GenerationMode.NEGATIVE, 50)
    assert not failures, "\n\n".join(failures)


def _post(d, body: bytes, headers: dict | None = None) -> httpx.Response:
    return httpx.post(f"{d.url}/v1/chat/completions", content=body, timeout=30,
                      headers={"Content-Type": "application/json", **(headers or {})})


def _envelope_4xx(resp: httpx.Response, status: int | None = None) -> dict:
    assert 400 <= resp.status_code < 500, (resp.status_code, resp.text[:300])
    if status is not None:
        assert resp.status_code == status, resp.text[:300]
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def _still_serves(d) -> None:
    assert _post(d, json.dumps(CHAT).encode()).status_code == 200


HOSTILE_BODIES = {
    "over the body limit": (b'{"model": "fake", "messages": [], "x": "' + b"a" * 70_000 + b'"}', 413),
    "deep JSON nesting": (b'{"model": "fake", "messages": ' + b"[" * 30_000 + b"]" * 30_000 + b"}", 400),
    "deep JSON nesting in an unknown field": (b'{"x": ' + b"[" * 30_000 + b"]" * 30_000 + b"}", 400),
    "invalid UTF-8": (b'{"model": "fake\xff\xfe", "messages": [{"role": "user", "content": "\xc3\x28"}]}', 400),
    "huge max_tokens": (json.dumps({**CHAT, "max_tokens": 10**30}).encode(), 400),
    "negative max_tokens": (json.dumps({**CHAT, "max_tokens": -5}).encode(), 400),
    "absurd n": (json.dumps({**CHAT, "n": -(2**63)}).encode(), 400),
    "a billion choices": (json.dumps({**CHAT, "n": 10**9}).encode(), 400),  # an engine would try to make them
    "a float where an integer goes": (json.dumps({**CHAT, "max_tokens": 1e308}).encode(), 400),
    "unknown role": (json.dumps({"model": "fake", "messages": [{"role": "root", "content": "x"}]}).encode(), 400),
    "empty messages": (json.dumps({"model": "fake", "messages": []}).encode(), 400),
    "no body": (b"", 400),
    "not an object": (b'"just a string"', 400),
    "NUL bytes": (b'{"model": "fake\x00", "messages": [\x00]}', 400),
    # The body goes on as sent: a reader taking a repeated field's first value would see
    # another model than the policy did.
    "the model named twice": (b'{"model": "nowhere", "model": "fake", "messages": [{"role": "user", "content": "x"}]}', 400),
    "the model named again with escapes": (
        b'{"model": "nowhere", "\\u006dodel": "fake", "messages": [{"role": "user", "content": "x"}]}', 400),
    "max_tokens named twice": (b'{"model": "fake", "max_tokens": 1, "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}', 400),
}


@pytest.mark.parametrize("case", list(HOSTILE_BODIES))
def test_a_hostile_body_gets_a_clear_4xx_in_the_envelope_and_others_are_served(hostile_daemon, case):
    body, status = HOSTILE_BODIES[case]
    _envelope_4xx(_post(hostile_daemon, body), status)
    _still_serves(hostile_daemon)


@pytest.mark.parametrize("size", [1024 * 1024, 8 * 1024 * 1024])
def test_a_header_of_extreme_size_is_refused_and_others_are_served(hostile_daemon, size):
    try:
        resp = _post(hostile_daemon, json.dumps(CHAT).encode(), {"X-Huge": "a" * size})
        assert 400 <= resp.status_code < 500, resp.status_code
        if resp.headers.get("content-type", "").startswith("application/json"):
            _envelope_4xx(resp)
    except httpx.RemoteProtocolError:
        pass  # the server closed the connection on the oversized header: also a refusal
    _still_serves(hostile_daemon)


def test_a_slowloris_client_is_cut_after_the_header_timeout_and_others_are_served(hostile_daemon):
    # header_read_timeout_s = 2 in this daemon's config: a byte every 0.2 s never finishes the headers.
    sock = socket.create_connection(("127.0.0.1", hostile_daemon.port), timeout=30)
    request = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 10_000
    cut = False
    started = time.monotonic()
    try:
        for i, byte in enumerate(request):
            sock.send(bytes([byte]))
            if i % 5 == 0:
                _still_serves(hostile_daemon)  # others are served while it trickles
            time.sleep(0.2)
            if time.monotonic() - started > 60:
                break
    except OSError:
        cut = True  # the server closed the connection: sending fails
    if not cut:
        sock.settimeout(30)
        try:
            answer = sock.recv(65536)
            cut = answer == b"" or answer.startswith((b"HTTP/1.1 408", b"HTTP/1.1 400"))
        except ConnectionError:
            cut = True
        except TimeoutError:
            cut = False
    sock.close()
    assert cut
    _still_serves(hostile_daemon)


def test_a_client_trickling_its_body_gets_408_and_others_are_served(hostile_daemon):
    # body_read_timeout_s = 2 in this daemon's config: the headers arrive at once,
    # then the body a byte every 0.3 s, which never finishes in time.
    body = json.dumps(CHAT).encode()
    sock = socket.create_connection(("127.0.0.1", hostile_daemon.port), timeout=30)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")
    answer = b""
    try:
        for i, byte in enumerate(body):
            sock.send(bytes([byte]))
            if i == 2:
                _still_serves(hostile_daemon)
            time.sleep(0.3)
            sock.setblocking(False)
            try:
                answer = sock.recv(65536)
            except BlockingIOError:
                pass
            sock.setblocking(True)
            if answer:
                break
    except OSError:
        pass
    sock.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b'"code":"request_timeout"' in answer
    _still_serves(hostile_daemon)


def test_admin_bodies_of_invalid_utf8_or_deep_nesting_get_400(hostile_daemon):
    for body in (b'{"replicas": "\xff"}', b'{"x": ' + b"[" * 30_000 + b"]" * 30_000 + b"}"):
        resp = httpx.post(f"{hostile_daemon.url}/admin/models/fake/scale", content=body, timeout=10,
                          headers={"Content-Type": "application/json"})
        _envelope_4xx(resp, 400)


def _raw(port: int, request: bytes, half_close: bool = False) -> bytes:
    """Send raw bytes (optionally closing our side after them); the whole answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except TimeoutError:
            pass
    return answer


def _audited_statuses(d, request_id: str) -> list[int]:
    db = d.config.parent / "state" / "appliance.db"
    with sqlite3.connect(db) as conn:
        return [s for (s,) in conn.execute("SELECT status FROM audit WHERE request_id = ?", (request_id,))]


CHUNKED = [("bad-size", b"zz\r\n{}\r\n0\r\n\r\n", False),
           ("chunk-overruns-its-size", b"3\r\n{\"model\": 1}\r\n0\r\n\r\n", False),
           ("truncated", b"40\r\n{\"model\": \"fake\", \"mess", True)]


@pytest.mark.parametrize(("case", "body", "half_close"), CHUNKED, ids=[c[0] for c in CHUNKED])
def test_a_malformed_chunked_body_gets_a_400_envelope_logged_and_audited(hostile_daemon, case, body, half_close):
    rid = f"chunked-{case}-{time.monotonic_ns()}"
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\nX-Request-Id: " + rid.encode() + b"\r\nConnection: close\r\n\r\n")
    answer = _raw(hostile_daemon.port, head + body, half_close)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:300]
    error = json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
    assert error["code"] == "invalid_body" and "chunked" in error["message"]
    wait_until(lambda: _audited_statuses(hostile_daemon, rid) == [400], 10, what="the audit row")
    assert "malformed chunked encoding" in hostile_daemon.log_text()
    _still_serves(hostile_daemon)


def test_a_malformed_chunked_admin_body_changes_nothing(hostile_daemon):
    before = next(m for m in hostile_daemon.status()["models"] if m["name"] == "fake")["pinned"]
    for path in (b"/admin/models/fake/pin", b"/admin/models/fake/scale"):
        answer = _raw(hostile_daemon.port, b"POST " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                      b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                      b"zz\r\n{}\r\n0\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 400"), answer[:300]
        assert b'"code":"invalid_body"' in answer
    after = next(m for m in hostile_daemon.status()["models"] if m["name"] == "fake")
    assert after["pinned"] == before and after["override"] is None


@pytest.mark.parametrize(("body", "named"), [
    (b'{"model":"a","messages":[],"n":1}', None),
    (b' {\t"model" :  "a" ,\n "n" : 1 }\r\n', None),
    (b'{"tools":[{"model":1,"model":2}],"model":"a"}', None),  # nested: the engine's own reading
    (b'{"model": "a", "messages": [], "n": 1}', None),  # as Python's json.dumps spaces it
    (b'{"model":"a","model":"b"}', "model"),
    (b'{"model": "a", "model": "b"}', "model"),
    (b'{"model":"a", "\\u006dodel":"b"}', "model"),
    (b'{"\\u006dodel":"a"}', "model"),  # alone: still refused, no client spells a name so
    (b'{"n":1,"model":"a","n":1}', "n"),  # the same value twice
    (b'{"n":"}","n":1}', "n"),  # the first value's bytes where the last one's end is looked for
    (b'{"n":1,"n":22222222}', "n"),  # the last value longer than the rest of the body
])
def test_a_top_level_field_named_twice_is_found_however_its_values_are_spaced_or_sized(body, named):
    from appliance.gateway.protocol import repeated_field

    assert repeated_field(body) == named


H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # and an empty SETTINGS


def test_http2_with_prior_knowledge_is_not_spoken_on_the_api_port(hostile_daemon):
    # Granian's default also spoke HTTP/2 to a client opening with its preface, where the
    # header timeout does not apply: idle HTTP/2 connections stayed open past it, and a
    # header block could be 16 MiB. The port speaks HTTP/1.1 only: the preface is refused.
    answer = _raw(hostile_daemon.port, H2_PREFACE, half_close=True)
    assert not answer.startswith(b"\x00\x00"), answer[:40]  # no SETTINGS frame: no HTTP/2
    _still_serves(hostile_daemon)
