"""Prometheus metrics: request counters on the hot path, replica state read at scrape time."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

if TYPE_CHECKING:
    from appliance.fleet.supervisor import Supervisor

# Litestar appends "; charset=utf-8" to a text/* media type itself (one charset, not two).
CONTENT_TYPE = "text/plain; version=0.0.4"


class _SupervisorCollector:
    """Replica states, in-flight and restarts, read per scrape from the same typed
    status the admin API shows (appliance/status.py), so the request path pays
    nothing for them and a label means what the status's field means."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor

    def collect(self):
        from appliance.fleet.replica_state import State

        state = GaugeMetricFamily(
            "appliance_replica_state", "1 for the state each replica is in", labels=["model", "replica", "state"]
        )
        inflight = GaugeMetricFamily(
            "appliance_replica_inflight_requests", "Requests being served by each replica", labels=["model", "replica"]
        )
        restarts = CounterMetricFamily(
            "appliance_replica_restarts", "Engine restarts after a crash", labels=["model", "replica"]
        )
        ready = GaugeMetricFamily("appliance_model_ready", "1 when a model has a READY replica", labels=["model"])
        load = {
            field: GaugeMetricFamily(f"appliance_engine_{field}", help_, labels=["model", "replica"])
            for field, help_ in (
                ("running", "Requests the engine is decoding"),
                ("waiting", "Requests queued inside the engine"),
                ("kv_cache_usage", "Fraction of the engine's KV cache in use"),
                ("prefix_cache_hit_rate", "Engine prefix-cache hit rate"),
            )
        }
        rps = GaugeMetricFamily(
            "appliance_model_requests_per_second",
            "Requests per second over a sliding window",
            labels=["model", "window"],
        )
        queued = GaugeMetricFamily(
            "appliance_model_queued_requests", "Requests held while the model starts", labels=["model"]
        )
        replicas = GaugeMetricFamily("appliance_model_replicas", "Replicas that exist (not draining)", labels=["model"])
        prefix = CounterMetricFamily(
            "appliance_prefix_routing_decisions",
            "Prefix-aware replica choices: hit (longest cached prefix), miss (new "
            "prefix, rendezvous hash), load_guard (sent to the least-loaded)",
            labels=["model", "outcome"],
        )
        evictions = CounterMetricFamily(
            "appliance_evictions",
            "Replicas stopped to make room for another model, by the model "
            "evicted and what asked for the room (request, load, scale_up, fairness, headroom)",
            labels=["model", "reason"],
        )
        for (model, reason), count in sorted(self.supervisor.market.evictions.items()):
            evictions.add_metric([model, reason], float(count))
        waits = HistogramMetricFamily(
            "appliance_wait_seconds",
            "How long requests held for a model with no ready replica waited, by what the wait "
            "paid for: evict (other models' replicas stopped first), wake, cold (a cold start)",
            labels=["model", "cause"],
        )
        for model, cause in sorted(self.supervisor.market.waits.series):
            buckets, total = self.supervisor.market.waits.cumulative(model, cause)
            waits.add_metric([model, cause], buckets, total)
        for m in self.supervisor.status():
            name = m.name
            for outcome, count in m.prefix_routing.items():
                prefix.add_metric([name, outcome], float(count))
            ready.add_metric([name], 1.0 if m.ready else 0.0)
            rps.add_metric([name, "10s"], m.rps_10s)
            rps.add_metric([name, "60s"], m.rps_60s)
            queued.add_metric([name], float(m.queued))
            replicas.add_metric([name], float(sum(1 for r in m.replicas if not r.retiring)))
            for r in m.replicas:
                idx = str(r.index)
                for s in State:
                    state.add_metric([name, idx, s.value], 1.0 if r.state == s.value else 0.0)
                inflight.add_metric([name, idx], float(r.inflight))
                restarts.add_metric([name, idx], float(r.restarts))
                if r.load is not None:
                    for field, family in load.items():
                        value = getattr(r.load, field)
                        if value is not None:
                            family.add_metric([name, idx], float(value))
        yield from (state, inflight, restarts, ready, rps, queued, replicas, prefix, evictions, waits, *load.values())


class Metrics:
    def __init__(self, supervisor: Supervisor) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "appliance_requests", "API requests answered", ["model", "endpoint", "status"], registry=self.registry
        )
        self.duration = Histogram(
            "appliance_request_duration_seconds",
            "Time from request to the last byte of the answer",
            ["model", "endpoint"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
        )
        self.ttft = Histogram(
            "appliance_time_to_first_token_seconds",
            "Streams: time from request to the first chunk of the answer",
            ["model"],
            registry=self.registry,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60),
        )
        self.tokens = Counter(
            "appliance_tokens",
            "Tokens from the engines' and providers' usage fields",
            ["model", "kind"],
            registry=self.registry,
        )
        self.fallbacks = Counter(
            "appliance_fallbacks",
            "Fallback decisions of routes, by reason",
            ["route", "reason", "target"],
            registry=self.registry,
        )
        self.registry.register(_SupervisorCollector(supervisor))
        # labels() locks and builds its key on every call; the label sets are few.
        self._children: dict[tuple[str, str, int], tuple] = {}
        self._ttft: dict[str, Any] = {}
        self._tokens: dict[tuple[str, str], Any] = {}

    def observe(self, model: str, endpoint: str, status: int, seconds: float) -> None:
        key = (model, endpoint, status)
        children = self._children.get(key)
        if children is None:
            children = (self.requests.labels(model, endpoint, str(status)), self.duration.labels(model, endpoint))
            self._children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def first_token(self, model: str, seconds: float) -> None:
        child = self._ttft.get(model)
        if child is None:
            child = self._ttft[model] = self.ttft.labels(model)
        child.observe(seconds)

    def usage(self, model: str, prompt: int, completion: int) -> None:
        if prompt:
            self._tokens_of(model, "prompt").inc(prompt)
        if completion:
            self._tokens_of(model, "completion").inc(completion)

    def _tokens_of(self, model: str, kind: str) -> Any:
        child = self._tokens.get((model, kind))
        if child is None:
            child = self._tokens[(model, kind)] = self.tokens.labels(model, kind)
        return child

    def fallback(self, route: str, reason: str, target: str) -> None:
        self.fallbacks.labels(route, reason, target).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
