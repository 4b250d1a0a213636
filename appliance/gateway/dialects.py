"""The APIs clients speak, and what differs between them once a request is
routed: the error envelope, the event that reports an error on a stream, where
an answer says what it used, and which event ends a stream.

- OpenAI (chat, completions, embeddings, tokenize, rerank, ...):
  ``{"error": {...}}``; a stream's usage comes only when asked for
  (stream_options.include_usage), and ``data: [DONE]`` ends it.
- Responses (appliance/gateway/api_responses.py): the OpenAI envelope; an ``error``
  event on a stream; usage in the response, response.completed ends a stream.
- llama.cpp's own API (infill): usage as tokens_evaluated, tokens_predicted.
- Anthropic Messages (appliance/gateway/api_messages.py): Anthropic's envelope and
  ``event: error``; usage in message_start and message_delta; message_stop ends it.
- Responses and Messages answers are made what the API promises where an engine
  falls short (``fix_whole``, ``fix_stream``: llama.cpp's ids, stop reasons, event
  indexes and numbers).
- Audio (appliance/gateway/api_audio.py): the OpenAI envelope and stream; a
  multipart upload charged by its audio's seconds, not its bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from appliance.errors import ApplianceError, ErrorEnvelope, MissingCredential, encode_error
from appliance.gateway import api_audio, api_messages, api_responses
from appliance.gateway.metering import Usage, estimated_usage, prompt_bound, unary_usage
from appliance.gateway.sse import EventRewriter


@dataclass(frozen=True, slots=True)
class Dialect:
    name: str
    # Usage from a whole answer or one streamed event's JSON (None: it says none).
    usage: Callable[[bytes], Usage | None]
    # Markers of a stream's last events, held back until the request's charge is
    # durable (OpenAI's [DONE] is held by the StreamTap itself).
    terminal: tuple[bytes, ...] = ()
    # The engine reports a stream's usage only when asked (stream_options).
    asks_usage: bool = False
    # What an event that may carry usage contains (cheap to look for).
    usage_marker: bytes = b'"usage"'
    # What a request may cost (its prompt's bound, from its body), and what it is
    # charged when the engine says nothing: an upload's audio is not a prompt's text.
    bound: Callable[[bytes], int] = prompt_bound
    estimate: Callable[[bytes, int, int | None], Usage] = estimated_usage
    # A whole answer's charge from the request's body and the answer (None: usage(answer)).
    whole: Callable[[bytes, bytes], Usage | None] | None = None
    # The shape of its errors (``envelope``), as the OpenAPI document declares them.
    error_envelope: type = ErrorEnvelope
    # What the API promises that an engine may not say (llama.cpp's Responses and
    # Messages): a whole answer fixed from the request's body, and a stream's events
    # fixed by one rewriter per stream (None: engines' answers go on as they come).
    fix_whole: Callable[[bytes, bytes], bytes] | None = None
    fix_stream: Callable[[bytes], EventRewriter] | None = None

    def answer_usage(self, body: bytes, data: bytes) -> Usage | None:
        return self.usage(data) if self.whole is None else self.whole(body, data)

    def envelope(self, err: ApplianceError) -> bytes:
        if self is ANTHROPIC:
            message = err.anthropic_message if isinstance(err, MissingCredential) else err.message
            return api_messages.envelope(err.status, message)
        return err.envelope()

    def id_headers(self, rid: str) -> dict[str, str]:
        """The headers an answer names its request's id in: X-Request-Id, and on
        Anthropic's API also request-id, the one its SDKs read (``e.request_id``)."""
        if self is ANTHROPIC:
            return {"x-request-id": rid, "request-id": rid}
        return {"x-request-id": rid}

    def stream_error(self, err: ApplianceError) -> bytes:
        """The event that tells a client its stream failed after it had begun."""
        if self is ANTHROPIC:
            return api_messages.stream_error(err.status, err.message)
        if self is RESPONSES:
            return api_responses.stream_error(err.message, err.type, err.param, err.code)
        return b"data: " + encode_error(err.message, err.type, err.param, err.code) + b"\n\n"


class _NativeUsage(msgspec.Struct):
    tokens_evaluated: int = 0
    tokens_predicted: int = 0


_NATIVE = msgspec.json.Decoder(_NativeUsage)


def _native_usage(data: bytes) -> Usage | None:
    try:
        counts = _NATIVE.decode(data)
    except msgspec.MsgspecError:
        return None
    return Usage(counts.tokens_evaluated, counts.tokens_predicted)


OPENAI = Dialect("openai", unary_usage, asks_usage=True)
# llama-server's own API (/infill): the OpenAI envelope; its answers and a stream's
# last event count tokens_evaluated and tokens_predicted.
LLAMACPP = Dialect("llamacpp", _native_usage, usage_marker=b'"tokens_predicted"')
RESPONSES = Dialect(
    "responses",
    api_responses.usage,
    api_responses.TERMINAL,
    fix_whole=api_responses.whole_answer,
    fix_stream=api_responses.ResponsesEvents,
)
ANTHROPIC = Dialect(
    "anthropic",
    api_messages.usage,
    api_messages.TERMINAL,
    error_envelope=api_messages.AnthropicError,
    fix_whole=api_messages.whole_answer,
    fix_stream=api_messages.MessagesEvents,
)
AUDIO = Dialect(
    "audio",
    api_audio.usage,
    bound=api_audio.audio_bound,
    estimate=api_audio.estimated_usage,
    whole=api_audio.answer_usage,
)


def dialect_for_path(path: str) -> Dialect:
    """The dialect an error on this path answers in (any path, a 404 included)."""
    return ANTHROPIC if path.startswith("/v1/messages") else OPENAI


__all__ = ["ANTHROPIC", "AUDIO", "LLAMACPP", "OPENAI", "RESPONSES", "Dialect", "dialect_for_path"]
