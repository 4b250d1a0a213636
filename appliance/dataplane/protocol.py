"""The frames between a worker and the daemon, over their private socketpair.

One connection per worker, multiplexed: a client's request is `rid` (numbered by
the worker), an engine call the daemon asks the worker to make is `uid`
(numbered by the daemon). Each frame is msgpack behind a 4-byte length.

A client request:   worker -> Request (with the body's first piece), Body...
                    daemon -> Start (with the answer's first piece), Body...
                    worker -> Gone (the client left); daemon -> Gone (no more answer)
An engine call:     daemon -> Call
                    worker -> Whole (a whole answer), or Head, Chunk..., End (a stream),
                              or End alone (it failed)
                    daemon -> Cancel (stop it: the engine's connection is dropped)

The fast path (a hot proxy endpoint whose whole body the worker has in hand and
could decode, Request.facts): the worker keeps the body and sends only what the
policy reads of it (gateway/facts.py); the daemon runs the same front door on
those (key, route, budget, replica, hold queue), then, for a request a worker
may carry alone, grants it:
                    daemon -> Grant (the replica's address, the engine's headers, the
                              fields to set in the body, the ticket's settings)
                    worker -> Finish (how the engine call went: status, usage,
                              time to first token; or why it failed before answering)
                    daemon -> Grant again (a retry on another replica), Start (a
                              refusal, answered verbatim), or Settled (a keyed or
                              regulated request's row is durable: the last bytes may go)
                    daemon -> Want (not grantable after all: the daemon answers it,
                              as a whole request); worker -> Body (the body it kept)
                    daemon -> Cut (a granted stream's key was revoked, or its budget
                              lowered below what it used: end it with that error)
A request whose client sent `Expect: 100-continue` (Request.held) comes without any
of its body; the daemon asks for it (Want) when its front door first reads it, and
the worker then reads it (its server sends the 100 Continue) and passes it on (Body...).
The engine's answer never crosses the link: a unary request is three frames (a
keyed one four), a stream's chunks none. Anything else (not on the fast path, or
not grantable: fallbacks, a provider, a stored Response, a loading model) is
answered by the daemon as a whole request, with Start and Body frames.

A whole request's unary answer is thus four frames, two each way
(bench/gateway_overhead.py --workers).
"""

from __future__ import annotations

import asyncio
import struct
from collections import deque
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import msgspec

from appliance.gateway.facts import Facts

T = TypeVar("T")


class Request(msgspec.Struct, tag=1, array_like=True):
    rid: int
    method: str
    path: str
    query: bytes
    headers: list[tuple[bytes, bytes]]
    client: tuple[str, int] | None
    http_version: str
    body: bytes
    more: bool
    # The worker has the whole body, keeps it, and would carry the answer itself: what
    # the front door's policy reads of the body (decide on these; grant it if you may).
    facts: Facts | None = None
    # Its client sent `Expect: 100-continue`: the worker reads the body (and its server
    # answers 100 Continue) only once the daemon asks for it (Want), as one process reads
    # it only when its front door does: a refusal before that goes without a 100.
    held: bool = False


class Body(msgspec.Struct, tag=2, array_like=True):
    """A piece of a request's body (worker -> daemon) or of its answer (daemon -> worker)."""

    rid: int
    data: bytes
    more: bool


class Gone(msgspec.Struct, tag=3, array_like=True):
    """The client left (worker -> daemon), or the daemon is done with a request
    whose answer it did not finish (daemon -> worker: drop the connection)."""

    rid: int


class Start(msgspec.Struct, tag=4, array_like=True):
    rid: int
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    more: bool


class Call(msgspec.Struct, tag=5, array_like=True):
    uid: int
    method: str
    url: str
    headers: dict[str, str]
    body: bytes | None
    connect_timeout_s: float | None
    read_timeout_s: float | None
    stream: bool


TOO_LARGE = "too_large"


class Head(msgspec.Struct, tag=6, array_like=True):
    uid: int
    status: int
    content_type: str


class Chunk(msgspec.Struct, tag=7, array_like=True):
    uid: int
    data: bytes


class Whole(msgspec.Struct, tag=10, array_like=True):
    """A whole (not streamed) engine answer."""

    uid: int
    status: int
    content_type: str
    body: bytes


class End(msgspec.Struct, tag=8, array_like=True):
    """An engine call's end: error "" (the whole stream came); before an answer,
    "timeout", "connect" (no byte of an answer came back: safe elsewhere) or
    "failure"; mid-answer, "stalled" or "broke"; a whole answer over the cap,
    TOO_LARGE (its message: the cap, upstream.max_answer_bytes)."""

    uid: int
    error: str
    message: str


class Cancel(msgspec.Struct, tag=9, array_like=True):
    uid: int


class Grant(msgspec.Struct, tag=11, array_like=True):
    """A decided request's ticket: the worker calls the engine itself and answers its client."""

    rid: int
    request_id: str  # the X-Request-Id its answer carries
    replica: str  # the replica's name (its errors' words)
    url: str
    headers: dict[str, str]
    fields: bytes  # top-level fields to set in the body it keeps (a JSON object; b"": none)
    stream: bool
    connect_timeout_s: float | None
    read_timeout_s: float | None
    # What a stream's relay watches: None (nothing), else whether the usage event
    # is the appliance's own (not the client's: kept from it); scrub: the tenant's
    # cache-revealing fields come out of the answer.
    tap: bool | None
    scrub: bool
    accountable: bool  # wait for Settled before the answer's last bytes


class Finish(msgspec.Struct, tag=12, array_like=True):
    """How a granted engine call went. error "": answered (the engine's status; 499:
    the client left, 502: a stream broke); "status": the engine refused (its status
    and body); else the proxy's error (its message): "timeout", "connect" (no byte
    came back: safe on another replica) or "failure"."""

    rid: int
    status: int
    error: str
    message: str
    body: bytes
    usage: tuple[int, int] | None
    events: int
    ttft: float | None
    started: bool  # bytes of the answer went to the client


class Want(msgspec.Struct, tag=14, array_like=True):
    """The daemon answers a decided request itself after all (not grantable), or reads a
    held one's body (Request.held): its body, please."""

    rid: int


class Settled(msgspec.Struct, tag=13, array_like=True):
    """A keyed or regulated request's row and charge are durable (ok), or could not be written."""

    rid: int
    ok: bool


class Limits(msgspec.Struct, tag=15, array_like=True):
    """A reloaded config's limits (server.body_read_timeout_s, the body's most bytes,
    server.send_timeout_s, upstream.max_answer_bytes): the worker reads the bodies,
    sends the answers and reads the engines' answers that come next by them
    (WorkerSettings has those it started with)."""

    body_read_timeout_s: float
    max_body_bytes: int
    send_timeout_s: float = 60.0
    max_answer_bytes: int = 64 * 1024 * 1024


class Cut(msgspec.Struct, tag=17, array_like=True):
    """A carried stream's key ended its standing (revoked, or its budget lowered below
    what it used: access/keys.py Standing): end it at its next piece with that error
    event (why: the standing's reason), charged for what it generated (its Finish)."""

    rid: int
    why: str


class Serving(msgspec.Struct, tag=16, array_like=True):
    """The worker is about to take connections on its socket: the daemon steers new ones to it."""


ToDaemon = Request | Body | Gone | Whole | Head | Chunk | End | Finish | Serving
ToWorker = Start | Body | Gone | Call | Cancel | Grant | Settled | Want | Limits | Cut

_LEN = struct.Struct("!I")
MAX_FRAME = 64 * 1024 * 1024  # a request body or an engine's whole answer, and then some
READ_SIZE = 256 * 1024


class FrameWriter:
    """Frames onto the socket. write() never waits: the frames written in one turn of
    the event loop leave together, in one send at its end (under load a turn writes
    several requests' frames: one system call for all, not one each); drain() sends
    what is pending and lets the socket's buffer flow."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.encode = msgspec.msgpack.Encoder().encode
        self.pending: list[bytes] = []
        self.loop = asyncio.get_running_loop()

    def write(self, frame: msgspec.Struct) -> None:
        data = self.encode(frame)
        if not self.pending:
            self.loop.call_soon(self.flush)
        self.pending.append(_LEN.pack(len(data)) + data)

    def flush(self) -> None:
        if self.pending:
            self.writer.write(b"".join(self.pending))
            self.pending.clear()

    async def drain(self) -> None:
        self.flush()
        await self.writer.drain()


class FrameReader:
    """Frames off the socket: all those that have arrived, from one read (under load
    a read brings several requests' frames: one wakeup for all, not two awaits each)."""

    def __init__(self, reader: asyncio.StreamReader, types: object) -> None:
        self.reader = reader
        self.decode = msgspec.msgpack.Decoder(types).decode
        self.buffer = bytearray()

    async def read(self) -> list:
        """The frames that have arrived, at least one; IncompleteReadError when the other side is gone."""
        while not (frames := self._frames()):
            data = await self.reader.read(READ_SIZE)
            if not data:
                raise asyncio.IncompleteReadError(bytes(self.buffer), None)
            self.buffer += data
        return frames

    async def dispatch(self, take: Callable[[Any], None], transport: asyncio.BaseTransport) -> None:
        """Each frame handed to take as its bytes arrive, in the transport's own callback
        (both ends of a link: no task woken per read, one loop turn less for every
        Request and Finish a worker sends, and every Grant the daemon sends;
        bench/gateway_overhead.py --workers). Returns
        never: raises IncompleteReadError when the other side is gone (the connection's
        error when it broke), or the error of a frame that does not decode."""
        stream = self.reader
        if stream.exception() is not None or stream.at_eof():  # gone before it was read
            await self.read()
        ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        inline = _Inline(self, take, transport.get_protocol(), ended)
        transport.set_protocol(inline)
        # What arrived before the switch, from the stream no more bytes reach (read to its end).
        stream.feed_eof()
        inline.data_received(await stream.read())
        await ended

    def _frames(self) -> list:
        buffer, frames, at = self.buffer, [], 0
        with memoryview(buffer) as view:
            while len(buffer) - at >= _LEN.size:
                (size,) = _LEN.unpack_from(buffer, at)
                if size > MAX_FRAME:
                    raise ValueError(f"frame of {size} bytes")
                start = at + _LEN.size
                if len(buffer) - start < size:
                    break
                frames.append(self.decode(view[start : start + size]))
                at = start + size
        del buffer[:at]
        return frames


class _Inline(asyncio.Protocol):
    """The link's transport protocol once FrameReader.dispatch has it: frames taken where
    their bytes arrive; what concerns the writing side (flow control, the connection's
    loss) still goes to the stream's own protocol, which the FrameWriter's drain waits on."""

    def __init__(
        self, frames: FrameReader, take: Callable[[Any], None], streams: Any, ended: asyncio.Future[None]
    ) -> None:
        self.frames, self.take, self.streams, self.ended = frames, take, streams, ended

    def data_received(self, data: bytes) -> None:
        if self.ended.done():
            return
        self.frames.buffer += data
        try:
            for frame in self.frames._frames():
                self.take(frame)
        except Exception as exc:  # a frame that does not decode (or a bug taking one): the link ends
            self.ended.set_exception(exc)

    def eof_received(self) -> bool | None:
        self._end(asyncio.IncompleteReadError(bytes(self.frames.buffer), None))
        return self.streams.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(exc if exc is not None else asyncio.IncompleteReadError(bytes(self.frames.buffer), None))
        self.streams.connection_lost(exc)

    def pause_writing(self) -> None:
        self.streams.pause_writing()

    def resume_writing(self) -> None:
        self.streams.resume_writing()

    def _end(self, exc: BaseException) -> None:
        if not self.ended.done():
            self.ended.set_exception(exc)


class WorkerSettings(msgspec.Struct, frozen=True):
    """What a worker is told on its command line (nothing secret: the link is a socketpair)."""

    index: int
    header_read_timeout_s: float
    # Beyond this many body bytes the worker stops reading: the daemon answers 413.
    max_body_bytes: int
    max_connections_per_replica: int
    backlog: int = 1024
    # A body not whole within this is answered 408 (server.body_read_timeout_s; the daemon's
    # front door times out the part it is passed, the worker the wait for its first piece).
    body_read_timeout_s: float = 30.0
    # A client that takes no piece of its answer this long is dropped (server.send_timeout_s).
    send_timeout_s: float = 60.0
    # The most bytes of an engine's whole answer the worker reads (upstream.max_answer_bytes).
    max_answer_bytes: int = 64 * 1024 * 1024


class Mailbox(Generic[T]):
    """The frames for one request or engine call, in order: asyncio.Queue without
    what it costs (bounds, putters, task accounting) on the path of every request.
    One reader at a time: a second's get would take the first's wakeup."""

    __slots__ = ("items", "loop", "waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.items: deque[T] = deque()
        self.waiter: asyncio.Future[None] | None = None
        # The loop its reader runs on, when its maker knows it: asyncio.get_running_loop
        # makes a getpid system call on each call (Python 3.11), on every request's path.
        self.loop = loop

    def put(self, item: T) -> None:
        self.items.append(item)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def get(self) -> T:
        while not self.items:
            waiter = self.waiter = (self.loop or asyncio.get_running_loop()).create_future()
            try:
                await waiter
            finally:
                # A reader cancelled here (its cancellation runs a turn later) must not
                # clear the wakeup of the one that reads next: its frame would wait forever.
                if self.waiter is waiter:
                    self.waiter = None
        return self.items.popleft()
