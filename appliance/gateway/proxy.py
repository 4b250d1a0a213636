"""Forwarding a request to an engine replica and its answer back.

The request body goes to the engine byte for byte (unknown fields pass through);
the answer comes back byte for byte, streamed chunk by chunk as it arrives. One
shared aiohttp session pools keep-alive connections to every replica.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractContextManager
from typing import Protocol

import aiohttp
import msgspec

from appliance.config import Config
from appliance.errors import ApplianceError, EngineFailure, EngineTimeout, error_for_status
from appliance.fleet.engine_access import http_session, tcp_connector
from appliance.gateway.dialects import OPENAI, Dialect
from appliance.gateway.engine_errors import explain

log = logging.getLogger("appliance.proxy")


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
        self.timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=cfg.upstream.connect_timeout_s,
            sock_read=cfg.upstream.read_timeout_s,
        )

    async def _open(
        self, replica: Upstream, path: str, body: bytes | None, headers: dict[str, str], method: str = "POST"
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
                method, url, data=body, headers=headers, timeout=replica.timeout or self.timeout
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
        try:
            body = await resp.read()
        except (TimeoutError, aiohttp.ClientError, OSError):
            body = b""
        finally:
            resp.release()
        raise engine_status_error(replica, resp.status, body)

    async def unary(
        self, replica: Upstream, path: str, body: bytes | None, headers: dict[str, str], method: str = "POST"
    ) -> tuple[int, bytes, str]:
        """The engine's whole answer: (status, body, content type)."""
        with replica.lease():
            resp = await self._open(replica, path, body, headers, method)
            await self._raise_for_engine_status(replica, resp)
            try:
                data = await resp.read()
            except TimeoutError:
                raise EngineTimeout(f"Engine {replica.name} stalled mid-answer") from None
            except (aiohttp.ClientError, OSError) as exc:
                raise EngineFailure(f"Engine {replica.name} broke mid-answer: {type(exc).__name__}") from None
            finally:
                resp.release()
            return resp.status, data, resp.headers.get("Content-Type", "application/json")

    async def open_stream(
        self, replica: Upstream, path: str, body: bytes, headers: dict[str, str], done: Done, dialect: Dialect = OPENAI
    ) -> AsyncIterator[bytes]:
        """Open the engine's stream; errors before the first byte raise (so the
        client gets a real status code). Returns the chunk iterator; a stream
        that breaks ends with the error event of its API's dialect."""
        lease = replica.lease()
        lease.__enter__()
        try:
            resp = await self._open(replica, path, body, headers)
            await self._raise_for_engine_status(replica, resp)
        except BaseException:
            lease.__exit__(None, None, None)
            raise
        return self._relay(replica, resp, lease, done, dialect)

    async def _relay(
        self, replica: Upstream, resp: aiohttp.ClientResponse, lease, done: Done, dialect: Dialect
    ) -> AsyncIterator[bytes]:
        status = 200
        finished = False
        try:
            async for chunk in resp.content.iter_any():
                yield chunk
            finished = True
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            # Bytes have gone out already: the status cannot change, so end the
            # stream with an explicit error event the client's SDK will raise.
            status = 502
            log.warning("stream from %s broke: %s", replica.name, type(exc).__name__)
            yield dialect.stream_error(EngineFailure(f"Engine {replica.name} broke mid-stream: {type(exc).__name__}"))
        except (asyncio.CancelledError, GeneratorExit):
            status = 499  # the client went away; closing resp cancels the engine's work
            raise
        finally:
            # An unfinished answer must drop the connection so the engine notices
            # and stops generating; a finished one returns it to the pool.
            if finished:
                resp.release()
            else:
                resp.close()
            lease.__exit__(None, None, None)
            done(status)
