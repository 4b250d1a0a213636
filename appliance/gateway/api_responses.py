"""The OpenAI Responses API (POST /v1/responses): what the appliance reads from a
request, the usage it charges from an answer or a streamed event, and the event
that ends a stream the engine broke.

As for chat, only the fields the appliance acts on are declared; the body goes
to the engine byte for byte. State (``store: true``, ``previous_response_id``,
``background``) needs an engine that keeps responses (appliance/capabilities.py).
"""

from __future__ import annotations

import time
from typing import Any

import msgspec

from appliance.errors import BadRequest
from appliance.gateway.metering import Usage
from appliance.gateway.protocol import Count, Name, Probability, Temperature, TopLogprobs
from appliance.gateway.sse import EventRewriter, decode_object, encode, head_of


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
    temperature: Temperature | None = None
    top_p: Probability | None = None
    top_logprobs: TopLogprobs | None = None
    tools: list[Any] | None = None
    # "required" or a named tool forces a tool call (capabilities.forces_tool).
    tool_choice: str | dict[str, Any] | None = None
    # vLLM's extra field: the stored Response's id (capabilities.check_fields refuses it).
    request_id: str | None = None

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
TERMINAL_TYPES = frozenset(kind.decode() for kind in TERMINAL)


def stream_error(message: str, type_: str, param: str | None, code: str | None) -> bytes:
    """An ``error`` event, as the Responses API sends one: the typed event's fields,
    and an ``error`` object, which the OpenAI SDK raises as an APIError."""
    error = {"type": type_, "code": code, "message": message, "param": param}
    data = {"type": "error", "code": code, "message": message, "param": param, "sequence_number": 0, "error": error}
    return b"event: error\ndata: " + msgspec.json.encode(data) + b"\n\n"


# What a Response says of the request that made it, when the engine leaves it out
# (llama.cpp's say none of it): the request's own value, else the API's default.
_ECHOED: dict[str, Any] = {
    "error": None,
    "incomplete_details": None,
    "instructions": None,
    "max_output_tokens": None,
    "metadata": {},
    "parallel_tool_calls": True,
    "previous_response_id": None,
    "tool_choice": "auto",
    "tools": [],
    "text": {"format": {"type": "text"}},
    "truncation": "disabled",
}
# Echoed only when the request set them: the engine's own defaults are not the API's.
_ECHOED_IF_SET = ("temperature", "top_p")


def _request_echo(body: bytes) -> dict[str, Any]:
    request = decode_object(body) or {}
    echo = {name: request.get(name, default) for name, default in _ECHOED.items()}
    echo |= {name: request[name] for name in _ECHOED_IF_SET if name in request}
    return echo


def _named_call(item: object) -> None:
    """A function call item's ``id``: its ``call_id`` where the engine gave none
    (llama.cpp's items have no id, and its argument deltas name the call_id as their
    item_id; the openai SDK's stream took every such item for the first one)."""
    if isinstance(item, dict) and item.get("type") == "function_call" and isinstance(item.get("call_id"), str):
        item.setdefault("id", item["call_id"])


def _filled(response: dict[str, Any], echo: dict[str, Any], model: str) -> dict[str, Any]:
    response.setdefault("object", "response")
    response.setdefault("created_at", int(time.time()))
    if model:
        response.setdefault("model", model)
    for name, value in echo.items():
        response.setdefault(name, value)
    return response


# Why an answer stopped short, as the Responses API says it (incomplete_details.reason),
# for the engine's finish reason.
INCOMPLETE_REASONS = {"length": "max_output_tokens", "content_filter": "content_filter"}


def _output_cap(body: bytes) -> int | None:
    request = decode_object(body) or {}
    cap = request.get("max_output_tokens")
    return cap if isinstance(cap, int) and not isinstance(cap, bool) else None


def _finish_reason(response: dict[str, Any], cap: int | None) -> str | None:
    """Why the engine stopped a Response it calls completed: "length" when it made as
    many tokens as max_output_tokens allowed (llama-server's Responses say "completed"
    whatever stopped them: its finish reason is only in its chat answers)."""
    usage = response.get("usage")
    made = usage.get("output_tokens") if isinstance(usage, dict) else None
    if cap is not None and isinstance(made, int) and made >= cap:
        return "length"
    return None


def settle_status(response: dict[str, Any], cap: int | None) -> bool:
    """Mark a Response the engine cut short ``incomplete``, with the reason the API
    gives (``incomplete_details``) and its last output item, the one the cap cut,
    ``incomplete``: what the SDKs and apps read to know the answer is not whole (the
    items before it were whole). True: it was changed."""
    if response.get("status") != "completed":
        return False
    reason = INCOMPLETE_REASONS.get(_finish_reason(response, cap) or "")
    if reason is None:
        return False
    response["status"] = "incomplete"
    response["incomplete_details"] = {"reason": reason}
    output = response.get("output")
    last = output[-1] if isinstance(output, list) and output else None
    if isinstance(last, dict) and last.get("status") == "completed":  # the item the cap cut
        last["status"] = "incomplete"
    return True


def whole_answer(body: bytes, data: bytes) -> bytes:
    """A whole Response with every field the API gives (the request's instructions,
    tools, ... where the engine left them out), and ``incomplete`` when cut short."""
    answer = decode_object(data)
    if answer is None or answer.get("object") != "response":
        return data
    settled = settle_status(answer, _output_cap(body))
    missing = [name for name in _ECHOED if name not in answer]
    if not missing and not settled:
        return data
    return encode(_filled(answer, _request_echo(body), ""))


def refuse_streamed_retrieve(params: Any) -> None:
    """A 400 naming ``stream`` for GET /v1/responses/{id}?stream=true (the openai SDK's
    ``responses.retrieve(id, stream=True)``, which replays a background response's
    events): the daemon answers a stored Response whole only, and the SDK read that
    JSON as a stream of no events, without an error."""
    asked = params.get("stream")
    if asked is not None and asked.lower() not in ("false", "0"):
        raise BadRequest(
            "A stored response is answered whole here, not replayed as a stream: "
            "retrieve it without 'stream' (and 'starting_after')",
            param="stream",
            code="stream_not_supported",
        )


def stored_answer(data: bytes, cap: int | None) -> bytes:
    """A stored Response as GET /v1/responses/{id} (or its cancel) answers it: cut at
    the cap its request gave the engine, ``incomplete`` as its create said (the engine
    keeps the status it gave: llama-server-like engines say "completed" whatever
    stopped them)."""
    answer = decode_object(data)
    if answer is None or answer.get("object") != "response" or not settle_status(answer, cap):
        return data
    return encode(answer)


# The events that name the output item (and content part) they are about.
_ITEM_EVENTS = ("response.output_item.added", "response.output_item.done")
_LIFECYCLE = ("response.created", "response.in_progress", "response.queued")
_DELTAS = ("response.output_text.delta", "response.function_call_arguments.delta")


class ResponsesEvents(EventRewriter):
    """A Responses stream as the API sends it, whatever the engine sent: each event
    numbered (``sequence_number``), each item event naming its ``output_index`` (and
    ``content_index``), the response in ``response.created`` whole, and a function
    call's ``response.function_call_arguments.done`` before its item is done.
    llama.cpp's events lack all of it, and the openai SDK's ``responses.stream()``
    raises without it; an answer cut at its cap ends with ``response.incomplete``
    (``settle_status``), and the ``response.output_item.done`` just before it says the
    item's status the final response gives it: that event is held until the next
    one comes, to know whether the next one ends a cut answer. An engine whose first
    event is numbered is passed on as it is."""

    def __init__(self, body: bytes) -> None:
        super().__init__()
        self._body = body
        self._echo: dict[str, Any] | None = None
        self._model = ""
        self._sequence = 0
        self._indexes: dict[str, int] = {}  # output item id -> its output_index
        self._parts: dict[str, int] = {}  # output item id -> its content parts so far
        self._arguments_done: set[str] = set()
        self._done: dict[int, Any] = {}  # output_index -> the item its output_item.done gave
        self._held: dict[str, Any] | None = None  # an output_item.done, until the event after it

    def fix(self, data: dict[str, Any]) -> list[dict[str, Any]]:
        if self._sequence == 0 and "sequence_number" in data:
            self.passing = True
            return [data]
        kind = data.get("type")
        response = data.get("response")
        if isinstance(response, dict):
            self._fill_response(kind, response)
            if kind == "response.completed" and settle_status(response, _output_cap(self._body)):
                kind = data["type"] = "response.incomplete"  # the event that ends a cut answer
        out = [data]
        if kind in _ITEM_EVENTS:
            out = self._item_event(kind, data)
        elif isinstance(data.get("item_id"), str):
            out = [*self._unannounced(kind, data["item_id"]), data]
            self._part_event(kind, data)
        if self._held is not None:
            out.insert(0, self._released(self._held, response if kind in TERMINAL_TYPES else None))
        if out[-1].get("type") == "response.output_item.done":
            self._held = out.pop()
        return self._numbered(out)

    def rest(self) -> bytes:
        """A held output_item.done the stream ended after (no terminal event came), then
        an unfinished last event, as it came."""
        held = b""
        if self._held is not None:
            [event] = self._numbered([self._released(self._held, None)])
            held = head_of(event, b"data: ") + encode(event) + b"\n\n"
        return held + super().rest()

    def _released(self, event: dict[str, Any], final: object) -> dict[str, Any]:
        """The held output_item.done, its item's status the one the final response gives
        the same item (a cut answer's last item is ``incomplete``, settle_status)."""
        self._held = None
        item = event.get("item")
        output = final.get("output") if isinstance(final, dict) else None
        if isinstance(item, dict) and isinstance(output, list):
            same = [o for o in output if isinstance(o, dict) and o.get("id") == item.get("id")]
            if same and "status" in same[-1]:
                item["status"] = same[-1]["status"]
        return event

    def _numbered(self, out: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for event in out:
            event.setdefault("sequence_number", self._sequence)
            self._sequence += 1
        return out

    def _fill_response(self, kind: object, response: dict[str, Any]) -> None:
        if self._echo is None:
            self._echo = _request_echo(self._body)
        self._model = response.get("model") or self._model or (decode_object(self._body) or {}).get("model", "")
        _filled(response, self._echo, self._model)
        if kind in _LIFECYCLE:
            response.setdefault("output", [])
        elif not response.get("output") and self._done:  # the items the stream finished
            response["output"] = [self._done[index] for index in sorted(self._done)]
        for item in response.get("output") or ():
            _named_call(item)

    def _index(self, item_id: object) -> int:
        if not isinstance(item_id, str):
            return len(self._indexes)
        return self._indexes.setdefault(item_id, len(self._indexes))

    def _item_event(self, kind: object, data: dict[str, Any]) -> list[dict[str, Any]]:
        item = data.get("item")
        item = item if isinstance(item, dict) else {}
        _named_call(item)
        item_id = item.get("id")
        data.setdefault("output_index", self._index(item_id))
        if kind == "response.output_item.done" and item:
            self._done[data["output_index"]] = item
        out = [data]
        if (
            kind == "response.output_item.done"
            and item.get("type") == "function_call"
            and item_id not in self._arguments_done
        ):
            done = {
                "type": "response.function_call_arguments.done",
                "item_id": item_id,
                "output_index": data["output_index"],
                "name": item.get("name"),
                "arguments": item.get("arguments", ""),
            }
            out.insert(0, done)
        return out

    def _unannounced(self, kind: object, item_id: str) -> list[dict[str, Any]]:
        """The output_item.added (and content_part.added) an engine left out before
        the first delta of its item: the SDK's stream accumulates into them."""
        if item_id in self._indexes or kind not in _DELTAS:
            return []
        index = self._index(item_id)
        if kind == "response.function_call_arguments.delta":
            call = {"type": "function_call", "id": item_id, "call_id": item_id, "name": "", "arguments": ""}
            return [{"type": "response.output_item.added", "output_index": index, "item": call}]
        self._parts[item_id] = 1
        message = {"type": "message", "id": item_id, "role": "assistant", "status": "in_progress", "content": []}
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        return [
            {"type": "response.output_item.added", "output_index": index, "item": message},
            {
                "type": "response.content_part.added",
                "item_id": item_id,
                "output_index": index,
                "content_index": 0,
                "part": part,
            },
        ]

    def _part_event(self, kind: object, data: dict[str, Any]) -> None:
        item_id = data["item_id"]
        data.setdefault("output_index", self._index(item_id))
        if kind == "response.function_call_arguments.done":
            self._arguments_done.add(item_id)
        if kind in ("response.function_call_arguments.delta", "response.function_call_arguments.done"):
            return
        if kind == "response.content_part.added":
            self._parts[item_id] = self._parts.get(item_id, 0) + 1
        data.setdefault("content_index", max(self._parts.get(item_id, 1) - 1, 0))
        if kind in ("response.output_text.delta", "response.output_text.done"):
            data.setdefault("logprobs", [])


def chat_format_fields(body: bytes) -> dict[str, Any]:
    """A Responses request's structured output (``text.format``) as chat's
    ``response_format``, for an engine that turns a Responses request into a chat one
    and reads chat's field only (llama-server ignored text.format and answered in words
    where a JSON object was asked). Nothing when the request sets neither or both."""
    if b'"format"' not in body:
        return {}
    request = decode_object(body) or {}
    text = request.get("text")
    shape = text.get("format") if isinstance(text, dict) else None
    if not isinstance(shape, dict) or "response_format" in request:
        return {}
    if shape.get("type") == "json_object":
        return {"response_format": {"type": "json_object"}}
    if shape.get("type") == "json_schema":
        schema = {k: v for k, v in shape.items() if k in ("name", "schema", "strict", "description")}
        return {"response_format": {"type": "json_schema", "json_schema": schema}}
    return {}
