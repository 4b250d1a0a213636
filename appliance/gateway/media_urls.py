"""Media a request points its engine at by URL: refused at the front door.

An engine serving a multimodal model fetches what a request names by URL
(llama-server with --mmproj, vLLM): an ``image_url`` of ``http://169.254.169.254/``
or of the daemon's own loopback port would be fetched from inside the box (SSRF).
So a request may carry media only as its bytes, a ``data:`` URL (base64); a media
reference holding any other URL is a 400 ``media_url_not_allowed`` naming the field,
unless it starts with one of ``[server] media_url_prefixes`` (an operator's own image
server), compared in one normal form (appliance/config/urls.py).

Where an engine fetches from, in every endpoint's body (the bodies go to the engine
as sent: Responses and Messages too, so their own fields are read here):
``image_url``, ``video_url``, ``audio_url``, ``file_url`` (a string, or an object
with ``url``: OpenAI's chat parts, vLLM's extensions, Responses' ``input_image`` and
``input_file``), ``file_data`` and ``input_audio.data`` (bytes, never a URL) and
Anthropic's ``source: {"type": "url", "url": ...}`` (image and document blocks).

A body holding no ``:/`` (in any JSON spelling) names no URL: it is not walked (a
scan of its bytes, two with a backslash in it). Whoever decoded the body finds the
references (the front door or a worker: gateway/facts.py); the daemon checks them
against the config it serves with (capabilities.check_fields), so both paths refuse
alike. A ``previous_response_id`` has the engine replay stored input: it passed this
check when it came.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from appliance.config.urls import normal_url
from appliance.errors import BadRequest

# A URL's ':/' as a body's bytes may spell it (the engine's JSON parser reads the
# escapes): ':' then '/' or a backslash (':/', ':\/', ':\u002f'), or an escaped colon
# ('\u003a', looked for without its backslash). A false match (':\n') costs a walk only.
# Regexes with a literal first byte: CPython 3.11's ``in`` scans for b"://" slower.
_COLON_THEN_SLASH = re.compile(rb":[/\\]")
_ESCAPED_COLON = re.compile(rb"u003[aA]")
# Fields holding a URL the engine fetches: a string, or an object with "url".
_URL_FIELDS = frozenset({"image_url", "video_url", "audio_url", "file_url"})
# Fields holding media bytes (base64 or a data: URL): never a URL.
_DATA_FIELDS = frozenset({"file_data"})
_C0_AND_SPACE = "".join(map(chr, range(0x21)))

# (the field's path, as the error's param names it; the URL it holds)
Reference = tuple[str, str]


def found(body: bytes) -> tuple[Reference, ...]:
    """The media references in a JSON body that hold a URL other than data: (none
    in a body that holds no ':/' in any spelling)."""
    if _COLON_THEN_SLASH.search(body) is None and (b"\\" not in body or _ESCAPED_COLON.search(body) is None):
        return ()
    try:
        tree = msgspec.json.decode(body)
    except (msgspec.MsgspecError, UnicodeDecodeError, RecursionError):
        return ()  # not JSON (a multipart upload): no field an engine fetches from
    refs: list[Reference] = []
    _walk(tree, [], refs)
    return tuple(refs)


def _walk(node: Any, at: list[str], refs: list[Reference]) -> None:
    if isinstance(node, list):
        for i, item in enumerate(node):
            at.append(f"[{i}]")
            _walk(item, at, refs)
            at.pop()
        return
    if not isinstance(node, dict):
        return
    if node.get("type") == "url":  # Anthropic's image or document source
        _seen(node.get("url"), at, "url", refs)
    for key, value in node.items():
        if key in _URL_FIELDS:
            if isinstance(value, dict):
                _seen(value.get("url"), [*at, _step(at, key)], "url", refs)
            else:
                _seen(value, at, key, refs)
        elif key in _DATA_FIELDS:
            _seen(value, at, key, refs)
        elif key == "input_audio" and isinstance(value, dict):
            _seen(value.get("data"), [*at, _step(at, key)], "data", refs)
        if isinstance(value, (dict, list)):
            at.append(_step(at, key))
            _walk(value, at, refs)
            at.pop()


def _seen(value: object, at: list[str], key: str, refs: list[Reference]) -> None:
    """A reference holding a URL other than data: (one with ':/' in it, or ':\\', which
    a WHATWG URL parser reads as ':/': engines fetch no other) is kept, with its field's path."""
    if not isinstance(value, str) or (":/" not in value and ":\\" not in value):
        return
    if value.lstrip(_C0_AND_SPACE)[:5].lower() == "data:":
        return
    refs.append(("".join(at) + _step(at, key), value))


def _step(at: list[str], key: str) -> str:
    """A field's name as its path's next step: messages[0].content[1].image_url.url."""
    return f".{key}" if at else key


def allowed(url: str, prefixes: list[str]) -> bool:
    """url starts with one of the prefixes (normal form, config/urls.py), once put in
    normal form itself: what cannot be (userinfo, backslashes, ...) never does."""
    if not prefixes:
        return False
    normal = normal_url(url)
    return normal is not None and any(normal.startswith(p) for p in prefixes)


def check(references: tuple[Reference, ...], prefixes: list[str]) -> None:
    """A 400 for the first reference no prefix allows."""
    for param, url in references:
        if not allowed(url, prefixes):
            raise BadRequest(
                f"{param}: media is not fetched by URL: send its bytes as a data: URL "
                "(data:image/png;base64,...) instead"
                + ("" if prefixes else " (an operator may allow URL prefixes: [server] media_url_prefixes)"),
                param=param,
                code="media_url_not_allowed",
            )


__all__ = ["Reference", "allowed", "check", "found"]
