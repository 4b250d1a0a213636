"""The input items of a stored Response, as ``GET /v1/responses/{id}/input_items``
lists them (the openai SDK's ``client.responses.input_items.list``).

No engine the appliance runs lists them (vLLM keeps a stored Response, not an
endpoint for its input), so the daemon keeps each stored Response's ``input`` as
the request sent it, next to where the Response lives (response_homes.py), and
makes the API's items of it here, a page at a time: a string input is one user
message, a message whose content is a string gets its content parts, and every item
an id (the one it came with, else one made from the Response's id and its place, the
same on every call, so ``after`` pages through them).
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator
from typing import Any

import msgspec

from appliance.errors import BadRequest, quoted

DEFAULT_LIMIT = 20
MAX_LIMIT = 100
ORDERS = ("asc", "desc")
# What ``include`` may ask for (the API's list); none of it is kept beyond the input
# itself, so an item has what its request gave, as the API answers a request without it.
INCLUDABLE = frozenset(
    {
        "code_interpreter_call.outputs",
        "computer_call_output.output.image_url",
        "file_search_call.results",
        "message.input_image.image_url",
        "message.output_text.logprobs",
        "reasoning.encrypted_content",
        "web_search_call.action.sources",
    }
)


class _Kept(msgspec.Struct, omit_defaults=True):
    """What the daemon keeps of a stored Response's request."""

    input: msgspec.Raw = msgspec.Raw(b"null")
    # The cap the engine was given: a GET of the Response says it was cut as its create did.
    max_output_tokens: int | None = None


_KEPT = msgspec.json.Decoder(_Kept)


def request_input(body: bytes) -> bytes:
    """What the daemon keeps of a Responses request (body: as the engine got it, with
    the cap the appliance set): its ``input``, as the JSON it sent, and its
    ``max_output_tokens``."""
    try:
        kept = _KEPT.decode(body)
    except msgspec.MsgspecError:
        return b""
    return msgspec.json.encode(kept)


def _kept(kept: bytes) -> _Kept:
    try:
        return _KEPT.decode(kept) if kept else _Kept()
    except msgspec.MsgspecError:
        return _Kept()


def kept_cap(kept: bytes) -> int | None:
    """The max_output_tokens the kept request gave its engine."""
    return _kept(kept).max_output_tokens


class Query(msgspec.Struct, frozen=True):
    after: str | None
    limit: int
    order: str
    include: tuple[str, ...]


def query(params: Any) -> Query:
    """The list's query parameters (a multi-dict: ``include`` may repeat), checked: a
    400 naming the one that is wrong."""
    raw = params.get("limit", str(DEFAULT_LIMIT))
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise BadRequest(f"limit must be a whole number from 1 to {MAX_LIMIT}, not {quoted(raw)}", param="limit")
    order = params.get("order", "desc")
    if order not in ORDERS:
        raise BadRequest(f"order must be 'asc' or 'desc', not {quoted(order)}", param="order")
    include = (*params.getall("include[]", []), *params.getall("include", []))
    for name in include:
        if name not in INCLUDABLE:
            raise BadRequest(f"include {quoted(name)} is not one of {', '.join(sorted(INCLUDABLE))}", param="include")
    after = params.get("after")
    if after == "":
        raise BadRequest("after must name an item id", param="after")
    return Query(after, int(raw), order, include)


def _base(response_id: str) -> str:
    """The part of a made id that names the Response: made once per listing."""
    return hashlib.blake2b(response_id.encode(), digest_size=8).hexdigest()


def _parts(role: str, content: Any) -> Any:
    if isinstance(content, str):
        kind = "output_text" if role == "assistant" else "input_text"
        return [{"type": kind, "text": content}]
    return content


_RAWS = msgspec.json.Decoder(list[msgspec.Raw])


def _given(kept: bytes) -> list[Any]:
    """The kept input's items, each as the JSON the request gave (decoded when read:
    a page reads only its own), or the one user message a string input is."""
    raw = _kept(kept).input
    try:
        return _RAWS.decode(raw)
    except msgspec.DecodeError:  # not a list
        pass
    try:
        given = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return []
    return [{"role": "user", "content": given}] if isinstance(given, str) else []


def _walk(given: list[Any], places: range) -> Iterator[tuple[int, dict[str, Any]]]:
    """The items at these places, each with its place (what is no object, skipped)."""
    for place in places:
        item = given[place]
        if isinstance(item, msgspec.Raw):
            try:
                item = msgspec.json.decode(item)
            except msgspec.DecodeError:
                continue
        if isinstance(item, dict):
            yield place, item


def _id(entry: tuple[int, dict[str, Any]], base: str) -> str:
    """An item's id: the one it came with, else one made from the Response's id and the
    item's place, the same on every call (a cursor stays valid)."""
    place, item = entry
    given = item.get("id")
    if given is not None:
        return str(given)
    return f"{'msg' if item.get('type', 'message') == 'message' else 'item'}_{base}{place:08x}"


def _item(entry: tuple[int, dict[str, Any]], base: str) -> dict[str, Any]:
    """One item as the API lists it."""
    item = dict(entry[1])
    if item.setdefault("type", "message") == "message":
        role = item.setdefault("role", "user")
        item["content"] = _parts(role, item.get("content", []))
        item.setdefault("status", "completed")
    item["id"] = _id(entry, base)
    return item


def items(kept: bytes, response_id: str) -> list[dict[str, Any]]:
    """The input items of the Response, in the order its request gave them."""
    base = _base(response_id)
    given = _given(kept)
    return [_item(entry, base) for entry in _walk(given, range(len(given)))]


def _made_place(item_id: str, base: str) -> int | None:
    """The place a made id names (None: not one made for this Response)."""
    prefix, _, tail = item_id.partition("_")
    if prefix not in ("msg", "item") or len(tail) != len(base) + 8 or not tail.startswith(base):
        return None
    try:
        return int(tail[len(base) :], 16)
    except ValueError:
        return None


def _places_after(given: list[Any], places: range, after: str, base: str) -> range:
    """The places that follow the item ``after`` names: a made id says its place, an
    item's own id is looked for in the list's order."""
    place = _made_place(after, base)
    if place is not None and place in places:
        found = next(_walk(given, range(place, place + 1)), None)
        if found is not None and _id(found, base) == after:
            return places[places.index(place) + 1 :]
    for entry in _walk(given, places):
        if _id(entry, base) == after:
            return places[places.index(entry[0]) + 1 :]
    raise BadRequest(f"after {quoted(after)} is no input item of this response", param="after")


def page(kept: bytes, response_id: str, asked: Query) -> dict[str, Any]:
    """One page of the list, in the API's shape. Only the page's items are read and
    made (and, to find ``after`` by an item's own id, the ids before it): a Response
    may keep up to 100,000 input items, and each call was making all of them
    (23 ms for 10,000) on the daemon's loop."""
    given = _given(kept)
    base = _base(response_id)
    places = range(len(given)) if asked.order == "asc" else range(len(given) - 1, -1, -1)
    if asked.after is not None:
        places = _places_after(given, places, asked.after, base)
    chosen = list(itertools.islice(_walk(given, places), asked.limit + 1))
    data = [_item(entry, base) for entry in chosen[: asked.limit]]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": len(chosen) > asked.limit,
    }


def listed(kept: bytes, response_id: str, asked: Query) -> bytes:
    """The answer to GET .../input_items: the asked page of the kept input's items."""
    return msgspec.json.encode(page(kept, response_id, asked))


__all__ = ["Query", "items", "kept_cap", "listed", "page", "query", "request_input"]
