"""Request-rate signals, cheap enough for the request path.

``RateWindow`` counts events in one-second buckets of a ring; ``rate(10)`` and
``rate(60)`` read requests per second over the last 10 and 60 seconds. Recording
is a few integer operations, no allocation, no lock (one event loop).
"""

from __future__ import annotations

import time
from collections.abc import Callable


class RateWindow:
    def __init__(self, horizon_s: int = 60, clock: Callable[[], float] = time.monotonic) -> None:
        self.horizon = horizon_s
        self.clock = clock
        self._buckets = [0] * (horizon_s + 1)
        self._stamps = [-1] * (horizon_s + 1)
        self.last_event = float("-inf")

    def record(self, n: int = 1) -> None:
        now = self.clock()
        second = int(now)
        slot = second % len(self._buckets)
        if self._stamps[slot] != second:
            self._stamps[slot] = second
            self._buckets[slot] = 0
        self._buckets[slot] += n
        self.last_event = now

    def count(self, window_s: int) -> int:
        """Events in the last window_s whole seconds, the current second included."""
        window_s = min(window_s, self.horizon)
        now = int(self.clock())
        total = 0
        for second in range(now - window_s + 1, now + 1):
            slot = second % len(self._buckets)
            if self._stamps[slot] == second:
                total += self._buckets[slot]
        return total

    def rate(self, window_s: int) -> float:
        return self.count(window_s) / float(min(window_s, self.horizon))

    def idle_for(self) -> float:
        return self.clock() - self.last_event
