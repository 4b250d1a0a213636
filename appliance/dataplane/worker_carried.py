"""What a worker keeps of a request it carries, and its granted engine call as the
proxy sees it: the body and what the daemon was told of it (``Carried``), the
grant's replica as an upstream (``Granted``), the proxy whose engine refusals go
back to the daemon as they came (``GrantedProxy``), and the Finish of a call that
failed before its answer reached the client (``failed``). worker_client.py carries
the request with these.
"""

from __future__ import annotations

import contextlib
from typing import Any

import aiohttp

from appliance.dataplane.protocol import TOO_LARGE, Finish, Grant
from appliance.errors import ApplianceError, EngineFailure, EngineTimeout, StateWriteFailed
from appliance.gateway.capabilities import ENDPOINTS, Endpoint
from appliance.gateway.facts import Facts, carried_facts
from appliance.gateway.protocol import decode_request
from appliance.gateway.providers import set_encoded_fields
from appliance.gateway.proxy import AnswerTooLarge, EngineProxy, engine_error_body


class Carried:
    """What the worker keeps of a request it asked to carry: its body, and what it
    told the daemon of it (gateway/facts.py)."""

    __slots__ = ("body", "endpoint", "facts", "started")

    def __init__(self, started: float, endpoint: Endpoint, body: bytes, facts: Facts) -> None:
        self.started, self.endpoint, self.body, self.facts = started, endpoint, body, facts

    def sent(self, grant: Grant) -> bytes:
        """The body for the grant's engine: with the fields the daemon set."""
        return set_encoded_fields(self.body, grant.fields) if grant.fields else self.body


def decode_carried(started: float, path: str, body: bytes) -> Carried | None:
    """A whole body the worker decodes itself (the front door's decoder and limits):
    None when it cannot (malformed, too large, compressed): the daemon reads it then,
    as any request's, and answers with its own 400, 413 or 415."""
    endpoint = ENDPOINTS[path]
    try:
        request: Any = decode_request(body, endpoint.cls)
    except ApplianceError:
        return None
    return Carried(started, endpoint, body, carried_facts(endpoint, body, request))


class Granted:
    """The grant's replica, as the proxy sees an upstream: its slot is leased by the daemon."""

    __slots__ = ("base_url", "name", "timeout")
    session = None  # the worker's own (a supervised replica's secret is in the grant's headers)

    def __init__(self, grant: Grant, timeout: aiohttp.ClientTimeout) -> None:
        self.name, self.base_url, self.timeout = grant.replica, grant.url, timeout

    def lease(self) -> contextlib.nullcontext[None]:
        return _NO_LEASE


_NO_LEASE: contextlib.nullcontext[None] = contextlib.nullcontext()
NOT_WRITTEN = StateWriteFailed("The request's accounting could not be written; see the appliance's log")


class EngineAnswered(Exception):  # noqa: N818 (the engine's answer, not an error here)
    """The engine refused the request: its status and body, turned into our error by the daemon."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(status)
        self.status, self.body = status, body


class GrantedProxy(EngineProxy):
    """The proxy, with the worker's session, whose engine refusals go back to the
    daemon as they came (it says them in the replica's model's words)."""

    def __init__(self, session: aiohttp.ClientSession, max_answer_bytes: int) -> None:
        self.session = session
        self.max_answer_bytes = max_answer_bytes
        self.timeout = aiohttp.ClientTimeout(total=None)

    @staticmethod
    async def _raise_for_engine_status(replica: Any, resp: aiohttp.ClientResponse) -> None:
        if resp.status < 400:
            return
        raise EngineAnswered(resp.status, await engine_error_body(resp))


def failed(rid: int, exc: Exception) -> Finish:
    """A granted call that failed before its answer reached the client."""
    if isinstance(exc, EngineAnswered):
        return Finish(rid, exc.status, "status", "", exc.body, None, 0, None, False)
    if isinstance(exc, AnswerTooLarge):
        return Finish(rid, exc.status, TOO_LARGE, str(exc.cap), b"", None, 0, None, False)
    assert isinstance(exc, EngineFailure)
    kind = "timeout" if isinstance(exc, EngineTimeout) else ("connect" if exc.retryable else "failure")
    return Finish(rid, exc.status, kind, exc.message, b"", None, 0, None, False)


__all__ = ["NOT_WRITTEN", "Carried", "EngineAnswered", "Granted", "GrantedProxy", "decode_carried", "failed"]
