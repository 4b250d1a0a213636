"""The request path's metrics (appliance/api/metrics.py) are kept as plain numbers and
read into metric families per scrape: what /metrics says of them is exactly what
prometheus_client's own Counter and Histogram say of the same observations."""

from __future__ import annotations

import re

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from appliance.api.metrics import DURATION_BUCKETS, TTFT_BUCKETS, Metrics
from appliance.fleet.market import Market

# (model, endpoint, status, seconds): on bucket bounds, between, past the last, refused.
REQUESTS = [
    ("fake", "chat", 200, 0.02),
    ("fake", "chat", 200, 0.025),
    ("fake", "chat", 200, 3.0),
    ("fake", "chat", 502, 0.5),
    ("", "chat", 401, 0.001),
    ("fake", "embeddings", 200, 500.0),
]
FIRST_TOKENS = [("fake", 0.03), ("fake", 0.01), ("other", 90.0)]
USAGE = [("fake", 5, 0), ("fake", 5, 7), ("other", 0, 3)]


class _Supervisor:
    market = Market()

    def status(self) -> list:
        return []


def _ours() -> str:
    metrics = Metrics(_Supervisor())  # type: ignore[arg-type]
    for model, endpoint, status, seconds in REQUESTS:
        metrics.observe(model, endpoint, status, seconds)
    for model, seconds in FIRST_TOKENS:
        metrics.first_token(model, seconds)
    for model, prompt, completion in USAGE:
        metrics.usage(model, prompt, completion)
    return metrics.render().decode()


def _prometheus_clients() -> str:
    """The same observations on prometheus_client's own metrics, as the request path kept them before."""
    registry = CollectorRegistry()
    requests = Counter("appliance_requests", "API requests answered", ["model", "endpoint", "status"], registry=registry)
    duration = Histogram(
        "appliance_request_duration_seconds",
        "Time from request to the last byte of the answer",
        ["model", "endpoint"],
        registry=registry,
        buckets=DURATION_BUCKETS,
    )
    ttft = Histogram(
        "appliance_time_to_first_token_seconds",
        "Streams: time from request to the first chunk of the answer",
        ["model"],
        registry=registry,
        buckets=TTFT_BUCKETS,
    )
    tokens = Counter(
        "appliance_tokens", "Tokens from the engines' and providers' usage fields", ["model", "kind"], registry=registry
    )
    for model, endpoint, status, seconds in REQUESTS:
        requests.labels(model, endpoint, str(status)).inc()
        duration.labels(model, endpoint).observe(seconds)
    for model, seconds in FIRST_TOKENS:
        ttft.labels(model).observe(seconds)
    for model, prompt, completion in USAGE:
        if prompt:
            tokens.labels(model, "prompt").inc(prompt)
        if completion:
            tokens.labels(model, "completion").inc(completion)
    return generate_latest(registry).decode()


def _request_families(text: str) -> str:
    """The four request families of an exposition, their _created times blanked."""
    names = ("appliance_requests", "appliance_request_duration", "appliance_time_to_first", "appliance_tokens")
    lines = [line for line in text.splitlines() if any(n in line for n in names)]
    return re.sub(r"(_created\{[^}]*\}) \S+", r"\1 T", "\n".join(lines))


def test_request_metrics_are_exposed_as_prometheus_clients_counters_and_histograms_are():
    ours = _request_families(_ours())
    assert ours == _request_families(_prometheus_clients())
    assert 'appliance_request_duration_seconds_bucket{endpoint="chat",le="0.025",model="fake"} 2.0' in ours
    assert 'appliance_request_duration_seconds_bucket{endpoint="embeddings",le="+Inf",model="fake"} 1.0' in ours
    assert 'appliance_tokens_total{kind="completion",model="fake"} 7.0' in ours
