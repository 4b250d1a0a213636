"""The APIs beyond chat (Responses, Anthropic Messages, count_tokens, tokenize,
infill, rerank, score) through the real daemon and fake engines: capabilities
refused before anything starts, budgets charged from each API's usage shape,
cache oracles stripped, errors in each API's envelope and stream event, routes
that fall back only to a provider declaring the same API, and regulated routes
that never leave the server."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from .conftest import fake_model, wait_until
from .test_keys import keys_cli
from .test_routes import recorder, route  # noqa: F401  (the recording provider)

MSG = {"max_tokens": 3, "messages": [{"role": "user", "content": "hello there"}]}
RESP = {"input": "hello there", "max_output_tokens": 3}
CALLS = {  # path -> body (without the model) for every new endpoint
    "/v1/responses": RESP,
    "/v1/messages": MSG,
    "/v1/messages/count_tokens": {"messages": MSG["messages"]},
    "/tokenize": {"content": "hello there"},
    "/detokenize": {"tokens": [1005, 1005]},
    "/infill": {"input_prefix": "def f(", "input_suffix": "):", "n_predict": 3},
}
RERANK = {"query": "q", "documents": ["a", "b", "c"]}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, recorder):
    from .conftest import DaemonFactory

    tmp = tmp_path_factory.mktemp("dialects")
    key = tmp / "cloud.key"
    key.write_text("sk-test\n")
    key.chmod(0o600)
    providers = "".join(
        f'[[providers]]\nname = "{name}"\nbase_url = "{recorder.url}/v1"\napi_key_file = "{key}"\n'
        f"apis = {apis}\nread_timeout_s = 5\n\n"
        for name, apis in (("cloud", '["chat", "responses", "messages"]'), ("chatonly", '["chat"]')))
    routes = (route("reg", "reg", "broken", True) + route("gen", "gen", "broken", False, ["cloud"])
              + route("regrank", "regrank", "rankdown", True)
              + route("narrow", "narrow", "broken", False, ["chatonly"]))
    models = (fake_model("fake", "--chunks", "3")
              + fake_model("cachey", "--chunks", "3", "--cache-report")
              + fake_model("reranker", extra='tasks = ["rerank"]')
              + fake_model("rankdown", "--fail-status", "500", "--fail-from", "1", extra='tasks = ["rerank"]')
              + fake_model("mid", "--chunks", "8", "--chunk-delay", "0.05", "--die-mid-stream", "3")
              + fake_model("broken", "--fail-status", "500")
              + fake_model("stateful", extra="[models.autoscaling]\nmin_replicas = 2\nmax_replicas = 2")
              + fake_model("cold", extra="[models.autoscaling]\nmin_replicas = 0\nmax_replicas = 1")
              + fake_model("sleepy", "--slow-start", "1", extra="[models.autoscaling]\nmin_replicas = 0\nmax_replicas = 1"))
    factory = DaemonFactory(tmp)
    d = factory.start(models, extra="[autoscaling]\nkeepalive_s = 0\n\n" + providers + routes,
                      supervisor="max_crashes = 50\ncrash_window_s = 60")
    wait_until(lambda: all(m["ready"] for m in d.status()["models"] if m["name"] not in ("cold", "sleepy")), 30,
               what="the models")
    yield d
    factory.cleanup()


def _post(d, path: str, body: dict, **headers) -> httpx.Response:
    return httpx.post(d.url + path, json=body, headers=headers, timeout=30)


def _engine_requests(d, model: str) -> int:
    [replica] = d.replicas(model)
    from .conftest import engine_client

    with engine_client(replica) as c:
        return c.get("/fake/stats").json()["requests"]


def _audit(d) -> list[tuple]:
    db = Path(d.config.read_text().split('state_dir = "', 1)[1].split('"', 1)[0]) / "appliance.db"
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT model, endpoint, status, prompt_tokens, completion_tokens FROM audit").fetchall()


@pytest.mark.parametrize("path", list(CALLS))
def test_every_new_endpoint_is_served_audited_and_counted_by_endpoint(daemon, path):
    resp = _post(daemon, path, {**CALLS[path], "model": "fake"})
    assert resp.status_code == 200, resp.text
    name = path.strip("/").removeprefix("v1/").replace("messages/", "")
    wait_until(lambda: ("fake", name, 200) in {r[:3] for r in _audit(daemon)}, 10, what="the audit row")
    assert f'endpoint="{name}"' in httpx.get(daemon.url + "/metrics").text


@pytest.mark.parametrize("path", ["/v1/rerank", "/rerank", "/v2/rerank", "/v1/score"])
def test_rerank_and_score_are_served_by_a_rerank_model_only(daemon, path):
    body = RERANK if "rerank" in path else {"text_1": "a", "text_2": ["b", "c"]}
    ok = _post(daemon, path, {**body, "model": "reranker"})
    assert ok.status_code == 200, ok.text
    refused = _post(daemon, path, {**body, "model": "fake"})
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "endpoint_not_supported"
    assert path in refused.json()["error"]["message"] and "'fake'" in refused.json()["error"]["message"]


def test_an_endpoint_the_model_does_not_serve_is_refused_before_anything_starts(daemon):
    before = _engine_requests(daemon, "reranker")
    for path in ("/v1/responses", "/v1/messages", "/infill"):
        resp = _post(daemon, path, {**CALLS[path], "model": "reranker"})
        assert resp.status_code == 400, resp.text
    assert _engine_requests(daemon, "reranker") == before
    # A model at zero is not started for a request it cannot serve.
    assert _post(daemon, "/v1/rerank", {**RERANK, "model": "cold"}).status_code == 400
    assert daemon.replicas("cold") == []


def test_a_messages_stream_for_a_model_at_zero_is_held_while_it_starts_then_answered(daemon):
    assert daemon.replicas("sleepy") == []
    claude = anthropic.Anthropic(base_url=daemon.url, api_key="x", max_retries=0, timeout=60)
    with claude.messages.stream(model="sleepy", max_tokens=3, messages=MSG["messages"]) as s:
        assert "".join(s.text_stream) == "tok0 tok1 tok2 "
    assert [r["state"] for r in daemon.replicas("sleepy")] == ["READY"]


def test_a_stored_response_is_found_again_on_the_replica_that_stored_it_for_its_key_only(daemon):
    owner = keys_cli(daemon, "create", "--name", "owner")
    other = keys_cli(daemon, "create", "--name", "other")
    oai = openai.OpenAI(base_url=daemon.url + "/v1", api_key=owner, max_retries=0)
    first = oai.responses.create(model="stateful", input="remember this", max_output_tokens=2, store=True)
    # Two replicas, each with its own store: every turn must reach the one that has it.
    previous = first.id
    for turn in range(6):
        stream = turn % 2 == 1
        if stream:
            events = list(oai.responses.create(model="stateful", input=f"turn {turn}", max_output_tokens=2,
                                               previous_response_id=previous, stream=True))
            reply = events[-1].response
        else:
            reply = oai.responses.create(model="stateful", input=f"turn {turn}", max_output_tokens=2,
                                         previous_response_id=previous)
        assert reply.previous_response_id == previous
        previous = reply.id
    assert oai.responses.retrieve(first.id).id == first.id
    # Another key's response is as unknown as one that never was.
    spy = openai.OpenAI(base_url=daemon.url + "/v1", api_key=other, max_retries=0)
    for call in (lambda: spy.responses.retrieve(first.id),
                 lambda: spy.responses.create(model="stateful", input="x", previous_response_id=first.id)):
        with pytest.raises(openai.NotFoundError) as err:
            call()
        assert err.value.body["code"] == "response_not_found"
    with pytest.raises(openai.NotFoundError):
        oai.responses.retrieve("resp_never")


def test_a_web_page_cannot_read_cancel_or_delete_a_stored_response_on_a_keyless_box(daemon):
    """GET /v1/responses/{id} (and DELETE, cancel) skipped the Host rule of the model API's
    other GETs: keyless, a page that rebound its name to 127.0.0.1 read a stored Response
    (a same-origin GET sends no Origin), and another origin's page could POST its cancel."""
    oai = openai.OpenAI(base_url=daemon.url + "/v1", api_key="x", max_retries=0)
    made = oai.responses.create(model="stateful", input="a secret", max_output_tokens=2, store=True)
    path = daemon.url + "/v1/responses/" + made.id
    for host in (f"evil.example:{daemon.port}", "evil.example"):
        for call in (httpx.get, httpx.delete, lambda url, **kw: httpx.post(url + "/cancel", **kw)):
            resp = call(path, headers={"Host": host}, timeout=10)
            assert resp.status_code == 403 and resp.json()["error"]["code"] == "untrusted_host", resp.text
            assert "output" not in resp.json()
    page = {"Origin": "http://evil.example"}
    cancel = httpx.post(path + "/cancel", headers=page, timeout=10)
    assert cancel.status_code == 403 and cancel.json()["error"]["code"] == "cross_origin", cancel.text
    assert oai.responses.retrieve(made.id).id == made.id  # its own Host: served, and nothing was deleted


def test_a_stored_response_whose_replica_restarted_is_gone_not_guessed(daemon):
    oai = openai.OpenAI(base_url=daemon.url + "/v1", api_key="x", max_retries=0)
    made = oai.responses.create(model="stateful", input="hi", max_output_tokens=2)
    pids = {r["pid"] for r in daemon.replicas("stateful")}
    with daemon.client() as c:  # restart every replica: their stores are empty now
        for r in daemon.replicas("stateful"):
            assert c.post(f"/admin/models/stateful/replicas/{r['index']}/restart", json={}).status_code == 200
    wait_until(lambda: all(r["state"] == "READY" and r["pid"] not in pids for r in daemon.replicas("stateful")),
               30, what="the restarted replicas")
    resp = httpx.delete(daemon.url + "/v1/responses/" + made.id)
    assert resp.status_code == 404 and "restarted" in resp.json()["error"]["message"], resp.text
    for gone in (httpx.get(daemon.url + "/v1/responses/" + made.id),
                 httpx.post(daemon.url + f"/v1/responses/{made.id}/cancel")):
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "response_not_found", gone.text


def _usage(d, name: str) -> tuple[int, int]:
    found = {u["key"]: u for u in d.status()["usage"]}.get(name)
    return (found["prompt_tokens"], found["completion_tokens"]) if found else (0, 0)


@pytest.mark.parametrize("stream", [False, True])
def test_budgets_are_charged_from_each_apis_usage_shape(daemon, stream):
    name = f"meter-{int(stream)}"
    key = keys_cli(daemon, "create", "--name", name, "--budget-tokens", "100000")
    oai = openai.OpenAI(base_url=daemon.url + "/v1", api_key=key, max_retries=0)
    claude = anthropic.Anthropic(base_url=daemon.url, api_key=key, max_retries=0)
    if stream:
        events = list(oai.responses.create(model="cachey", input="one two three", max_output_tokens=2,
                                           stream=True))
        assert events[-1].type == "response.incomplete"  # its 2 tokens are all max_output_tokens let it make
        with claude.messages.stream(model="cachey", max_tokens=3,
                                    messages=[{"role": "user", "content": "one two three four"}]) as s:
            assert "".join(s.text_stream) == "tok0 tok1 tok2 "
    else:
        oai.responses.create(model="cachey", input="one two three", max_output_tokens=2)
        claude.messages.create(model="cachey", max_tokens=3,
                               messages=[{"role": "user", "content": "one two three four"}])
    # Responses: input 3 words, output 2; Messages: input 4 words (cached or not), output 3.
    assert _usage(daemon, name) == (3 + 4, 2 + 3)


@pytest.mark.parametrize("stream", [False, True])
def test_budgets_are_charged_from_llamacpps_and_reranks_usage_shapes(daemon, stream):
    name = f"shapes-{int(stream)}"
    key = keys_cli(daemon, "create", "--name", name, "--budget-tokens", "100000")
    headers = {"Authorization": f"Bearer {key}"}
    infill = httpx.post(daemon.url + "/infill", json={**CALLS["/infill"], "model": "fake", "stream": stream},
                        headers=headers, timeout=30)
    assert infill.status_code == 200, infill.text
    # llama.cpp's tokens_evaluated ("def f(" and "):" are 3 words) and tokens_predicted (3).
    assert _usage(daemon, name) == (3, 3)
    if not stream:  # rerank's usage.prompt_tokens: 7 per document, nothing generated
        assert httpx.post(daemon.url + "/v1/rerank", json={**RERANK, "model": "reranker"}, headers=headers,
                          timeout=30).status_code == 200
        assert _usage(daemon, name) == (3 + 21, 3)


def test_a_tokenizers_work_is_audited_and_charged_no_tokens(daemon):
    key = keys_cli(daemon, "create", "--name", "counter", "--budget-tokens", "100")
    headers = {"Authorization": f"Bearer {key}"}
    for path in ("/tokenize", "/detokenize", "/v1/messages/count_tokens"):
        resp = httpx.post(daemon.url + path, json={**CALLS[path], "model": "fake", "pad": "x" * 500},
                          headers=headers, timeout=30)
        assert resp.status_code == 200, resp.text  # a 500-byte body within a 100-token budget
    assert _usage(daemon, "counter") == (0, 0)


def test_no_cache_oracle_in_any_apis_answer(daemon):
    first = {"model": "cachey", "max_tokens": 2, "messages": [{"role": "user", "content": "secret prefix here"}]}
    _post(daemon, "/v1/messages", first)
    again = _post(daemon, "/v1/messages", first).json()
    # The fake cached all 3 words: input_tokens alone would be 0; the whole prompt is told.
    assert again["usage"] == {"input_tokens": 3, "output_tokens": 2}
    streamed = httpx.post(daemon.url + "/v1/messages", json={**first, "stream": True}, timeout=30).text
    assert "cache_read" not in streamed and '"input_tokens":3' in streamed
    resp = {"model": "cachey", "input": "secret prefix here", "max_output_tokens": 2}
    _post(daemon, "/v1/responses", resp)
    assert "cached_tokens" not in _post(daemon, "/v1/responses", resp).text
    assert "cached_tokens" not in httpx.post(daemon.url + "/v1/responses", json={**resp, "stream": True},
                                             timeout=30).text


def test_errors_on_the_messages_path_come_in_anthropics_envelope(daemon):
    resp = _post(daemon, "/v1/messages", {"model": "fake", "messages": []})
    assert resp.status_code == 400
    assert resp.json()["type"] == "error" and resp.json()["error"]["type"] == "invalid_request_error"
    missing = _post(daemon, "/v1/messages", {**MSG, "model": "nope"}).json()
    assert missing["error"]["type"] == "not_found_error" and "nope" in missing["error"]["message"]
    # The Responses path keeps OpenAI's envelope.
    assert _post(daemon, "/v1/responses", {"model": "nope", "input": "x"}).json()["error"]["code"] == \
        "model_not_found"


def test_a_broken_stream_ends_with_each_apis_error_event(daemon):
    text = httpx.post(daemon.url + "/v1/messages", json={**MSG, "max_tokens": 8, "model": "mid", "stream": True},
                      timeout=30).text
    assert text.rstrip().endswith("}") and "event: error\ndata: " in text and '"type":"api_error"' in text
    claude = anthropic.Anthropic(base_url=daemon.url, api_key="x", max_retries=0)
    with pytest.raises(anthropic.APIStatusError):
        with claude.messages.stream(model="mid", max_tokens=8, messages=MSG["messages"]) as s:
            list(s.text_stream)
    text = httpx.post(daemon.url + "/v1/responses", json={**RESP, "max_output_tokens": 8, "model": "mid",
                                                          "stream": True}, timeout=30).text
    assert "event: error\ndata: " in text and '"type":"error"' in text and "engine_error" in text
    oai = openai.OpenAI(base_url=daemon.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.APIError):
        list(oai.responses.create(model="mid", input="x", max_output_tokens=8, stream=True))


@pytest.mark.parametrize("path", list(CALLS))
def test_a_regulated_route_never_sends_a_new_endpoint_off_the_server(daemon, recorder, path):
    before = recorder.requests()
    resp = _post(daemon, path, {**CALLS[path], "model": "reg"})
    body = {**CALLS[path], "model": "reg", "stream": True}
    if path in ("/v1/responses", "/v1/messages", "/infill"):
        httpx.post(daemon.url + path, json=body, timeout=30)
    assert recorder.requests() == before
    assert resp.status_code in (200, 502), resp.text  # served here (tokenize) or the local failure


@pytest.mark.parametrize("path", ["/v1/rerank", "/rerank", "/v2/rerank", "/v1/score"])
def test_a_regulated_route_never_sends_a_rerank_or_score_off_the_server(daemon, recorder, path):
    before = recorder.requests()
    body = RERANK if "rerank" in path else {"text_1": "a", "text_2": ["b", "c"]}
    resp = _post(daemon, path, {**body, "model": "regrank"})
    assert resp.status_code == 502, resp.text  # the local model's failure, nowhere else
    assert recorder.requests() == before


def test_a_route_falls_back_only_to_a_provider_that_declares_the_api(daemon, recorder):
    before = recorder.requests()
    assert _post(daemon, "/v1/messages", {**MSG, "model": "gen"}).status_code == 200  # cloud speaks it
    assert recorder.last_body()["model"] == "gen" and recorder.requests() == before + 1
    assert _post(daemon, "/v1/responses", {**RESP, "model": "gen", "stream": True}).status_code == 200
    assert recorder.requests() == before + 2
    # chatonly serves chat only: the Messages request stays here and fails here.
    resp = _post(daemon, "/v1/messages", {**MSG, "model": "narrow"})
    assert resp.status_code == 502 and resp.json()["type"] == "error"
    assert recorder.requests() == before + 2
    assert 'target="skipped:chatonly"' in httpx.get(daemon.url + "/metrics").text


def test_a_stored_response_is_deleted_and_cancelled_on_its_replica_for_its_key_only_and_audited(daemon):
    owner = keys_cli(daemon, "create", "--name", "keeper")
    other = keys_cli(daemon, "create", "--name", "prowler")
    oai = openai.OpenAI(base_url=daemon.url + "/v1", api_key=owner, max_retries=0)
    spy = openai.OpenAI(base_url=daemon.url + "/v1", api_key=other, max_retries=0)
    made = [oai.responses.create(model="stateful", input=f"keep {i}", max_output_tokens=2).id for i in range(4)]
    for rid in made:  # another key's response: unknown to it, whatever it asks
        for call in (spy.responses.retrieve, spy.responses.delete, spy.responses.cancel):
            with pytest.raises(openai.NotFoundError) as err:
                call(rid)
            assert err.value.body["code"] == "response_not_found"
    # Each on the replica that holds it (two replicas, each with its own store).
    assert all(oai.responses.cancel(rid).status == "cancelled" for rid in made)
    for rid in made:
        oai.responses.delete(rid)
        with pytest.raises(openai.NotFoundError):
            oai.responses.retrieve(rid)
    # Each call has its row: those that reached the replica name its model; the
    # prowler's tries and the retrievals after the delete were refused here (404).
    wanted = {("stateful", "responses_cancel", 200), ("stateful", "responses_delete", 200),
              ("", "responses_get", 404), ("", "responses_delete", 404), ("", "responses_cancel", 404)}
    wait_until(lambda: wanted <= {r[:3] for r in _audit(daemon)}, 10, what="the audit rows")
