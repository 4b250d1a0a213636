"""Routes and their policy: which local model serves a request, and where it may
go when that model cannot.

A route matches the requested model name and optionally a tag (the tag header,
or the API key's tag). A key's tag binds it: the header may repeat it, never
replace it, and a tag no route carries is a 400. Its fallbacks are tried in
order, for permitted routes only: a burst when the local model is saturated, a
failover when it cannot start or fails before the first byte (connection
error, timeout, 5xx). Once a streamed answer has sent a byte there is no fallback.

Regulated routes never reach a commercial provider. Config validation refuses
such a fallback, and ``check_may_send`` repeats the check on every fallback
decision, right before the request would leave: whatever path got there
(retries, streams, errors, a reloaded config), it fails closed with a 503.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from appliance.config import RouteConfig
from appliance.errors import (
    BadRequest,
    EngineFailure,
    EngineTimeout,
    Forbidden,
    NoCapacity,
    QueueFull,
    QueueTimeout,
    RegulatedFailClosed,
    ShuttingDown,
    StateWriteFailed,
)
from appliance.fleet.replica import State
from appliance.gateway.capabilities import serves
from appliance.gateway.dialects import OPENAI, Dialect

if TYPE_CHECKING:
    from appliance.access.keys import ApiKey, Reservation
    from appliance.fleet.supervisor import Deployment
    from appliance.gateway.metering import StreamTap, Usage
    from appliance.gateway.providers import Provider

log = logging.getLogger("appliance.routing")

# Local failures a permitted route may fail over from.
FALLBACK_ERRORS = (NoCapacity, QueueFull, EngineFailure)


@dataclass(slots=True)
class RequestCtx:
    """One request's facts, from admission to its audit row."""

    rid: str
    started: float  # perf_counter at arrival
    arrived: float  # unix time at arrival
    model: str  # the model the client asked for
    endpoint: str
    dialect: Dialect = OPENAI  # the API the client speaks (errors on its stream)
    key: ApiKey | None = None
    route: RouteConfig | None = None
    prefix: list[int] | None = None
    served_by: str | None = None
    fallback_reason: str | None = None
    ttft: float | None = None
    tap: StreamTap | None = None
    usage: Usage | None = None
    bytes_sent: bool = False
    response_text: bytes | None = None  # b"" collects the answer (audit.include_text)
    finished: bool = False
    # Metering: what the key's budget holds for the request, the body it is
    # charged by when the engine reports no usage, and its completion cap.
    reservation: Reservation | None = None
    body: bytes = b""
    completion_cap: int | None = None
    # The audit row and the future that resolves once it (and the request's
    # charge) is on disk; None when the row is written in the background.
    row: list | None = None
    receipt: asyncio.Future | None = None


class Routes:
    def __init__(self, routes: list[RouteConfig]) -> None:
        self.table = {(r.model, r.tag): r for r in routes}
        self.models = {r.model for r in routes}
        self.tags = {r.tag for r in routes if r.tag}

    def resolve(self, model: str, tag: str) -> RouteConfig | None:
        if model not in self.models:
            return None
        return self.table.get((model, tag)) or self.table.get((model, ""))

    def match(self, model: str, sent_tag: str, key: ApiKey | None, header: str) -> RouteConfig | None:
        """The route for a request: its model and the tag it carries. A key's tag
        is a ceiling: the tag header may repeat it, never move the key to
        another tag's routes (a catch-all route, tag "", matches every tag)."""
        if sent_tag and sent_tag not in self.tags:
            raise BadRequest(
                f"Unknown tag {sent_tag!r} in the {header} header: no route carries it", code="unknown_tag"
            )
        key_tag = key.tag if key is not None else ""
        if key_tag and sent_tag and sent_tag != key_tag:
            raise Forbidden(
                f"This API key is bound to tag {key_tag!r}; the {header} header may not change it to {sent_tag!r}",
                code="tag_not_allowed",
            )
        if not self.models:
            return None
        return self.resolve(model, sent_tag or key_tag)


def check_may_send(route: RouteConfig | None, provider: Provider) -> None:
    """The last check before a request leaves for a provider: fail closed."""
    if route is None or (route.regulated and provider.commercial):
        name = route.name if route is not None else "(none)"
        log.error("refused to send route %s to commercial provider %s: the route is regulated", name, provider.cfg.name)
        raise RegulatedFailClosed(
            f"Route '{name}' is regulated: its requests are served on this server only, and the "
            "local model cannot serve this one now",
            retry_after=30,
        )


def saturated(dep: Deployment, burst_at_queue: int) -> bool:
    """Taking this request locally would make more than burst_at_queue requests
    wait beyond the READY engines' slots (0: burst as soon as every slot is busy)."""
    if burst_at_queue < 0:
        return False
    ready = [r for r in dep.replicas if r.state is State.READY and not r.retiring]
    if not ready:
        return False  # nothing to be saturated: cold start or outage, decided by acquire
    slots = sum(r.model.parallel for r in ready)
    return len(dep.waiters) + max(0, dep.inflight + 1 - slots) > burst_at_queue


def reason_of(exc: Exception) -> str:
    if isinstance(exc, EngineTimeout):
        return "timeout"
    if isinstance(exc, EngineFailure):
        return "connection_error" if exc.retryable else "engine_error"
    if isinstance(exc, QueueFull):
        return "queue_full"
    if isinstance(exc, QueueTimeout):
        return "queue_timeout"
    return "cannot_start"


Attempt = Callable[[Any], Awaitable[Any]]


async def with_fallback(rt, ctx: RequestCtx, dep: Deployment, local: Attempt, remote: Attempt):
    """Run the request locally, or on the route's fallbacks as its policy allows.
    local(deployment) and remote(provider) forward it; both raise before the
    first byte reaches the client when they fail."""
    route = ctx.route
    if route is None or not route.fallbacks:
        return await local(dep)
    err: Exception | None = None
    reason = "saturated" if saturated(dep, route.burst_at_queue) else None
    if reason is None:
        try:
            return await local(dep)
        except FALLBACK_ERRORS as exc:
            if isinstance(exc, ShuttingDown) or ctx.bytes_sent:
                raise
            err, reason = exc, reason_of(exc)
    for name in route.fallbacks:
        if ctx.bytes_sent:
            break  # a streamed answer has begun: no fallback, an SSE error event instead
        provider = rt.providers.get(name)
        if provider is not None:
            check_may_send(route, provider)
            if ctx.endpoint not in provider.cfg.apis:  # it does not speak this request's API
                _decide(rt, ctx, name, "api_not_served", taken=False)
                continue
            if not provider.breaker.allow():
                _decide(rt, ctx, name, "breaker_open", taken=False)
                continue
            _decide(rt, ctx, name, reason)
            ctx.served_by = provider.name
            try:
                result = await remote(provider)
            except EngineFailure as exc:
                provider.breaker.failure()
                err, reason = exc, reason_of(exc)
                continue
            provider.breaker.success()
            return result
        other = rt.supervisor.deployments.get(name)
        if other is not None and not serves(other.model, ctx.endpoint):
            _decide(rt, ctx, name, "api_not_served", taken=False)
        elif other is not None:
            _decide(rt, ctx, name, reason)
            try:
                return await local(other)
            except FALLBACK_ERRORS as exc:
                if isinstance(exc, ShuttingDown) or ctx.bytes_sent:
                    raise
                err, reason = exc, reason_of(exc)
    if err is None:  # saturated, and no fallback could take the burst: wait locally
        ctx.fallback_reason = None
        return await local(dep)
    raise err


def _decide(rt, ctx: RequestCtx, target: str, reason: str, taken: bool = True) -> None:
    route = ctx.route.name if ctx.route is not None else ""
    rt.metrics.fallback(route, reason, target if taken else f"skipped:{target}")
    log.info("route %s: %s %s (%s)", route, "falling back to" if taken else "skipping", target, reason)
    if taken:
        ctx.fallback_reason = reason
        key = (route, target)
        rt.fallbacks_fired[key] = rt.fallbacks_fired.get(key, 0) + 1


def finish(rt, ctx: RequestCtx, status: int, request_text: bytes | None = None) -> None:
    """The request is answered: metrics, the key's budget settled, one audit row
    (awaited by ``committed`` before the answer ends, for a keyed or regulated request)."""
    if ctx.finished:
        return
    ctx.finished = True
    latency = time.perf_counter() - ctx.started
    endpoint = ctx.endpoint
    if ctx.served_by is not None or ctx.route is not None:
        rt.metrics.observe(ctx.model, endpoint, status, latency)
    usage = ctx.usage or (ctx.tap.usage if ctx.tap is not None else None)
    events = ctx.tap.events if ctx.tap is not None else 0
    if usage is None and ctx.served_by is not None and (status in (200, 499) or events):
        # The engine ran it but never said what it used (a client that left, a
        # stream cut short, an engine that ignores stream_options): our count.
        usage = ctx.dialect.estimate(ctx.body, events, ctx.completion_cap)
    prompt = completion = None
    if usage is not None:
        prompt, completion = usage.prompt_tokens, usage.completion_tokens
        rt.metrics.usage(ctx.model, prompt, completion)
    if ctx.reservation is not None:
        rt.gate.settle(ctx.reservation, (prompt or 0) + (completion or 0))
    if ctx.key is not None:
        # Per key since the daemon started, for the status and the TUI's usage view.
        seen = rt.key_usage.setdefault(ctx.key.name, [0, 0, 0])
        seen[0] += 1
        seen[1] += prompt or 0
        seen[2] += completion or 0
    ttft_ms = None
    if status == 200 and ctx.ttft is None and ctx.endpoint != "embeddings" and not ctx.bytes_sent:
        ctx.ttft = latency  # a whole answer: its first token came with it
    if ctx.ttft is not None:
        rt.metrics.first_token(ctx.model, ctx.ttft)
        rt.ttft.observe(ctx.model, ctx.ttft)  # the in-memory p50 the status and the TUI show
        ttft_ms = round(ctx.ttft * 1000, 3)
    ctx.row = [
        ctx.arrived,
        ctx.rid,
        ctx.key.id if ctx.key is not None else None,
        ctx.route.name if ctx.route is not None else None,
        ctx.model,
        endpoint,
        ctx.served_by,
        status,
        prompt,
        completion,
        round(latency * 1000, 3),
        ttft_ms,
        ctx.fallback_reason,
        _text(request_text),
        _text(ctx.response_text),
    ]
    ctx.receipt = rt.audit.record(ctx.row, durable=accountable(ctx))


def accountable(ctx: RequestCtx) -> bool:
    """A keyed or regulated request: its audit row and charge are on disk before its answer ends."""
    return ctx.key is not None or (ctx.route is not None and ctx.route.regulated)


STATUS = 7  # the status column of an audit row


async def committed(ctx: RequestCtx) -> None:
    """Wait until the request's audit row and charge are durable (a no-op for one
    written in the background). When the state database cannot take them, the
    request fails with 503 state_write_failed, and so says its row (kept to retry)."""
    if ctx.receipt is None:
        return
    try:
        await ctx.receipt
    except StateWriteFailed:
        if ctx.row is not None:
            ctx.row[STATUS] = StateWriteFailed.status
        raise


def _text(data: bytes | None) -> str | None:
    return data.decode("utf-8", "replace") if data else None
