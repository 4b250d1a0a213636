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
from appliance.gateway.protocol import Count, Name
from appliance.gateway.sse import EventRewriter, decode_object, encode


class AnthropicMessage(msgspec.Struct, kw_only=True):
    role: Literal["user", "assistant"]
    # A string, or a list of content blocks (text, image, tool_use, tool_result, ...).
    content: str | list[Any]


class CountTokensRequest(msgspec.Struct, kw_only=True):
    model: Name
    messages: Annotated[list[AnthropicMessage], msgspec.Meta(min_length=1)]
    system: str | list[Any] | None = None
    tools: list[Any] | None = None


class MessagesRequest(CountTokensRequest):
    # Required by the Messages API: the budget reserves for it.
    max_tokens: Count
    stream: bool = False
    temperature: float | None = None
    top_p: float | None = None
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
    _fix_id(message)
    _fix_stop(message, _stop_sequences(body))
    return encode(message)


class MessagesEvents(EventRewriter):
    """A Messages stream with Anthropic's id (message_start), stop rule
    (message_delta) and a tool_use block's ``input`` from its start (llama.cpp's has
    none: a call without arguments left the SDK's block with no input); its other
    events pass on as they came."""

    def __init__(self, body: bytes) -> None:
        super().__init__()
        self._body = body

    def _event(self, event: bytes) -> bytes:
        if b"message_start" not in event and b"message_delta" not in event and b'"tool_use"' not in event:
            return event + b"\n\n"
        return super()._event(event)

    def fix(self, data: dict[str, Any]) -> list[dict[str, Any]]:
        kind = data.get("type")
        if kind == "message_start" and isinstance(data.get("message"), dict):
            _fix_id(data["message"])
        elif kind == "message_delta" and isinstance(data.get("delta"), dict):
            _fix_stop(data["delta"], _stop_sequences(self._body))
        elif kind == "content_block_start" and isinstance(block := data.get("content_block"), dict):
            if block.get("type") == "tool_use":
                block.setdefault("input", {})
        return [data]
