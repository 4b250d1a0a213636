"""The OpenAI audio API (POST /v1/audio/transcriptions and /v1/audio/translations):
a multipart/form-data upload whose ``model`` is a form field, what the appliance
reads from it, how it rewrites a field, and what it charges.

The body is read once (bounded by ``server.max_upload_bytes``, a 413 beyond) and
scanned in place: only the form fields' values are copied out, never the audio,
and the body goes to the engine byte for byte (a rewritten field, such as the
model a route names, changes that part's value only). One whole body is what
lets a request that failed before its answer began be retried on another
replica or taken by a fallback, like every other endpoint's.

Charging (what a key's budget pays, in tokens):

- the audio, as prompt tokens: ``AUDIO_TOKENS_PER_SECOND`` per second of it (the
  positions a Whisper-class encoder computes per second). Its seconds: the
  engine's ``usage.seconds`` (vLLM's json answer) or ``duration``
  (verbose_json); when the answer says neither (the text, srt and vtt formats, a
  stream), the upload's size at ``SETTLE_BYTES_PER_SECOND`` (a 128 kbit/s
  recording: lower-bitrate audio is undercharged, 16-bit PCM overcharged 2-4x);
- the text, as completion tokens: its bytes / 4 for a whole answer, one per
  relayed event for a stream (metering.py's rules);
- reserved before it runs: the audio at ``RESERVE_BYTES_PER_SECOND`` (16 kbit/s,
  the lowest bitrate speech is usually sent at) and the model's completion cap.
  The engine cannot be told a length for a transcription, so the text it returns
  is charged whole even beyond the cap.
"""

from __future__ import annotations

import re

import msgspec

from appliance.errors import BadRequest, quoted
from appliance.gateway.metering import BYTES_PER_TOKEN, Usage

AUDIO_TOKENS_PER_SECOND = 50
SETTLE_BYTES_PER_SECOND = 16_000
RESERVE_BYTES_PER_SECOND = 2_000
# A form field's value (not a file) longer than this is refused: the fields are
# a model name, a language, a prompt, numbers.
MAX_FIELD_BYTES = 64 * 1024

# The fields the appliance acts on: each given once, as a value (never a file).
_ROUTED = (b"model", b"stream")
# A boundary=, quoted or not, ending where its parameter does (so that a parser reading
# more of it, a quoted one's spaces, finds no other delimiter than the appliance's).
_BOUNDARY = re.compile(
    rb'(?i:boundary)=(?:"([0-9A-Za-z\'()+_,./:=?-]{1,70})"|([0-9A-Za-z\'()+_,./:=?-]{1,70}))(?=[ \t]*(?:;|$))'
)
_NAME = re.compile(rb'(?i)name="([^"\r\n]*)"')  # read at the one name= of the Content-Disposition
_FILENAME = re.compile(rb"(?i)content-disposition:[^\r\n]*?\bfilename\*?=")
# What engines' form parsers may take for a part's name, or a form's boundary, however
# written (quoted or not, RFC 2231's name*=, any case, on a folded line): each must
# come once, and as _NAME and _BOUNDARY read it.
# (name*=, and RFC 2231's continuations name*0=, name*1*=: a mail parser joins them.)
_ANY_NAME = re.compile(rb"(?i)(?<![\w-])name\s*[*=]")
_QUOTED = re.compile(rb'"[^"\r\n]*"')  # a quoted value (a filename may hold "name=")
_ANY_BOUNDARY = re.compile(rb"(?i)(?<![\w-])boundary\s*[*=]")
_DISPOSITION = re.compile(rb"(?im)^content-disposition\s*:[^\r\n]*")


class AudioRequest:
    """The form fields the appliance acts on (the rest pass through to the engine)."""

    __slots__ = ("model", "stream")

    def __init__(self, model: str, stream: bool) -> None:
        self.model = model
        self.stream = stream


def boundary_of(content_type: bytes | None) -> bytes:
    if content_type is None or not content_type.lower().startswith(b"multipart/form-data"):
        raise BadRequest(
            "This endpoint takes multipart/form-data (the audio as the 'file' field, 'model' as another field)",
            code="invalid_content_type",
        )
    found = [m.start() for m in _ANY_BOUNDARY.finditer(content_type)]
    if len(found) > 1:  # a parser taking another would see other parts
        raise BadRequest(
            "The multipart/form-data Content-Type names its boundary more than once", code="invalid_content_type"
        )
    # Read where that one boundary parameter is, never inside another's value.
    match = _BOUNDARY.match(content_type, found[0]) if found else None
    if match is None:
        raise BadRequest("The multipart/form-data Content-Type names no boundary", code="invalid_content_type")
    return match.group(1) or match.group(2)


def _name_of(headers: bytes) -> bytes:
    """A part's name, from its one Content-Disposition's one quoted ``name``: a part an
    engine's form parser could name otherwise (a name unquoted or in RFC 2231's form, two
    names, two Content-Dispositions, a folded line) is a 400, so that the engine reads
    the fields, ``model`` first, that the appliance routed by and rewrote."""
    dispositions = _DISPOSITION.findall(headers)
    named = None
    # An escaped quote (\") would end a quoted value for this scan, not for a mail parser.
    if len(dispositions) == 1 and b'\\"' not in dispositions[0]:
        # Quoted values blanked, at the same length: a name= inside one is not a name.
        blanked = _QUOTED.sub(lambda m: b'"' + b" " * (len(m[0]) - 2) + b'"', dispositions[0])
        names = [m.start() for m in _ANY_NAME.finditer(blanked)]
        named = _NAME.match(dispositions[0], names[0]) if len(names) == 1 else None
    if named is None or b"\r\n " in headers or b"\r\n\t" in headers:
        raise BadRequest(
            'Malformed multipart body: each part names its field once, in one Content-Disposition header as name="..."',
            code="invalid_body",
        )
    return named.group(1)


def _parts(body: bytes, boundary: bytes):
    """Each part of the form: (headers, value start, value end); nothing is copied."""
    delimiter = b"\r\n--" + boundary
    if not body.startswith(delimiter[2:]):
        raise BadRequest("Malformed multipart body: it does not begin with its boundary", code="invalid_body")
    at = len(delimiter) - 2
    while True:
        if body.startswith(b"--", at):
            return  # the closing delimiter
        if not body.startswith(b"\r\n", at):
            raise BadRequest("Malformed multipart body: a boundary line is not followed by CRLF", code="invalid_body")
        head_end = body.find(b"\r\n\r\n", at + 2, at + 2 + 16 * 1024)
        if head_end < 0:
            raise BadRequest("Malformed multipart body: a part's headers never end", code="invalid_body")
        start = head_end + 4
        end = body.find(delimiter, start)
        if end < 0:
            raise BadRequest("Malformed multipart body: it ends before its closing boundary", code="invalid_body")
        yield body[at + 2 : head_end], start, end
        at = end + len(delimiter)


def decode(body: bytes, content_type: bytes | None) -> AudioRequest:
    """The request's form fields, type-checked; a 400 naming the field otherwise."""
    boundary = boundary_of(content_type)
    spans: dict[bytes, tuple[int, int]] = {}
    audio = False
    for headers, start, end in _parts(body, boundary):
        name = _name_of(headers)
        is_file = _FILENAME.search(headers) is not None
        if name in _ROUTED and (name in spans or is_file):
            # The engine might read another one than the appliance routed by.
            raise BadRequest(f"Form field {quoted(name.decode())} is given more than once", param=name.decode())
        if is_file:
            audio = audio or name == b"file"
            continue
        if end - start > MAX_FIELD_BYTES:
            raise BadRequest(f"Form field {quoted(name.decode('latin-1'))} is longer than {MAX_FIELD_BYTES} bytes")
        spans[name] = (start, end)
    if not audio:
        raise BadRequest("The form has no 'file' part (the audio to transcribe)", param="file")
    if b"model" not in spans:
        raise BadRequest("The form has no 'model' field", param="model")
    model = _text(body, spans[b"model"], "model")
    if not model:
        raise BadRequest("'model' must be a non-empty string", param="model")
    return AudioRequest(model, _flag(body, spans, b"stream"))


def _text(body: bytes, span: tuple[int, int], name: str) -> str:
    try:
        return body[span[0] : span[1]].decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest(f"Form field {quoted(name)} is not valid UTF-8", param=name) from None


def _flag(body: bytes, spans: dict[bytes, tuple[int, int]], name: bytes) -> bool:
    """A boolean form field as the engines' form parsers read one."""
    if name not in spans:
        return False
    value = _text(body, spans[name], name.decode()).strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off", ""):
        return False
    raise BadRequest(
        f"Form field {quoted(name.decode())} must be true or false, got {value[:20]!r}", param=name.decode()
    )


def set_form_fields(body: bytes, fields: dict) -> bytes:
    """The body with these form fields' values replaced (or added before the closing
    boundary); every other byte kept."""
    boundary = body[2 : body.index(b"\r\n")]
    spans = {}
    for headers, start, end in _parts(body, boundary):
        if not _FILENAME.search(headers):  # (decode read the form: each part has its one name)
            spans[_name_of(headers).decode("latin-1")] = (start, end)
    edits = []
    added = b""
    for name, value in fields.items():
        data = _form_value(value)
        if name in spans:
            edits.append((*spans[name], data))
        else:
            head = b'\r\nContent-Disposition: form-data; name="' + name.encode() + b'"\r\n\r\n'
            added += b"\r\n--" + boundary + head + data
    closing = body.rindex(b"\r\n--" + boundary + b"--")
    edits.append((closing, closing, added))
    out, at = [], 0
    for start, end, data in sorted(edits, key=lambda e: e[0]):
        out += [body[at:start], data]
        at = end
    out.append(body[at:])
    return b"".join(out)


def without_audio(body: bytes) -> bytes:
    """The form as the audit log keeps it (audit.include_text): its fields, and each
    file part's name and size in place of its bytes."""
    boundary = body[2 : body.index(b"\r\n")]
    out = []
    for headers, start, end in _parts(body, boundary):
        value = f"({end - start} bytes)".encode() if _FILENAME.search(headers) else body[start:end]
        out.append(headers + b"\r\n\r\n" + value)
    return b"\r\n".join(out)


def _form_value(value) -> bytes:
    if isinstance(value, bool):
        return b"true" if value else b"false"
    return str(value).encode()


def is_form(body: bytes) -> bool:
    """A multipart body begins with its boundary; a JSON one never with '--'."""
    return body.startswith(b"--")


# --- charging ---------------------------------------------------------------------


class _Usage(msgspec.Struct):
    seconds: float | None = None


class _Answer(msgspec.Struct):
    text: str = ""
    usage: _Usage | None = None
    duration: float | None = None  # verbose_json


_ANSWER = msgspec.json.Decoder(_Answer)


def _audio_tokens(seconds: float) -> int:
    return -(-int(max(seconds, 0.0) * AUDIO_TOKENS_PER_SECOND * 1000) // 1000)  # rounded up, never negative


def audio_bound(body: bytes) -> int:
    """The most prompt tokens an upload of this size is charged, before it runs."""
    return _audio_tokens(len(body) / RESERVE_BYTES_PER_SECOND)


def usage(data: bytes) -> Usage | None:
    """What a JSON answer (json, verbose_json) says it used: its audio's seconds,
    its text; None when it says no duration (the upload's size decides then)."""
    try:
        answer = _ANSWER.decode(data)
    except msgspec.MsgspecError:
        return None
    seconds = answer.usage.seconds if answer.usage is not None else None
    if seconds is None:
        seconds = answer.duration
    if seconds is None:
        return None
    return Usage(_audio_tokens(seconds), _text_tokens(len(answer.text.encode())))


def answer_usage(body: bytes, data: bytes) -> Usage:
    """A whole answer's charge: its own usage, else the upload's size and the text's."""
    found = usage(data)
    if found is not None:
        return found
    try:
        text = len(_ANSWER.decode(data).text.encode())
    except msgspec.MsgspecError:
        text = len(data)  # text, srt, vtt: the answer is the text
    return Usage(_settle_audio(body), _text_tokens(text))


def estimated_usage(body: bytes, events: int, completion_cap: int | None) -> Usage:
    """A stream's (or a cut answer's) charge: the upload's size, one token per event."""
    completion = events if completion_cap is None else min(events, completion_cap)
    return Usage(_settle_audio(body), completion)


def _settle_audio(body: bytes) -> int:
    return _audio_tokens(len(body) / SETTLE_BYTES_PER_SECOND)


def _text_tokens(size: int) -> int:
    return -(-size // BYTES_PER_TOKEN)


__all__ = [
    "AudioRequest",
    "answer_usage",
    "audio_bound",
    "decode",
    "estimated_usage",
    "is_form",
    "set_form_fields",
    "usage",
    "without_audio",
]
