"""The Anthropic Messages API (POST /v1/messages, /v1/messages/count_tokens):
what the appliance reads from a request, the usage it charges, and errors in
Anthropic's own envelope and stream event.

Clients send their key as ``x-api-key`` (or ``Authorization: Bearer``) and an
``anthropic-version`` header; both are accepted (appliance/api/app.py). Anthropic's
``input_tokens`` leaves out the prompt tokens read from (or written to) the
prompt cache: the charge counts them all.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from appliance.gateway.metering import Usage
from appliance.gateway.protocol import Count, Name, Probability
from appliance.gateway.sse import EventRewriter, decode_object, encode


class ContentBlock(msgspec.Struct):
    """A message's content block as the appliance reads it: its type, and a tool_result's
    content (the blocks inside it; the engine reads the rest from the body as it was sent)."""

    type: str
    # A tool_result's content: a string or blocks. Any, read in block_kinds: a field
    # of another block's shape is not this request's to refuse.
    content: Any = None


class AnthropicMessage(msgspec.Struct, kw_only=True):
    role: Literal["user", "assistant"]
    # A string, or a list of content blocks (text, image, tool_use, tool_result, ...).
    content: str | list[ContentBlock]


class CountTokensRequest(msgspec.Struct, kw_only=True):
    model: Name
    messages: Annotated[list[AnthropicMessage], msgspec.Meta(min_length=1)]
    system: str | list[Any] | None = None
    tools: list[Any] | None = None

    def block_kinds(self) -> tuple[tuple[str, str], ...]:
        """Each content block type the messages hold, with where it first is
        (``messages[i].content[j]``, or ``messages[i].content[j].content[k]`` inside a
        tool_result's content): what capabilities.check_blocks reads."""
        seen: dict[str, str] = {}
        for i, message in enumerate(self.messages):
            if isinstance(message.content, str):
                continue
            for j, block in enumerate(message.content):
                where = f"messages[{i}].content[{j}]"
                seen.setdefault(block.type, where)
                if isinstance(block.content, list):
                    for k, inner in enumerate(block.content):
                        if isinstance(inner, dict) and isinstance(inner.get("type"), str):
                            seen.setdefault(inner["type"], f"{where}.content[{k}]")
        return tuple(seen.items())


class MessagesRequest(CountTokensRequest):
    # Required by the Messages API: the budget reserves for it.
    max_tokens: Count
    stream: bool = False
    # Anthropic's bounds: a temperature from 0 to 1 (OpenAI's goes to 2), a nucleus from 0 to 1.
    temperature: Probability | None = None
    top_p: Probability | None = None
    top_k: int | None = None
    stop_sequences: list[str] | None = None
    # {"type": "any"} or {"type": "tool", ...} forces a tool call (capabilities.forces_tool).
    tool_choice: str | dict[str, Any] | None = None


class _Usage(msgspec.Struct):
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_input_tokens: int | None = None
    cache_creation_input_tokens: int | None = None


class _WithUsage(msgspec.Struct):
    usage: _Usage | None = None
    # message_start carries the prompt's usage in its message.
    message: _WithUsage | None = None


_DECODER = msgspec.json.Decoder(_WithUsage)


def usage(data: bytes) -> Usage | None:
    """Usage of a whole message, or of a message_start / message_delta event (the
    stream's relay keeps the largest of each count: output_tokens grows)."""
    try:
        top = _DECODER.decode(data)
    except msgspec.MsgspecError:
        return None
    found = top.usage or (top.message.usage if top.message is not None else None)
    if found is None:
        return None
    prompt = found.input_tokens + (found.cache_read_input_tokens or 0) + (found.cache_creation_input_tokens or 0)
    return Usage(prompt, found.output_tokens)


TERMINAL = (b"message_stop",)

# Our status codes as Anthropic's error types (https://docs.anthropic.com/en/api/errors).
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "request_too_large",
    415: "invalid_request_error",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
}


def error_type(status: int) -> str:
    return _TYPES.get(status, "api_error")


class AnthropicErrorBody(msgspec.Struct):
    type: str
    message: str


class AnthropicError(msgspec.Struct, tag="error", tag_field="type"):
    """Anthropic's error envelope: {"type": "error", "error": {"type", "message"}}."""

    error: AnthropicErrorBody


def envelope(status: int, message: str) -> bytes:
    return msgspec.json.encode(AnthropicError(AnthropicErrorBody(error_type(status), message)))


def stream_error(status: int, message: str) -> bytes:
    return b"event: error\ndata: " + envelope(status, message) + b"\n\n"


def _stop_sequences(body: bytes) -> list[str]:
    asked = (decode_object(body) or {}).get("stop_sequences")
    return [s for s in asked if isinstance(s, str)] if isinstance(asked, list) else []


def _fix_stop(said: dict[str, Any], asked: list[str]) -> None:
    """Anthropic's rule: ``stop_sequence`` names the request's stop sequence that ended
    the answer, and then only, with ``stop_reason`` "stop_sequence". llama.cpp says
    "end_turn" with the word it stopped on (one of the chat template's own, too)."""
    reason, sequence = said.get("stop_reason"), said.get("stop_sequence")
    if reason is None and sequence is None:
        return
    if sequence is not None and sequence in asked and reason in ("end_turn", "stop_sequence"):
        said["stop_reason"] = "stop_sequence"
        return
    said["stop_sequence"] = None
    if reason == "stop_sequence":
        said["stop_reason"] = "end_turn"


def _prefill(body: bytes) -> str:
    """The text of the assistant turn a request ends on (Anthropic's prefill, which the
    answer continues); "" when it ends on the user's turn or the turn holds other blocks."""
    messages = (decode_object(body) or {}).get("messages")
    last = messages[-1] if isinstance(messages, list) and messages else None
    if not isinstance(last, dict) or last.get("role") != "assistant":
        return ""
    content = last.get("content")
    if isinstance(content, list) and all(isinstance(b, dict) and b.get("type") == "text" for b in content):
        content = "".join(str(b.get("text") or "") for b in content)
    return content if isinstance(content, str) else ""


def _echoes_prefill(message: dict[str, Any]) -> bool:
    """llama.cpp's answer (its chat id, ``chatcmpl-...``) starts with the prefill it
    continued; Anthropic's is only what the model added."""
    made = message.get("id")
    return isinstance(made, str) and made.startswith("chatcmpl-")


def _drop_prefill(message: dict[str, Any], prefill: str) -> None:
    content = message.get("content")
    first = content[0] if isinstance(content, list) and content else None
    if isinstance(first, dict) and first.get("type") == "text":
        text = first.get("text")
        if isinstance(text, str) and text.startswith(prefill):
            first["text"] = text[len(prefill) :]


def tool_choice_fields(body: bytes) -> dict[str, Any]:
    """A Messages request's tool_choice as the tools llama-server is given: it reads
    only "auto" and "any"/"tool" (as chat's "required", any tool), so a named tool is
    honoured by giving it that tool alone, and "none" by giving it none (it let the
    model call one). Nothing for any other choice, or a name no tool has."""
    if b'"tool_choice"' not in body:
        return {}
    request = decode_object(body) or {}
    choice, tools = request.get("tool_choice"), request.get("tools")
    if not isinstance(choice, dict) or not isinstance(tools, list) or not tools:
        return {}
    if choice.get("type") == "none":
        return {"tools": []}
    if choice.get("type") == "tool":
        named = [t for t in tools if isinstance(t, dict) and t.get("name") == choice.get("name")]
        return {"tools": named} if named and len(named) < len(tools) else {}
    return {}


def _fix_id(message: dict[str, Any]) -> None:
    """A message's id as Anthropic's: ``msg_...`` (llama.cpp's is chat's ``chatcmpl-...``)."""
    made = message.get("id")
    if isinstance(made, str) and not made.startswith("msg_"):
        message["id"] = "msg_" + made.removeprefix("chatcmpl-")


def whole_answer(body: bytes, data: bytes) -> bytes:
    """A whole message with Anthropic's id and stop rule, whatever the engine said."""
    if b'"chatcmpl-' not in data and b'"stop_sequence":null' in data:
        return data  # nothing to fix: the cheap look first
    message = decode_object(data)
    if message is None or message.get("type") != "message":
        return data
    if _echoes_prefill(message) and (prefill := _prefill(body)):
        _drop_prefill(message, prefill)
    _fix_id(message)
    _fix_stop(message, _stop_sequences(body))
    return encode(message)


class MessagesEvents(EventRewriter):
    """A Messages stream with Anthropic's id (message_start), stop rule
    (message_delta), a tool_use block's ``input`` from its start (llama.cpp's has
    none: a call without arguments left the SDK's block with no input) and, after a
    prefill, only the text the model added (llama.cpp's first deltas repeat the
    prefill); each block stopped before the next one starts, as Anthropic's API
    streams them (llama.cpp stops every block at the end, after the last tool call's
    deltas); its other events pass on as they came."""

    def __init__(self, body: bytes) -> None:
        super().__init__()
        self._body = body
        self._prefill = ""  # what is left of the prefill to take off the first text deltas
        self._open: object = None  # the index of the block started and not yet stopped
        self._stopped: set[object] = set()  # blocks stopped already (their later stop is dropped)

    def _event(self, event: bytes) -> bytes:
        if (
            b"message_start" not in event
            and b"message_delta" not in event
            and b"content_block_st" not in event  # a block's start or stop
            and b'"tool_use"' not in event
            and not (self._prefill and b'"text_delta"' in event)
        ):
            return event + b"\n\n"
        return super()._event(event)

    def _without_prefill(self, delta: dict[str, Any]) -> list[dict[str, Any]] | None:
        """The prefill taken off a text delta: None keeps the event as it is now, []
        drops it (it held nothing but prefill)."""
        text, prefill = delta.get("text"), self._prefill
        if not isinstance(text, str):
            self._prefill = ""
        elif text.startswith(prefill):
            delta["text"], self._prefill = text[len(prefill) :], ""
        elif prefill.startswith(text):
            delta["text"], self._prefill = "", prefill[len(text) :]
        else:  # not the prefill after all: the answer goes on as it came
            self._prefill = ""
        return [] if delta.get("text") == "" else None

    def fix(self, data: dict[str, Any]) -> list[dict[str, Any]]:
        kind = data.get("type")
        if kind == "message_start" and isinstance(data.get("message"), dict):
            if _echoes_prefill(data["message"]):
                self._prefill = _prefill(self._body)
            _fix_id(data["message"])
        elif kind == "content_block_delta" and self._prefill and isinstance(delta := data.get("delta"), dict):
            if delta.get("type") == "text_delta" and (kept := self._without_prefill(delta)) is not None:
                return kept
        elif kind == "message_delta" and isinstance(data.get("delta"), dict):
            _fix_stop(data["delta"], _stop_sequences(self._body))
        elif kind == "content_block_start":
            if isinstance(block := data.get("content_block"), dict) and block.get("type") == "tool_use":
                block.setdefault("input", {})
            return self._started(data)
        elif kind == "content_block_stop":
            return self._stop(data.get("index"))
        return [data]

    def _started(self, start: dict[str, Any]) -> list[dict[str, Any]]:
        """A block's start, after the stop of the block still open (llama.cpp's comes
        only at the end)."""
        before = [] if self._open is None else self._stop(self._open)
        self._open = start.get("index")
        return [*before, start]

    def _stop(self, index: object) -> list[dict[str, Any]]:
        """A block's stop, once: the engine's own later stop of it is dropped."""
        if self._open == index:
            self._open = None
        if index in self._stopped:
            return []
        self._stopped.add(index)
        return [{"type": "content_block_stop", "index": index}]
