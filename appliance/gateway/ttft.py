"""Time to first token per model, kept in memory for /admin/status (the TUI's
TTFT p50): the last few hundred requests' time from arrival to the first byte of
the answer (a streamed answer's first token; for a whole answer, the answer)."""

from __future__ import annotations

import statistics
from collections import deque

WINDOW = 256


class TtftTracker:
    def __init__(self, window: int = WINDOW) -> None:
        self.window = window
        self._samples: dict[str, deque[float]] = {}

    def observe(self, model: str, seconds: float) -> None:
        samples = self._samples.get(model)
        if samples is None:
            samples = self._samples[model] = deque(maxlen=self.window)
        samples.append(seconds)

    def p50_ms(self, model: str) -> float | None:
        samples = self._samples.get(model)
        if not samples:
            return None
        return round(statistics.median(samples) * 1000, 1)
