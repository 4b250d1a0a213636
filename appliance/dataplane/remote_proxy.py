"""The engine calls of a request a worker's client sent, made by that worker
(``RemoteProxy``, the daemon's EngineProxy with workers): each call a ``Call``
frame to the worker, its answer frames back here (``EngineCall``), a stream
relayed piece by piece (``RemoteStream``). The link itself, and the requests
that make these calls, are the authority's (authority.py).
"""

from __future__ import annotations

import itertools
import logging
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from appliance.dataplane.protocol import TOO_LARGE, Call, Cancel, Chunk, End, Head, Mailbox, Whole
from appliance.errors import EngineFailure, EngineTimeout
from appliance.fleet.replica import Replica
from appliance.gateway.dialects import OPENAI, Dialect
from appliance.gateway.proxy import AnswerStream, AnswerTooLarge, Done, EngineProxy, Upstream, engine_status_error

if TYPE_CHECKING:
    from appliance.dataplane.authority import WorkerLink

log = logging.getLogger("appliance.dataplane")

# The link of the worker whose client sent the request this task serves (None: no worker's).
CURRENT: ContextVar[WorkerLink | None] = ContextVar("appliance_worker_link", default=None)

_uids = itertools.count(1)


class EngineCall:
    """One engine call a worker makes for the daemon: its head, then its chunks."""

    def __init__(self, link: WorkerLink, uid: int, frames: Mailbox[Whole | Head | Chunk | End]) -> None:
        self.link, self.uid, self.frames = link, uid, frames
        self.ended = False

    async def next(self) -> Whole | Head | Chunk | End:
        frame = await self.frames.get()
        if isinstance(frame, (End, Whole)):
            self.ended = True
        return frame

    async def whole(self) -> tuple[End, bytes]:
        parts = []
        while not isinstance(frame := await self.next(), End):
            if isinstance(frame, Chunk):
                parts.append(frame.data)
        return frame, b"".join(parts)

    def close(self) -> None:
        """Done with it: an engine call not at its end is cancelled (the engine stops)."""
        self.link.calls.pop(self.uid, None)
        if not self.ended and not self.link.closed:
            self.link.out.write(Cancel(self.uid))


MID_ANSWER = ("stalled", "broke")


def _refused(upstream: Upstream, end: End) -> EngineFailure | EngineTimeout:
    """An engine call that ended before its answer's head."""
    if end.error == "timeout":
        return EngineTimeout(f"Engine {upstream.name} did not answer in time")
    err = EngineFailure(f"Engine {upstream.name} failed: {end.message}")
    err.retryable = end.error == "connect"  # no byte of an answer came back: safe on another replica
    return err


def _broke(upstream: Upstream, end: End) -> EngineFailure | EngineTimeout:
    """An engine call that ended mid-answer."""
    if end.error == "stalled":
        return EngineTimeout(f"Engine {upstream.name} stalled mid-answer")
    return EngineFailure(f"Engine {upstream.name} broke mid-answer: {end.message}")


class RemoteProxy(EngineProxy):
    """The engine proxy of a daemon with workers: a request a worker's client sent
    has its engine calls made by that worker; any other (the admin socket's, or one
    to a provider, whose credentials stay in the daemon, or to an engine on a unix
    socket) is made here, as without workers."""

    def unary(self, replica: Upstream, path: str, body: bytes | None, headers: dict[str, str], method: str = "POST"):
        link = CURRENT.get()
        secret = engine_headers(replica)
        if link is None or secret is None:
            return super().unary(replica, path, body, headers, method)
        return self._unary(link, replica, self._call(replica, path, body, headers | secret, method, False))

    async def open_stream(
        self, replica: Upstream, path: str, body: bytes, headers: dict[str, str], done: Done, dialect: Dialect = OPENAI
    ) -> AnswerStream:
        link = CURRENT.get()
        secret = engine_headers(replica)
        if link is None or secret is None:
            return await super().open_stream(replica, path, body, headers, done, dialect)
        lease = replica.lease()
        lease.__enter__()
        call = link.call(self._call(replica, path, body, headers | secret, "POST", True))
        try:
            head = await call.next()
            if isinstance(head, End):
                raise _refused(replica, head)
            if isinstance(head, Head) and head.status >= 400:
                _, data = await call.whole()
                raise engine_status_error(replica, head.status, data)
        except BaseException:
            call.close()
            lease.__exit__(None, None, None)
            raise
        return RemoteStream(replica, call, lease, done, dialect)

    async def _unary(self, link: WorkerLink, replica: Upstream, frame: Call) -> tuple[int, bytes, str]:
        with replica.lease():
            call = link.call(frame)
            try:
                answer = await call.next()
            finally:
                call.close()
            if isinstance(answer, End):
                if answer.error == TOO_LARGE:  # the worker read no more than the cap (its message)
                    raise AnswerTooLarge(replica.name, int(answer.message))
                raise (_broke if answer.error in MID_ANSWER else _refused)(replica, answer)
            assert isinstance(answer, Whole), "a whole call's answer"
            if answer.status >= 400:
                raise engine_status_error(replica, answer.status, answer.body)
            return answer.status, answer.body, answer.content_type

    def _call(
        self, replica: Upstream, path: str, body: bytes | None, headers: dict[str, str], method: str, stream: bool
    ) -> Call:
        timeout = replica.timeout or self.timeout
        url = replica.base_url + path
        return Call(next(_uids), method, url, headers, body, timeout.sock_connect, timeout.sock_read, stream)


class RemoteStream:
    """An engine's stream that a worker reads and relays here frame by frame (the
    relay's AnswerStream): each Chunk frame is a piece, End the stream's end (with an
    error: its API's error event, since bytes have gone out). ``close`` ends the
    worker's call (an unfinished one closes the engine's connection there) and
    reports how it went, once: 200, 502 (broken) or 499 (the client left)."""

    __slots__ = ("_call", "_dialect", "_done", "_lease", "_replica", "_status")

    def __init__(self, replica: Upstream, call: EngineCall, lease: Any, done: Done, dialect: Dialect) -> None:
        self._replica, self._call, self._lease, self._dialect = replica, call, lease, dialect
        self._done: Done | None = done  # None once closed
        self._status: int | None = None

    async def read(self) -> bytes:
        while self._status is None:
            frame = await self._call.next()
            if isinstance(frame, Chunk):
                if frame.data:
                    return frame.data
            elif isinstance(frame, Whole):  # the answer in one frame: it has ended
                self._status = 200
                return frame.body
            elif isinstance(frame, End):
                if not frame.error:
                    self._status = 200
                    return b""
                self._status = 502
                name = self._replica.name
                log.warning("stream from %s broke: %s", name, frame.message)
                return self._dialect.stream_error(EngineFailure(f"Engine {name} broke mid-stream: {frame.message}"))
        return b""

    def close(self) -> None:
        if self._done is None:
            return
        self._call.close()  # the client went away (499): the worker closes the engine's connection
        self._lease.__exit__(None, None, None)
        done, self._done = self._done, None
        done(self._status or 499)


def engine_headers(upstream: Upstream) -> dict[str, str] | None:
    """What a worker must add for this engine to take its call (a supervised replica's
    secret), or None when the daemon makes the call itself: a provider (its
    credentials stay here), an engine on a unix socket, a replica restarting."""
    if not isinstance(upstream, Replica) or upstream.unix_socket:
        return None
    if not upstream.supervised:
        return {}  # an external engine: the shared session sends nothing of its own
    session = upstream.session
    if upstream.access is None or session is None or session.closed:
        return None  # the proxy here says "restarted": safe on another replica
    return upstream.access.headers


__all__ = ["CURRENT", "EngineCall", "RemoteProxy", "engine_headers"]
