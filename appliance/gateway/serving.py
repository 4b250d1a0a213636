"""Serving one OpenAI request: choose a replica (holding the request while its
model cold-starts), forward it, retry on another replica when the engine failed
before answering a byte, and relay the answer, streamed or whole.

Raw ASGI on purpose: this is the hot path (see bench/gateway_overhead.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from appliance.errors import ApplianceError, EngineFailure
from appliance.fleet.supervisor import ClientGone, Deployment, Exclude
from appliance.gateway.dialects import OPENAI, Dialect
from appliance.gateway.routing import committed

T = TypeVar("T")

log = logging.getLogger("appliance.serving")

MAX_ATTEMPTS = 3
SSE_START_HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


async def forward_unary(
    rt, dep: Deployment, path: str, body: bytes, headers: dict[str, str], receive, ctx=None
) -> tuple[int, bytes, str]:
    """The engine's whole answer. receive: watched for the client leaving while
    the request is held (None: the caller watches, see unless_client_leaves)."""
    return await _on_a_replica(dep, receive, ctx, headers, lambda replica: rt.proxy.unary(replica, path, body, headers))


# A unary answer quicker than this is not watched for the client leaving: most are,
# and watching costs a task per request (bench/gateway_overhead.py); a client that
# leaves sooner is noticed this much later.
WATCH_AFTER_S = 0.2


async def unless_client_leaves(receive, work: Awaitable[T]) -> T:
    """work's result, unless the client disconnects first: then the request's task
    is cancelled out of work (a held request leaves the queue; the engine's
    connection is closed, which stops its generation) and ClientGone raised.
    The request's own task is cancelled, not a task of its own for work: one
    task fewer per request."""
    task = asyncio.current_task()
    waiting, gone = True, False
    watcher: asyncio.Future | None = None

    def left(w: asyncio.Future) -> None:
        nonlocal gone
        if waiting and not w.cancelled():
            gone = True
            task.cancel()

    def watch() -> None:
        nonlocal watcher
        watcher = asyncio.ensure_future(_wait_disconnect(receive))
        watcher.add_done_callback(left)

    timer = asyncio.get_running_loop().call_later(WATCH_AFTER_S, watch)
    try:
        return await work
    except asyncio.CancelledError:
        if gone:
            task.uncancel()
            raise ClientGone from None
        raise
    finally:
        waiting = False
        timer.cancel()
        if watcher is not None:
            watcher.cancel()


async def _on_a_replica(dep: Deployment, receive, ctx, headers: dict[str, str], call):
    """call(replica) on a READY replica (held while the model starts); when the
    engine failed before answering a byte, again on another one (or the same,
    restarted), up to MAX_ATTEMPTS."""
    failed = None
    prefix = ctx.prefix if ctx is not None else None
    for attempt in range(1, MAX_ATTEMPTS + 1):
        replica = await dep.acquire(
            disconnected=(lambda: _wait_disconnect(receive)) if receive else None, exclude=failed, prefix=prefix
        )
        if ctx is not None:
            ctx.served_by = replica.name
        try:
            return await call(replica)
        except EngineFailure as exc:
            if not exc.retryable or attempt == MAX_ATTEMPTS:
                raise
            log.warning("retrying request %s on another replica: %s", headers.get("X-Request-Id"), exc)
            failed = Exclude(replica, dep.supervisor.clock.monotonic())
    raise AssertionError("unreachable")


async def forward_stream(
    rt,
    dep: Deployment,
    path: str,
    body: bytes,
    headers: dict[str, str],
    receive,
    send,
    done: Callable[[int], None],
    ctx=None,
    opener=None,
) -> None:
    """Open the engine's stream, then relay it. Errors before the answer starts
    raise (the client gets a real status); after, they end the stream with an
    SSE error event. A client that goes away cancels the engine's work.
    opener(), when given, opens the stream instead (a route with fallbacks)."""
    keepalive = rt.cfg.queue.keepalive_s
    started = False
    watcher = None
    if opener is None:

        def opener():
            return _open_stream(rt, dep, path, body, headers, receive, done, ctx)

    try:
        chunks = await _open_with_keepalive(dep, opener, headers, send, keepalive, ctx, done)
        if isinstance(chunks, _Started):
            started, chunks = True, chunks.chunks
        if not started:
            await _start_sse(send, headers, ctx)
            started = True
        watcher = asyncio.ensure_future(_wait_disconnect(receive))
        pump = asyncio.ensure_future(_pump(chunks, send, ctx))
        await asyncio.wait([pump, watcher], return_when=asyncio.FIRST_COMPLETED)
        if not pump.done():
            pump.cancel()  # the client left: closing the engine's stream stops its work
            with contextlib.suppress(BaseException):
                await pump
            return
        pump.result()
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    except ApplianceError as exc:
        if not started:
            done(exc.status)
            raise
        await _send_sse_error(send, exc, ctx)
    finally:
        if watcher is not None and not watcher.done():
            watcher.cancel()


class _Started:
    """The response already started (keepalive comments went out while held)."""

    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
        self.chunks = chunks


async def _open_with_keepalive(dep, opener, headers, send, keepalive: float, ctx, done):
    if keepalive <= 0 or dep.pick_ready() is not None:
        return await opener()
    opening = asyncio.ensure_future(opener())
    try:
        opened, _ = await asyncio.wait([opening], timeout=keepalive)
        if opened:
            return opening.result()
        # Still loading: start the answer now, and keep it alive with SSE comments.
        await _start_sse(send, headers, ctx)
        while True:
            await send({"type": "http.response.body", "body": b": model is loading\n\n", "more_body": True})
            opened, _ = await asyncio.wait([opening], timeout=keepalive)
            if opened:
                try:
                    return _Started(opening.result())
                except ApplianceError as exc:
                    done(exc.status)
                    await _send_sse_error(send, exc, ctx)
                    return _Started(_empty())
    finally:
        if not opening.done():
            opening.cancel()


async def _start_sse(send, headers, ctx) -> None:
    """Start a 200 event-stream answer; from here on no fallback may take over the request."""
    if ctx is not None:
        ctx.bytes_sent = True
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [*SSE_START_HEADERS, (b"x-request-id", headers["X-Request-Id"].encode())],
        }
    )


async def _empty() -> AsyncIterator[bytes]:
    return
    yield b""  # pragma: no cover - makes this an async generator


def open_local_stream(rt, dep: Deployment, path, body, headers, receive, done, ctx=None):
    return _open_stream(rt, dep, path, body, headers, receive, done, ctx)


async def _open_stream(rt, dep: Deployment, path, body, headers, receive, done, ctx=None) -> AsyncIterator[bytes]:
    return await _on_a_replica(
        dep,
        receive,
        ctx,
        headers,
        lambda replica: rt.proxy.open_stream(replica, path, body, headers, done, _dialect(ctx)),
    )


async def _pump(chunks: AsyncIterator[bytes], send, ctx=None) -> None:
    tap = ctx.tap if ctx is not None else None
    text = [] if ctx is not None and ctx.response_text is not None else None
    try:
        async for chunk in chunks:
            if ctx is not None and ctx.ttft is None:
                ctx.ttft = time.perf_counter() - ctx.started
            if tap is not None:
                chunk = tap.feed(chunk)
                if not chunk:
                    continue
            if text is not None:
                text.append(chunk)
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        # The engine's stream ended and the relay finished the request (its row);
        # the closing [DONE], held back by the tap, waits until that row is durable.
        if ctx is not None:
            await committed(ctx)
        if tap is not None and (rest := tap.rest()):
            await send({"type": "http.response.body", "body": rest, "more_body": True})
    finally:
        if text is not None:
            ctx.response_text = b"".join(text)
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()


async def _wait_disconnect(receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


def _dialect(ctx) -> Dialect:
    return ctx.dialect if ctx is not None else OPENAI


async def _send_sse_error(send, exc: ApplianceError, ctx) -> None:
    """The stream's end, in its API's error event (appliance/dialects.py)."""
    event = _dialect(ctx).stream_error(exc)
    with contextlib.suppress(Exception):
        await send({"type": "http.response.body", "body": event, "more_body": False})


__all__ = ["ClientGone", "forward_stream", "forward_unary", "open_local_stream", "unless_client_leaves"]
