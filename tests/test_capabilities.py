"""What a request asks that the model's engine cannot honour is a 400 naming the field,
in every API, before anything is queued or started (appliance/gateway/capabilities.py)."""

from __future__ import annotations

import json

import anthropic
import httpx
import openai
import pytest

from appliance.config import parse_config
from appliance.errors import BadRequest
from appliance.gateway.api_messages import MessagesRequest
from appliance.gateway.api_responses import ResponsesRequest
from appliance.gateway.capabilities import ENDPOINTS, check_fields
from appliance.gateway.protocol import EmbeddingRequest

from .conftest import fake_model

SAID = [{"role": "user", "content": "weather?"}]
FORCED_MESSAGES = ({"type": "any"}, {"type": "tool", "name": "get_weather"})
FORCED_RESPONSES = ("required", {"type": "function", "name": "get_weather"},
                    {"type": "allowed_tools", "mode": "required", "tools": [{"type": "function", "name": "f"}]})


def _bundled():
    cfg = parse_config("")  # the bundled SmolLM2 on llama.cpp: its template never mentions tools
    return cfg, cfg.models[0]


def test_a_forced_tool_on_messages_or_responses_is_refused_like_chats_and_a_free_choice_is_not():
    # Regression: only chat's tool_choice was checked; Messages' {"type": "any"|"tool"} and
    # Responses' "required" reached a template without tools, which answered in words.
    cfg, model = _bundled()
    messages, responses = ENDPOINTS["/v1/messages"], ENDPOINTS["/v1/responses"]
    for endpoint, request in [
        *((messages, MessagesRequest(model="m", messages=SAID, max_tokens=3, tool_choice=c)) for c in FORCED_MESSAGES),
        *((responses, ResponsesRequest(model="m", input="hi", tool_choice=c)) for c in FORCED_RESPONSES),
    ]:
        with pytest.raises(BadRequest, match="cannot call tools") as info:
            check_fields(cfg, endpoint, model, request)
        assert (info.value.code, info.value.param) == ("tools_not_supported", "tool_choice")
    free = [(messages, MessagesRequest(model="m", messages=SAID, max_tokens=3, tool_choice=c))
            for c in (None, {"type": "auto"}, {"type": "none"})]
    free += [(responses, ResponsesRequest(model="m", input="hi", tool_choice=c))
             for c in (None, "auto", "none", {"type": "allowed_tools", "mode": "auto", "tools": []})]
    for endpoint, request in free:
        check_fields(cfg, endpoint, model, request)


def test_embedding_dimensions_are_refused_on_llama_cpp_and_passed_on_to_vllm():
    # Regression: llama.cpp ignores dimensions and answered 576 numbers where 8 were asked.
    cfg, model = _bundled()
    embeddings = ENDPOINTS["/v1/embeddings"]
    with pytest.raises(BadRequest, match="dimensions") as info:
        check_fields(cfg, embeddings, model, EmbeddingRequest(model="m", input="hi", dimensions=8))
    assert (info.value.code, info.value.param) == ("dimensions_not_supported", "dimensions")
    check_fields(cfg, embeddings, model, EmbeddingRequest(model="m", input="hi"))
    vllm = parse_config('[[models]]\nname = "v"\nserver = "vllm"\nsource = "hf:org/matryoshka"\n'
                        'tasks = ["embed"]\n').models[0]
    check_fields(cfg, embeddings, vllm, EmbeddingRequest(model="v", input="hi", dimensions=8))


@pytest.fixture(scope="module")
def cold_llama(tmp_path_factory):
    """A llama.cpp model that serves embeddings, never started: the refusals come first."""
    from .conftest import DaemonFactory

    factory = DaemonFactory(tmp_path_factory.mktemp("capabilities"))
    models = ('[[models]]\nname = "llama"\nsource = "builtin:smollm2-135m-instruct"\nembeddings = true\n'
              "[models.autoscaling]\nmin_replicas = 0\nmax_replicas = 1\n\n" + fake_model("fake", embeddings=True))
    yield factory.start(models)
    factory.cleanup()


def test_the_front_door_refuses_what_llama_cpp_cannot_honour_in_each_apis_envelope(cold_llama):
    url = cold_llama.url
    with pytest.raises(openai.BadRequestError) as dims:
        openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0).embeddings.create(
            model="llama", input="hi", dimensions=8)
    assert (dims.value.body["param"], dims.value.body["code"]) == ("dimensions", "dimensions_not_supported")
    claude = anthropic.Anthropic(base_url=url, api_key="x", max_retries=0)
    tools = [{"name": "get_weather", "input_schema": {"type": "object"}}]
    with pytest.raises(anthropic.BadRequestError) as forced:
        claude.messages.create(model="llama", max_tokens=3, messages=SAID, tools=tools, tool_choice={"type": "any"})
    assert "cannot call tools" in forced.value.body["error"]["message"]
    resp = httpx.post(f"{url}/v1/responses", timeout=30, json={
        "model": "llama", "input": "hi", "tool_choice": "required",
        "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}]})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "tools_not_supported", resp.text
    # Nothing was started for them; another engine's model keeps its dimensions.
    assert cold_llama.replicas("llama") == []
    fake = httpx.post(f"{url}/v1/embeddings", json={"model": "fake", "input": "hi", "dimensions": 8}, timeout=30)
    assert fake.status_code == 200, fake.text


def test_a_workers_facts_carry_what_check_fields_reads():
    # With workers the daemon decides on the facts a worker read of the body (gateway/facts.py).
    from appliance.gateway.facts import carried_facts
    from appliance.gateway.protocol import decode_request

    cfg, model = _bundled()
    for path, body in (("/v1/embeddings", b'{"model": "m", "input": "hi", "dimensions": 8}'),
                       ("/v1/messages", b'{"model": "m", "max_tokens": 3, "tool_choice": {"type": "any"},'
                                        b' "messages": [{"role": "user", "content": "hi"}]}')):
        endpoint = ENDPOINTS[path]
        with pytest.raises(BadRequest):
            check_fields(cfg, endpoint, model, carried_facts(endpoint, body, decode_request(body, endpoint.cls)))


def test_a_completions_echo_or_suffix_is_refused_on_llama_cpp_not_answered_without_it(cold_llama):
    # Regression: llama-server ignores echo and suffix on /v1/completions: echo=True answered
    # without the prompt, as if it had been honoured. Refused before any engine starts, in
    # one process and through a worker's facts alike; the fake (openai) engine decides itself.
    from appliance.gateway.facts import carried_facts
    from appliance.gateway.protocol import decode_request

    cfg, model = _bundled()
    completions = ENDPOINTS["/v1/completions"]
    for field, body in (("echo", b'{"model": "m", "prompt": "Hello", "echo": true}'),
                        ("suffix", b'{"model": "m", "prompt": "def f(", "suffix": "return x"}')):
        with pytest.raises(BadRequest) as info:
            check_fields(cfg, completions, model, carried_facts(completions, body, decode_request(body, completions.cls)))
        assert (info.value.param, info.value.code) == (field, f"{field}_not_supported")
    plain = b'{"model": "m", "prompt": "Hello", "echo": false}'
    check_fields(cfg, completions, model, carried_facts(completions, plain, decode_request(plain, completions.cls)))
    client = openai.OpenAI(base_url=f"{cold_llama.url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as echo:
        client.completions.create(model="llama", prompt="Hello", max_tokens=3, echo=True)
    assert (echo.value.body["param"], echo.value.body["code"]) == ("echo", "echo_not_supported")
    assert cold_llama.replicas("llama") == []
    fake = client.completions.create(model="fake", prompt="Hello", max_tokens=3, echo=True)
    assert fake.choices


def test_a_completions_best_of_above_one_is_refused_on_llama_cpp_not_answered_with_one_sample(cold_llama):
    # Regression: llama-server ignores best_of: best_of=2 answered one sample, as if it were
    # the best of two. Refused before any engine starts, in one process and through a
    # worker's facts; best_of=1 asks nothing more; the fake (openai) engine decides itself.
    from appliance.gateway.facts import carried_facts
    from appliance.gateway.protocol import decode_request

    cfg, model = _bundled()
    completions = ENDPOINTS["/v1/completions"]
    for best_of, refused in ((2, True), (1, False)):
        body = b'{"model": "m", "prompt": "Hello", "best_of": %d}' % best_of
        for request in (decode_request(body, completions.cls),
                        carried_facts(completions, body, decode_request(body, completions.cls))):
            if not refused:
                check_fields(cfg, completions, model, request)
                continue
            with pytest.raises(BadRequest) as info:
                check_fields(cfg, completions, model, request)
            assert (info.value.param, info.value.code) == ("best_of", "best_of_not_supported")
    client = openai.OpenAI(base_url=f"{cold_llama.url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="llama", prompt="Hello", max_tokens=3, best_of=2)
    assert (err.value.body["param"], err.value.body["code"]) == ("best_of", "best_of_not_supported")
    assert cold_llama.replicas("llama") == []
    assert client.completions.create(model="fake", prompt="Hello", max_tokens=3, best_of=2).choices


def test_a_messages_content_block_llama_cpp_drops_is_refused_through_a_workers_facts_too():
    # llama-server's Messages API drops a document (any block but text, image, thinking,
    # tool_use, tool_result) without a word; the refusal reads the block types from the
    # Facts, which a worker sends the daemon. Other engines read their blocks themselves.
    from appliance.gateway.facts import carried_facts
    from appliance.gateway.protocol import decode_request

    cfg, model = _bundled()
    messages = ENDPOINTS["/v1/messages"]
    body = (b'{"model": "m", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"},'
            b' {"role": "assistant", "content": [{"type": "text", "text": "ok"}]}, {"role": "user", "content":'
            b' [{"type": "tool_result", "tool_use_id": "t"}, {"type": "document", "source": {}}]}]}')
    facts = carried_facts(messages, body, decode_request(body, messages.cls))
    with pytest.raises(BadRequest) as info:
        check_fields(cfg, messages, model, facts)
    assert (info.value.param, info.value.code) == ("messages[2].content[1]", "content_block_not_supported")
    assert "'document'" in info.value.message
    vllm = parse_config('[[models]]\nname = "v"\nserver = "vllm"\nsource = "hf:org/m"\n').models[0]
    check_fields(cfg, messages, vllm, facts)
    read = body.replace(b'"document", "source": {}', b'"image", "source": {}')
    check_fields(cfg, messages, model, carried_facts(messages, read, decode_request(read, messages.cls)))


def test_a_messages_content_block_llama_cpp_drops_inside_a_tool_result_is_refused_where_it_is():
    # Regression: only a message's own blocks were read, so a document inside a
    # tool_result's content went to llama-server, which dropped it without a word.
    from appliance.gateway.facts import carried_facts
    from appliance.gateway.protocol import decode_request

    cfg, model = _bundled()
    messages = ENDPOINTS["/v1/messages"]
    body = (b'{"model": "m", "max_tokens": 3, "messages": [{"role": "user", "content": [{"type": "text",'
            b' "text": "hi"}, {"type": "tool_result", "tool_use_id": "t", "content": [{"type": "text",'
            b' "text": "found"}, {"type": "document", "source": {}}]}]}]}')
    with pytest.raises(BadRequest) as info:
        check_fields(cfg, messages, model, carried_facts(messages, body, decode_request(body, messages.cls)))
    assert (info.value.param, info.value.code) == ("messages[0].content[1].content[1]", "content_block_not_supported")
    for read in (body.replace(b'"document", "source": {}', b'"image", "source": {}'),
                 body.replace(b'[{"type": "text", "text": "found"}, {"type": "document", "source": {}}]', b'"found"')):
        check_fields(cfg, messages, model, carried_facts(messages, read, decode_request(read, messages.cls)))


@pytest.mark.parametrize("choice, given", [
    ({"type": "none"}, []),
    ({"type": "tool", "name": "get_time"}, [{"name": "get_time", "input_schema": {"type": "object"}}]),
    ({"type": "auto"}, None), ({"type": "any"}, None), ({"type": "tool", "name": "nope"}, None),
])
def test_a_messages_tool_choice_llama_cpp_cannot_read_is_told_it_in_the_tools_it_is_given(choice, given):
    # llama-server turns Anthropic's tool_choice into chat's "auto" or "required" and drops
    # the rest: "none" let the model call a tool, and a named tool let it call any other.
    # The engine is given no tools, or the named one alone; other choices go as they came.
    from appliance.gateway.capabilities import engine_fields

    cfg, model = _bundled()
    tools = [{"name": "get_weather", "input_schema": {"type": "object"}},
             {"name": "get_time", "input_schema": {"type": "object"}}]
    body = json.dumps({"model": "m", "max_tokens": 3, "messages": SAID, "tools": tools, "tool_choice": choice}).encode()
    fields = engine_fields(ENDPOINTS["/v1/messages"], model, body)
    assert fields == ({} if given is None else {"tools": given})
    vllm = parse_config('[[models]]\nname = "v"\nserver = "vllm"\nsource = "hf:org/m"\n').models[0]
    assert engine_fields(ENDPOINTS["/v1/messages"], vllm, body) == {}
