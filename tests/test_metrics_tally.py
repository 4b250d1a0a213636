"""The hot path's metrics are tallied and folded in at the scrape (api/metrics.py):
a scrape shows exactly what Prometheus' own children would, for every request
finished before it."""

from __future__ import annotations

import math
import re

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from appliance.api.metrics import Metrics
from appliance.fleet.market import Market

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60)
# On a bound, between bounds, below the first, past the last.
LATENCIES = (0.005, 0.0051, 0.0001, 0.3, 1.0, 7.5, 500.0, 0.025, 0.025)


def _metrics() -> Metrics:
    supervisor = type("S", (), {"deployments": {}, "market": Market(), "status": lambda self: []})()
    return Metrics(supervisor)


def _plain() -> tuple[CollectorRegistry, Counter, Histogram, Histogram, Counter]:
    registry = CollectorRegistry(auto_describe=True)
    return (
        registry,
        Counter("appliance_requests", "API requests answered", ["model", "endpoint", "status"], registry=registry),
        Histogram("appliance_request_duration_seconds", "Time from request to the last byte of the answer",
                  ["model", "endpoint"], registry=registry, buckets=BUCKETS),
        Histogram("appliance_time_to_first_token_seconds", "Streams: time to the first chunk",
                  ["model"], registry=registry, buckets=TTFT_BUCKETS),
        Counter("appliance_tokens", "Tokens from the engines' and providers' usage fields", ["model", "kind"],
                registry=registry),
    )


def _samples(text: bytes, names: tuple[str, ...]) -> dict[str, str]:
    lines = text.decode().splitlines()
    return {
        line.rsplit(" ", 1)[0]: line.rsplit(" ", 1)[1]
        for line in lines
        if line.startswith(names) and not re.match(r"\w+_created", line)
    }


def test_a_scrape_counts_exactly_what_prometheus_children_count_for_the_same_requests():
    metrics = _metrics()
    registry, requests, duration, ttft, tokens = _plain()
    names = ("appliance_requests", "appliance_request_duration", "appliance_time_to_first", "appliance_tokens")
    for scrape in range(2):  # what comes after a scrape is added to what it showed
        for i, seconds in enumerate(LATENCIES):
            model, status = ("m1", 200) if i % 3 else ("", 401)
            metrics.observe(model, "chat", status, seconds + scrape)
            requests.labels(model, "chat", str(status)).inc()
            duration.labels(model, "chat").observe(seconds + scrape)
            metrics.first_token("m1", seconds / 2)
            ttft.labels("m1").observe(seconds / 2)
            metrics.usage("m1", i, 2 * i)
            if i:
                tokens.labels("m1", "prompt").inc(i)
                tokens.labels("m1", "completion").inc(2 * i)
        ours, theirs = _samples(metrics.render(), names), _samples(generate_latest(registry), names)
        assert ours.keys() == theirs.keys()
        for sample, value in ours.items():  # counts exact; a sum added in another order: to rounding
            exact = "_sum{" not in sample
            assert value == theirs[sample] if exact else math.isclose(float(value), float(theirs[sample])), sample
        assert ours['appliance_requests_total{endpoint="chat",model="m1",status="200"}'] == f"{6.0 * (scrape + 1)}"
