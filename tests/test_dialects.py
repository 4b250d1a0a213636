"""The APIs' pieces without a daemon: a Responses or Messages stream relayed in
arbitrary chunks keeps its usage and holds its last event back; each API's
cache counters are scrubbed; models' tasks and providers' apis are validated."""

from __future__ import annotations

import json

import msgspec
import openai
import pytest

from appliance.access.tenancy import revealing, scrub
from appliance.config import ConfigError, parse_config
from appliance.errors import BadRequest
from appliance.gateway import api_messages, api_responses
from appliance.gateway.capabilities import ENDPOINTS, check, serves
from appliance.gateway.metering import StreamTap


def _sse(events: list[tuple[str, dict]]) -> bytes:
    return b"".join(f"event: {n}\ndata: {json.dumps(d, separators=(',', ':'))}\n\n".encode() for n, d in events)


MESSAGES_STREAM = _sse([
    ("message_start", {"type": "message_start", "message": {"id": "m", "usage": {
        "input_tokens": 2, "cache_read_input_tokens": 5, "output_tokens": 1}}}),
    ("content_block_delta", {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "hi"}}),
    ("message_delta", {"type": "message_delta", "usage": {"output_tokens": 4}}),
    ("message_stop", {"type": "message_stop"}),
])
RESPONSES_STREAM = _sse([
    ("response.created", {"type": "response.created", "response": {"id": "r"}}),
    ("response.output_text.delta", {"type": "response.output_text.delta", "delta": "hi"}),
    ("response.completed", {"type": "response.completed", "response": {"id": "r", "usage": {
        "input_tokens": 7, "output_tokens": 4, "input_tokens_details": {"cached_tokens": 5}}},
        "timings": {"cache_n": 5}}),
])


def _relay(stream: bytes, size: int, module, isolated: bool) -> tuple[StreamTap, bytes]:
    tap = StreamTap(False, scrub if isolated else None, revealing if isolated else None,
                    usage_of=module.usage, terminal=module.TERMINAL)
    out = b"".join(tap.feed(stream[i:i + size]) for i in range(0, len(stream), size))
    return tap, out


@pytest.mark.parametrize("size", [1, 7, 64, 10_000])
@pytest.mark.parametrize("isolated", [False, True])
def test_a_messages_stream_in_any_chunks_is_charged_its_whole_prompt_and_its_end_held(size, isolated):
    tap, out = _relay(MESSAGES_STREAM, size, api_messages, isolated)
    assert (tap.usage.prompt_tokens, tap.usage.completion_tokens) == (7, 4)
    assert b"message_stop" not in out  # held until the charge is durable
    whole = out + tap.rest()
    assert whole.endswith(b'event: message_stop\ndata: {"type":"message_stop"}\n\n')
    assert (b"cache_read" in whole) is not isolated
    if isolated:
        assert b'"input_tokens":7' in whole


@pytest.mark.parametrize("size", [1, 13, 10_000])
@pytest.mark.parametrize("isolated", [False, True])
def test_a_responses_stream_in_any_chunks_is_charged_and_its_completed_event_held(size, isolated):
    tap, out = _relay(RESPONSES_STREAM, size, api_responses, isolated)
    assert (tap.usage.prompt_tokens, tap.usage.completion_tokens) == (7, 4)
    assert b"response.completed" not in out and b"response.output_text.delta" in out
    whole = out + tap.rest()
    assert b"event: response.completed" in whole
    assert (b"cached_tokens" in whole or b"cache_n" in whole) is not isolated


def test_a_model_serves_only_its_tasks_endpoints():
    cfg = parse_config('[[models]]\nname = "r"\nsource = "builtin:smollm2-135m-instruct"\ntasks = ["rerank"]\n')
    model = next(m for m in cfg.models if m.name == "r")
    assert serves(model, "rerank") and serves(model, "tokenize") and not serves(model, "messages")
    with pytest.raises(BadRequest, match="Model 'r' does not serve /v1/messages"):
        check("/v1/messages", ENDPOINTS["/v1/messages"], model)
    default = parse_config("").models[0]  # llama.cpp, chat: no score (llama-server has none)
    assert serves(default, "messages") and not serves(default, "score")


@pytest.mark.parametrize("snippet, field", [
    ('[[models]]\nname = "x"\nsource = "builtin:smollm2-135m-instruct"\ntasks = ["summarize"]\n',
     "models[0].tasks"),
    ('[[providers]]\nname = "p"\nbase_url = "http://127.0.0.1:1/v1"\napis = ["chat", "telepathy"]\n',
     "providers[0].apis"),
])
def test_unknown_tasks_and_apis_are_config_errors_naming_the_field(snippet, field):
    with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
        parse_config(snippet)


def test_transcriptions_are_served_by_a_transcribe_model_on_an_engine_that_declares_them():
    cfg = parse_config('[[models]]\nname = "ear"\nsource = "builtin:smollm2-135m-instruct"\ntasks = ["transcribe"]\n')
    llama = next(m for m in cfg.models if m.name == "ear")  # llama-server has no audio endpoint
    with pytest.raises(BadRequest, match="llamacpp engine, which does not serve /v1/audio/transcriptions"):
        check("/v1/audio/transcriptions", ENDPOINTS["/v1/audio/transcriptions"], llama)
    vllm = msgspec.structs.replace(llama, server="vllm")
    assert serves(vllm, "transcriptions") and serves(vllm, "translations") and not serves(vllm, "chat")
    assert not serves(msgspec.structs.replace(llama, server="sglang"), "transcriptions")


@pytest.mark.parametrize("fields", [{"model": "other"}, {"model": "other", "stream": True}])
def test_a_form_field_is_rewritten_in_place_and_every_other_byte_kept(fields):
    from appliance.gateway.api_audio import decode, set_form_fields

    boundary = b"b0undary"
    body = (b"--b0undary\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper\r\n"
            b"--b0undary\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.wav\"\r\n\r\n"
            b"\x00\r\n--b0undar\xff\r\n--b0undary--\r\n")
    out = set_form_fields(body, fields)
    req = decode(out, b"multipart/form-data; boundary=" + boundary)
    assert req.model == "other" and out.replace(b"other", b"whisper", 1).startswith(body[:-len(b"--b0undary--\r\n")])
    assert req.stream is ("stream" in fields)


# llama.cpp's Responses stream: no sequence_number, output_index or content_index,
# a bare response in response.created, no function_call_arguments.done.
LLAMA_RESPONSES_STREAM = _sse([
    ("response.created", {"type": "response.created", "response": {
        "id": "resp_1", "object": "response", "status": "in_progress"}}),
    ("response.in_progress", {"type": "response.in_progress", "response": {
        "id": "resp_1", "object": "response", "status": "in_progress"}}),
    ("response.output_item.added", {"type": "response.output_item.added", "item": {
        "content": [], "id": "msg_1", "role": "assistant", "status": "in_progress", "type": "message"}}),
    ("response.content_part.added", {"type": "response.content_part.added", "item_id": "msg_1",
                                     "part": {"type": "output_text", "text": ""}}),
    ("response.output_text.delta", {"type": "response.output_text.delta", "item_id": "msg_1", "delta": "Hel"}),
    ("response.output_text.delta", {"type": "response.output_text.delta", "item_id": "msg_1", "delta": "lo"}),
    ("response.output_item.added", {"type": "response.output_item.added", "item": {
        "id": "fc_7", "arguments": "", "call_id": "call_7", "name": "get_weather", "type": "function_call",
        "status": "in_progress"}}),
    ("response.function_call_arguments.delta", {"type": "response.function_call_arguments.delta",
                                                "item_id": "fc_7", "delta": '{"city":"Paris"}'}),
    ("response.output_text.done", {"type": "response.output_text.done", "item_id": "msg_1", "text": "Hello"}),
    ("response.content_part.done", {"type": "response.content_part.done", "item_id": "msg_1", "part": {
        "type": "output_text", "annotations": [], "logprobs": [], "text": "Hello"}}),
    ("response.output_item.done", {"type": "response.output_item.done", "item": {
        "type": "message", "status": "completed", "id": "msg_1", "role": "assistant",
        "content": [{"type": "output_text", "annotations": [], "logprobs": [], "text": "Hello"}]}}),
    ("response.output_item.done", {"type": "response.output_item.done", "item": {
        "id": "fc_7", "type": "function_call", "status": "completed", "arguments": '{"city":"Paris"}',
        "call_id": "call_7", "name": "get_weather"}}),
    ("response.completed", {"type": "response.completed", "response": {
        "id": "resp_1", "object": "response", "created_at": 1, "status": "completed", "model": "m",
        "output": [], "usage": {"input_tokens": 3, "output_tokens": 2, "total_tokens": 5}}}),
])
REQUEST = json.dumps({"model": "m", "input": "hi", "instructions": "Be brief", "max_output_tokens": 9,
                      "tools": [{"type": "function", "name": "get_weather", "parameters": {}}]}).encode()


def _events(stream: bytes) -> list[dict]:
    return [json.loads(e.split(b"data: ", 1)[1]) for e in stream.split(b"\n\n") if e]


def _fixed(fixer, stream: bytes, size: int) -> bytes:
    return b"".join(fixer.feed(stream[i:i + size]) for i in range(0, len(stream), size)) + fixer.rest()


@pytest.mark.parametrize("size", [1, 13, 10_000])
def test_a_llama_cpp_responses_stream_becomes_what_the_openai_sdks_stream_helper_accumulates(size):
    """llama.cpp's events lacked output_index, content_index and sequence_number: the
    openai SDK's responses.stream() raised TypeError on the first delta."""
    from openai._models import construct_type
    from openai.lib.streaming.responses._responses import ResponseStreamState
    from openai.types.responses import ResponseStreamEvent

    out = _fixed(api_responses.ResponsesEvents(REQUEST), LLAMA_RESPONSES_STREAM, size)
    events = _events(out)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    by_type = {e["type"]: e for e in events}
    assert by_type["response.output_text.delta"]["output_index"] == 0
    assert by_type["response.output_text.delta"]["content_index"] == 0
    assert by_type["response.function_call_arguments.delta"]["output_index"] == 1
    assert by_type["response.function_call_arguments.done"]["arguments"] == '{"city":"Paris"}'
    created = by_type["response.created"]["response"]
    assert created["output"] == [] and created["instructions"] == "Be brief" and created["model"] == "m"
    for header, data in zip((e for e in out.split(b"\n\n") if e), events, strict=True):
        assert header.startswith(b"event: " + data["type"].encode() + b"\ndata: ")
    state = ResponseStreamState(input_tools=[], text_format=openai.NOT_GIVEN)
    for data in events:
        state.handle_event(construct_type(type_=ResponseStreamEvent, value=data))
    final = state._completed_response
    assert final.output_text == "Hello" and final.instructions == "Be brief" and final.max_output_tokens == 9
    assert [o.type for o in final.output] == ["message", "function_call"]


def test_a_responses_stream_an_engine_numbers_itself_goes_on_byte_for_byte():
    numbered = RESPONSES_STREAM.replace(b'"type":"response.created",', b'"type":"response.created","sequence_number":0,')
    assert _fixed(api_responses.ResponsesEvents(REQUEST), numbered, 7) == numbered


def test_a_delta_whose_item_the_engine_never_announced_gets_its_added_events():
    stream = RESPONSES_STREAM.replace(b'"delta":"hi"', b'"item_id":"msg_1","delta":"hi"')
    out = _events(_fixed(api_responses.ResponsesEvents(REQUEST), stream, 10_000))
    assert [e["type"] for e in out] == ["response.created", "response.output_item.added",
                                        "response.content_part.added", "response.output_text.delta",
                                        "response.completed"]


def _cut(stream: bytes) -> bytes:
    return stream.replace(b'"output_tokens":2', b'"output_tokens":9')  # REQUEST's cap: the answer was cut


@pytest.mark.parametrize("size", [1, 13, 10_000])
def test_a_cut_streams_last_output_item_done_says_incomplete_as_its_final_response(size):
    """The final response said the cut item was incomplete, its output_item.done "completed"."""
    events = _events(_fixed(api_responses.ResponsesEvents(REQUEST), _cut(LLAMA_RESPONSES_STREAM), size))
    done = {e["item"]["id"]: e["item"]["status"] for e in events if e["type"] == "response.output_item.done"}
    final = events[-1]["response"]
    assert events[-1]["type"] == "response.incomplete"
    assert done == {"msg_1": "completed", "fc_7": "incomplete"}  # the last item is the one the cap cut
    assert {o["id"]: o["status"] for o in final["output"]} == done
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    whole = _events(_fixed(api_responses.ResponsesEvents(REQUEST), LLAMA_RESPONSES_STREAM, size))
    assert [e["type"] for e in whole] == [e["type"] for e in events[:-1]] + ["response.completed"]
    assert all(e["item"]["status"] == "completed" for e in whole if e["type"] == "response.output_item.done")


def test_an_output_item_done_a_stream_ends_on_is_sent_at_its_end():
    stream = LLAMA_RESPONSES_STREAM[:LLAMA_RESPONSES_STREAM.rfind(b"event: response.completed")]
    events = _events(_fixed(api_responses.ResponsesEvents(REQUEST), stream, 10_000))
    assert events[-1]["type"] == "response.output_item.done" and events[-1]["item"]["id"] == "fc_7"
    assert [e["sequence_number"] for e in events] == list(range(len(events)))


def test_a_whole_llama_cpp_response_names_the_requests_instructions_and_tools():
    whole = {"id": "resp_1", "object": "response", "created_at": 1, "status": "completed", "model": "m",
             "output": [], "usage": {"input_tokens": 3, "output_tokens": 2}}
    fixed = json.loads(api_responses.whole_answer(REQUEST, json.dumps(whole).encode()))
    assert fixed["instructions"] == "Be brief" and fixed["tools"][0]["name"] == "get_weather"
    assert fixed["max_output_tokens"] == 9 and fixed["tool_choice"] == "auto" and fixed["error"] is None
    assert fixed["usage"] == whole["usage"] and fixed["id"] == "resp_1"


def _message(reason: str, sequence: str | None) -> bytes:
    return json.dumps({"id": "chatcmpl-abc", "type": "message", "role": "assistant", "content": [],
                       "model": "m", "stop_reason": reason, "stop_sequence": sequence,
                       "usage": {"input_tokens": 1, "output_tokens": 1}}).encode()


@pytest.mark.parametrize(("reason", "said", "asked", "expected"), [
    ("end_turn", "5", ["5"], ("stop_sequence", "5")),
    ("end_turn", "<|im_end|>", [], ("end_turn", None)),  # the template's own word: not the client's
    ("max_tokens", None, ["5"], ("max_tokens", None)),
    ("tool_use", "5", ["5"], ("tool_use", None)),
    ("end_turn", None, [], ("end_turn", None)),
])
def test_a_messages_stop_sequence_is_named_only_with_the_stop_sequence_reason(reason, said, asked, expected):
    """llama.cpp said end_turn with stop_sequence set: Anthropic's API sets stop_sequence
    only with stop_reason "stop_sequence", and gives msg_ ids, not chat's chatcmpl-."""
    body = json.dumps({"model": "m", "max_tokens": 5, "messages": [], "stop_sequences": asked}).encode()
    whole = json.loads(api_messages.whole_answer(body, _message(reason, said)))
    assert (whole["stop_reason"], whole["stop_sequence"]) == expected and whole["id"] == "msg_abc"
    start = {"type": "message_start", "message": {**json.loads(_message(reason, said)), "stop_reason": None,
                                                  "stop_sequence": None}}
    delta = {"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": said},
             "usage": {"output_tokens": 1}}
    stream = _sse([("message_start", start), ("message_delta", delta), ("message_stop", {"type": "message_stop"})])
    events = _events(_fixed(api_messages.MessagesEvents(body), stream, 5))
    assert events[0]["message"]["id"] == "msg_abc"
    assert (events[1]["delta"]["stop_reason"], events[1]["delta"]["stop_sequence"]) == expected
    assert events[2] == {"type": "message_stop"}


def test_a_streamed_tool_use_block_starts_with_its_input_as_anthropics_does():
    """llama.cpp's content_block_start for a tool_use had no input: a call without
    arguments ended in the SDK's final message as a block with no input at all."""
    start = {"type": "content_block_start", "index": 0,
             "content_block": {"type": "tool_use", "id": "t1", "name": "now"}}
    stream = _sse([("content_block_start", start), ("content_block_stop", {"type": "content_block_stop", "index": 0})])
    events = _events(_fixed(api_messages.MessagesEvents(b"{}"), stream, 3))
    assert events[0]["content_block"] == {"type": "tool_use", "id": "t1", "name": "now", "input": {}}
