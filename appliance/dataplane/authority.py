"""The daemon's end of the data plane: each worker's link, the requests its
clients send run on the daemon's own app (so every decision — key, route,
budget, replica, hold queue, fallback, audit row — is made here, exactly as with
no workers).

A request on the fast path (Request.facts: a hot endpoint whose whole body the
worker has read and decoded) comes without its body: only what the policy reads
of it (gateway/facts.py). It is decided here by the same front door on those
facts (app.py ``_serve``: no body read, no JSON parsed here), then granted
(``answer``, the runtime's answerer): the worker sets the fields decided here
in the body it kept, calls the replica chosen here and answers its client
itself; its Finish frame comes back here, where the replica's slot is released
and the request settled and audited (gateway/ledger.finish), as the relay
would. One that may not be granted after all (a fallback to weigh, the audit's
text...) has its body asked of the worker (Want) and is answered here. A traced one
is granted too: its attempt's span is made here and its traceparent goes in the grant.
Any other request is answered here, and the engine calls it makes are made by
its worker (RemoteProxy, remote_proxy.py), whose process relays the bytes.

A worker that dies takes its clients' connections along: its requests here see
the client gone, its engine calls end as broken, so each request ends the way a
cut connection ends it today (its reservation settled, its audit row written).
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextvars import ContextVar
from functools import partial
from typing import Any

import msgspec

from appliance.api.app import with_body
from appliance.dataplane.protocol import (
    TOO_LARGE,
    Body,
    Call,
    Chunk,
    Cut,
    End,
    Finish,
    FrameReader,
    FrameWriter,
    Gone,
    Grant,
    Head,
    Mailbox,
    Request,
    Serving,
    Settled,
    Start,
    ToDaemon,
    Want,
    Whole,
)
from appliance.dataplane.remote_proxy import CURRENT, EngineCall, RemoteProxy, engine_headers
from appliance.errors import EngineFailure, EngineTimeout, StateWriteFailed
from appliance.fleet.hold import ClientGone
from appliance.fleet.replica import Replica
from appliance.gateway.dialects import OPENAI
from appliance.gateway.ledger import committed, estimate, finish
from appliance.gateway.metering import Usage
from appliance.gateway.proxy import AnswerTooLarge, engine_status_error
from appliance.gateway.relay import answer_stream, answer_whole
from appliance.gateway.serving import fields_for, on_deployment

log = logging.getLogger("appliance.dataplane")


class WorkerLink:
    """One worker's link: its requests run on app; the engine calls they make go back to it."""

    def __init__(self, app: Any, reader: FrameReader, writer: FrameWriter, server: tuple[str, int]) -> None:
        self.app, self.reader, self.out, self.server = app, reader, writer, server
        self.inboxes: dict[int, Inbox] = {}
        self.calls: dict[int, Mailbox[Whole | Head | Chunk | End]] = {}
        self.tasks: dict[int, asyncio.Task[None]] = {}  # each request's, by rid (asyncio keeps weak ones)
        self.closed = False
        self.serving = asyncio.Event()  # the worker said it takes connections (Serving)
        self.loop = asyncio.get_running_loop()

    async def run(self) -> None:
        """Frames from the worker, until it is gone; then its requests end as cut."""
        try:
            await self.reader.dispatch(self._take, self.out.writer.transport)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the worker exited
        except (ValueError, msgspec.MsgspecError) as exc:
            log.error("worker link: bad frame (%s): dropping the worker", exc)
        finally:
            self.closed = True
            for rid, inbox in self.inboxes.items():
                inbox.put(Gone(rid))
            for uid, call in self.calls.items():
                call.put(End(uid, "broke", "the worker relaying it exited"))

    def _take(self, frame: ToDaemon) -> None:
        """A frame from the worker, taken as it arrives (FrameReader.dispatch)."""
        if isinstance(frame, Request):
            self._start(frame)
        elif isinstance(frame, (Body, Gone, Finish)):
            if (inbox := self.inboxes.get(frame.rid)) is not None:
                inbox.put(frame)
        elif isinstance(frame, Serving):
            self.serving.set()
        elif (call := self.calls.get(frame.uid)) is not None:
            call.put(frame)

    def _start(self, req: Request) -> None:
        inbox = Inbox(self.loop)
        self.inboxes[req.rid] = inbox
        # Dropped by the task itself as it ends: a done callback is one more loop turn per request.
        self.tasks[req.rid] = self.loop.create_task(self._serve(req, inbox))

    async def _serve(self, req: Request, inbox: Inbox) -> None:
        CURRENT.set(self)  # this task's context: the engine calls it makes go to this worker
        ticket = Ticket(self, req.rid, inbox) if req.facts is not None else None
        TICKET.set(ticket)
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": req.http_version,
            "method": req.method,
            "scheme": "http",
            "path": req.path,
            "raw_path": req.path.encode(),
            "query_string": req.query,
            "root_path": "",
            "headers": req.headers,
            "client": req.client,
            "server": self.server,
            "facts": req.facts,  # what its worker read of the body it keeps (app.py _serve)
        }
        gone = False
        unread = req.more  # part of its body not read here yet
        held = req.held  # its worker reads the body only when asked (Expect: 100-continue)
        first: dict[str, Any] | None = {"type": "http.request", "body": req.body, "more_body": req.more}
        start: dict[str, Any] | None = None
        answered = False

        async def receive() -> dict[str, Any]:
            nonlocal gone, first, unread, held
            if first is not None:
                message, first = first, None
                return message
            if ticket is not None:  # its frames are the ticket's: its client's leaving is watched apart
                await inbox.left()
            elif not gone:
                if held:  # the front door reads the body: now its client is told to send it
                    held = False
                    self.out.write(Want(req.rid))
                frame = await inbox.get()
                if isinstance(frame, Body):
                    unread = frame.more
                    return {"type": "http.request", "body": frame.data, "more_body": frame.more}
                gone = True
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            # The answer's start goes with its first piece of body: one frame fewer.
            nonlocal start, answered
            if self.closed:
                raise ConnectionResetError("the worker relaying this answer exited")
            if message["type"] == "http.response.start":
                start = message
                return
            if message["type"] != "http.response.body":
                return
            body, more = message.get("body", b""), message.get("more_body", False)
            if start is not None:
                headers = [(bytes(k), bytes(v)) for k, v in start.get("headers", ())]
                if unread and (b"connection", b"close") not in headers:
                    # Answered before its whole body (a refusal): its connection closes, as one process's.
                    headers.append((b"connection", b"close"))
                self.out.write(Start(req.rid, start["status"], headers, body, more))
                start = None
            else:
                self.out.write(Body(req.rid, body, more))
            answered = not more
            await self.out.drain()

        try:
            await self.app(scope, receive, send)
        except Exception:
            log.exception("request %d from a worker failed", req.rid)
        finally:
            del self.inboxes[req.rid]
            del self.tasks[req.rid]
            if not answered and not self.closed and (ticket is None or not ticket.carried):
                # Ended without its whole answer (its client left, or it failed): the
                # worker drops the connection instead of waiting for the rest.
                self.out.write(Gone(req.rid))

    def call(self, frame: Call) -> EngineCall:
        queue: Mailbox[Whole | Head | Chunk | End] = Mailbox()
        self.calls[frame.uid] = queue
        if self.closed:
            queue.put(End(frame.uid, "broke", "the worker relaying it exited"))
        else:
            self.out.write(frame)
        return EngineCall(self, frame.uid, queue)


class Inbox(Mailbox[Body | Gone | Finish]):
    """A request's frames from its worker, read by one reader (a ticket's: its body,
    then each attempt's Finish); its client's leaving (a Gone) is also seen by those
    that only watch for it (``left``: a held request's watcher), who take no frame."""

    __slots__ = ("gone", "watchers")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.gone = False
        self.watchers: list[asyncio.Future[None]] = []

    def put(self, item: Body | Gone | Finish) -> None:
        super().put(item)
        if isinstance(item, Gone):
            self.gone = True
            for watcher in self.watchers:
                if not watcher.done():
                    watcher.set_result(None)

    async def left(self) -> None:
        """Once its client has left (or its worker exited)."""
        if self.gone:
            return
        watcher = (self.loop or asyncio.get_running_loop()).create_future()
        self.watchers.append(watcher)
        try:
            await watcher
        finally:
            self.watchers.remove(watcher)


class Ticket:
    """A request its worker asked to carry (Request.facts): granted, the worker calls
    the replica chosen here; each Finish it sends back ends one attempt."""

    __slots__ = ("carried", "inbox", "link", "rid")

    def __init__(self, link: WorkerLink, rid: int, inbox: Inbox) -> None:
        self.link, self.rid, self.inbox = link, rid, inbox
        self.carried = False  # the worker answered its client (or is gone): nothing more to tell it

    async def carry(self, rt: Any, req: Any) -> None:
        """The request on a READY replica (serving.on_deployment: held while the model
        starts, again on another replica when the engine failed before answering a
        byte), the engine call made by the worker: each attempt a grant, its replica's
        slot leased until the worker's Finish."""
        dep = req.deployment
        fields = (req.fields or {}) | fields_for(req, dep)
        grant = partial(self._leased, rt, req, msgspec.json.encode(fields) if fields else b"")
        end = await on_deployment(req, dep, grant, watch=True)
        await self._settle(rt, req, end)

    async def _leased(self, rt: Any, req: Any, fields: bytes, replica: Replica) -> Finish:
        with replica.lease():
            if req.trace is None:
                return await self._attempt(rt, req, replica, fields, req.headers)
            # Traced: the attempt's span, as serving.to_replica's; the engine gets its traceparent.
            attempt = partial(self._attempt, rt, req, replica, fields)
            return await req.trace.attempt(replica.name, True, req.headers, attempt)

    async def body(self) -> bytes:
        """The body its worker kept, for a decided request answered here after all."""
        self.link.out.write(Want(self.rid))
        parts = []
        while True:
            frame = await self.inbox.get()
            if not isinstance(frame, Body):
                raise ClientGone  # its client left (or its worker exited) meanwhile
            parts.append(frame.data)
            if not frame.more:
                return b"".join(parts)

    async def _attempt(self, rt: Any, req: Any, replica: Replica, fields: bytes, headers: dict[str, str]) -> Finish:
        """One grant, and how it went: the worker's Finish (an engine that refused or
        failed before answering raises here, as the proxy's call would)."""
        secret = engine_headers(replica)
        if secret is None:  # restarted since it was chosen: safe on another replica
            err = EngineFailure(f"Engine {replica.name} restarted")
            err.retryable = True
            raise err
        timeout = replica.timeout or rt.proxy.timeout
        tap = None if req.tap is None else req.tap.strip_usage
        grant = Grant(
            self.rid,
            req.rid,
            replica.name,
            replica.base_url + req.path,
            headers | secret if secret else headers,
            fields,
            req.stream,
            timeout.sock_connect,
            timeout.sock_read,
            tap,
            rt.tenancy.isolated,
            req.accountable,
        )
        self.link.out.write(grant)
        # A keyed stream is relayed by the worker: its key's standing ending (revoked, or
        # its budget lowered below what it used) is told to it (Cut), as the relay reads it.
        standing = req.key.standing if req.stream and req.key is not None else None
        if standing is not None:
            standing.carriers.add(self._cut)
        try:
            while True:
                frame = await self.inbox.get()
                if isinstance(frame, Finish):
                    break
                if isinstance(frame, Gone) and self.link.closed:
                    # The worker died with the ticket: its client's connection went with it.
                    self.carried = True
                    return Finish(self.rid, 502, "", "the worker carrying it exited", b"", None, 0, None, True)
                # Else its client left (a Gone) before the grant arrived: its Finish says so.
        finally:
            if standing is not None:
                standing.carriers.discard(self._cut)
        if frame.error == "status":
            raise engine_status_error(replica, frame.status, frame.body)
        if frame.error == TOO_LARGE:  # its message: the cap the worker read by
            raise AnswerTooLarge(replica.name, int(frame.message))
        if frame.error:  # the proxy's own error, made in the worker (its message names the replica)
            err = EngineTimeout(frame.message) if frame.error == "timeout" else EngineFailure(frame.message)
            err.retryable = frame.error == "connect"
            raise err
        if frame.status == 499 and not frame.started:
            raise ClientGone  # as relay.unless_client_leaves says it: the front door finishes it 499
        return frame

    def _cut(self, why: str) -> None:
        if not self.link.closed:
            self.link.out.write(Cut(self.rid, why))

    async def _settle(self, rt: Any, req: Any, end: Finish) -> None:
        """The relay's end, for an answer the worker relayed: the request finished (its
        metrics, its budget settled, its audit row), and for a keyed or regulated one,
        the worker told once that row is durable (its last bytes wait for it)."""
        req.bytes_sent = end.started
        # The worker counts its time to first token from its own read of the request, a
        # little before this request's start here: never later than now (its trace's span).
        req.ttft = None if end.ttft is None else min(end.ttft, time.perf_counter() - req.started)
        if end.usage is not None:
            req.usage = Usage(*end.usage)
        elif req.tap is not None:
            req.tap.events = end.events
        if self.carried and end.usage is None:  # it died with the ticket: charged as a cut stream is
            req.usage = estimate(req, end.events)
        finish(rt, req, end.status)
        ok = True
        if req.receipt is not None:  # its row is written before its last bytes (no coroutine else)
            try:
                await committed(req)
            except StateWriteFailed:
                if not end.started and not self.carried:
                    raise  # a whole answer becomes the 503 the worker sends instead, as the relay's does
                ok = False
        if req.accountable and not self.link.closed:
            self.link.out.write(Settled(self.rid, ok))
        self.carried = True


def grantable(rt: Any, req: Any) -> bool:
    """Whether a decided request's worker may carry it: a local deployment's
    replicas on TCP, no fallback to weigh, no stored Response, nothing the relay
    here must see (the audit's text), no stream to keep alive while its model loads.
    A traced one is granted: its spans are made here (``Ticket._leased``)."""
    dep = req.deployment
    if req.pinned is not None or req.stores or rt.cfg.audit.include_text:
        return False
    if (req.route is not None and req.route.fallbacks) or req.endpoint.dialect is not OPENAI:
        return False
    if any(not isinstance(r, Replica) or r.unix_socket for r in dep.replicas):
        return False
    return not (req.stream and rt.cfg.queue.keepalive_s > 0 and dep.pick_ready() is None)


async def answer(rt: Any, req: Any, send: Any) -> None:
    """The runtime's answerer with workers (Gateway.answer): a request its worker
    asked to carry, and may, is granted to it; any other is relayed here."""
    ticket = TICKET.get()
    if ticket is not None:
        if grantable(rt, req):
            await ticket.carry(rt, req)
            return
        with_body(rt.cfg, req, await ticket.body(), req.fields or {})  # decided on its facts
    if req.stream:
        await answer_stream(rt, req, send)
    else:
        await answer_whole(rt, req, send)


# The ticket of the request this task serves, when its worker asked to carry it.
TICKET: ContextVar[Ticket | None] = ContextVar("appliance_ticket", default=None)


__all__ = ["CURRENT", "RemoteProxy", "WorkerLink", "answer"]
