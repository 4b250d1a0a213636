"""The OpenAI Responses API (POST /v1/responses): what the appliance reads from a
request, the usage it charges from an answer or a streamed event, and the event
that ends a stream the engine broke.

As for chat, only the fields the appliance acts on are declared; the body goes
to the engine byte for byte. State (``store: true``, ``previous_response_id``,
``background``) needs an engine that keeps responses (appliance/capabilities.py).
"""

from __future__ import annotations

from typing import Any

import msgspec

from appliance.gateway.metering import Usage
from appliance.gateway.protocol import Count, Name


class ResponsesRequest(msgspec.Struct, kw_only=True):
    model: Name
    # A string, or a list of input items (messages, function call outputs, ...).
    input: str | list[Any]
    instructions: str | None = None
    stream: bool = False
    max_output_tokens: Count | None = None
    store: bool | None = None
    previous_response_id: str | None = None
    background: bool | None = None
    temperature: float | None = None
    top_p: float | None = None
    tools: list[Any] | None = None
    # "required" or a named tool forces a tool call (capabilities.forces_tool).
    tool_choice: str | dict[str, Any] | None = None

    @property
    def stateful(self) -> bool:
        """Whether the request needs the engine to keep (or find) a stored response."""
        return bool(self.store) or bool(self.background) or self.previous_response_id is not None


class _Usage(msgspec.Struct):
    input_tokens: int = 0
    output_tokens: int = 0


class _Answer(msgspec.Struct):
    id: str = ""
    usage: _Usage | None = None
    # A streamed event carries the response (and its usage) one level down.
    response: _Answer | None = None


_DECODER = msgspec.json.Decoder(_Answer)


def usage(data: bytes) -> Usage | None:
    """Usage of a whole response, or of a response.completed/incomplete/failed event."""
    return usage_and_id(data)[0]


def usage_and_id(data: bytes) -> tuple[Usage | None, str]:
    """Usage and id of a whole response, or of the response in a stream's event: one
    parse, for a response the engine stores (its id goes into appliance/gateway/response_homes.py)."""
    try:
        top = _DECODER.decode(data)
    except msgspec.MsgspecError:
        return None, ""
    inner = top.response
    found = top.usage or (inner.usage if inner is not None else None)
    made = inner.id if inner is not None else top.id
    return (Usage(found.input_tokens, found.output_tokens) if found is not None else None), made


# The events that end a stream: held until the request's accounting is durable.
TERMINAL = (b"response.completed", b"response.incomplete", b"response.failed")


def stream_error(message: str, type_: str, param: str | None, code: str | None) -> bytes:
    """An ``error`` event, as the Responses API sends one: the typed event's fields,
    and an ``error`` object, which the OpenAI SDK raises as an APIError."""
    error = {"type": type_, "code": code, "message": message, "param": param}
    data = {"type": "error", "code": code, "message": message, "param": param, "sequence_number": 0, "error": error}
    return b"event: error\ndata: " + msgspec.json.encode(data) + b"\n\n"
