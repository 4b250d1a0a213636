"""What the capacity market did, for the operator: each eviction (what, for whom, why,
asleep or stopped) and how long requests that found their model not ready waited for it,
by what their wait paid for (``evict``: others stopped first, then a cold start;
``wake``: a sleeping replica woken; ``cold``: a cold start on free room).

Read by status (/admin/status, /admin/gpus) and /metrics (``appliance_evictions_total``,
``appliance_wait_seconds``); written by the supervisor. Bounded: the last RECENT evictions,
and fixed histogram buckets."""

from __future__ import annotations

import bisect
import time
from collections import deque
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from appliance import status

RECENT = 50
# Seconds: a wake takes a fraction of a second to a few, a cold start tens.
WAIT_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


@dataclass(frozen=True)
class Eviction:
    replica: str  # evicted: "a#0"
    model: str
    to: str  # "sleep" (weights to host RAM) or "stop"
    for_model: str  # the model that needed the room
    trigger: str  # what asked for the room: request, load, scale_up, fairness, headroom
    why: str  # one line: idle for how long, least recently used, priority
    at: float  # wall-clock seconds


class Waits:
    """A histogram per (model, cause): bucket counts, count and sum."""

    def __init__(self) -> None:
        self.series: dict[tuple[str, str], list] = {}

    def observe(self, model: str, cause: str, seconds: float) -> None:
        buckets, _, _ = entry = self.series.setdefault((model, cause), [[0] * len(WAIT_BUCKETS), 0, 0.0])
        i = bisect.bisect_left(WAIT_BUCKETS, seconds)
        if i < len(WAIT_BUCKETS):
            buckets[i] += 1
        entry[1] += 1
        entry[2] += seconds

    def cumulative(self, model: str, cause: str) -> tuple[list[tuple[str, float]], float]:
        """Prometheus' buckets (cumulative, +Inf last) and the sum."""
        buckets, count, total = self.series[(model, cause)]
        out, running = [], 0
        for bound, n in zip(WAIT_BUCKETS, buckets, strict=True):
            running += n
            out.append((repr(bound), float(running)))
        out.append(("+Inf", float(count)))
        return out, total


class Market:
    def __init__(self) -> None:
        self.evictions: dict[tuple[str, str], int] = {}  # (evicted model, trigger) -> count
        self._recent: deque[Eviction] = deque(maxlen=RECENT)
        self.waits = Waits()

    def evicted(self, e: Eviction) -> None:
        key = (e.model, e.trigger)
        self.evictions[key] = self.evictions.get(key, 0) + 1
        self._recent.append(e)

    def recent(self, limit: int = 20) -> list[status.Eviction]:
        """The latest evictions, newest first (as the admin API shows them)."""
        return [
            status.Eviction(**{**asdict(e), "at": datetime.fromtimestamp(e.at, UTC)})
            for e in reversed(list(self._recent)[-limit:])
        ]


def now() -> float:
    return round(time.time(), 3)
