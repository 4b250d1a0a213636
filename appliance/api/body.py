"""A request's whole body, read straight from the ASGI receive channel: within the
size limit (413) and the read timeout (408), a body that breaks off a 400. The front
door (api/app.py) and the admin API's writes (api/admin.py) read bodies this way."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from litestar.types import Receive

from appliance.errors import BadRequest, PayloadTooLarge, RequestTimeout
from appliance.gateway import deadlines

log = logging.getLogger("appliance.api")


async def read_body(receive: Receive, declared: bytes | None, limit: int, timeout: float = 30.0) -> bytes:
    """The whole request body straight from the ASGI receive channel, within
    timeout seconds (a client trickling its body byte by byte gets 408). The deadline
    cancels this task, as asyncio.timeout's would, from a queue of the deadlines of
    its length rather than a loop timer of its own (gateway/deadlines.py)."""
    deadline = deadlines.start(timeout)
    try:
        return await _receive_body(receive, declared, limit)
    except asyncio.CancelledError:
        if deadline.passed():  # our deadline's cancel, no one else's
            raise RequestTimeout(f"Request body not received within {timeout:g}s") from None
        raise
    finally:
        deadline.end()


async def _receive_body(receive: Receive, declared: bytes | None, limit: int) -> bytes:
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"Request body of {int(declared)} bytes exceeds the limit of {limit} bytes")
    message: Any = await receive()  # an http.request or http.disconnect message
    body = message.get("body", b"")
    if message.get("more_body", False):
        chunks = [body]
        size = len(body)
        while message.get("more_body", False):
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _body_broken(size)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"Request body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
        body = b"".join(chunks)
    elif message["type"] == "http.disconnect":
        raise _body_broken(0)
    if len(body) > limit:
        raise PayloadTooLarge(f"Request body of {len(body)} bytes exceeds the limit of {limit} bytes")
    return body


def _body_broken(received: int) -> BadRequest:
    """Granian ends the body with http.disconnect both when the client left and when
    its framing broke (a bad chunk size, a chunk longer than it said, the connection
    closed mid-body): a 400 for whoever still listens, logged and audited."""
    log.info("request body ended after %d bytes: malformed chunked encoding or connection closed", received)
    return BadRequest(
        f"Malformed or incomplete request body (ended after {received} bytes): bad chunked "
        "encoding, or the connection closed before the whole body arrived",
        code="invalid_body",
    )
