"""An engine's SSE stream rewritten one whole event at a time, on its way to the
client: the base of the fixes that make an engine's Responses and Messages
streams what the APIs (and their SDKs) promise (appliance/gateway/api_responses.py,
appliance/gateway/api_messages.py).

An event is ``event: TYPE`` (optional) then ``data: {json}``. Pieces arrive cut
anywhere: a piece's unfinished event waits for the rest of it.
"""

from __future__ import annotations

from typing import Any

import msgspec

_ENCODE = msgspec.json.Encoder().encode


class EventRewriter:
    """Subclasses say what to do with one event's JSON (``fix``); ``passing``
    set, every later piece goes on untouched (an engine that needs no fix)."""

    def __init__(self) -> None:
        self._buf = b""
        self.passing = False

    def feed(self, piece: bytes) -> bytes:
        """The whole events this piece completes, rewritten."""
        if self.passing and not self._buf:
            return piece
        data = self._buf + piece
        cut = data.rfind(b"\n\n")
        if cut < 0:
            self._buf = data
            return b""
        complete, self._buf = data[: cut + 2], data[cut + 2 :]
        return b"".join(self._event(event) for event in complete.split(b"\n\n")[:-1])

    def rest(self) -> bytes:
        """An unfinished event the stream ended on, as it came."""
        rest, self._buf = self._buf, b""
        return rest

    def _event(self, event: bytes) -> bytes:
        at = 0 if event.startswith(b"data: ") else event.find(b"\ndata: ") + 1
        if self.passing or (at == 0 and not event.startswith(b"data: ")):
            return event + b"\n\n"
        head, payload = event[: at + 6], event[at + 6 :]
        try:
            parsed = msgspec.json.decode(payload)
        except msgspec.DecodeError:
            return event + b"\n\n"
        if not isinstance(parsed, dict):
            return event + b"\n\n"
        return b"".join(head_of(data, head) + _ENCODE(data) + b"\n\n" for data in self.fix(parsed))

    def fix(self, data: dict[str, Any]) -> list[dict[str, Any]]:
        """The events this one becomes (itself, changed in place, at the least)."""
        raise NotImplementedError


def head_of(data: dict[str, Any], head: bytes) -> bytes:
    """The lines before an event's data: its own ``event:`` line, or one naming its
    type for an event the rewriter added."""
    kind = data.get("type")
    if isinstance(kind, str) and (not head.startswith(b"event: ") or head[7:].split(b"\n", 1)[0] != kind.encode()):
        return b"event: " + kind.encode() + b"\ndata: "
    return head


def decode_object(data: bytes) -> dict[str, Any] | None:
    """A whole answer's JSON object (None: not one)."""
    try:
        parsed = msgspec.json.decode(data)
    except msgspec.DecodeError:
        return None
    return parsed if isinstance(parsed, dict) else None


encode = _ENCODE

__all__ = ["EventRewriter", "decode_object", "encode", "head_of"]
