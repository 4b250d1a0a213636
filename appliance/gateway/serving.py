"""Sending one request on: to a local deployment (a replica chosen, the request
held while its model cold-starts, retried on another replica when the engine
failed before answering a byte), to one replica, or to a provider. What comes
back is the engine's whole answer, or, for a stream, its chunks to relay
(appliance/gateway/relay.py).

Raw ASGI on purpose: this is the hot path (see bench/gateway_overhead.py).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, TypeVar

from appliance.access.keys import ended_error
from appliance.access.tenancy import SALTED_SERVERS
from appliance.errors import EngineFailure
from appliance.fleet.hold import Exclude
from appliance.gateway.ledger import finish_stream
from appliance.gateway.providers import set_fields
from appliance.gateway.proxy import AnswerStream

if TYPE_CHECKING:
    from litestar.types import Receive

    from appliance.fleet.deployment import Deployment
    from appliance.fleet.replica import Replica
    from appliance.gateway.providers import Provider
    from appliance.gateway.request import ProxyRequest
    from appliance.gateway.runtime import Gateway

log = logging.getLogger("appliance.serving")

MAX_ATTEMPTS = 3
T = TypeVar("T")

# An engine's whole answer: (status, body, content type).
Whole = tuple[int, bytes, str]
# What forwarding a request gives back: the whole answer, or a stream's chunks.
Answer = Whole | AnswerStream


def to_deployment(rt: Gateway, req: ProxyRequest, dep: Deployment, served: str | None = None) -> Awaitable[Answer]:
    """The request on a READY replica of dep (on_deployment). A held stream's client
    that leaves takes it out of the queue (a whole answer's caller watches for that
    itself: relay.unless_client_leaves). served: the model name it is served as (a
    local fallback's; else req.target), the base's or one of its LoRA adapters'."""
    body = body_for(req, dep, served)
    return on_deployment(req, dep, partial(to_replica, rt, req, body=body), req.stream)


async def on_deployment(req: ProxyRequest, dep: Deployment, send: Callable[[Replica], Awaitable[T]], watch: bool) -> T:
    """send(replica) on a READY replica of dep (held while the model starts); when
    the engine failed before answering a byte, again on another one (or the same,
    restarted), up to MAX_ATTEMPTS. send: this process's call (to_replica), or a
    grant to the worker that carries it (appliance/dataplane/authority.py). watch:
    a held request's client that leaves takes it out of the queue."""
    failed = None
    for attempt in range(1, MAX_ATTEMPTS + 1):
        # A READY replica is taken without a coroutine; else the request waits for one.
        replica = dep.take_ready(failed, req.prefix) if req.trace is None else None
        if replica is None:
            disconnected = partial(wait_disconnect, req.receive) if watch else None
            if req.trace is None:
                replica = await dep.hold(disconnected, failed, req.prefix)
            else:  # traced: the time held is a span of its own
                acquiring = dep.acquire(disconnected=disconnected, exclude=failed, prefix=req.prefix)
                replica = await req.trace.held(dep, acquiring)
            if req.key is not None and req.key.standing.ended is not None:
                raise ended_error(req.key.standing)  # revoked while it was held
        req.served_by = replica.name
        try:
            return await send(replica)
        except EngineFailure as exc:
            if not exc.retryable or attempt == MAX_ATTEMPTS:
                raise
            log.warning("retrying request %s on another replica: %s", req.rid, exc)
            failed = Exclude(replica, dep.supervisor.clock.monotonic())
    raise AssertionError("unreachable")


# to_replica and to_provider return the proxy's own coroutine, to be awaited by the
# caller: no coroutine of their own on the hot path (bench/gateway_overhead.py).


def to_replica(rt: Gateway, req: ProxyRequest, replica: Replica, body: bytes) -> Awaitable[Answer]:
    """The request on this one replica (a stored Response's home, or the one acquired)."""
    if req.trace is not None:  # traced: an attempt's span, and its traceparent for the engine
        return req.trace.attempt(replica.name, True, req.headers, partial(_send, rt, req, replica, req.path, body))
    return _send(rt, req, replica, req.path, body, req.headers)


def to_provider(rt: Gateway, req: ProxyRequest, provider: Provider) -> Awaitable[Answer]:
    """The request on a provider: its path, its name for the model, its credentials."""
    path = provider.path(req.path)
    body = provider.body(req.forwarded, req.model)
    headers = provider.headers(req.headers, req.endpoint.name)
    if req.trace is not None:  # traced: an attempt's span; no trace context leaves the box
        return req.trace.attempt(provider.name, False, headers, partial(_send, rt, req, provider, path, body))
    return _send(rt, req, provider, path, body, headers)


def _send(
    rt: Gateway, req: ProxyRequest, upstream: Replica | Provider, path: str, body: bytes, headers: dict[str, str]
) -> Awaitable[Answer]:
    if req.stream:
        done = partial(finish_stream, rt, req)
        return rt.proxy.open_stream(upstream, path, body, headers, done, req.endpoint.dialect)
    return rt.proxy.unary(upstream, path, body, headers)


def body_for(req: ProxyRequest, dep: Deployment, served: str | None = None) -> bytes:
    """The body for a local model (fields_for set in what the front door forwards)."""
    fields = fields_for(req, dep, served)
    return set_fields(req.forwarded, **fields) if fields else req.forwarded


def fields_for(req: ProxyRequest, dep: Deployment, served: str | None = None) -> dict[str, object]:
    """What a local model's body says besides what the front door set: the name its
    engine knows it by in "model" (and for a LoRA adapter on llama-server, the adapter
    selected: appliance/fleet/lora.py), and for an engine that partitions its prefix
    cache by one, the tenant's cache salt."""
    fields: dict[str, object]
    if dep.lora is not None:
        fields = dep.lora.fields(served or req.target, req.target, req.endpoint.name)
    else:
        fields = {} if dep.model.name == req.target else {"model": dep.model.name}
    if req.salt is not None and dep.model.server in SALTED_SERVERS:
        fields["cache_salt"] = req.salt
    return fields


async def wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


__all__ = [
    "Answer",
    "Whole",
    "body_for",
    "fields_for",
    "on_deployment",
    "to_deployment",
    "to_provider",
    "to_replica",
    "wait_disconnect",
]
