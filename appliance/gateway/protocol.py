"""OpenAI protocol types: what the appliance reads from a request.

Only the fields the appliance itself acts on or must type-check are declared:
every one it acts on (stream, stream_options, the completion-length fields it
reserves a key's budget for, n, cache_salt, model) is typed here, so a wrong type
is a 400 naming the field, never a silently skipped rewrite. The request body is
forwarded to the engine byte for byte, so fields declared nowhere here (tools,
response_format, logprobs, ...) pass through untouched.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal, TypeVar

import msgspec

from appliance.errors import BadRequest, quoted

# The ranges every endpoint's request is held to, declared on its Struct: msgspec checks
# them as it decodes (a 400 naming the field) and the OpenAPI document shows them.
# Engines keep counts in 32-bit integers; larger ones are errors, not work.
MAX_COUNT = 2**31 - 1
# A completion length or a number of choices or results: at least 1.
Count = Annotated[int, msgspec.Meta(ge=1, le=MAX_COUNT)]
# A request's number of choices: OpenAI's own ceiling. An engine asked for a billion
# choices (vLLM, llama-server) tries to make them: a 400 here, not an engine's crash.
MAX_CHOICES = 128
Choices = Annotated[int, msgspec.Meta(ge=1, le=MAX_CHOICES)]
# llama.cpp's completion length: -1 until the context is full, -2 until it is filled.
NPredict = Annotated[int, msgspec.Meta(ge=-2, le=MAX_COUNT)]
# Sampling bounds as OpenAI's API documents them (a client moving from it already keeps
# them): a temperature from 0 to 2, a nucleus from 0 to 1, at most 20 top logprobs.
# llama.cpp took -1 or 5 and answered 200; an out-of-range value is a 400 naming it.
Temperature = Annotated[float, msgspec.Meta(ge=0, le=2)]
Probability = Annotated[float, msgspec.Meta(ge=0, le=1)]
TopLogprobs = Annotated[int, msgspec.Meta(ge=0, le=20)]
# A model's name, a cache salt: never empty.
Name = Annotated[str, msgspec.Meta(min_length=1)]


class StreamOptions(msgspec.Struct, kw_only=True):
    # The appliance asks for usage on every metered stream (and keeps the extra
    # event from a client that did not ask); other options pass through.
    include_usage: bool | None = None


class _Request(msgspec.Struct, kw_only=True):
    model: Name
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: Count | None = None
    # llama.cpp's own name for max_tokens; it wins over max_tokens there, so a
    # key's budget reserves for it too. Negative: until the context is full.
    n_predict: NPredict | None = None
    n: Choices | None = None
    # vLLM and SGLang partition their prefix cache by it; the appliance sets its
    # own per tenant (appliance/access/tenancy.py), narrowed by the client's.
    cache_salt: Name | None = None
    temperature: Temperature | None = None
    top_p: Probability | None = None
    stop: str | list[str] | None = None
    user: str | None = None
    # vLLM's extra field: its own id for the request (capabilities.check_fields refuses it).
    request_id: str | None = None


# The roles OpenAI accepts; any other is a 400 here, not an engine's 500.
Role = Literal["system", "developer", "user", "assistant", "tool", "function"]


class ChatMessage(msgspec.Struct, kw_only=True):
    role: Role
    # str, a list of content parts, or null (assistant turns with tool calls).
    content: Any = None


class ChatCompletionRequest(_Request):
    messages: Annotated[list[ChatMessage], msgspec.Meta(min_length=1)]
    # "none", "auto", "required", or {"type": "function", ...}: the latter two need a model
    # whose template renders tools (gateway/capabilities.check_tools).
    tool_choice: str | dict[str, Any] | None = None
    max_completion_tokens: Count | None = None
    top_logprobs: TopLogprobs | None = None


# A prompt is a string, or a list of strings, of token ids, or of token-id lists;
# msgspec checks the outer shape, the engine the rest.
Prompt = str | list[str | int | list[int]]


class CompletionRequest(_Request):
    prompt: Prompt
    # Honoured by some engines only (gateway/capabilities.check_completion_fields).
    echo: bool = False
    suffix: str | None = None
    best_of: Choices | None = None


class EmbeddingRequest(msgspec.Struct, kw_only=True):
    model: Name
    input: Prompt
    encoding_format: Literal["float", "base64"] | None = None
    # A shorter vector: honoured by some engines only (gateway/capabilities.check_dimensions).
    dimensions: int | None = None
    request_id: str | None = None  # vLLM's, as on _Request: refused


RequestT = ChatCompletionRequest | CompletionRequest | EmbeddingRequest
Body = TypeVar("Body", bound=msgspec.Struct)

_DECODERS: dict[type, msgspec.json.Decoder] = {
    cls: msgspec.json.Decoder(cls) for cls in (ChatCompletionRequest, CompletionRequest, EmbeddingRequest)
}
_AT = re.compile(r" - at `\$\.?([^`]*)`$")


def decode_request(body: bytes, cls: type[Body]) -> Body:
    """Parse and type-check a request body (any proxy endpoint's or admin call's msgspec Struct);
    a 400 that names the field otherwise."""
    if not body:
        raise BadRequest("Request body is empty; expected a JSON object")
    decoder = _DECODERS.get(cls)
    if decoder is None:
        decoder = _DECODERS[cls] = msgspec.json.Decoder(cls)
    try:
        req = decoder.decode(body)
    except msgspec.ValidationError as exc:
        text = str(exc)
        match = _AT.search(text)
        param = match.group(1) if match else None
        message = text[: match.start()] if match else text
        if param:
            message = f"{message} for '{param}'"
        raise BadRequest(f"Invalid request: {message}", param=param or None) from None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"Malformed JSON in request body: {exc}") from None
    except (UnicodeDecodeError, RecursionError) as exc:
        raise hostile_json(exc) from None
    if (field := repeated_field(body)) is not None:
        raise BadRequest(
            f"Request body names the field {quoted(field)} twice (or spells a field's name with escapes): "
            "send each field once, its name plainly",
            param=field,
            code="duplicate_field",
        )
    return req


# A body's top level, each field's value as sent (repeated_field reads its spelling).
_TOP = msgspec.json.Decoder(dict[str, msgspec.Raw])
_ENCODE = msgspec.json.Encoder().encode
_SPACE = frozenset(b" \t\r\n")
_COLON, _COMMA, _CLOSE = b":,}"


def repeated_field(body: bytes) -> str | None:
    """The top-level field of a (valid JSON object) body that is named twice, or whose
    name is spelled with escapes ("\\u006dodel"); None when each is named once,
    plainly. The body goes on to the engine as sent: a reader that takes a repeated
    field's first value (msgspec here, like Python's json, takes its last) would see
    another model, stream or max_tokens than the policy weighed.

    The body must be exactly its fields as decoded (each name spelled plainly, each
    value the bytes it was decoded from, in order), with nothing but the separators
    between them; a repeated field leaves bytes over. A body as clients send it (compact:
    httpx, JSON.stringify; or spaced as Python's json.dumps) is compared whole with its
    fields encoded again; any other is walked, one pass over its top level."""
    top = _TOP.decode(body)
    if _ENCODE(top) == body or _spaced(top) == body:  # as clients send it: each named once
        return None
    space, startswith = _SPACE, body.startswith
    pos = body.index(b"{") + 1
    try:
        for name, value in top.items():
            if body[pos] in space:
                pos = _skip(body, pos)
            spelled = b'"' + name.encode() + b'"' if name.isidentifier() else msgspec.json.encode(name)
            if not startswith(spelled, pos):
                return _named_twice(body, name)
            pos += len(spelled)
            if body[pos] in space:
                pos = _skip(body, pos)
            if body[pos] != _COLON:
                return _named_twice(body, name)
            pos += 1
            if body[pos] in space:
                pos = _skip(body, pos)
            if not startswith(value, pos):
                return _named_twice(body, name)
            pos += len(value)
            if body[pos] in space:
                pos = _skip(body, pos)
            if body[pos] == _COMMA:
                pos += 1
        if body[pos] in space:
            pos = _skip(body, pos)
        if body[pos] != _CLOSE or body[pos + 1 :].strip(b" \t\r\n"):
            return _named_twice(body, "")
    except IndexError:
        return _named_twice(body, "")
    return None


def _named_twice(body: bytes, otherwise: str) -> str:
    """The first top-level name a refused body repeats (else the one spelled with
    escapes, where the walk stopped): read again, slowly, only to say which."""
    seen: set[str] = set()
    for name, _ in json.loads(body, object_pairs_hook=list):
        if name in seen:
            return str(name)
        seen.add(name)
    return otherwise


def _spaced(top: dict[str, msgspec.Raw]) -> bytes:
    """The fields as Python's json.dumps spaces them by default (", ", ": ")."""
    return b"{" + b", ".join([b'"%s": %s' % (name.encode(), value) for name, value in top.items()]) + b"}"


def _skip(body: bytes, pos: int) -> int:
    while body[pos] in _SPACE:
        pos += 1
    return pos


def hostile_json(exc: UnicodeDecodeError | RecursionError) -> BadRequest:
    """What msgspec raises outside its own errors, on bytes no client should send."""
    if isinstance(exc, UnicodeDecodeError):
        return BadRequest(f"Request body is not valid UTF-8 (byte {exc.start})")
    return BadRequest("Malformed JSON in request body: nested too deeply")


# --- responses the appliance itself produces ----------------------------------


class ModelCard(msgspec.Struct):
    id: str
    object: str = "model"
    created: int = 0
    owned_by: str = "appliance"
    # A LoRA adapter's base model (vLLM's field); None for a model.
    parent: str | None = None


class ModelList(msgspec.Struct):
    data: list[ModelCard]
    object: str = "list"
