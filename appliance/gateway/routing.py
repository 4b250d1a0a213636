"""Routes and their policy: which local model serves a request, and where it may
go when that model cannot. ``forward`` decides and sends the request there
(appliance/gateway/serving.py), one ProxyRequest from start to end.

A route matches the requested model name and optionally a tag (the tag header,
or the API key's tag). A key's tag binds it: the header may repeat it, never
replace it, and a tag no route carries is a 400, as are two different tags
(``one_tag``). Its fallbacks are tried in
order, for permitted routes only: a burst when the local model is saturated, a
failover when it cannot start or fails before the first byte (connection
error, timeout, 5xx). Once a streamed answer has sent a byte there is no fallback.

Regulated routes never reach a commercial provider. Config validation refuses
such a fallback, and ``check_may_send`` repeats the check on every fallback
decision, right before the request would leave: whatever path got there
(retries, streams, errors, a reloaded config), it fails closed with a 503.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

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
    quoted,
)
from appliance.fleet.replica_state import State
from appliance.gateway.capabilities import serves
from appliance.gateway.serving import Answer, body_for, to_deployment, to_provider, to_replica

if TYPE_CHECKING:
    from collections.abc import Awaitable

    from appliance.access.keys import ApiKey
    from appliance.fleet.deployment import Deployment
    from appliance.gateway.providers import Provider
    from appliance.gateway.request import ProxyRequest
    from appliance.gateway.runtime import Gateway

log = logging.getLogger("appliance.routing")

# Local failures a permitted route may fail over from.
FALLBACK_ERRORS = (NoCapacity, QueueFull, EngineFailure)

# What a request that sent two different tag headers carries in place of either:
# Routes.match refuses it.
TWO_TAGS = b"\0two different tags"
_TWO_TAGS_SENT = TWO_TAGS.decode("latin-1")


def one_tag(first: bytes | None, other: bytes) -> bytes:
    """A request's tag once another tag header came: the first when both are the same,
    else TWO_TAGS. A reverse proxy in front may stamp a tag (a department's regulated
    route) on requests: a client adding its own, different one must not pick which is
    obeyed, by order, and send its request to an unregulated route's provider."""
    return other if first is None or first == other else TWO_TAGS


class Routes:
    def __init__(self, routes: list[RouteConfig]) -> None:
        self.table = {(r.model, r.tag): r for r in routes}
        self.models = {r.model for r in routes}
        self.tags = {r.tag for r in routes if r.tag}
        self.named = {r.name: r for r in routes}

    def resolve(self, model: str, tag: str) -> RouteConfig | None:
        if model not in self.models:
            return None
        return self.table.get((model, tag)) or self.table.get((model, ""))

    def match(self, model: str, sent_tag: str, key: ApiKey | None, header: str) -> RouteConfig | None:
        """The route for a request: its model and the tag it carries. A key's tag
        is a ceiling: the tag header may repeat it, never move the key to
        another tag's routes (a catch-all route, tag "", matches every tag)."""
        if sent_tag == _TWO_TAGS_SENT:
            raise BadRequest(
                f"Two different tags in the {header} header: send one (a proxy in front may set it)",
                code="two_tags",
            )
        if sent_tag and sent_tag not in self.tags:
            raise BadRequest(
                f"Unknown tag {quoted(sent_tag)} in the {header} header: no route carries it", code="unknown_tag"
            )
        key_tag = key.tag if key is not None else ""
        if key_tag and sent_tag and sent_tag != key_tag:
            raise Forbidden(
                f"This API key is bound to tag {key_tag!r}; "
                f"the {header} header may not change it to {quoted(sent_tag)}",
                code="tag_not_allowed",
            )
        if not self.models:
            return None
        return self.resolve(model, sent_tag or key_tag)

    def allows(self, key: ApiKey, model: str) -> bool:
        """Whether the key may call this model name, as ``match`` and Gate.admit would
        decide it: any, for a key without routes; else through a route it lists, under
        its tag, or (a key bound to none) under any tag a request may send."""
        if not key.routes:
            return True
        tags = [key.tag] if key.tag else ["", *self.tags]
        return any((route := self.resolve(model, tag)) is not None and route.name in key.routes for tag in tags)


def check_may_send(route: RouteConfig | None, provider: Provider) -> None:
    """The last check before a request leaves for a provider: fail closed."""
    if route is None or (route.regulated and provider.commercial):
        name = route.name if route is not None else "(none)"
        log.error("refused to send route %s to commercial provider %s: the route is regulated", name, provider.cfg.name)
        raise RegulatedFailClosed(
            f"Route '{name}' is regulated: its requests never go to a commercial provider, and "
            "the models and non-commercial providers it may use cannot serve this one now",
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


def forward(rt: Gateway, req: ProxyRequest) -> Awaitable[Answer]:
    """Decide where the request goes and send it there: the replica holding the
    stored Response it continues, else its local deployment, or the route's
    fallbacks as its policy allows. Raises before the first byte reaches the
    client when nothing could take it. A route without fallbacks (nearly every
    request) gets the deployment's own coroutine, none of this function's: each
    coroutine in the chain is re-entered every time the request's task resumes."""
    dep = req.deployment
    assert dep is not None, "the front door chose the deployment"
    if req.pinned is not None:
        req.served_by = req.pinned.name
        return to_replica(rt, req, req.pinned, body_for(req, dep))
    route = req.route
    if route is None or not route.fallbacks:
        return to_deployment(rt, req, dep)
    return _with_fallbacks(rt, req, dep, route)


async def _with_fallbacks(rt: Gateway, req: ProxyRequest, dep: Deployment, route: RouteConfig) -> Answer:
    """forward's way for a route with fallbacks: the local deployment unless it is
    saturated, then each fallback its policy allows, in order."""
    err: Exception | None = None
    reason = "saturated" if saturated(dep, route.burst_at_queue) else ""
    if not reason:
        try:
            return await to_deployment(rt, req, dep)
        except FALLBACK_ERRORS as exc:
            if isinstance(exc, ShuttingDown) or req.bytes_sent:
                raise
            err, reason = exc, reason_of(exc)
    for name in route.fallbacks:
        if req.bytes_sent:
            break  # a streamed answer has begun: no fallback, an SSE error event instead
        provider = rt.providers.get(name)
        if provider is not None:
            check_may_send(route, provider)
            # A reload since this request's admission may have made its route regulated.
            check_may_send(rt.routes.named.get(route.name, route), provider)
            if req.endpoint.name not in provider.cfg.apis:  # it does not speak this request's API
                _decide(rt, req, name, "api_not_served", taken=False)
                continue
            if not provider.breaker.allow():
                _decide(rt, req, name, "breaker_open", taken=False)
                continue
            _decide(rt, req, name, reason)
            req.served_by = provider.name
            try:
                result = await to_provider(rt, req, provider)
            except EngineFailure as exc:
                provider.breaker.failure()
                err, reason = exc, reason_of(exc)
                continue
            provider.breaker.success()
            return result
        other = rt.supervisor.find(name)  # a model, or a LoRA adapter (its base's deployment)
        if other is not None and not serves(other.model, req.endpoint.name):
            _decide(rt, req, name, "api_not_served", taken=False)
        elif other is not None:
            _decide(rt, req, name, reason)
            try:
                return await to_deployment(rt, req, other, name)
            except FALLBACK_ERRORS as exc:
                if isinstance(exc, ShuttingDown) or req.bytes_sent:
                    raise
                err, reason = exc, reason_of(exc)
    if err is None:  # saturated, and no fallback could take the burst: wait locally
        req.fallback_reason = None
        return await to_deployment(rt, req, dep)
    raise err


def _decide(rt: Gateway, req: ProxyRequest, target: str, reason: str, taken: bool = True) -> None:
    route = req.route.name if req.route is not None else ""
    rt.metrics.fallback(route, reason, target if taken else f"skipped:{target}")
    log.info("route %s: %s %s (%s)", route, "falling back to" if taken else "skipping", target, reason)
    if taken:
        req.fallback_reason = reason
        key = (route, target)
        rt.fallbacks_fired[key] = rt.fallbacks_fired.get(key, 0) + 1
