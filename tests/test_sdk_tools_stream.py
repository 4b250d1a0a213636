"""Streamed tool calls as the official SDKs assemble them, through the real daemon,
from a fake engine that streams its calls the way llama-server does (tests/fake_engine.py
--tool-calls): OpenAI chat deltas, Anthropic Messages tool_use blocks (the engine's own
Messages stream, fixed by api_messages.MessagesEvents) and Responses function_call items
(fixed by api_responses.ResponsesEvents)."""

from __future__ import annotations

import json

import anthropic
import openai
import pytest

from .conftest import fake_model

CHAT_TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}]
MESSAGES_TOOLS = [{"name": t["function"]["name"], "input_schema": t["function"]["parameters"]} for t in CHAT_TOOLS]
RESPONSES_TOOLS = [{"type": "function", "name": t["function"]["name"], "parameters": t["function"]["parameters"]}
                   for t in CHAT_TOOLS]
ASK = [{"role": "user", "content": "Weather and time in Paris?"}]
MODELS = fake_model("one-call", "--tool-calls", "1") + fake_model("two-calls", "--tool-calls", "2")


def _arguments(k: int) -> dict:
    """What the fake engine's k-th call's argument pieces make whole."""
    return {"city": "Paris", "call": k}


@pytest.fixture(scope="module", params=[1, 2], ids=["one_worker", "two_workers"])
def daemon(request, tmp_path_factory):
    from .conftest import DaemonFactory

    factory = DaemonFactory(tmp_path_factory.mktemp("tools"))
    server = "" if request.param == 1 else "workers = 2"
    yield factory.start(MODELS, server=server)
    factory.cleanup()


@pytest.fixture
def oai(daemon):
    return openai.OpenAI(base_url=daemon.url + "/v1", api_key="unused", max_retries=0, timeout=30)


@pytest.fixture
def claude(daemon):
    return anthropic.Anthropic(base_url=daemon.url, api_key="unused", max_retries=0, timeout=30)


# --- OpenAI chat ----------------------------------------------------------------------


@pytest.mark.parametrize("model,calls", [("one-call", 1), ("two-calls", 2)])
def test_a_streamed_chat_tool_call_is_assembled_whole_by_the_sdks_stream_helper(oai, model, calls):
    with oai.chat.completions.stream(model=model, messages=ASK, tools=CHAT_TOOLS,
                                     stream_options={"include_usage": True}) as stream:
        events = list(stream)
        final = stream.get_final_completion()
    [choice] = final.choices
    assert choice.finish_reason == "tool_calls"
    made = choice.message.tool_calls
    assert [c.id for c in made] == [f"call_fake{k}" for k in range(calls)]
    assert [c.function.name for c in made] == ["get_weather", "get_time"][:calls]
    assert [json.loads(c.function.arguments) for c in made] == [_arguments(k) for k in range(calls)]
    # The SDK's parsed arguments and its per-call done events say the same.
    done = [e for e in events if e.type == "tool_calls.function.arguments.done"]
    assert [(e.index, e.name, json.loads(e.arguments)) for e in done] == [
        (k, ["get_weather", "get_time"][k], _arguments(k)) for k in range(calls)]
    assert final.usage is not None and final.usage.completion_tokens == 6 * calls


def test_streamed_chat_tool_call_deltas_arrive_chunk_for_chunk_as_the_engine_sent_them(oai):
    chunks = list(oai.chat.completions.create(model="two-calls", messages=ASK, tools=CHAT_TOOLS, stream=True,
                                              stream_options={"include_usage": True}))
    deltas = [(c.choices[0].delta, c.choices[0].finish_reason) for c in chunks if c.choices]
    # Each call announced once, whole (index, id, type, name, empty arguments) ...
    heads = [d.tool_calls[0] for d, _ in deltas if d.tool_calls and d.tool_calls[0].id]
    assert [(h.index, h.id, h.type, h.function.name, h.function.arguments) for h in heads] == [
        (0, "call_fake0", "function", "get_weather", ""), (1, "call_fake1", "function", "get_time", "")]
    # ... then its arguments one piece per chunk, none merged or split.
    pieces = [(d.tool_calls[0].index, d.tool_calls[0].function.arguments)
              for d, _ in deltas if d.tool_calls and not d.tool_calls[0].id]
    assert len(pieces) == 10 and [i for i, _ in pieces] == [0] * 5 + [1] * 5
    for k in range(2):
        assert json.loads("".join(p for i, p in pieces if i == k)) == _arguments(k)
    assert [f for _, f in deltas] == [None] * 12 + ["tool_calls"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


# --- Anthropic Messages ---------------------------------------------------------------


@pytest.mark.parametrize("model,calls", [("one-call", 1), ("two-calls", 2)])
def test_a_streamed_messages_tool_use_is_assembled_whole_by_the_sdks_stream_helper(claude, model, calls):
    with claude.messages.stream(model=model, max_tokens=64, messages=ASK, tools=MESSAGES_TOOLS) as stream:
        events = [e.type for e in stream]
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    assert [(b.type, b.id, b.name, b.input) for b in final.content] == [
        ("tool_use", f"call_fake{k}", ["get_weather", "get_time"][k], _arguments(k)) for k in range(calls)]
    assert final.id.startswith("msg_") and final.usage.output_tokens > 0


def test_streamed_messages_tool_use_events_come_in_anthropics_order(claude):
    events = list(claude.messages.create(model="two-calls", max_tokens=64, messages=ASK, tools=MESSAGES_TOOLS,
                                         stream=True))
    kinds = [e.type for e in events]
    block = ["content_block_start"] + ["content_block_delta"] * 5 + ["content_block_stop"]
    assert kinds == ["message_start", *block, *block, "message_delta", "message_stop"]
    starts = [e for e in events if e.type == "content_block_start"]
    assert [(e.index, e.content_block.type, e.content_block.input) for e in starts] == [
        (0, "tool_use", {}), (1, "tool_use", {})]
    deltas = [e for e in events if e.type == "content_block_delta"]
    assert {e.delta.type for e in deltas} == {"input_json_delta"}
    for k in range(2):
        assert json.loads("".join(e.delta.partial_json for e in deltas if e.index == k)) == _arguments(k)
    assert events[-2].delta.stop_reason == "tool_use" and events[-2].usage.output_tokens > 0


# --- Responses ------------------------------------------------------------------------


@pytest.mark.parametrize("model,calls", [("one-call", 1), ("two-calls", 2)])
def test_a_streamed_responses_function_call_is_announced_argued_and_completed(oai, model, calls):
    with oai.responses.stream(model=model, input="Weather and time in Paris?", tools=RESPONSES_TOOLS) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    added = [e for e in events if e.type == "response.output_item.added"]
    assert [(e.output_index, e.item.type, e.item.name) for e in added] == [
        (k, "function_call", ["get_weather", "get_time"][k]) for k in range(calls)]
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert [json.loads(e.arguments) for e in done] == [_arguments(k) for k in range(calls)]
    for k in range(calls):  # each call's deltas, then its done, before the response completes
        item_id = added[k].item.id
        mine = [i for i, e in enumerate(events) if getattr(e, "item_id", None) == item_id]
        assert [kinds[i] for i in mine] == ["response.function_call_arguments.delta"] * 5 + [
            "response.function_call_arguments.done"]
        assert json.loads("".join(events[i].delta for i in mine[:-1])) == _arguments(k)
    assert kinds[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert [(o.type, o.call_id, o.name, json.loads(o.arguments)) for o in final.output] == [
        ("function_call", f"fc_call_fake{k}", ["get_weather", "get_time"][k], _arguments(k)) for k in range(calls)]
    assert final.status == "completed" and final.usage is not None


def test_a_text_block_then_a_tool_use_from_llama_cpp_are_stopped_in_turn_each_once():
    """llama.cpp's text, then a call: both blocks stopped only at the end."""
    from appliance.gateway.api_messages import MessagesEvents

    def event(data: dict) -> bytes:
        return f"event: {data['type']}\ndata: {json.dumps(data)}\n\n".encode()

    engine = [{"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
              {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Let me look."}},
              {"type": "content_block_start", "index": 1,
               "content_block": {"type": "tool_use", "id": "c1", "name": "get_weather"}},
              {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "{}"}},
              {"type": "content_block_stop", "index": 0}, {"type": "content_block_stop", "index": 1}]
    out = MessagesEvents(b"{}").feed(b"".join(event(e) for e in engine))
    sent = [json.loads(e.split(b"data: ", 1)[1]) for e in out.split(b"\n\n") if e]
    assert [(e["type"], e["index"]) for e in sent] == [
        ("content_block_start", 0), ("content_block_delta", 0), ("content_block_stop", 0),
        ("content_block_start", 1), ("content_block_delta", 1), ("content_block_stop", 1)]
    assert sent[3]["content_block"]["input"] == {}
