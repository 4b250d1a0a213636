"""Routes and their policy: which local model serves a request, and where it may
go when that model cannot.

A route matches the requested model name and optionally a tag (the tag header,
or the API key's default tag). Its fallbacks are tried in order, for permitted
routes only: a burst when the local model is saturated, a failover when it
cannot start or fails before the first byte (connection error, timeout, 5xx).
Once a streamed answer has sent a byte there is no fallback.

Regulated routes never reach a commercial provider. Config validation refuses
such a fallback, and ``check_may_send`` repeats the check on every fallback
decision, right before the request would leave: whatever path got there
(retries, streams, errors, a reloaded config), it fails closed with a 503.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .config import RouteConfig
from .errors import (
    EngineFailure,
    EngineTimeout,
    NoCapacity,
    QueueFull,
    QueueTimeout,
    RegulatedFailClosed,
    ShuttingDown,
)
from .replica import State

if TYPE_CHECKING:
    from .audit import Usage, UsageTap
    from .keys import ApiKey
    from .supervisor import Deployment
    from .upstreams import Provider

log = logging.getLogger("appliance.routing")

# Local failures a permitted route may fail over from.
FALLBACK_ERRORS = (NoCapacity, QueueFull, EngineFailure)


@dataclass(slots=True)
class RequestCtx:
    """One request's facts, from admission to its audit row."""

    rid: str
    started: float          # perf_counter at arrival
    arrived: float          # unix time at arrival
    model: str              # the model the client asked for
    endpoint: str
    key: ApiKey | None = None
    route: RouteConfig | None = None
    prefix: list[int] | None = None
    served_by: str | None = None
    fallback_reason: str | None = None
    ttft: float | None = None
    tap: UsageTap | None = None
    usage: Usage | None = None
    bytes_sent: bool = False
    response_text: bytes | None = None   # b"" collects the answer (audit.include_text)
    finished: bool = False


class Routes:
    def __init__(self, routes: list[RouteConfig]) -> None:
        self.table = {(r.model, r.tag): r for r in routes}
        self.models = {r.model for r in routes}

    def resolve(self, model: str, tag: str) -> RouteConfig | None:
        if model not in self.models:
            return None
        return self.table.get((model, tag)) or self.table.get((model, ""))


def check_may_send(route: RouteConfig | None, provider: Provider) -> None:
    """The last check before a request leaves for a provider: fail closed."""
    if route is None or (route.regulated and provider.commercial):
        name = route.name if route is not None else "(none)"
        log.error("refused to send route %s to commercial provider %s: the route is regulated",
                  name, provider.cfg.name)
        raise RegulatedFailClosed(
            f"Route '{name}' is regulated: its requests are served on this server only, and the "
            "local model cannot serve this one now", retry_after=30)


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
        if other is not None:
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
    """The request is answered: metrics, token ledger, one audit row."""
    if ctx.finished:
        return
    ctx.finished = True
    latency = time.perf_counter() - ctx.started
    endpoint = ctx.endpoint
    if ctx.served_by is not None or ctx.route is not None:
        rt.metrics.observe(ctx.model, endpoint, status, latency)
    usage = ctx.usage or (ctx.tap.usage if ctx.tap is not None else None)
    prompt = completion = None
    if usage is not None:
        prompt, completion = usage.prompt_tokens, usage.completion_tokens
        rt.metrics.usage(ctx.model, prompt, completion)
        if ctx.key is not None:
            rt.gate.charge(ctx.key, prompt + completion)
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
    rt.audit.record((ctx.arrived, ctx.rid, ctx.key.id if ctx.key is not None else None,
                     ctx.route.name if ctx.route is not None else None, ctx.model, endpoint,
                     ctx.served_by, status, prompt, completion, round(latency * 1000, 3), ttft_ms,
                     ctx.fallback_reason, _text(request_text), _text(ctx.response_text)))


def _text(data: bytes | None) -> str | None:
    return data.decode("utf-8", "replace") if data else None
