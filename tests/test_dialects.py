"""The APIs' pieces without a daemon: a Responses or Messages stream relayed in
arbitrary chunks keeps its usage and holds its last event back; each API's
cache counters are scrubbed; models' tasks and providers' apis are validated."""

from __future__ import annotations

import json

import msgspec
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
