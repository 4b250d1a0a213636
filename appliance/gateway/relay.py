"""The answer's way back to the client: a whole answer sent once its ledger
entry is written, or a stream relayed chunk by chunk as it arrives (kept alive
with SSE comments while its model loads). Errors before the answer starts raise
(the client gets a real status); after, the stream ends with its API's error
event. A client that goes away cancels the engine's work.

Raw ASGI on purpose: this is the hot path (see bench/gateway_overhead.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable
from typing import TYPE_CHECKING, TypeVar

from appliance.access.keys import NO_KEY, Standing, ended_error
from appliance.access.tenancy import cleaned
from appliance.errors import ApplianceError
from appliance.fleet.hold import ClientGone
from appliance.gateway import api_completions, deadlines
from appliance.gateway.api_responses import usage_and_id
from appliance.gateway.ledger import committed, finish, finish_stream
from appliance.gateway.metering import Usage
from appliance.gateway.response_items import request_input
from appliance.gateway.routing import forward
from appliance.gateway.serving import wait_disconnect

if TYPE_CHECKING:
    from litestar.types import Receive, Send

    from appliance.fleet.deployment import Deployment
    from appliance.gateway.capabilities import Endpoint
    from appliance.gateway.proxy import AnswerStream
    from appliance.gateway.request import ProxyRequest
    from appliance.gateway.runtime import Gateway
    from appliance.gateway.sse import EventRewriter

T = TypeVar("T")
log = logging.getLogger("appliance.relay")

SSE_START_HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
FREE = Usage(0, 0)  # what a free endpoint (a tokenizer's work) is charged


async def answer_whole(rt: Gateway, req: ProxyRequest, send: Send) -> None:
    """Forward the request, then send the engine's whole answer once its ledger
    entry is written (and, for a keyed or regulated request, durable)."""
    # A client that leaves cancels the engine's work, as a stream's does.
    answer = await unless_client_leaves(req.receive, forward(rt, req))
    assert isinstance(answer, tuple), "a whole answer"
    status, data, content_type = answer
    endpoint = req.endpoint
    if req.stores:  # one parse for the usage and the id of the response the engine keeps
        req.usage, made = usage_and_id(data)
        if status == 200 and req.deployment is not None:
            inputs = request_input(req.forwarded or req.body)
            rt.response_homes.remember_made(made, req.deployment.replicas, req.served_by, req.key, inputs)
        data = rt.tenancy.answer(data)
    else:
        req.usage, data = charged(endpoint, req.body, data, rt.tenancy.isolated)
    if status == 200 and (fix := endpoint.dialect.fix_whole) is not None:
        data = fix(req.forwarded or req.body, data)  # as the engine got it: the cap it was held to
    if req.response_text is not None:
        req.response_text = data
    finish(rt, req, status)
    await committed(req)
    req.bytes_sent = True
    headers = req.endpoint.dialect.id_headers(req.rid)
    await send_whole_within(rt.cfg.server.send_timeout_s, send, status, content_type, data, headers, req.rid)


def charged(endpoint: Endpoint, body: bytes, data: bytes, isolated: bool) -> tuple[Usage | None, bytes]:
    """A whole answer's charge and what its client gets of it: its usage (the engine's
    word; nothing on a free endpoint) and, for tenants kept apart, the answer without
    its cache-revealing fields. One step, for this process's relay and a worker's."""
    usage = FREE if endpoint.free else endpoint.dialect.answer_usage(body, data)
    data = cleaned(data, isolated)
    if endpoint.name == "completions" and api_completions.needs_fix(data):  # llama.cpp's chat-shaped one
        data = api_completions.whole_answer(body, data)
    return usage, data


async def send_whole(send: Send, status: int, content_type: str, body: bytes, headers: dict[str, str]) -> None:
    """A whole answer on the raw ASGI path: status, content type and length, headers, body."""
    await send({"type": "http.response.start", "status": status, "headers": _head(content_type, body, headers)})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _head(content_type: str, body: bytes, headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    head = [
        (b"content-type", _CONTENT_TYPES.get(content_type) or content_type.encode("latin-1")),
        (b"content-length", b"%d" % len(body)),
    ]
    for name, value in headers.items():
        head.append((_HEADER_NAMES.get(name) or name.lower().encode("latin-1"), value.encode("latin-1")))
    return head


# A whole answer up to this size goes to the server in one send (it takes it all,
# whether its client reads or not); a larger one goes in pieces of this size, each
# under the send deadline, so a client that stops reading holds no more of it than a
# piece or two.
PIECE_BYTES = 256 * 1024


async def send_whole_within(
    seconds: float, send: Send, status: int, content_type: str, body: bytes, headers: dict[str, str], rid: str
) -> None:
    """send_whole, for an engine's answer: a large one in pieces, given up when its
    client has taken none for ``seconds`` (it stopped reading), with a log line. Its
    ledger entry is written already (the engine's slot was freed once it answered)."""
    if len(body) <= PIECE_BYTES:
        await send_whole(send, status, content_type, body, headers)
        return
    sends = deadlines.sends(seconds)
    try:
        await send({"type": "http.response.start", "status": status, "headers": _head(content_type, body, headers)})
        for at in range(0, len(body), PIECE_BYTES):
            piece = body[at : at + PIECE_BYTES]
            sends.n += 1
            await send({"type": "http.response.body", "body": piece, "more_body": at + PIECE_BYTES < len(body)})
            sends.n += 1
    except asyncio.CancelledError:
        if not sends.passed():
            raise
        log_stalled(rid, seconds, len(body))
    finally:
        sends.end()


def log_stalled(rid: str, seconds: float, size: int | None = None) -> None:
    """The log line of an answer whose client stopped reading it."""
    what = "its answer" if size is None else f"its answer ({size} bytes)"
    log.warning(
        "request %s: its client took no piece of %s for %gs (server.send_timeout_s): dropped", rid, what, seconds
    )


# What send_whole sends most, encoded once: the usual content types, and the names of
# the headers an answer carries (dialects' id headers, the error path's), lowercased.
_CONTENT_TYPES = {"application/json": b"application/json"}
_HEADER_NAMES = {
    name: name.lower().encode("latin-1")
    for name in ("x-request-id", "request-id", "Retry-After", "Allow", "connection")
}


# An answer quicker than this is not watched for the client leaving: most whole ones
# are, and watching costs a task per request (bench/gateway_overhead.py); a stream's
# watch starts this late, after its first chunks. A client that leaves sooner is
# noticed this much later (the engine's work stops then).
WATCH_AFTER_S = 0.2


async def unless_client_leaves(receive: Receive, work: Awaitable[T]) -> T:
    """work's result, unless the client disconnects first: then the request's task
    is cancelled out of work (a held request leaves the queue; the engine's
    connection is closed, which stops its generation) and ClientGone raised.
    The request's own task is cancelled, not a task of its own for work: one
    task fewer per request."""
    watch = _ClientWatch(receive)
    loop = asyncio.get_running_loop()
    watches = _watches if _watches.loop is loop else _watches_on(loop)
    watches.add(watch)
    try:
        return await work
    except asyncio.CancelledError:
        if watch.gone:
            watch.task.uncancel()
            raise ClientGone from None
        raise
    finally:
        watch.waiting = False  # its due time passes over it
        if watch.watcher is not None:
            watch.watcher.cancel()


class _ClientWatch:
    """unless_client_leaves' watch on one request's client, started WATCH_AFTER_S in."""

    __slots__ = ("gone", "receive", "task", "waiting", "watcher")

    def __init__(self, receive: Receive) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.task, self.receive = task, receive
        self.waiting, self.gone = True, False
        self.watcher: asyncio.Future | None = None

    def start(self) -> None:
        self.watcher = asyncio.ensure_future(wait_disconnect(self.receive))
        self.watcher.add_done_callback(self.left)

    def left(self, watcher: asyncio.Future) -> None:
        if self.waiting and not watcher.cancelled():
            self.gone = True
            self.task.cancel()


class _Watches:
    """The client watches of one event loop, each due WATCH_AFTER_S after it was set.
    All wait the same time, so they fall due in the order they were set: a queue and
    one loop timer for its head, not a timer per request (scheduling and cancelling
    one cost ~2 µs of the request's ~30). A watch whose request has ended is passed
    over when it falls due."""

    __slots__ = ("due", "loop", "timer")

    def __init__(self, loop: asyncio.AbstractEventLoop | None) -> None:
        self.loop = loop
        self.due: deque[tuple[float, _ClientWatch]] = deque()
        self.timer: asyncio.TimerHandle | None = None

    def add(self, watch: _ClientWatch) -> None:
        at = self.loop.time() + WATCH_AFTER_S  # type: ignore[union-attr]
        self.due.append((at, watch))
        if self.timer is None:
            self.timer = self.loop.call_at(at, self._fire)  # type: ignore[union-attr]

    def _fire(self) -> None:
        self.timer = None
        due = self.due
        # The loop's timers are in milliseconds: one due within the next is due now.
        now = self.loop.time() + 0.001  # type: ignore[union-attr]
        try:
            while due and due[0][0] <= now:
                watch = due.popleft()[1]
                if watch.waiting:
                    watch.start()
        finally:
            if due:
                self.timer = self.loop.call_at(due[0][0], self._fire)  # type: ignore[union-attr]


_watches = _Watches(None)


def _watches_on(loop: asyncio.AbstractEventLoop) -> _Watches:
    """The running loop's watches (a new loop, in tests and at startup, gets its own)."""
    global _watches
    _watches = _Watches(loop)
    return _watches


async def answer_stream(rt: Gateway, req: ProxyRequest, send: Send) -> None:
    """Open the stream (routing.forward), then relay it."""
    started = False
    try:
        opened = await _open_with_keepalive(rt, req, send)
        stream: AnswerStream | None
        if isinstance(opened, _Started):
            started, stream = True, opened.stream
        else:
            stream = opened
        if not started:
            await _start_sse(send, req)
            started = True
        if stream is None:  # it ended with its error event while the model loaded
            return
        await relay_opened(stream, send, req, rt.cfg.server.send_timeout_s)
    except ApplianceError as exc:
        if not started:
            finish_stream(rt, req, exc.status)
            raise
        await send_sse_error(send, exc, req)


async def relay_opened(stream: AnswerStream, send: Send, req: ProxyRequest, send_timeout_s: float) -> None:
    """An opened stream whose response has started, relayed to its end (or until its
    client leaves, or takes no piece for send_timeout_s: a client that stopped reading
    is treated as one that left). In the request's own task, the client watched only
    once the stream outlives WATCH_AFTER_S: no task and no wait set up per stream
    before its first chunk, work every other stream starting at the same time waits behind."""
    sends = deadlines.sends(send_timeout_s)
    try:
        await unless_client_leaves(req.receive, _pump(stream, send, req, sends))
    except ClientGone:
        return  # the pump, cancelled, closed the engine's stream: that stops its work
    except asyncio.CancelledError:
        if sends.passed():  # the pump, cancelled, closed the stream: charged as a client that left
            log_stalled(req.rid, send_timeout_s)
            return
        raise
    finally:
        sends.end()
    await send({"type": "http.response.body", "body": b"", "more_body": False})


class _Started:
    """The response already started (keepalive comments went out while held);
    stream None: it has ended with its error event already."""

    def __init__(self, stream: AnswerStream | None) -> None:
        self.stream = stream


async def _open(rt: Gateway, req: ProxyRequest) -> AnswerStream:
    stream = await forward(rt, req)
    assert not isinstance(stream, tuple), "a stream"
    return stream


async def _open_with_keepalive(rt: Gateway, req: ProxyRequest, send: Send) -> AnswerStream | _Started:
    keepalive = rt.cfg.queue.keepalive_s
    dep: Deployment | None = req.deployment
    if keepalive <= 0 or dep is None or dep.pick_ready() is not None:
        return await _open(rt, req)
    opening = asyncio.ensure_future(_open(rt, req))
    sends: deadlines.Sends | None = None
    try:
        opened, _ = await asyncio.wait([opening], timeout=keepalive)
        if opened:
            return opening.result()
        # Still loading: start the answer now, and keep it alive with SSE comments,
        # each under server.send_timeout_s (a client that stops reading them has left).
        await _start_sse(send, req)
        sends = deadlines.sends(rt.cfg.server.send_timeout_s)
        while True:
            sends.n += 1
            try:
                await send({"type": "http.response.body", "body": b": model is loading\n\n", "more_body": True})
            except asyncio.CancelledError:
                if not sends.passed():
                    raise
                log_stalled(req.rid, sends.seconds)
                raise ClientGone from None
            finally:
                sends.n += 1
            opened, _ = await asyncio.wait([opening], timeout=keepalive)
            if opened:
                try:
                    return _Started(opening.result())
                except ApplianceError as exc:
                    finish_stream(rt, req, exc.status)
                    await send_sse_error(send, exc, req)
                    return _Started(None)
    finally:
        if sends is not None:
            sends.end()
        if not opening.done():
            opening.cancel()


async def _start_sse(send: Send, req: ProxyRequest) -> None:
    """Start a 200 event-stream answer; from here on no fallback may take over the request."""
    req.bytes_sent = True
    id_headers = req.endpoint.dialect.id_headers(req.rid)
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [*SSE_START_HEADERS, *((k.encode(), v.encode()) for k, v in id_headers.items())],
        }
    )


# The end of an audit row's answer text cut at upstream.max_answer_bytes.
TEXT_CUT = b"\n[cut: the answer was longer than upstream.max_answer_bytes]"


async def _pump(stream: AnswerStream, send: Send, req: ProxyRequest, sends: deadlines.Sends) -> None:
    """Each piece the engine sent, sent on as it arrives: one read and one send per
    piece and nothing else awaited (the tap's work is a few substring scans). A piece
    is whatever arrived since the last read (proxy.EngineStream), so events that
    arrived during the last send go out together, and none waits for a later one.
    Each send is under the sends deadline (counted before and after: no timer)."""
    tap = req.tap
    text: list[bytes] | None = [] if req.response_text is not None else None
    room = req.response_text_cap  # what more of the text is kept: cut there, not held whole
    read = stream.read
    fixer = _stream_fixer(req)
    # Its key's standing: revoked (or its budget lowered below what it used) ends the
    # stream at its next piece, one attribute read per piece (Gate.refresh sets it; in
    # a worker carrying the stream, the daemon's Cut: dataplane/worker_client.py).
    standing = req.key.standing if req.key is not None else req.standing or NO_KEY
    try:
        chunk = await read()
        if chunk:
            req.ttft = time.perf_counter() - req.started
        while chunk:
            if standing.ended is not None:
                raise _cut(req, standing)
            if fixer is not None:
                chunk = fixer.feed(chunk)
            if tap is not None:
                chunk = tap.feed(chunk)
            if chunk:
                if text is not None and room >= 0:
                    text.append(chunk if len(chunk) <= room else chunk[:room] + TEXT_CUT)
                    room = room - len(chunk) if len(chunk) <= room else -1
                sends.n += 1
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                sends.n += 1
            chunk = await read()
        # The engine's stream ended and the relay finished the request (its row);
        # the closing [DONE], held back by the tap, waits until that row is durable.
        stream.close()
        if fixer is not None and (tail := fixer.rest()):  # an unfinished last event, as it came
            await send({"type": "http.response.body", "body": tap.feed(tail) if tap else tail, "more_body": True})
        await committed(req)
        if tap is not None and (rest := tap.rest()):
            await send({"type": "http.response.body", "body": rest, "more_body": True})
    finally:
        if text is not None:
            req.response_text = b"".join(text)
        stream.close()


def _cut(req: ProxyRequest, standing: Standing) -> ApplianceError:
    """A stream its key's standing ended: its error event, and its row's status (the
    pump's close charges what it generated so far and closes the engine's connection)."""
    exc = ended_error(standing)
    req.cut_status = exc.status
    log.warning(
        "request %s: its stream was ended: its key %s",
        req.rid,
        "was revoked" if standing.ended == "revoked" else "is over its lowered budget",
    )
    return exc


def _stream_fixer(req: ProxyRequest) -> EventRewriter | None:
    """What rewrites the stream's events into its API's promise (the dialect's fix; a
    legacy completion's, which chat's dialect shares: api_completions.CompletionEvents)."""
    endpoint = req.endpoint
    if endpoint.dialect.fix_stream is not None:  # the request as the engine got it: the cap it was held to
        return endpoint.dialect.fix_stream(req.forwarded or req.body)
    return api_completions.CompletionEvents(req.body) if endpoint.name == "completions" else None


async def send_sse_error(send: Send, exc: ApplianceError, req: ProxyRequest) -> None:
    """The stream's end, in its API's error event (appliance/gateway/dialects.py)."""
    event = req.endpoint.dialect.stream_error(exc)
    with contextlib.suppress(Exception):
        await send({"type": "http.response.body", "body": event, "more_body": False})


__all__ = [
    "answer_stream",
    "answer_whole",
    "charged",
    "log_stalled",
    "relay_opened",
    "send_sse_error",
    "send_whole",
    "send_whole_within",
    "unless_client_leaves",
]
