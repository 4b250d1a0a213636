"""What a request may cost before it runs, and what it did cost after.

Before: ``prompt_bound`` and ``completion_cap`` size the reservation a key's
budget must cover (appliance/access/keys.py: Gate.admit). After: the engine's usage,
from a whole answer (``unary_usage``) or from a relayed stream (``StreamTap``),
which the appliance always asks for on metered streams (``usage_option``); when
none comes (a client that left, an engine that ignores stream_options), the
count ``estimated_usage`` makes from the request and the relayed events.

The estimators, and their error:

- ``prompt_bound``: the request body's size in bytes. No tokenizer yields more
  tokens than the bytes it reads, and the body's JSON syntax outweighs the few
  tokens a chat template adds per message, so a reservation never undercounts a
  text prompt. It overcounts: English is ~4 bytes per token, so near the end of
  its budget a key's long prompt is refused up to ~4x before it would truly
  overrun. (Images sent as URLs are the exception: their tokens are counted at
  settlement only.)
- ``prompt_guess``: bytes / 4, the typical ratio: what a request is charged for
  its prompt when the engine never reported usage. Text of 1-2 bytes per token
  (digits, CJK) is undercharged by up to 4x, JSON-heavy bodies overcharged.
- relayed events: one SSE event is one token on llama.cpp, vLLM and SGLang by
  default; the role-only first event and the finish event add ~2, tokens an
  engine holds back and sends together (a partial stop string, a multi-byte
  character) are fewer events than tokens. Capped at what was reserved.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from appliance.gateway.protocol import RequestT

BYTES_PER_TOKEN = 4


def prompt_bound(body: bytes) -> int:
    """The most tokens the request's prompt can be: one per byte."""
    return len(body)


def prompt_guess(body: bytes) -> int:
    """The prompt's likely tokens, for a charge the engine never reported."""
    return -(-len(body) // BYTES_PER_TOKEN)


def completion_cap(req: RequestT) -> int | None:
    """The most completion tokens the request asked for, all choices together;
    None when it set no limit. Engines differ in which length field wins when a
    body has several (llama.cpp reads n_predict first), so the largest counts."""
    caps = [
        v
        for v in (
            getattr(req, "max_tokens", None),
            getattr(req, "max_completion_tokens", None),
            getattr(req, "n_predict", None),
            getattr(req, "max_output_tokens", None),
        )
        if v is not None and v >= 0
    ]
    if not caps:
        return None
    return max(caps) * choices(req)


# A request's completion length fields, in the order a message names the first of equals.
LENGTH_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens", "n_predict")


def longest_length(req: RequestT) -> tuple[str, int] | None:
    """The largest completion length one choice may have, and the field that asked
    it; None when the request set none (a negative n_predict: llama.cpp's "no limit")."""
    longest: tuple[str, int] | None = None
    for name in LENGTH_FIELDS:
        v = getattr(req, name, None)
        if v is not None and v >= 0 and (longest is None or v > longest[1]):
            longest = (name, v)
    return longest


def choices(req: RequestT) -> int:
    return getattr(req, "n", None) or 1


class Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _WithUsage(msgspec.Struct):
    usage: Usage | None = None


class _StreamEvent(msgspec.Struct):
    usage: Usage | None = None
    choices: list[msgspec.Raw] | None = None


_UNARY = msgspec.json.Decoder(_WithUsage)
_EVENT = msgspec.json.Decoder(_StreamEvent)
_TOP = msgspec.json.Decoder(dict[str, msgspec.Raw])


def unary_usage(data: bytes) -> Usage | None:
    try:
        return _UNARY.decode(data).usage
    except msgspec.MsgspecError:
        return None


def stream_options(body: bytes) -> bytes:
    """The request's stream_options as sent (raw JSON; b"" when absent or null)."""
    raw = _TOP.decode(body).get("stream_options")
    return b"" if raw is None or bytes(raw) == b"null" else bytes(raw)


def usage_option(options: bytes) -> dict:
    """The request's stream_options (``stream_options``' raw JSON) with include_usage
    on, every other option kept (the body was validated: an object or absent)."""
    kept = _TOP.decode(options) if options else {}
    kept["include_usage"] = msgspec.Raw(b"true")
    return kept


def estimated_usage(body: bytes, events: int, completion_cap: int | None) -> Usage:
    """What a request without reported usage is charged: its prompt's likely
    tokens and one token per relayed event, no more than it reserved."""
    return guessed_usage(prompt_guess(body), events, completion_cap)


def guessed_usage(prompt: int, events: int, completion_cap: int | None) -> Usage:
    """estimated_usage, its prompt's tokens guessed already (by the worker that read the body)."""
    completion = events if completion_cap is None else min(events, completion_cap)
    return Usage(prompt, completion)


DONE = b"data: [DONE]\n\n"


@dataclass(eq=False, slots=True)
class StreamTap:
    """Watches a relayed SSE stream: keeps its usage event (and drops the
    usage-only event a client did not ask for), counts its events (the
    completion's size when no usage comes), passes events naming cache-revealing
    fields through ``scrub`` (appliance/access/tenancy.py), and holds the closing
    ``[DONE]`` back until ``rest()``, which the relay sends once the request's
    accounting is durable. Only events that need it are parsed."""

    strip_usage: bool
    # With scrub, revealing(data) says whether data may name a field scrub removes.
    scrub: Callable[[bytes], bytes] | None = None
    revealing: Callable[[bytes], bool] | None = None
    # Another API's stream (appliance/dialects.py): usage_of(data) reads an event's
    # usage (the largest of each count is kept: Anthropic reports the prompt's in
    # message_start, the completion's in message_delta), and an event whose type
    # names one of terminal is held back like [DONE].
    usage_of: Callable[[bytes], Usage | None] | None = None
    usage_marker: bytes = b'"usage"'
    terminal: tuple[bytes, ...] = ()
    held: bytes = b""
    usage: Usage | None = None
    events: int = 0
    done: bool = False
    _buf: bytes = b""

    def _watched(self, data: bytes) -> bool:
        # Called on every relayed piece: substring scans only, no generator or parse.
        if self.usage_marker in data or (self.revealing is not None and self.revealing(data)):
            return True
        for marker in self.terminal:
            if marker in data:
                return True
        return False

    def feed(self, chunk: bytes) -> bytes:
        if not self._buf and chunk.endswith(b"\n\n") and not self._watched(chunk):
            self.events += chunk.count(b"data: {")
            return self._hold_done(chunk)
        data = self._buf + chunk
        cut = data.rfind(b"\n\n")
        if cut < 0:
            self._buf = data
            return b""
        complete, self._buf = data[: cut + 2], data[cut + 2 :]
        self.events += complete.count(b"data: {")
        if not self._watched(complete):
            return self._hold_done(complete)
        out = []
        for event in complete.split(b"\n\n")[:-1]:
            kept: bytes | None = event
            if self.usage_of is not None:
                kept = self._dialect_event(event)
            elif event.startswith(b"data: {") and self._watched(event):
                kept = self._event(event)
            if kept is not None:
                out.append(kept + b"\n\n")
        return self._hold_done(b"".join(out))

    def _event(self, event: bytes) -> bytes | None:
        payload = event[6:]
        if b'"usage"' in payload:
            try:
                parsed = _EVENT.decode(payload)
            except msgspec.MsgspecError:
                parsed = None
            if parsed is not None and parsed.usage is not None:
                self.usage = parsed.usage
                if self.strip_usage and not parsed.choices:
                    self.events -= 1  # not a token
                    return None
        if self.scrub is not None:
            return b"data: " + self.scrub(payload)
        return event

    def _dialect_event(self, event: bytes) -> bytes | None:
        """An event of a Responses or Messages stream ("event: TYPE" then "data: {...}")."""
        at = 0 if event.startswith(b"data: ") else event.find(b"\ndata: ") + 1
        if at == 0 and not event.startswith(b"data: ") or not self._watched(event):
            return event
        head, payload = event[: at + 6], event[at + 6 :]
        if self.usage_marker in payload and self.usage_of is not None:
            found = self.usage_of(payload)
            if found is not None:
                seen = self.usage
                self.usage = (
                    found
                    if seen is None
                    else Usage(
                        max(seen.prompt_tokens, found.prompt_tokens),
                        max(seen.completion_tokens, found.completion_tokens),
                    )
                )
        if self.scrub is not None and self.revealing is not None and self.revealing(payload):
            event = head + self.scrub(payload)
        if any(m in event[: at + 40] for m in self.terminal):
            self.held += event + b"\n\n"
            return None
        return event

    def _hold_done(self, out: bytes) -> bytes:
        if out.endswith(DONE):
            self.done = True
            return out[: -len(DONE)]
        return out

    def rest(self) -> bytes:
        """What is left to send: an unfinished event, then the held [DONE] (or
        another API's held last event)."""
        rest, self._buf = self._buf + self.held, b""
        self.held = b""
        if self.done:
            self.done = False
            rest += DONE
        return rest


__all__ = [
    "StreamTap",
    "Usage",
    "completion_cap",
    "estimated_usage",
    "guessed_usage",
    "prompt_bound",
    "prompt_guess",
    "stream_options",
    "unary_usage",
    "usage_option",
]
