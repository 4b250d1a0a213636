"""Prometheus metrics: request counters on the hot path, replica state read at scrape time.

The hot path's counts are tallied here in plain numbers and folded into their
Prometheus children when /metrics is scraped (``render``): a child's inc or
observe takes a lock per value and walks the buckets in Python, ~4 us per
metric, 3-4 of them per request; a tally is a few additions, and a scrape shows
every request finished before it, as before."""

from __future__ import annotations

from bisect import bisect_left
from typing import TYPE_CHECKING, Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

if TYPE_CHECKING:
    from appliance.fleet.supervisor import Supervisor

T = TypeVar("T", "_Count", "_Observed")

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


class _Count:
    """A counter child's increments since the last scrape."""

    __slots__ = ("child", "n")

    def __init__(self, child: Any) -> None:
        self.child, self.n = child, 0

    def fold(self) -> None:
        if self.n:
            self.child.inc(self.n)
            self.n = 0


class _Observed:
    """A histogram child's observations since the last scrape: their sum and their
    count per bucket (the first bound at or above each value: Histogram.observe's)."""

    __slots__ = ("bounds", "child", "counts", "sum")

    def __init__(self, child: Any) -> None:
        # Histogram's own value holders: folding a tally in is a few of their incs, not one
        # observe per value (checked as each child is made, so a change shows at once).
        self.child, self.bounds = child, list(child._upper_bounds)
        self.counts = [0] * len(self.bounds)
        self.sum = 0.0
        assert len(child._buckets) == len(self.bounds), "prometheus_client's Histogram changed"

    def observe(self, value: float) -> None:
        self.sum += value
        self.counts[bisect_left(self.bounds, value)] += 1

    def fold(self) -> None:
        child, counts = self.child, self.counts
        if not any(counts):
            return
        child._sum.inc(self.sum)
        for i, n in enumerate(counts):
            if n:
                child._buckets[i].inc(n)
                counts[i] = 0
        self.sum = 0.0


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
        # labels() locks and builds its key on every call; the label sets are few. Each
        # child's tally, folded in at the scrape (render).
        self._children: dict[tuple[str, str, int], tuple[_Count, _Observed]] = {}
        self._ttft: dict[str, _Observed] = {}
        self._tokens: dict[tuple[str, str], _Count] = {}
        self._tallies: list[_Count | _Observed] = []

    def observe(self, model: str, endpoint: str, status: int, seconds: float) -> None:
        key = (model, endpoint, status)
        children = self._children.get(key)
        if children is None:
            count = self._tally(_Count(self.requests.labels(model, endpoint, str(status))))
            children = self._children[key] = (count, self._tally(_Observed(self.duration.labels(model, endpoint))))
        children[0].n += 1
        children[1].observe(seconds)

    def first_token(self, model: str, seconds: float) -> None:
        tally = self._ttft.get(model)
        if tally is None:
            tally = self._ttft[model] = self._tally(_Observed(self.ttft.labels(model)))
        tally.observe(seconds)

    def usage(self, model: str, prompt: int, completion: int) -> None:
        if prompt:
            self._tokens_of(model, "prompt").n += prompt
        if completion:
            self._tokens_of(model, "completion").n += completion

    def _tokens_of(self, model: str, kind: str) -> _Count:
        tally = self._tokens.get((model, kind))
        if tally is None:
            tally = self._tokens[(model, kind)] = self._tally(_Count(self.tokens.labels(model, kind)))
        return tally

    def _tally(self, tally: T) -> T:
        self._tallies.append(tally)
        return tally

    def fallback(self, route: str, reason: str, target: str) -> None:
        self.fallbacks.labels(route, reason, target).inc()

    def render(self) -> bytes:
        for tally in self._tallies:  # what was counted since the last scrape
            tally.fold()
        return generate_latest(self.registry)
