"""Forwarding a request to an engine replica and its answer back.

The request body goes to the engine byte for byte (unknown fields pass through);
the answer comes back byte for byte, streamed chunk by chunk as it arrives. One
shared aiohttp session pools keep-alive connections to every replica.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Protocol

import aiohttp
import msgspec

from appliance.config import Config
from appliance.errors import ApplianceError, EngineFailure, EngineTimeout, error_for_status
from appliance.fleet.engine_access import http_session, tcp_connector
from appliance.gateway import deadlines
from appliance.gateway.dialects import OPENAI, Dialect
from appliance.gateway.engine_errors import explain

log = logging.getLogger("appliance.proxy")

# What is kept of an engine's or a provider's error answer: its message is in its
# first bytes; the rest is dropped with its connection (not read into memory).
MAX_ERROR_BYTES = 64 * 1024


class AnswerTooLarge(EngineFailure):
    """A whole answer larger than upstream.max_answer_bytes: not read past the cap."""

    code = "answer_too_large"

    def __init__(self, upstream: str, cap: int) -> None:
        self.cap = cap
        super().__init__(
            f"Engine {upstream}'s answer is larger than upstream.max_answer_bytes ({cap} bytes): "
            "ask for less (max_tokens, n), or raise the cap"
        )


async def read_at_most(resp: aiohttp.ClientResponse, cap: int) -> bytes | None:
    """An answer's body up to cap bytes, or None when it has more (the rest unread:
    the caller closes the connection). Its declared length, when it has one, decides
    before any byte is read; a chunked one is read piece by piece up to the cap."""
    length = resp.content_length
    if length is not None:
        return await resp.read() if length <= cap else None
    pieces, size = [], 0
    while piece := await resp.content.readany():
        size += len(piece)
        if size > cap:
            return None
        pieces.append(piece)
    return b"".join(pieces)


def make_session(cfg: Config) -> aiohttp.ClientSession:
    """The shared session: providers and external engines (a supervised replica has its own)."""
    return http_session(tcp_connector(cfg.upstream.max_connections_per_replica))


class _EngineError(msgspec.Struct):
    message: str = ""


class _EngineErrorEnvelope(msgspec.Struct):
    error: _EngineError | str | None = None
    message: str | None = None


def _engine_message(body: bytes) -> str:
    try:
        env = msgspec.json.decode(body, type=_EngineErrorEnvelope)
    except msgspec.MsgspecError:
        return body[:300].decode("utf-8", "replace").strip() or "no message"
    if isinstance(env.error, _EngineError) and env.error.message:
        return env.error.message
    if isinstance(env.error, str):
        return env.error
    return env.message or "no message"


Done = Callable[[int], None]


class Upstream(Protocol):
    """Where a request is forwarded: an engine replica (appliance/fleet/replica.py)
    or a provider (appliance/gateway/providers.py)."""

    @property
    def name(self) -> str: ...

    @property
    def base_url(self) -> str: ...

    @property
    def session(self) -> aiohttp.ClientSession | None: ...  # its own (a replica's secret), else the proxy's

    @property
    def timeout(self) -> aiohttp.ClientTimeout | None: ...  # its own, else the proxy's

    def lease(self) -> AbstractContextManager[object]: ...  # held while a request is at it


async def engine_error_body(resp: aiohttp.ClientResponse) -> bytes:
    """An engine's error answer's body (b"" when it broke off), its first MAX_ERROR_BYTES
    only: a longer one's rest is dropped with its connection, not read."""
    kept = b""
    try:
        while len(kept) < MAX_ERROR_BYTES and (piece := await resp.content.read(MAX_ERROR_BYTES - len(kept))):
            kept += piece
    except (TimeoutError, aiohttp.ClientError, OSError):
        return b""
    finally:
        if resp.content.at_eof():
            resp.release()
        else:
            resp.close()
    return kept


def engine_status_error(replica: Upstream, status: int, body: bytes) -> ApplianceError:
    """An engine's error answer as ours: 4xx keep their status, 5xx become 502."""
    model = getattr(replica, "model", None)  # a local replica's; a provider has none
    explained = explain(model, status, body) if model is not None else None
    if explained is not None:  # an engine limit the operator sets: said in the config's words
        return explained
    message = _engine_message(body)
    if status >= 500:
        return EngineFailure(f"Engine {replica.name} answered {status}: {message}")
    return error_for_status(status, message)


class EngineProxy:
    def __init__(self, cfg: Config, session: aiohttp.ClientSession) -> None:
        self.session = session
        self.max_answer_bytes = cfg.upstream.max_answer_bytes  # a reload sets it anew (Gateway.adopt)
        self.timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=cfg.upstream.connect_timeout_s,
            sock_read=cfg.upstream.read_timeout_s,
        )

    async def _open(
        self,
        replica: Upstream,
        path: str,
        body: bytes | None,
        headers: dict[str, str],
        method: str = "POST",
        timeout: aiohttp.ClientTimeout | None = None,
    ) -> aiohttp.ClientResponse:
        url = replica.base_url + path
        # A supervised replica's own session carries its secret (appliance/fleet/engine_access.py).
        session = replica.session or self.session
        if session.closed:  # the replica restarted since it was chosen: safe on another one
            err = EngineFailure(f"Engine {replica.name} restarted")
            err.retryable = True
            raise err
        try:
            return await session.request(
                method, url, data=body, headers=headers, timeout=timeout or replica.timeout or self.timeout
            )
        except TimeoutError:
            raise EngineTimeout(f"Engine {replica.name} did not answer in time") from None
        except (aiohttp.ClientError, OSError) as exc:
            err = EngineFailure(f"Engine {replica.name} failed: {type(exc).__name__}")
            # No byte of an answer came back: the request is safe on another replica.
            err.retryable = isinstance(exc, (aiohttp.ClientConnectionError, OSError))
            raise err from None

    @staticmethod
    async def _raise_for_engine_status(replica: Upstream, resp: aiohttp.ClientResponse) -> None:
        """Engine errors become ours: 4xx keep their status, 5xx become 502."""
        if resp.status < 400:
            return
        raise engine_status_error(replica, resp.status, await engine_error_body(resp))

    async def unary(
        self, replica: Upstream, path: str, body: bytes | None, headers: dict[str, str], method: str = "POST"
    ) -> tuple[int, bytes, str]:
        """The engine's whole answer: (status, body, content type)."""
        with replica.lease():
            resp = await self._open(replica, path, body, headers, method)
            await self._raise_for_engine_status(replica, resp)
            try:
                data = await read_at_most(resp, self.max_answer_bytes)
            except TimeoutError:
                raise EngineTimeout(f"Engine {replica.name} stalled mid-answer") from None
            except (aiohttp.ClientError, OSError) as exc:
                raise EngineFailure(f"Engine {replica.name} broke mid-answer: {type(exc).__name__}") from None
            finally:
                resp.release()  # one read whole goes back to the pool; one cut short is closed
            if data is None:
                resp.close()
                log.warning("answer from %s is larger than upstream.max_answer_bytes: dropped", replica.name)
                raise AnswerTooLarge(replica.name, self.max_answer_bytes)
            return resp.status, data, resp.headers.get("Content-Type", "application/json")

    async def open_stream(
        self, replica: Upstream, path: str, body: bytes, headers: dict[str, str], done: Done, dialect: Dialect = OPENAI
    ) -> AnswerStream:
        """Open the engine's stream; errors before the first byte raise (so the
        client gets a real status code). Returns the stream, to be read piece by
        piece; a stream that breaks ends with the error event of its API's dialect."""
        timeout = replica.timeout or self.timeout
        lease = replica.lease()
        lease.__enter__()
        # No sock_read on a stream's connection (EngineStream watches for silence):
        # the answer's head, or an error's body, is bounded here, once, by a deadline
        # that cancels this task (gateway/deadlines.py: no asyncio.timeout, ~4 µs less).
        deadline = deadlines.start(timeout.sock_read) if timeout.sock_read is not None else None
        try:
            resp = await self._open(replica, path, body, headers, timeout=_without_sock_read(timeout))
            await self._raise_for_engine_status(replica, resp)
        except asyncio.CancelledError:
            lease.__exit__(None, None, None)
            if deadline is not None and deadline.passed():  # its cancel, no one else's
                raise EngineTimeout(f"Engine {replica.name} did not answer in time") from None
            raise
        except TimeoutError:
            lease.__exit__(None, None, None)
            raise EngineTimeout(f"Engine {replica.name} did not answer in time") from None
        except BaseException:
            lease.__exit__(None, None, None)
            raise
        finally:
            if deadline is not None:
                deadline.end()
        return EngineStream(replica, resp, lease, done, dialect, timeout.sock_read)


@functools.lru_cache(maxsize=64)
def _without_sock_read(timeout: aiohttp.ClientTimeout) -> aiohttp.ClientTimeout:
    """A stream's timeouts: aiohttp's sock_read re-arms a timer on every piece the
    engine sends (~3 us of CPU each, a tenth of a relayed chunk's cost), so a
    stream's silence is watched by EngineStream instead, with one timer per period."""
    return aiohttp.ClientTimeout(
        total=timeout.total,
        connect=timeout.connect,
        sock_connect=timeout.sock_connect,
        sock_read=None,
        ceil_threshold=timeout.ceil_threshold,
    )


class AnswerStream(Protocol):
    """A streamed answer as the relay reads it (gateway/relay._pump): ``read`` gives
    the next piece as it arrives, b"" at the end (a broken stream's last piece is its
    API's error event); ``close`` ends it however it went, once. EngineStream reads an
    engine's connection here; a worker's stream (appliance/dataplane) reads frames."""

    async def read(self) -> bytes: ...

    def close(self) -> None: ...


class EngineStream:
    """An engine's streamed answer on its way to the client. ``read`` gives
    whatever bytes have arrived since the last read, as one piece (events the
    engine sent together stay together; a piece is never held back waiting for
    more), and b"" at the end. A plain method rather than an async generator: one
    coroutine per piece is the relay's whole Python cost between aiohttp and the
    server (bench/gateway_overhead.py --stream). ``close`` ends it however it went:
    a finished answer's connection goes back to the pool, an unfinished one is
    dropped so the engine notices and stops generating; it runs once.

    An engine silent for ``silence`` seconds while a read waits (upstream.read_timeout_s,
    a provider's own) breaks the stream as aiohttp's sock_read would, but its timer
    is armed once per period rather than once per piece: it fires, finds the read
    waiting since when, and either breaks the stream or sleeps until that read's
    deadline. Time the relay spends sending (a slow client) is not the engine's."""

    __slots__ = (
        "_content",
        "_dialect",
        "_done",
        "_lease",
        "_loop",
        "_reading_since",
        "_replica",
        "_resp",
        "_silence",
        "_status",
        "_watchdog",
    )

    def __init__(
        self,
        replica: Upstream,
        resp: aiohttp.ClientResponse,
        lease,
        done: Done,
        dialect: Dialect,
        silence: float | None = None,
    ) -> None:
        self._replica, self._resp, self._lease, self._dialect = replica, resp, lease, dialect
        self._done: Done | None = done  # None once closed
        self._content = resp.content
        self._status: int | None = None  # set when the engine's answer ended (200) or broke (502)
        self._loop = asyncio.get_running_loop()
        self._silence = silence
        self._reading_since: float | None = None
        self._watchdog = self._loop.call_later(silence, self._watch) if silence else None

    def _watch(self) -> None:
        assert self._silence is not None, "armed with a silence"
        since = self._reading_since
        if since is not None and self._loop.time() - since >= self._silence:
            self._content.set_exception(aiohttp.SocketTimeoutError("Timeout on reading data from socket"))
            return
        self._watchdog = self._loop.call_at(
            (self._loop.time() if since is None else since) + self._silence, self._watch
        )

    async def read(self) -> bytes:
        if self._status is not None:
            return b""
        self._reading_since = self._loop.time()
        try:
            piece = await self._content.readany()
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            # Bytes have gone out already: the status cannot change, so end the
            # stream with an explicit error event the client's SDK will raise.
            self._status = 502
            name = self._replica.name
            log.warning("stream from %s broke: %s", name, type(exc).__name__)
            return self._dialect.stream_error(EngineFailure(f"Engine {name} broke mid-stream: {type(exc).__name__}"))
        finally:
            self._reading_since = None
        if not piece:
            self._status = 200
        return piece

    def close(self) -> None:
        if self._done is None:
            return
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._status == 200:
            self._resp.release()
        else:
            self._resp.close()  # unfinished: the client went away (499), or the engine broke
        self._lease.__exit__(None, None, None)
        done, self._done = self._done, None
        done(self._status or 499)
