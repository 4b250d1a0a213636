"""End to end: the APIs beyond chat (Responses, Anthropic Messages, tokenize) on the
real llama.cpp server with the bundled SmolLM2, called through the openai and
anthropic SDKs exactly as a local app or an agent would, with a budgeted key."""

from __future__ import annotations

import asyncio

import anthropic
import httpx
import openai
import pydantic
import pytest

from .test_e2e_llamacpp import MODEL, llama_daemon  # noqa: F401  (the daemon on the bundled model)
from .test_keys import keys_cli

pytestmark = pytest.mark.e2e

WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


@pytest.fixture(scope="module")
def key(llama_daemon):
    return keys_cli(llama_daemon, "create", "--name", "agent", "--budget-tokens", "100000")


def _used(llama_daemon, name: str) -> tuple[int, int]:
    usage = {u["key"]: u for u in llama_daemon.status()["usage"]}.get(name)
    return (usage["prompt_tokens"], usage["completion_tokens"]) if usage else (0, 0)


@pytest.fixture
def oai(llama_daemon, key):
    return openai.OpenAI(base_url=f"{llama_daemon.url}/v1", api_key=key, max_retries=0, timeout=120)


@pytest.fixture
def claude(llama_daemon, key):
    return anthropic.Anthropic(base_url=llama_daemon.url, api_key=key, max_retries=0, timeout=120)


def test_responses_create_with_a_function_tool_is_answered_and_charged(llama_daemon, oai):
    before = _used(llama_daemon, "agent")
    resp = oai.responses.create(model=MODEL, input="What is the weather in Paris?", tools=[WEATHER],
                                max_output_tokens=16)
    # Completed, or cut by max_output_tokens and saying so.
    assert resp.status == ("incomplete" if resp.usage.output_tokens >= 16 else "completed") and resp.output
    assert resp.usage.input_tokens > 0 and resp.usage.output_tokens > 0
    assert getattr(resp.usage.input_tokens_details, "cached_tokens", None) is None  # no cache oracle
    after = _used(llama_daemon, "agent")
    assert after == (before[0] + resp.usage.input_tokens, before[1] + resp.usage.output_tokens)


def test_responses_streamed_with_a_function_tool_ends_with_its_terminal_event_and_is_charged(llama_daemon, oai):
    before = _used(llama_daemon, "agent")
    events = list(oai.responses.create(model=MODEL, input="What is the weather in Paris?", tools=[WEATHER],
                                       max_output_tokens=8, stream=True))
    types = [e.type for e in events]
    usage = events[-1].response.usage
    ending = "response.incomplete" if usage.output_tokens >= 8 else "response.completed"
    assert types[0] == "response.created" and types[-1] == ending, types
    assert any(t in ("response.output_text.delta", "response.function_call_arguments.delta") for t in types)
    after = _used(llama_daemon, "agent")
    assert after == (before[0] + usage.input_tokens, before[1] + usage.output_tokens)


def test_messages_create_with_a_system_prompt_is_answered_and_charged_all_its_prompt(llama_daemon, claude):
    claude.messages.create(model=MODEL, system="You are terse.", max_tokens=8,
                           messages=[{"role": "user", "content": "Hello"}])  # warms llama's prompt cache
    before = _used(llama_daemon, "agent")
    msg = claude.messages.create(model=MODEL, system="You are terse.", max_tokens=8,
                                 messages=[{"role": "user", "content": "Hello"}])
    assert msg.type == "message" and msg.role == "assistant" and msg.content[0].text
    # The prompt cache's share is folded into input_tokens: the whole prompt, no oracle.
    assert msg.usage.cache_read_input_tokens is None
    count = claude.messages.count_tokens(model=MODEL, system="You are terse.",
                                         messages=[{"role": "user", "content": "Hello"}])
    assert msg.usage.input_tokens >= count.input_tokens - 2 > 0
    prompt, completion = _used(llama_daemon, "agent")
    assert completion == before[1] + msg.usage.output_tokens
    assert prompt >= before[0] + msg.usage.input_tokens  # + count_tokens' own prompt


def test_messages_streamed_events_and_charge(llama_daemon, claude):
    before = _used(llama_daemon, "agent")
    with claude.messages.stream(model=MODEL, max_tokens=8, system="Be brief.",
                                messages=[{"role": "user", "content": "Hi"}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text and final.stop_reason in ("max_tokens", "end_turn")
    after = _used(llama_daemon, "agent")
    assert after[1] == before[1] + final.usage.output_tokens
    assert after[0] == before[0] + final.usage.input_tokens


def test_messages_errors_come_in_anthropics_envelope(llama_daemon, claude):
    with pytest.raises(anthropic.NotFoundError) as err:
        claude.messages.create(model="no-such-model", max_tokens=8, messages=[{"role": "user", "content": "x"}])
    assert err.value.body["type"] == "error" and err.value.body["error"]["type"] == "not_found_error"
    bad = anthropic.Anthropic(base_url=llama_daemon.url, api_key="ak-nope-nope", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        bad.messages.create(model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "x"}])


def test_tokenize_round_trip(llama_daemon, key):
    with httpx.Client(base_url=llama_daemon.url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as c:
        tokens = c.post("/tokenize", json={"model": MODEL, "content": "Hello world"}).json()["tokens"]
        assert tokens and all(isinstance(t, int) for t in tokens)
        text = c.post("/detokenize", json={"model": MODEL, "tokens": tokens}).json()["content"]
        assert text.strip() == "Hello world"
        # SmolLM2 is a chat model: rerank is refused before anything runs, naming both.
        resp = c.post("/v1/rerank", json={"model": MODEL, "query": "a", "documents": ["a", "b"]})
        assert resp.status_code == 400 and "/v1/rerank" in resp.text and MODEL in resp.text


def test_llama_server_keeps_no_responses_so_a_stateful_request_is_a_clear_400(llama_daemon, oai):
    for extra in ({"store": True}, {"previous_response_id": "resp_1"}, {"background": True}):
        with pytest.raises(openai.BadRequestError) as err:
            oai.responses.create(model=MODEL, input="hi", max_output_tokens=2, **extra)
        assert err.value.body["code"] == "responses_store_not_supported"
        assert "llamacpp" in err.value.body["message"]
    answered = oai.responses.create(model=MODEL, input="hi", max_output_tokens=64, store=False, temperature=0)
    assert answered.status == "completed"


def test_llama_server_transcribes_nothing_so_an_upload_is_a_400_naming_endpoint_and_model(llama_daemon, oai):
    with pytest.raises(openai.BadRequestError) as err:
        oai.audio.transcriptions.create(model=MODEL, file=("a.wav", b"RIFF" + bytes(4000)))
    assert err.value.body["code"] == "endpoint_not_supported"
    assert "/v1/audio/transcriptions" in err.value.body["message"] and MODEL in err.value.body["message"]


def test_the_openai_sdks_responses_stream_helper_gets_its_final_response_on_llama_cpp(llama_daemon, oai, key):
    """llama.cpp's Responses events lack output_index, content_index and sequence_number:
    the SDK's responses.stream() raised TypeError on the first delta."""
    # "Hi" is answered in about 10 tokens: a final response needs a completed answer.
    with oai.responses.stream(model=MODEL, input="Hi", tools=[WEATHER], temperature=0,
                              instructions="Be brief.", max_output_tokens=64) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert deltas and final.output_text == "".join(e.delta for e in deltas) == deltas[-1].snapshot
    assert final.instructions == "Be brief." and [t.name for t in final.tools] == ["get_weather"]
    assert final.usage.output_tokens > 0

    async def helper() -> str:
        client = openai.AsyncOpenAI(base_url=f"{llama_daemon.url}/v1", api_key=key, max_retries=0, timeout=120)
        async with client.responses.stream(model=MODEL, input="Hi", max_output_tokens=64, temperature=0) as stream:
            return (await stream.get_final_response()).output_text

    assert asyncio.run(helper())


def test_messages_on_llama_cpp_have_anthropic_ids_and_name_a_stop_sequence_only_when_it_stopped(claude):
    """llama.cpp's answers had chatcmpl- ids and said end_turn with stop_sequence set."""
    ask = {"model": MODEL, "max_tokens": 40, "extra_body": {"temperature": 0}, "stop_sequences": ["4"],
           "messages": [{"role": "user", "content": "Count from 1 to 10, comma separated"}]}
    whole = claude.messages.create(**ask)
    with claude.messages.stream(**ask) as stream:
        streamed = stream.get_final_message()
    for msg in (whole, streamed):
        assert msg.id.startswith("msg_")
        assert (msg.stop_reason, msg.stop_sequence) == ("stop_sequence", "4"), msg.content
    cut = claude.messages.create(model=MODEL, max_tokens=2, messages=[{"role": "user", "content": "Hi"}])
    assert (cut.stop_reason, cut.stop_sequence) == ("max_tokens", None) and cut.id.startswith("msg_")


def test_an_image_to_a_model_that_cannot_read_one_is_a_400_the_sdks_do_not_retry(llama_daemon, key, claude):
    """llama-server answers a 500 for an image part without its mmproj: it was a 502
    engine_error, which both SDKs retry and report as the server's fault."""
    oai = openai.OpenAI(base_url=f"{llama_daemon.url}/v1", api_key=key, max_retries=2, timeout=120)
    image = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNgYGD4DwABBAEAHnOcQAAAAABJRU5ErkJggg=="
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(model=MODEL, max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}}]}])
    assert err.value.body["code"] == "unsupported_input" and MODEL in err.value.body["message"]
    with pytest.raises(anthropic.BadRequestError) as err:
        claude.messages.create(model=MODEL, max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": image}}]}])
    assert err.value.body["error"]["type"] == "invalid_request_error"


def test_a_responses_structured_output_is_honoured_on_llama_cpp(oai):
    """llama-server reads chat's response_format only, and ignored a Responses request's
    text.format: responses.parse(text_format=...) got words, not the JSON it asked for."""
    class Person(pydantic.BaseModel):
        name: str

    parsed = oai.responses.parse(model=MODEL, input="Give a person's name", max_output_tokens=60,
                                 temperature=0, text_format=Person)
    assert isinstance(parsed.output_parsed, Person)
    with oai.responses.stream(model=MODEL, input="Give a person's name", max_output_tokens=60, temperature=0,
                              text_format=Person) as stream:
        assert isinstance(stream.get_final_response().output_parsed, Person)


def test_a_response_cut_by_max_output_tokens_on_llama_cpp_is_incomplete(oai):
    """llama-server's Responses say "completed" whatever stopped them: an answer cut at
    max_output_tokens was reported whole, and its stream ended with response.completed."""
    cut = oai.responses.create(model=MODEL, input="Tell me a long story", max_output_tokens=3)
    assert (cut.status, cut.incomplete_details.reason) == ("incomplete", "max_output_tokens"), cut
    with oai.responses.stream(model=MODEL, input="Tell me a long story", max_output_tokens=3) as stream:
        events = list(stream)
    assert events[-1].type == "response.incomplete" and events[-1].response.status == "incomplete"
    assert "response.completed" not in [e.type for e in events]
    # The cut message's own done event says so too, as the final response does.
    [done] = [e for e in events if e.type == "response.output_item.done"]
    assert (done.item.status, events[-1].response.output[-1].status) == ("incomplete", "incomplete")


def test_a_legacy_completions_logprobs_come_in_the_legacy_shape_on_llama_cpp(oai):
    """llama-server answered /v1/completions with a chatcmpl- id and chat's logprobs
    ({"content": [...]}): the SDK's choice.logprobs.tokens was None."""
    prompt = "Once upon a time"
    answer = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=3, logprobs=2, temperature=0)
    assert answer.id.startswith("cmpl-") and answer.object == "text_completion"
    logprobs = answer.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 3
    assert "".join(logprobs.tokens) == answer.choices[0].text
    assert all(len(top) == 2 and all(v <= 0 for v in top.values()) for top in logprobs.top_logprobs)
    assert logprobs.text_offset[0] == len(prompt)
    steps = [b - a for a, b in zip(logprobs.text_offset, logprobs.text_offset[1:], strict=False)]
    assert steps == [len(t) for t in logprobs.tokens[:-1]]
    assert oai.completions.create(model=MODEL, prompt=prompt, max_tokens=2).id.startswith("cmpl-")
    # Streamed: the same, chunk by chunk, the offsets running on.
    chunks = list(oai.completions.create(model=MODEL, prompt=prompt, max_tokens=3, logprobs=2, stream=True,
                                         temperature=0))
    assert all(c.id.startswith("cmpl-") for c in chunks)
    streamed = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert [t for lp in streamed for t in lp.tokens] == logprobs.tokens
    assert [o for lp in streamed for o in lp.text_offset] == logprobs.text_offset
    assert [p for lp in streamed for p in lp.top_logprobs] == logprobs.top_logprobs
