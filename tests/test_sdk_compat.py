"""What the official SDKs (openai, anthropic) see of the daemon, where an app that
moves from a commercial API changes only its base URL and model name: the real
SDKs against the real daemon on fake engines (tests/test_e2e_dialects.py has the
same against llama-server)."""

from __future__ import annotations

import json

import anthropic
import httpx
import openai
import pytest

from .conftest import fake_model, wait_until
from .test_api_dialects import _audit
from .test_keys import keys_cli


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    from .conftest import DaemonFactory

    factory = DaemonFactory(tmp_path_factory.mktemp("sdk"))
    # Each fake answer is 3 tokens long, fewer when max_output_tokens asks fewer.
    d = factory.start(fake_model("fake", "--chunks", "3") + fake_model("stateful", "--chunks", "3")
                      + fake_model("capped", "--chunks", "3", extra="default_max_tokens = 2"))
    yield d
    factory.cleanup()


@pytest.fixture
def oai(daemon):
    return openai.OpenAI(base_url=daemon.url + "/v1", api_key="unused", max_retries=0, timeout=30)


# --- Responses: an answer cut by max_output_tokens is incomplete ---------------------


def test_a_response_cut_by_max_output_tokens_is_incomplete_saying_why(oai):
    cut = oai.responses.create(model="fake", input="count", max_output_tokens=2)
    assert cut.status == "incomplete", cut
    assert cut.incomplete_details is not None and cut.incomplete_details.reason == "max_output_tokens"
    assert cut.output_text == "tok0 tok1" and cut.output[0].status == "incomplete"
    whole = oai.responses.create(model="fake", input="count", max_output_tokens=5)
    assert whole.status == "completed" and whole.incomplete_details is None
    assert whole.output[0].status == "completed"


def test_a_streamed_response_cut_by_max_output_tokens_ends_with_response_incomplete(oai):
    events = list(oai.responses.create(model="fake", input="count", max_output_tokens=2, stream=True))
    kinds = [e.type for e in events]
    assert kinds[-1] == "response.incomplete" and "response.completed" not in kinds, kinds
    final = events[-1].response
    assert final.status == "incomplete" and final.incomplete_details.reason == "max_output_tokens"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    # The SDK's stream helper sees the same events (its final response is for completed
    # answers only, as against OpenAI's own API).
    with oai.responses.stream(model="fake", input="count", max_output_tokens=2) as stream:
        helper = [e.type for e in stream]
    assert helper[-1] == "response.incomplete" and "response.output_text.delta" in helper
    whole = list(oai.responses.create(model="fake", input="count", max_output_tokens=5, stream=True))
    assert whole[-1].type == "response.completed" and whole[-1].response.incomplete_details is None


def test_a_streamed_cut_messages_output_item_done_says_incomplete_as_its_final_response_does(oai):
    events = list(oai.responses.create(model="fake", input="count", max_output_tokens=2, stream=True))
    [done] = [e for e in events if e.type == "response.output_item.done"]
    final = events[-1].response
    assert (done.item.status, final.output[0].status, final.status) == ("incomplete", "incomplete", "incomplete")
    assert done.item.id == final.output[0].id and done.sequence_number == events[-1].sequence_number - 1
    whole = list(oai.responses.create(model="fake", input="count", max_output_tokens=5, stream=True))
    [done] = [e for e in whole if e.type == "response.output_item.done"]
    assert (done.item.status, whole[-1].response.output[0].status) == ("completed", "completed")


def test_a_response_cut_at_the_cap_the_appliance_set_is_incomplete_too(daemon):
    # A budgeted key's request without max_output_tokens is held to the model's default_max_tokens
    # (the engine is told it): cut there, the answer is as incomplete as at its own cap.
    key = keys_cli(daemon, "create", "--name", "capped", "--budget-tokens", "100000")
    oai = openai.OpenAI(base_url=daemon.url + "/v1", api_key=key, max_retries=0, timeout=30)
    cut = oai.responses.create(model="capped", input="count")
    assert (cut.status, cut.incomplete_details.reason, cut.output_text) == ("incomplete", "max_output_tokens",
                                                                            "tok0 tok1"), cut
    events = list(oai.responses.create(model="capped", input="count", stream=True))
    assert events[-1].type == "response.incomplete"


def test_a_stored_response_cut_at_its_cap_is_retrieved_incomplete_as_it_was_created(daemon, oai):
    # The engine keeps the status it gave ("completed"): retrieve said so of a response its
    # create had called incomplete.
    cut = oai.responses.create(model="stateful", input="count", max_output_tokens=2, store=True)
    streamed = list(oai.responses.create(model="stateful", input="count", max_output_tokens=2, store=True,
                                         stream=True))[-1].response
    for made in (cut, streamed):
        got = oai.responses.retrieve(made.id)
        assert (got.status, got.incomplete_details.reason, got.output[-1].status) == (
            "incomplete", "max_output_tokens", "incomplete"), got
    whole = oai.responses.create(model="stateful", input="count", max_output_tokens=5, store=True)
    got = oai.responses.retrieve(whole.id)
    assert (got.status, got.incomplete_details, got.output[-1].status) == ("completed", None, "completed")
    # Cut at the cap the appliance set (a budgeted key's default_max_tokens), not the client's.
    key = keys_cli(daemon, "create", "--name", "capped-store", "--budget-tokens", "100000")
    budgeted = openai.OpenAI(base_url=daemon.url + "/v1", api_key=key, max_retries=0, timeout=30)
    made = budgeted.responses.create(model="capped", input="count", store=True)
    assert made.status == "incomplete"
    assert budgeted.responses.retrieve(made.id).status == "incomplete"


def test_retrieving_a_stored_response_as_a_stream_is_a_400_naming_stream_not_an_empty_stream(oai):
    # The daemon answers a stored response whole: the SDK read that JSON as a stream of
    # no events, and the app saw an empty replay without an error.
    made = oai.responses.create(model="stateful", input="hi", max_output_tokens=2, store=True)
    for asked in ({}, {"starting_after": 2}):
        with pytest.raises(openai.BadRequestError) as err:
            list(oai.responses.retrieve(made.id, stream=True, **asked))
        assert (err.value.body["param"], err.value.body["code"]) == ("stream", "stream_not_supported")
    assert oai.responses.retrieve(made.id).id == made.id
    assert oai.responses.with_raw_response.retrieve(made.id, extra_query={"stream": "false"}).status_code == 200


# --- Responses: GET /v1/responses/{id}/input_items ------------------------------------


def test_input_items_of_a_stored_response_list_its_input_for_its_key_only(daemon):
    owner = keys_cli(daemon, "create", "--name", "lister")
    other = keys_cli(daemon, "create", "--name", "peeker")
    oai = openai.OpenAI(base_url=daemon.url + "/v1", api_key=owner, max_retries=0, timeout=30)
    spy = openai.OpenAI(base_url=daemon.url + "/v1", api_key=other, max_retries=0, timeout=30)
    given = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "first"},
             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "second"}]}]
    made = oai.responses.create(model="stateful", input=given, max_output_tokens=2, store=True)
    page = oai.responses.input_items.list(made.id)
    texts = [item.content[0].text for item in page.data]
    assert texts == ["second", "first", "be brief"]  # newest first, as the API orders by default
    assert all(item.type == "message" and item.id for item in page.data)
    assert [i.role for i in page.data] == ["user", "user", "system"]
    assert page.has_more is False and page.first_id == page.data[0].id and page.last_id == page.data[-1].id
    # Pages: limit, after, order; the SDK's auto-pagination walks them all.
    first = oai.responses.input_items.list(made.id, limit=1, order="asc")
    assert [first.data[0].content[0].text, first.has_more] == ["be brief", True]
    rest = oai.responses.input_items.list(made.id, limit=1, order="asc", after=first.last_id)
    assert rest.data[0].content[0].text == "first"
    walked = [i.content[0].text for i in oai.responses.input_items.list(made.id, limit=1, order="asc")]
    assert walked == ["be brief", "first", "second"]
    included = oai.responses.input_items.list(made.id, include=["message.input_image.image_url"])
    assert [i.id for i in included.data] == [i.id for i in page.data]
    with pytest.raises(openai.BadRequestError) as err:
        oai.responses.input_items.list(made.id, include=["no.such.thing"])
    assert err.value.body["param"] == "include"
    # Same ids on every call (a cursor must stay valid).
    assert oai.responses.input_items.list(made.id).data[0].id == page.data[0].id
    # A string input is one user message.
    plain = oai.responses.create(model="stateful", input="just this", max_output_tokens=2, store=True)
    [item] = oai.responses.input_items.list(plain.id).data
    assert (item.role, item.content[0].type, item.content[0].text) == ("user", "input_text", "just this")
    # The access rule of GET /v1/responses/{id}: another key's response is unknown to it.
    for call in (lambda: spy.responses.input_items.list(made.id), lambda: spy.responses.retrieve(made.id)):
        with pytest.raises(openai.NotFoundError) as err:
            call()
        assert err.value.body["code"] == "response_not_found"
    with pytest.raises(openai.NotFoundError):
        oai.responses.input_items.list("resp_never")
    oai.responses.delete(made.id)
    with pytest.raises(openai.NotFoundError):
        oai.responses.input_items.list(made.id)
    # Audited like GET /v1/responses/{id}: the owner's lists (200), the others' (404).
    wanted = {("stateful", "responses_input_items", 200), ("", "responses_input_items", 404)}
    wait_until(lambda: wanted <= {r[:3] for r in _audit(daemon)}, 10, what="the audit rows")


@pytest.mark.parametrize("order", ["asc", "desc"])
def test_input_items_paged_one_by_one_are_the_whole_lists_items_in_its_order(order):
    # A page makes only its own items (response_items.page): walked with after, the pages
    # must still be the whole list, ids included (own ids kept, made ones the same each call).
    from appliance.errors import BadRequest
    from appliance.gateway import response_items

    given = [{"role": "user", "content": "a"}, 7, {"type": "function_call_output", "call_id": "c", "output": "x"},
             {"type": "message", "id": "msg_own", "role": "assistant", "content": "b"}, {"role": "user", "content": []}]
    kept = response_items.request_input(json.dumps({"model": "m", "input": given, "max_output_tokens": 9}).encode())
    assert response_items.kept_cap(kept) == 9
    whole = response_items.items(kept, "resp_1")
    assert [i["id"] for i in whole][2] == "msg_own" and len(whole) == 4
    walked, after = [], None
    while True:
        got = response_items.page(kept, "resp_1", response_items.Query(after, 1, order, ()))
        walked += got["data"]
        if not got["has_more"]:
            break
        after = got["last_id"]
    assert walked == (whole if order == "asc" else whole[::-1])
    assert response_items.items(kept, "resp_1") == whole and response_items.items(kept, "resp_2") != whole
    # A cursor that names no item of this list: another response's id, or a made id for a
    # place that is no item (7) or that has its own id (msg_own's).
    nowhere = [response_items.items(kept, "resp_2")[0]["id"], whole[0]["id"][:-1] + "1",
               whole[0]["id"][:-1] + "3"]
    for after in nowhere:
        with pytest.raises(BadRequest):
            response_items.page(kept, "resp_1", response_items.Query(after, 1, order, ()))


@pytest.mark.parametrize("query, param", [
    ({"limit": "0"}, "limit"), ({"limit": "101"}, "limit"), ({"limit": "x"}, "limit"),
    ({"order": "sideways"}, "order"), ({"include": ["no.such"]}, "include"),
    ({"after": "msg_never"}, "after"),
])
def test_input_items_query_parameters_are_checked_in_the_envelope(daemon, oai, query, param):
    made = oai.responses.create(model="stateful", input="hi", max_output_tokens=2, store=True)
    resp = httpx.get(f"{daemon.url}/v1/responses/{made.id}/input_items", params=query, timeout=10)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    ok = httpx.get(f"{daemon.url}/v1/responses/{made.id}/input_items",
                   params={"include[]": "message.input_image.image_url", "limit": "100"}, timeout=10)
    assert ok.status_code == 200 and ok.json()["object"] == "list", ok.text


# --- errors quote at most a bounded piece of what the client sent ----------------------


def test_an_unknown_models_404_quotes_a_bounded_piece_of_a_huge_id(daemon, oai):
    huge = "m" * 10_000
    with pytest.raises(openai.NotFoundError) as err:
        oai.chat.completions.create(model=huge, messages=[{"role": "user", "content": "hi"}])
    message = err.value.body["message"]
    assert len(message) < 300 and "cut" in message and "10000" in message, message
    assert err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError) as err:
        oai.models.retrieve(huge)
    assert len(err.value.body["message"]) < 300
    claude = anthropic.Anthropic(base_url=daemon.url, api_key="unused", max_retries=0, timeout=30)
    with pytest.raises(anthropic.NotFoundError) as info:
        claude.messages.create(model=huge, max_tokens=2, messages=[{"role": "user", "content": "hi"}])
    assert len(info.value.body["error"]["message"]) < 300 and "cut" in info.value.body["error"]["message"]
    # A short id is named whole, as before.
    with pytest.raises(openai.NotFoundError) as err:
        oai.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert err.value.body["message"] == "The model 'gpt-4o' does not exist"


def test_headers_an_error_names_are_quoted_bounded_too(daemon):
    long = "x" * 3000
    responses = [
        httpx.post(f"{daemon.url}/v1/chat/completions", content=b"{}", timeout=10,
                   headers={"Content-Type": "application/json", "Content-Encoding": long}),
        httpx.get(f"{daemon.url}/v1/models", headers={"Host": long + ".example"}, timeout=10),
        httpx.post(f"{daemon.url}/v1/chat/completions", json={}, timeout=10, headers={"Origin": "http://" + long}),
    ]
    for resp in responses:
        message = resp.json()["error"]["message"]
        assert resp.status_code in (403, 415) and len(message) < 400 and "cut" in message, (resp.status_code, message)


# --- OpenAI endpoints the appliance does not serve ------------------------------------


def test_openai_endpoints_not_served_at_a_served_path_are_the_sdks_not_found_not_a_405(daemon, oai):
    # OpenAI serves these at paths the appliance answers with other methods: the SDK's
    # calls got a 405 (APIStatusError, as no other unsupported endpoint does) where
    # files, batches or images get a 404 the SDK raises as NotFoundError.
    calls = {"chat.completions.list": lambda: oai.chat.completions.list(),
             "responses.input_tokens.count": lambda: oai.responses.input_tokens.count(model="fake", input="hi"),
             "responses.compact": lambda: oai.responses.compact(model="fake", input="hi"),
             "files.list": lambda: oai.files.list()}
    for name, call in calls.items():
        with pytest.raises(openai.NotFoundError) as err:
            call()
        assert (err.value.body["code"], err.value.body["type"]) == ("not_found", "invalid_request_error"), name
        assert "allow" not in err.value.response.headers, name
    # What the appliance serves at those paths is as before, and a method no API has
    # there is still a 405 that says the methods it has.
    assert oai.chat.completions.create(model="fake", messages=[{"role": "user", "content": "hi"}]).choices
    made = oai.responses.create(model="stateful", input="hi", max_output_tokens=2, store=True)
    assert oai.responses.retrieve(made.id).id == made.id
    put = httpx.put(f"{daemon.url}/v1/chat/completions", json={}, timeout=10)
    assert (put.status_code, put.headers["allow"]) == (405, "POST"), put.text
    post = httpx.post(f"{daemon.url}/v1/responses/{made.id}", json={}, timeout=10)
    assert post.status_code == 405 and post.json()["error"]["code"] == "method_not_allowed", post.text


def test_an_endpoint_anthropics_sdk_calls_that_is_not_served_is_a_404_in_anthropics_envelope(daemon):
    # Its files and skills (beta) live outside /v1/messages: the 404 came in OpenAI's
    # envelope, so e.body["error"]["type"] was "invalid_request_error", not "not_found_error".
    claude = anthropic.Anthropic(base_url=daemon.url, api_key="unused", max_retries=0, timeout=30)
    for call in (lambda: claude.beta.files.list(), lambda: claude.messages.batches.list()):
        with pytest.raises(anthropic.NotFoundError) as err:
            call()
        assert err.value.body["type"] == "error" and err.value.body["error"]["type"] == "not_found_error", err.value.body
        assert err.value.request_id
    # Without the SDK's anthropic-version header, the path's API (OpenAI's) answers.
    plain = httpx.get(f"{daemon.url}/v1/files", timeout=10)
    assert plain.status_code == 404 and plain.json()["error"]["code"] == "not_found", plain.text
