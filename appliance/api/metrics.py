"""Prometheus metrics: request counters on the hot path, replica state read at scrape time."""

from __future__ import annotations

import time
from bisect import bisect_left
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

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


# A series: a counter's value, or a histogram's count per bucket and sum (counted
# into the first bucket whose bound the value is within, as prometheus_client does),
# with the unix time it was first seen (the exposition's _created).
class _Series:
    __slots__ = ("buckets", "created", "sum", "value")

    def __init__(self, bounds: int = 0) -> None:
        self.value = self.sum = 0.0
        self.buckets = [0] * bounds
        self.created = time.time()


DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60)


class _RequestCollector:
    """The request path's counters and histograms as plain numbers, read into metric
    families per scrape. prometheus_client's own take a lock and do several calls per
    count (~5 us of a proxied request's CPU for its five: bench/gateway_overhead.py);
    these are only written from the event loop, and a scrape reads a snapshot of them.
    The exposition is the same as prometheus_client's Counter and Histogram's."""

    def __init__(self) -> None:
        # (model, endpoint, status) -> (requests counter, its (model, endpoint) duration histogram)
        self.requests: dict[tuple[str, str, int], tuple[_Series, _Series]] = {}
        self.duration: dict[tuple[str, str], _Series] = {}
        self.ttft: dict[str, _Series] = {}
        self.tokens: dict[tuple[str, str], _Series] = {}

    def request_series(self, model: str, endpoint: str, status: int) -> tuple[_Series, _Series]:
        duration = self.duration.get((model, endpoint))
        if duration is None:
            duration = self.duration[(model, endpoint)] = _Series(len(DURATION_BUCKETS) + 1)
        series = self.requests[(model, endpoint, status)] = (_Series(), duration)
        return series

    def collect(self):
        requests = CounterMetricFamily(
            "appliance_requests", "API requests answered", labels=["model", "endpoint", "status"]
        )
        for (model, endpoint, status), (count, _) in list(self.requests.items()):
            requests.add_metric([model, endpoint, str(status)], count.value, created=count.created)
        duration = _histogram(
            "appliance_request_duration_seconds",
            "Time from request to the last byte of the answer",
            ["model", "endpoint"],
            DURATION_BUCKETS,
            list(self.duration.items()),
        )
        ttft = _histogram(
            "appliance_time_to_first_token_seconds",
            "Streams: time from request to the first chunk of the answer",
            ["model"],
            TTFT_BUCKETS,
            [((model,), series) for model, series in list(self.ttft.items())],
        )
        tokens = CounterMetricFamily(
            "appliance_tokens", "Tokens from the engines' and providers' usage fields", labels=["model", "kind"]
        )
        for labels, series in list(self.tokens.items()):
            tokens.add_metric(list(labels), series.value, created=series.created)
        yield from (requests, duration, ttft, tokens)


def _histogram(name: str, help_: str, labels: list[str], bounds: tuple, series: list) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, help_, labels=labels)
    les = [*(floatToGoString(b) for b in bounds), "+Inf"]
    for values, s in series:
        cumulative, total = [], 0.0
        for le, n in zip(les, list(s.buckets), strict=True):
            total += n
            cumulative.append((le, total))
        family.add_metric(list(values), cumulative, s.sum)
        family.samples.append(Sample(name + "_created", dict(zip(labels, values, strict=True)), s.created, None))
    return family


class Metrics:
    def __init__(self, supervisor: Supervisor) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._hot = hot = _RequestCollector()
        self._requests, self._ttft, self._tokens = hot.requests, hot.ttft, hot.tokens
        self.registry.register(hot)
        self.fallbacks = Counter(
            "appliance_fallbacks",
            "Fallback decisions of routes, by reason",
            ["route", "reason", "target"],
            registry=self.registry,
        )
        self.registry.register(_SupervisorCollector(supervisor))

    def observe(self, model: str, endpoint: str, status: int, seconds: float) -> None:
        series = self._requests.get((model, endpoint, status))
        if series is None:
            series = self._hot.request_series(model, endpoint, status)
        count, duration = series
        count.value += 1
        duration.buckets[bisect_left(DURATION_BUCKETS, seconds)] += 1
        duration.sum += seconds

    def first_token(self, model: str, seconds: float) -> None:
        series = self._ttft.get(model)
        if series is None:
            series = self._ttft[model] = _Series(len(TTFT_BUCKETS) + 1)
        series.buckets[bisect_left(TTFT_BUCKETS, seconds)] += 1
        series.sum += seconds

    def usage(self, model: str, prompt: int, completion: int) -> None:
        if prompt:
            self._tokens_of(model, "prompt").value += prompt
        if completion:
            self._tokens_of(model, "completion").value += completion

    def _tokens_of(self, model: str, kind: str) -> _Series:
        series = self._tokens.get((model, kind))
        if series is None:
            series = self._tokens[(model, kind)] = _Series()
        return series

    def fallback(self, route: str, reason: str, target: str) -> None:
        self.fallbacks.labels(route, reason, target).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
