"""What the hot path runs on: the collaborators the app's lifespan opens, typed,
so that the gateway's modules are checked without importing the API layer
(appliance/api/lifespan.py's Runtime adds what only its other handlers use)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from appliance.access.tenancy import Tenancy
from appliance.gateway.forwarded import TrustedProxies
from appliance.gateway.response_homes import ResponseHomes
from appliance.gateway.ttft import TtftTracker

if TYPE_CHECKING:
    from appliance.access.audit import AuditLog
    from appliance.access.keys import Gate
    from appliance.config import Config
    from appliance.fleet.supervisor import Supervisor
    from appliance.gateway.providers import Provider
    from appliance.gateway.proxy import EngineProxy
    from appliance.gateway.routing import Routes
    from appliance.gateway.tracing import Tracing


class RequestMetrics(Protocol):
    """What the hot path tells /metrics (appliance/api/metrics.py)."""

    def observe(self, model: str, endpoint: str, status: int, seconds: float) -> None: ...

    def first_token(self, model: str, seconds: float) -> None: ...

    def usage(self, model: str, prompt: int, completion: int) -> None: ...

    def fallback(self, route: str, reason: str, target: str) -> None: ...


@dataclass
class Gateway:
    """The runtime of the proxy endpoints, from the front door to the ledger."""

    cfg: Config
    supervisor: Supervisor
    proxy: EngineProxy
    metrics: RequestMetrics
    gate: Gate
    audit: AuditLog
    routes: Routes
    providers: dict[str, Provider] = field(default_factory=dict)
    tenancy: Tenancy = field(default_factory=lambda: Tenancy("key"))
    response_homes: ResponseHomes = field(default_factory=ResponseHomes)
    ttft: TtftTracker = field(default_factory=TtftTracker)
    # (route, fallback target) -> times taken.
    fallbacks_fired: dict[tuple[str, str], int] = field(default_factory=dict)
    tag_header: bytes = b"x-appliance-tag"
    # The reverse proxies whose X-Forwarded-For (or Forwarded) names a request's client
    # ([server] trusted_proxies); None: no list, and no header is read.
    proxies: TrustedProxies | None = None
    draining: bool = False
    # Requests on the hot path, from arrival to their answer's end: held, at an
    # engine or a provider, or waiting for their audit row. The drain waits for 0.
    inflight: int = 0
    # Request traces ([telemetry] otlp_endpoint); None: off, and nothing is recorded.
    tracing: Tracing | None = None
    # Who answers a request the front door admitted: None, this process's relay
    # (appliance/gateway/relay.py); with workers, the data plane's (a request its
    # worker may carry alone is granted to it: appliance/dataplane/authority.py).
    answer: Callable[[Any, Any, Any], Awaitable[None]] | None = None
    # Told of each config adopt() makes live (with workers: the body limits they read by,
    # appliance/dataplane/front.py).
    adopted: list[Callable[[Config], None]] = field(default_factory=list)

    def adopt(self, cfg: Config, routes: Routes, providers: dict[str, Provider], tenancy: Tenancy) -> None:
        """A reloaded config's policy, built whole and checked (appliance/api/reload.py),
        made live in one step: a request reads all of it before or all of it after."""
        self.cfg, self.routes, self.providers, self.tenancy = cfg, routes, providers, tenancy
        self.tag_header = cfg.routing.tag_header.lower().encode("latin-1")
        self.proxies = TrustedProxies.of(cfg.server)
        self.gate.required = cfg.keys.required
        self.proxy.max_answer_bytes = cfg.upstream.max_answer_bytes
        for listener in self.adopted:
            listener(cfg)


__all__ = ["Gateway", "RequestMetrics"]
