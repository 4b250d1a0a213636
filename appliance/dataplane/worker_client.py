"""A worker's client side: each HTTP request Granian gives it (its ASGI app), passed to
the daemon over the link and its answer sent back (appliance/dataplane/worker.py owns
the process and the link; worker_engine.py the engine calls the daemon asks for;
worker_carried.py what a carried request keeps and its granted call's pieces).

The fast path (FAST_PATHS, a body that came whole and decodes): the worker reads
the body with the front door's own decoder, keeps it, and sends the daemon only
what its policy reads of it (Request.facts, gateway/facts.py); granted, it sets
the fields the daemon decided, calls the replica itself and answers its client
(the relay's own code: EngineProxy, StreamTap, relay.relay_opened, relay.charged),
then tells the daemon how it went (Finish); a keyed or regulated answer's last
bytes wait for the daemon's Settled. Refused, the daemon's envelope is sent as
it came; not grantable, the daemon asks for the body (Want) and answers it as
any request. A body the worker cannot decode goes to the daemon whole, whose
front door answers it (400, 413, 415) as one process does. A body whose first
piece never comes is answered 408 here (the daemon never hears of it): swept.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import Any

import aiohttp
import msgspec

from appliance.access.keys import Standing
from appliance.access.tenancy import revealing, scrub
from appliance.dataplane.protocol import (
    Body,
    Cut,
    Finish,
    FrameWriter,
    Gone,
    Grant,
    Limits,
    Mailbox,
    Request,
    Settled,
    Start,
    ToWorker,
    Want,
    WorkerSettings,
)
from appliance.dataplane.worker_carried import (
    NOT_WRITTEN,
    Carried,
    EngineAnswered,
    Granted,
    GrantedProxy,
    decode_carried,
    failed,
)
from appliance.errors import ApplianceError, EngineFailure, RequestTimeout
from appliance.fleet.hold import ClientGone
from appliance.gateway import deadlines
from appliance.gateway.dialects import dialect_for_path
from appliance.gateway.metering import StreamTap
from appliance.gateway.relay import (
    SSE_START_HEADERS,
    WATCH_AFTER_S,
    charged,
    log_stalled,
    relay_opened,
    send_sse_error,
    send_whole,
    send_whole_within,
    unless_client_leaves,
)
from appliance.gateway.request import ProxyRequest, request_id_of
from appliance.gateway.serving import wait_disconnect

log = logging.getLogger("appliance.worker")

WORKER_HEADER = b"x-appliance-worker"
# On an answer the worker carried (a grant): the fast path was taken.
CARRIED = (b"x-appliance-path", b"fast")
# The hot endpoints a worker asks to carry (OpenAI's; the daemon still decides).
FAST_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings"})


class ClientSide:
    """Granian's ASGI app in a worker: its requests, each passed to the daemon (over the
    link's writer) and answered with what the daemon sends back (take), or carried here."""

    def __init__(self, settings: WorkerSettings, writer: FrameWriter, session: aiohttp.ClientSession) -> None:
        self.settings = settings
        self.out = writer
        self.worker_header = (WORKER_HEADER, str(settings.index).encode())
        self.carried_headers = {WORKER_HEADER.decode(): str(settings.index), CARRIED[0].decode(): CARRIED[1].decode()}
        self.ids = itertools.count(1)
        self.requests: dict[int, Mailbox[Start | Body | Grant | Settled | Want | None]] = {}
        self.proxy = GrantedProxy(session, settings.max_answer_bytes)
        # A carried stream's Settled, awaited by the relay before its last bytes.
        self.receipts: dict[int, asyncio.Future[None]] = {}
        # Each carried request's standing, ended by the daemon's Cut (its key revoked, or
        # its budget lowered below what it used): its stream's relay reads it per piece.
        self.standings: dict[int, Standing] = {}
        self.timeouts: dict[tuple[float | None, float | None], aiohttp.ClientTimeout] = {}
        # The requests whose body's first piece has not come: the receive awaited for it, and
        # since when (the loop's clock); a receive past server.body_read_timeout_s is cancelled
        # (late_bodies), and its request answered 408. Swept (a timer per request would cost
        # more than the rest of its reading).
        self.first_pieces: dict[Any, float] = {}
        self.loop = asyncio.get_running_loop()
        self.clock = self.loop.time
        self.late_bodies: set[Any] = set()

    def take(self, frame: ToWorker) -> None:
        """A frame from the daemon for one of these requests."""
        if isinstance(frame, Settled) and (receipt := self.receipts.get(frame.rid)) is not None:
            if not receipt.done():
                receipt.set_result(None) if frame.ok else receipt.set_exception(NOT_WRITTEN)
        elif isinstance(frame, (Start, Body, Gone, Grant, Settled, Want)):
            answer = self.requests.get(frame.rid)
            if answer is not None:
                answer.put(None if isinstance(frame, Gone) else frame)
        elif isinstance(frame, Limits):  # a reload's: the requests that come next are read by them
            self.settings = msgspec.structs.replace(
                self.settings,
                body_read_timeout_s=frame.body_read_timeout_s,
                max_body_bytes=frame.max_body_bytes,
                send_timeout_s=frame.send_timeout_s,
                max_answer_bytes=frame.max_answer_bytes,
            )
            self.proxy.max_answer_bytes = frame.max_answer_bytes
        elif isinstance(frame, Cut) and (standing := self.standings.get(frame.rid)) is not None:
            standing.ended = frame.why

    def daemon_gone(self) -> None:
        """The link closed: no answer will come for these requests."""
        for answer in self.requests.values():
            answer.put(None)
        for receipt in self.receipts.values():  # the daemon is gone: no last bytes without its word
            if not receipt.done():
                receipt.set_exception(NOT_WRITTEN)

    # One request, passed to the daemon and its answer sent back.

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if _expects_continue(scope):
            await self._held(scope, receive, send)
            return
        piece = receive()  # Granian's awaitable: cancellable, as a future is
        self.first_pieces[piece] = self.clock()
        try:  # (the rest of a body that comes in pieces is timed by the daemon's front door)
            first = await piece
        except asyncio.CancelledError:
            if piece not in self.late_bodies or _cancelling():
                raise
            await self._body_timed_out(scope, send)
            return
        finally:
            del self.first_pieces[piece]
            self.late_bodies.discard(piece)
        started, rid = time.perf_counter(), next(self.ids)
        answer: Mailbox[Start | Body | Grant | Settled | Want | None] = Mailbox(self.loop)
        self.requests[rid] = answer
        if first["type"] == "http.disconnect":
            # Granian ends a body whose chunked framing broke before its first byte (a bad
            # chunk size) as a client that left: the daemon's front door reads it so, and
            # answers its 400, logged and audited, as one process does (not Granian's 500).
            self.out.write(_request(rid, scope, b"", True, None))
            self.out.write(Gone(rid))
            try:
                await self._answer(rid, answer, send)
            finally:
                del self.requests[rid]
            return
        left = self.settings.max_body_bytes + 1
        data, more, left = _piece(first, left)
        # A body whose first piece is all of it goes as one (more: False), whatever the path:
        # answered without reading it, its connection stays open, as one process's (Granian
        # drains a body it has). A fast path's is carried.
        more = more and not _came_whole(scope, data)
        whole = not more and scope["path"] in FAST_PATHS and scope["method"] == "POST"
        carried = decode_carried(started, scope["path"], data) if whole else None
        try:
            self.out.write(_request(rid, scope, data if carried is None else b"", more, carried))
            if carried is not None:
                await self._decided(rid, answer, carried, receive, send)
                return
            # Its body's rest passed on beside the daemon's answer, which may come before the
            # body is whole (401, 413, the front door's 408): then the rest is not read.
            client = self._pass_then_watch(rid, receive, left) if more else self._watch(rid, receive)
            watcher = asyncio.ensure_future(client)
            try:
                await self._answer(rid, answer, send)
            finally:
                watcher.cancel()
        finally:
            del self.requests[rid]

    async def _held(self, scope: Any, receive: Any, send: Any) -> None:
        """A request whose client waits for 100 Continue before sending its body: passed
        on without it, its body read (Granian then sends the 100) and passed on only once
        the daemon's front door asks for it (Want); a refusal before that (401, 403, 413 on
        the declared length...) goes out with no 100, the body never read, as one process
        answers. Not carried: its facts would need the body before the daemon's word."""
        rid = next(self.ids)
        answer: Mailbox[Start | Body | Grant | Settled | Want | None] = Mailbox(self.loop)
        self.requests[rid] = answer
        reader: asyncio.Future[None] | None = None
        left = self.settings.max_body_bytes + 1
        try:
            self.out.write(_request(rid, scope, b"", True, None, held=True))
            while isinstance(frame := await answer.get(), Want):
                if reader is None:
                    reader = asyncio.ensure_future(self._pass_then_watch(rid, receive, left))
            await self._answer(rid, answer, send, frame)
        finally:
            if reader is not None:
                reader.cancel()
            del self.requests[rid]

    async def _body_timed_out(self, scope: Any, send: Any) -> None:
        """No piece of the body came in time (the daemon never heard of the request):
        the front door's 408, in the path's API's envelope, naming the request's id as
        every answer does (the client's X-Request-Id, by the front door's rule, or a new one)."""
        err = RequestTimeout(f"Request body not received within {self.settings.body_read_timeout_s:g}s")
        dialect = dialect_for_path(scope["path"])
        rid = request_id_of(next((bytes(v) for k, v in scope["headers"] if k == b"x-request-id"), None))
        headers = {**err.headers(), **dialect.id_headers(rid), WORKER_HEADER.decode(): str(self.settings.index)}
        await send_whole(send, err.status, "application/json", dialect.envelope(err), headers)

    async def sweep_late_bodies(self) -> None:
        """Cancel the requests whose body's first piece is later than the timeout (each
        answers 408), looking every second (every half timeout, if that is shorter)."""
        while True:
            await asyncio.sleep(min(1.0, self.settings.body_read_timeout_s / 2))
            self.sweep()

    def sweep(self) -> None:
        """Cancel the first-piece receives waiting longer than the timeout. The receive
        is cancelled, not its request's task: a piece that came in this same loop turn
        (its receive done, its task not yet resumed) cannot be cancelled, and is served."""
        timeout, now = self.settings.body_read_timeout_s, self.clock()
        for piece, since in list(self.first_pieces.items()):
            if now - since >= timeout and piece.cancel():
                self.late_bodies.add(piece)

    async def _pass_then_watch(self, rid: int, receive: Any, left: int) -> None:
        if await self._pass_body(rid, receive, left):
            await self._watch(rid, receive)

    async def _pass_body(self, rid: int, receive: Any, left: int) -> bool:
        """The rest of the request's body to the daemon as it arrives; False: the client left."""
        while True:
            await self.out.drain()
            message = await receive()
            if message["type"] == "http.disconnect":
                self.out.write(Gone(rid))
                return False
            data, more, left = _piece(message, left)
            self.out.write(Body(rid, data, more))
            if not more:
                return True

    async def _watch(self, rid: int, receive: Any) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.out.write(Gone(rid))

    async def _answer(self, rid: int, answer: Mailbox[Any], send: Any, frame: Any = None) -> None:
        """The daemon's answer (from frame, else its first), relayed to the client. One in
        pieces (a stream; a large whole answer, relay.send_whole_within) whose client takes
        none for server.send_timeout_s (it stopped reading) is dropped, and the daemon told
        it left (Gone): that ends the engine's request, as for any leaver. An answer in one
        frame goes to the server whole, read or not: it is not watched (no cost)."""
        sends: deadlines.Sends | None = None
        start: Start | None = None  # its head: the X-Request-Id the client and the audit row know
        try:
            while True:
                if frame is None:
                    frame = await answer.get()
                if not isinstance(frame, (Start, Body)):  # no more answer (the daemon is done with it, or gone)
                    return
                if sends is None and frame.more:
                    sends = deadlines.sends(self.settings.send_timeout_s)
                if sends is not None:
                    sends.n += 1
                if isinstance(frame, Start):
                    start = frame
                    headers = [*frame.headers, self.worker_header]
                    await send({"type": "http.response.start", "status": frame.status, "headers": headers})
                    await send({"type": "http.response.body", "body": frame.body, "more_body": frame.more})
                else:
                    await send({"type": "http.response.body", "body": frame.data, "more_body": frame.more})
                if sends is not None:
                    sends.n += 1
                if not frame.more:
                    return
                frame = None
        except asyncio.CancelledError:
            if sends is None or not sends.passed():
                raise
            log_stalled(f"{_request_id(start, rid)} (worker {self.settings.index})", sends.seconds)
            self.out.write(Gone(rid))
        finally:
            if sends is not None:
                sends.end()

    # The fast path: a request the daemon decides and this worker carries.

    async def _decided(self, rid: int, frames: Mailbox[Any], carried: Carried, receive: Any, send: Any) -> None:
        """Granted, the request is carried here (again, when the daemon retries it on
        another replica); refused, or answered by the daemon, that answer is relayed."""
        watch = _ClientWatch(self, rid, receive)
        self.standings[rid] = Standing()  # before any grant: a Cut may follow it in the same read
        try:
            while True:
                frame = await frames.get()
                if isinstance(frame, Want):  # the daemon answers it after all: the body it needs
                    self.out.write(Body(rid, carried.body, False))
                    continue
                if not isinstance(frame, Grant):
                    await self._answer(rid, frames, send, frame)
                    return
                if watch.gone:  # the client left before the grant came: nothing to carry
                    self.out.write(Finish(rid, 499, "", "", b"", None, 0, None, False))
                    continue
                watch.stop()  # the relay watches the client from here
                carry = self._carry_stream if frame.stream else self._carry_whole
                if await carry(rid, frame, carried, receive, send, frames):
                    return
                watch = _ClientWatch(self, rid, receive)
        finally:
            watch.stop()
            del self.standings[rid]

    async def _carry_whole(
        self, rid: int, grant: Grant, carried: Carried, receive: Any, send: Any, frames: Mailbox[Any]
    ) -> bool:
        """relay.answer_whole, on the grant's replica: False when the engine failed
        before answering (the daemon retries it, or answers with the error)."""
        try:
            call = self.proxy.unary(Granted(grant, self._timeout(grant)), "", carried.sent(grant), grant.headers)
            status, data, content_type = await unless_client_leaves(receive, call)
        except ClientGone:
            self.out.write(Finish(rid, 499, "", "", b"", None, 0, None, False))
            return True
        except (EngineAnswered, EngineFailure) as exc:
            self.out.write(failed(rid, exc))
            return False
        usage, data = charged(carried.endpoint, carried.body, data, grant.scrub)
        counts = (usage.prompt_tokens, usage.completion_tokens) if usage is not None else None
        self.out.write(Finish(rid, status, "", "", b"", counts, 0, None, False))
        if grant.accountable:  # the answer waits until its row and charge are durable
            settled = await frames.get()
            if not isinstance(settled, Settled):  # the daemon answers instead (503: not written)
                await self._answer(rid, frames, send, settled)
                return True
        request_id = grant.request_id
        headers = {"x-request-id": request_id, **self.carried_headers}
        await send_whole_within(self.settings.send_timeout_s, send, status, content_type, data, headers, request_id)
        return True

    async def _carry_stream(
        self, rid: int, grant: Grant, carried: Carried, receive: Any, send: Any, frames: Mailbox[Any]
    ) -> bool:
        """relay.answer_stream, on the grant's replica: the engine's stream relayed as
        it arrives (a slow client slows its reading: each piece's send is awaited), its
        usage tapped, its end told to the daemon (Finish, from the stream's close)."""
        req = ProxyRequest(grant.request_id, carried.started, 0.0, carried.endpoint, receive)
        req.body = carried.body  # what the stream's fixer reads of the request (relay._stream_fixer)
        req.standing = self.standings[rid]
        if grant.tap is not None:
            req.tap = StreamTap(grant.tap, scrub, revealing) if grant.scrub else StreamTap(grant.tap)
        if grant.accountable:
            req.receipt = self.receipts[rid] = self.loop.create_future()

        def done(status: int) -> None:
            tap = req.tap
            usage = tap.usage if tap is not None else None
            counts = (usage.prompt_tokens, usage.completion_tokens) if usage is not None else None
            events = tap.events if tap is not None else 0
            status = req.cut_status or status  # its key's standing ended it: 401, 429
            self.out.write(Finish(rid, status, "", "", b"", counts, events, req.ttft, req.bytes_sent))

        try:
            upstream = Granted(grant, self._timeout(grant))
            try:
                stream = await self.proxy.open_stream(upstream, "", carried.sent(grant), grant.headers, done)
            except (EngineAnswered, EngineFailure) as exc:
                self.out.write(failed(rid, exc))
                return False
            await self._relay_carried(stream, req, send)
            return True
        finally:
            self.receipts.pop(rid, None)

    async def _relay_carried(self, stream: Any, req: ProxyRequest, send: Any) -> None:
        req.bytes_sent = True
        headers = [*SSE_START_HEADERS, (b"x-request-id", req.rid.encode()), self.worker_header, CARRIED]
        try:
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await relay_opened(stream, send, req, self.settings.send_timeout_s)
        except ApplianceError as exc:  # its row could not be written: the stream ends with the error event
            await send_sse_error(send, exc, req)
        finally:
            stream.close()

    def _timeout(self, grant: Grant) -> aiohttp.ClientTimeout:
        key = (grant.connect_timeout_s, grant.read_timeout_s)
        timeout = self.timeouts.get(key)
        if timeout is None:
            timeout = self.timeouts[key] = aiohttp.ClientTimeout(total=None, sock_connect=key[0], sock_read=key[1])
        return timeout


def _request_id(start: Start | None, rid: int) -> str:
    """The request's X-Request-Id, from its answer's head (every answer names it), for a log
    line: the worker's own number for it is known to no client, access log or audit row."""
    found = next((v for k, v in start.headers if k == b"x-request-id"), None) if start is not None else None
    return found.decode(errors="replace") if found is not None else f"#{rid}"


class _ClientWatch:
    """A client watched for leaving while the daemon decides its request (a held one:
    its Gone takes it out of the queue), from WATCH_AFTER_S on: most decisions take
    less, and watching costs a task (as relay.unless_client_leaves does)."""

    __slots__ = ("gone", "receive", "rid", "task", "timer", "worker")

    def __init__(self, worker: ClientSide, rid: int, receive: Any) -> None:
        self.worker, self.rid, self.receive = worker, rid, receive
        self.gone = False
        self.task: asyncio.Task[None] | None = None
        self.timer = worker.loop.call_later(WATCH_AFTER_S, self._start)

    def _start(self) -> None:
        self.task = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        await wait_disconnect(self.receive)
        self.gone = True
        self.worker.out.write(Gone(self.rid))

    def stop(self) -> None:
        self.timer.cancel()
        if self.task is not None:
            self.task.cancel()


def _cancelling() -> bool:
    """Whether the current task itself is being cancelled (not only a receive it awaited)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _request(rid: int, scope: Any, body: bytes, more: bool, carried: Carried | None, held: bool = False) -> Request:
    """The Request frame of a client's request: its head, with its body's first piece
    (or the facts of a body kept here, carried; or nothing yet, held)."""
    client = scope.get("client")
    return Request(
        rid,
        scope["method"],
        scope["path"],
        scope["query_string"],
        [(bytes(k), bytes(v)) for k, v in scope["headers"]],
        (str(client[0]), int(client[1])) if client else None,
        scope["http_version"],
        body,
        more,
        None if carried is None else carried.facts,
        held,
    )


def _expects_continue(scope: Any) -> bool:
    """Whether the client waits for 100 Continue before sending its body (RFC 9110 10.1.1)."""
    for name, value in scope["headers"]:
        if name == b"expect":
            return bytes(value).strip().lower() == b"100-continue"
    return False


def _came_whole(scope: Any, data: bytes) -> bool:
    """Whether the first piece is the whole body its Content-Length declares (Granian
    says more_body until it has read past the end: the next message is empty)."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            return value.isdigit() and int(value) == len(data)
    return False


def _piece(message: dict[str, Any], left: int) -> tuple[bytes, bool, int]:
    """(data, more, bytes left) of a body message: past the limit the worker stops
    reading, and the daemon, given one byte too many, answers 413."""
    data = message.get("body", b"")[:left]
    left -= len(data)
    return data, message.get("more_body", False) and left > 0, left
