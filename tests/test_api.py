"""The OpenAI-compatible API through the real daemon (Granian + Litestar) and a
real fake-engine subprocess."""

from __future__ import annotations

import gzip
import json
import re
import socket

from unittest.mock import ANY

import anthropic
import httpx
import pytest

from .conftest import engine_client, wait_until

CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}


def assert_envelope(resp: httpx.Response, status: int, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    assert "Traceback" not in resp.text
    if code:
        assert body["error"]["code"] == code
    return body["error"]


def fake_stats(daemon, model: str) -> dict:
    with engine_client(daemon.replicas(model)[0]) as engine:
        return engine.get("/fake/stats").json()


def test_chat_completion_answers_200_with_the_engines_body(shared_daemon):
    with shared_daemon.client() as c:
        resp = c.post("/v1/chat/completions", json=CHAT)
    assert resp.status_code == 200
    body = resp.json()
    assert body["choices"][0]["message"]["content"] == "tok0 tok1 tok2 tok3"
    assert body["usage"]["completion_tokens"] == 4
    assert resp.headers["x-request-id"]


def test_completion_answers_200(shared_daemon):
    with shared_daemon.client() as c:
        resp = c.post("/v1/completions", json={"model": "fake", "prompt": "hi", "max_tokens": 2})
    assert resp.status_code == 200
    assert resp.json()["choices"][0]["text"] == "tok0 tok1"


def test_unknown_fields_pass_through_to_the_engine_untouched(shared_daemon):
    request = {**CHAT, "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
               "response_format": {"type": "json_object"}, "logprobs": True, "x_vendor": {"a": [1, 2]}}
    with shared_daemon.client() as c:
        assert c.post("/v1/chat/completions", json=request).status_code == 200
    assert fake_stats(shared_daemon, "fake")["last_body"] == request


def test_request_id_from_the_client_is_echoed(shared_daemon):
    with shared_daemon.client() as c:
        resp = c.post("/v1/chat/completions", json=CHAT, headers={"X-Request-Id": "abc-123"})
    assert resp.headers["x-request-id"] == "abc-123"


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_streaming_sends_sse_chunks_then_done(shared_daemon, path):
    body = ({**CHAT, "stream": True} if "chat" in path
            else {"model": "fake", "prompt": "hi", "stream": True})
    with shared_daemon.client() as c, c.stream("POST", path, json=body) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = [line for line in resp.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert len(chunks) == 4


def test_streaming_is_incremental(shared_daemon):
    """The first chunk reaches the client while the engine is still generating
    (50 chunks, 0.1 s apart): nothing buffers the stream until it ends."""
    before = fake_stats(shared_daemon, "slow")
    with shared_daemon.client() as c, c.stream(
        "POST", "/v1/chat/completions", json={**CHAT, "model": "slow", "stream": True}
    ) as resp:
        first = next(line for line in resp.iter_lines() if line.startswith("data: "))
        during = fake_stats(shared_daemon, "slow")
    assert json.loads(first[6:])["choices"][0]["delta"]["content"] == "tok0 "
    assert during["streams_started"] == before["streams_started"] + 1
    assert during["streams_completed"] == before["streams_completed"]  # still generating


def test_client_disconnect_cancels_the_upstream_stream(shared_daemon):
    before = fake_stats(shared_daemon, "slow")
    with shared_daemon.client() as c, c.stream(
        "POST", "/v1/chat/completions", json={**CHAT, "model": "slow", "stream": True}
    ) as resp:
        next(line for line in resp.iter_lines() if line.startswith("data: "))
    # Leaving the block closes the connection after one chunk of fifty.
    wait_until(lambda: fake_stats(shared_daemon, "slow")["streams_cancelled"]
               > before["streams_cancelled"], timeout=5, what="the engine to see the cancel")
    after = fake_stats(shared_daemon, "slow")
    assert after["streams_completed"] == before["streams_completed"]
    wait_until(lambda: shared_daemon.replicas("slow")[0]["inflight"] == 0, timeout=5,
               what="the replica's in-flight count to drop")


def test_models_lists_configured_models(shared_daemon):
    with shared_daemon.client() as c:
        resp = c.get("/v1/models")
        one = c.get("/v1/models/fake")
    assert resp.status_code == 200
    assert {m["id"] for m in resp.json()["data"]} == {"fake", "slow", "embedder"}
    assert resp.json()["object"] == "list"
    assert one.status_code == 200 and one.json()["id"] == "fake"


def test_the_anthropic_sdk_lists_and_retrieves_models_in_anthropics_shape(shared_daemon):
    claude = anthropic.Anthropic(base_url=shared_daemon.url, api_key="x", max_retries=0)
    listed = list(claude.models.list(limit=1))  # one model a page: the SDK follows after_id
    assert [m.id for m in listed] == ["fake", "slow", "embedder"]
    assert {(m.type, m.display_name == m.id) for m in listed} == {("model", True)}
    assert all(m.created_at.tzinfo is not None for m in listed)  # RFC 3339, parsed as such
    page = claude.models.list()
    assert (page.has_more, page.first_id, page.last_id) == (False, "fake", "embedder")
    assert claude.models.list(limit=2, before_id="embedder").data[0].id == "fake"
    one = claude.models.retrieve("slow")
    assert (one.id, one.type) == ("slow", "model")
    with pytest.raises(anthropic.NotFoundError) as missing:
        claude.models.retrieve("nope")
    assert missing.value.body == {"type": "error", "error": {"type": "not_found_error", "message": ANY}}
    with pytest.raises(anthropic.BadRequestError) as bad:
        claude.models.list(after_id="nope")
    assert bad.value.body["error"]["type"] == "invalid_request_error"
    # The same paths without Anthropic's header: OpenAI's cards and envelope, as before.
    with shared_daemon.client() as c:
        assert c.get("/v1/models").json()["object"] == "list"
        assert_envelope(c.get("/v1/models/nope"), 404, "model_not_found")


def test_embeddings_are_proxied_to_an_engine_that_serves_them(shared_daemon):
    with shared_daemon.client() as c:
        resp = c.post("/v1/embeddings", json={"model": "embedder", "input": ["a", "b"]})
    assert resp.status_code == 200
    assert len(resp.json()["data"]) == 2


def test_embeddings_on_a_model_without_them_is_a_clear_400(shared_daemon):
    with shared_daemon.client() as c:
        resp = c.post("/v1/embeddings", json={"model": "fake", "input": "a"})
    err = assert_envelope(resp, 400, "embeddings_not_supported")
    assert "fake" in err["message"]


# --- errors ----------------------------------------------------------------------------


def test_malformed_json_is_400(shared_daemon):
    with shared_daemon.client() as c:
        resp = c.post("/v1/chat/completions", content=b'{"model": "fake", "messages": [',
                      headers={"content-type": "application/json"})
    assert_envelope(resp, 400, "invalid_request")


def test_wrong_field_type_is_400_naming_the_field(shared_daemon):
    with shared_daemon.client() as c:
        resp = c.post("/v1/chat/completions", json={**CHAT, "max_tokens": "many"})
    err = assert_envelope(resp, 400)
    assert err["param"] == "max_tokens"


def test_missing_messages_is_400_naming_the_field(shared_daemon):
    with shared_daemon.client() as c:
        resp = c.post("/v1/chat/completions", json={"model": "fake"})
    err = assert_envelope(resp, 400)
    assert "messages" in err["message"]


def test_empty_body_is_400(shared_daemon):
    with shared_daemon.client() as c:
        resp = c.post("/v1/chat/completions", content=b"")
    assert_envelope(resp, 400)


def test_unknown_model_is_404_and_lists_nothing_private(shared_daemon):
    with shared_daemon.client() as c:
        resp = c.post("/v1/chat/completions", json={**CHAT, "model": "gpt-4o"})
        card = c.get("/v1/models/gpt-4o")
    err = assert_envelope(resp, 404, "model_not_found")
    assert err["param"] == "model"
    for private in ("fake", "slow", "embedder", "127.0.0.1"):
        assert private not in err["message"]
    assert_envelope(card, 404, "model_not_found")


def test_body_over_the_limit_is_413(shared_daemon):
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 70_000}]}
    with shared_daemon.client() as c:
        resp = c.post("/v1/chat/completions", json=big)
    assert_envelope(resp, 413, "request_too_large")


def test_body_over_the_limit_without_content_length_is_413(shared_daemon):
    def chunks():
        for _ in range(20):
            yield b"x" * 8192

    with shared_daemon.client() as c:
        resp = c.post("/v1/chat/completions", content=chunks(),
                      headers={"content-type": "application/json"})
    assert_envelope(resp, 413, "request_too_large")


def test_unknown_route_and_wrong_method_use_the_envelope(shared_daemon):
    with shared_daemon.client() as c:
        missing = c.get("/v1/nothing-here")
        # (GET /v1/chat/completions is OpenAI's list of stored completions: not served, a 404.)
        wrong = c.get("/v1/embeddings")
    assert_envelope(missing, 404)
    assert_envelope(wrong, 405)


def test_a_wrong_method_says_in_allow_which_methods_the_path_answers(shared_daemon):
    with shared_daemon.client() as c:
        proxied = c.get("/v1/embeddings")
        routed = c.delete("/healthz")
    assert_envelope(proxied, 405, "method_not_allowed")
    assert proxied.headers["allow"] == "POST"
    assert_envelope(routed, 405, "method_not_allowed")
    assert {"GET", "HEAD"} <= {m.strip() for m in routed.headers["allow"].split(",")}


def test_options_allow_names_every_method_the_path_answers_head_included(shared_daemon):
    expected = {
        "/v1/models": {"GET", "HEAD", "OPTIONS"},
        "/healthz": {"GET", "HEAD", "OPTIONS"},
        "/v1/responses/resp_none": {"DELETE", "GET", "HEAD", "OPTIONS"},  # two handlers on one path
        "/v1/responses/resp_none/cancel": {"OPTIONS", "POST"},
    }
    with shared_daemon.client() as c:
        for path, methods in expected.items():
            resp = c.options(path)
            assert resp.status_code == 204, path
            assert {m.strip() for m in resp.headers["allow"].split(",")} == methods, path
            for method in methods - {"OPTIONS", "POST"}:  # each one said is answered, not a 405
                assert c.request(method, path).status_code != 405, (method, path)
            assert c.put(path).status_code == 405


def test_head_answers_what_get_does_without_a_body(shared_daemon):
    with shared_daemon.client() as c:
        for path in ("/healthz", "/readyz", "/v1/models", "/metrics"):
            got, head = c.get(path), c.head(path)
            assert head.status_code == got.status_code == 200, (path, head.status_code)
            assert head.content == b""
            assert head.headers["content-type"] == got.headers["content-type"]
            assert int(head.headers["content-length"]) == len(got.content)
        assert c.head("/v1/embeddings").status_code == 405


def test_metrics_content_type_names_its_charset_once(shared_daemon):
    with shared_daemon.client() as c:
        kind = c.get("/metrics").headers["content-type"]
    assert kind.startswith("text/plain; version=0.0.4") and kind.count("charset") == 1


def test_a_compressed_request_body_is_refused_as_such_not_as_malformed_json(shared_daemon):
    with shared_daemon.client() as c:
        resp = c.post("/v1/chat/completions", content=gzip.compress(json.dumps(CHAT).encode()),
                      headers={"content-type": "application/json", "content-encoding": "gzip"})
        plain = c.post("/v1/chat/completions", json=CHAT, headers={"content-encoding": "identity"})
    err = assert_envelope(resp, 415, "unsupported_content_encoding")
    assert "gzip" in err["message"] and "uncompressed" in err["message"]
    assert resp.headers["x-request-id"]
    assert plain.status_code == 200


@pytest.mark.parametrize("headers", [
    {"origin": "http://evil.example", "content-type": "text/plain"},  # a "simple" cross-site POST
    {"origin": "http://localhost:3000", "content-type": "text/plain"},  # another local web server's page
    {"origin": "http://rebound.example:8000"},  # a DNS-rebinding page posts same-origin, with its own name
    {"sec-fetch-site": "cross-site"},
])
def test_a_web_page_of_another_origin_cannot_use_the_model_api(shared_daemon, headers):
    before = fake_stats(shared_daemon, "fake")["requests"]
    with shared_daemon.client() as c:
        resp = c.post("/v1/chat/completions", content=json.dumps(CHAT), headers=headers)
    assert_envelope(resp, 403, "cross_origin")
    assert fake_stats(shared_daemon, "fake")["requests"] == before  # nothing ran on the engine


def test_the_daemons_own_origin_and_sdk_clients_still_reach_the_model_api(shared_daemon):
    with shared_daemon.client() as c:
        own = c.post("/v1/chat/completions", json=CHAT,
                     headers={"origin": shared_daemon.url, "sec-fetch-site": "same-origin"})
        sdk = c.post("/v1/chat/completions", json=CHAT)
    assert own.status_code == sdk.status_code == 200


def test_every_answer_carries_a_request_id_the_clients_own_if_it_sent_one(shared_daemon):
    with shared_daemon.client() as c:
        answers = [c.get("/v1/models"), c.get("/v1/models/nope"), c.head("/healthz"), c.delete("/healthz"),
                   c.get("/v1/nothing-here")]
        mine = c.get("/v1/models/nope", headers={"x-request-id": "client-id-42"})
    for resp in answers:
        assert len(resp.headers.get_list("x-request-id")) == 1, (resp.request.url, resp.headers)
    assert mine.headers["x-request-id"] == "client-id-42"


def test_the_anthropic_sdk_reads_the_request_id_of_every_anthropic_answer(shared_daemon):
    # Regression: only X-Request-Id was sent; Anthropic's SDK reads request-id, so
    # e.request_id (and a message's _request_id) was None.
    claude = anthropic.Anthropic(base_url=shared_daemon.url, api_key="x", max_retries=0)
    said = [{"role": "user", "content": "hi"}]
    made = claude.messages.with_raw_response.create(model="fake", max_tokens=3, messages=said)
    assert made.headers["request-id"] == made.headers["x-request-id"] and made.parse()._request_id
    with claude.messages.with_streaming_response.create(model="fake", max_tokens=3, messages=said,
                                                        stream=True) as streamed:
        assert streamed.headers["request-id"] == streamed.headers["x-request-id"]
    counted = claude.messages.with_raw_response.count_tokens(model="fake", messages=said)
    listed = claude.models.with_raw_response.list()
    for raw in (counted, listed):
        assert raw.headers["request-id"] == raw.headers["x-request-id"], raw.headers
    for call in (lambda: claude.messages.create(model="nope", max_tokens=3, messages=said),
                 lambda: claude.models.retrieve("nope")):
        with pytest.raises(anthropic.NotFoundError) as info:
            call()
        assert info.value.request_id == info.value.response.headers["x-request-id"]
    with pytest.raises(anthropic.BadRequestError) as info:
        claude.messages.create(model="fake", max_tokens=3, messages=[])
    assert info.value.request_id
    # OpenAI's answers carry only X-Request-Id, as before.
    with shared_daemon.client() as c:
        assert "request-id" not in c.post("/v1/chat/completions", json=CHAT).headers


def test_a_request_id_with_a_byte_beyond_printable_ascii_is_replaced_not_echoed(shared_daemon):
    # Regression: any latin-1 byte (0x9b is CSI to a terminal) was echoed, audited and sent
    # to the engine; a printable ASCII id is still the client's own.
    with shared_daemon.client() as c:
        for sent in (b"zz\x9b31mRED", "caf\xe9".encode("latin-1"), b"x" * 129):
            for resp in (c.post("/v1/chat/completions", json=CHAT, headers={"x-request-id": sent}),
                         c.get("/v1/models", headers={"x-request-id": sent}),
                         c.get("/v1/models/nope", headers={"x-request-id": sent})):
                assert re.fullmatch("[0-9a-f]{32}", resp.headers["x-request-id"]), (sent, resp.headers)
        mine = "job 7/step-2 (retry ~1)"
        kept = c.post("/v1/chat/completions", json=CHAT, headers={"x-request-id": mine})
    assert kept.status_code == 200 and kept.headers["x-request-id"] == mine


def test_a_raw_garbage_request_gets_an_http_error_not_a_hang(shared_daemon):
    with socket.create_connection(("127.0.0.1", shared_daemon.port), timeout=5) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n\xff\xfe\x00\x01\x02")
        reply = s.recv(65536)
    assert reply.startswith(b"HTTP/1.1 400")


# --- health, readiness, metrics ------------------------------------------------------


def test_health_ready_and_metrics(shared_daemon):
    with shared_daemon.client() as c:
        assert c.get("/healthz").status_code == 200
        ready = c.get("/readyz")
        c.post("/v1/chat/completions", json=CHAT)
        metrics = c.get("/metrics")
    assert ready.status_code == 200 and ready.json()["models"]["fake"] is True
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    assert 'appliance_requests_total{endpoint="chat",model="fake",status="200"}' in text
    assert 'appliance_replica_state{model="fake",replica="0",state="READY"} 1.0' in text
    assert "appliance_request_duration_seconds_bucket" in text
    assert 'appliance_model_requests_per_second{model="fake",window="10s"}' in text
    assert 'appliance_model_queued_requests{model="fake"} 0.0' in text
