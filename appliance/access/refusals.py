"""A flood of refused credentials, folded: the audit rows of unauthenticated refusals
(401 or 403 with no key id: a missing or wrong key, a wrong admin token, a browser's
cross-site request) are written one by one up to ``[audit] refusal_rows_per_minute``
per source and minute; past that, the minute's other refusals of that source leave
one summary row, written when the minute ends: the first of them, its ``folded``
column the count of refusals it stands for.

A source is the client's host (not its port: a flood opens a new connection per
refusal), the endpoint and the status. Without this, a local client refused ~1,100
times a second wrote as many rows, ~0.5 GB of state database an hour, kept until
retention (bench/refusal_flood.py; docs/routing.md, "Audit").

The windows kept in memory are bounded (MAX_SOURCES): past that many sources at once,
a new source's refusals are folded with every other such source's, under its endpoint
and status, so a client with many addresses gets no more rows than one. They are kept
in the order they started (a window never starts before the newest one), so each
flush looks only at those that ended: a flood from 10,000 hosts cost the daemon's
loop a walk over all 10,000 (about 3 ms) at every flush of the audit log.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

WINDOW_S = 60.0
MAX_SOURCES = 10_000
REFUSALS = frozenset({401, 403})


@dataclass(slots=True)
class _Window:
    start: float  # the time of its first refusal
    written: int = 0
    folded: int = 0
    first: list | None = None  # the first refusal not written: the summary row to be


class RefusalFolding:
    """Which refusal rows are written, and the summary rows of the rest."""

    def __init__(self, per_minute: int, columns: Sequence[str]) -> None:
        self.per_minute = per_minute
        self.windows: dict[tuple[str, str, int], _Window] = {}  # oldest first
        self.newest = 0.0  # the newest window's start: none starts before it
        self.ended: list[list] = []  # summary rows to write
        # Where the row's fields are (access/audit.py COLUMNS).
        self.ts, self.key_id, self.endpoint, self.status, self.client, self.folded = (
            columns.index(name) for name in ("ts", "key_id", "endpoint", "status", "client", "folded")
        )

    def admit(self, row: list | tuple) -> bool:
        """Whether to write this row now (False: it is counted in its window's summary)."""
        status = row[self.status]
        if status not in REFUSALS or row[self.key_id] is not None:
            return True
        source = (_host(row[self.client]), row[self.endpoint], status)
        now = row[self.ts]
        window = self.windows.get(source)
        if window is not None and now - window.start >= WINDOW_S:
            self._ended(source, window)
            window = None
        if window is None:
            if len(self.windows) >= MAX_SOURCES:
                source = ("*", row[self.endpoint], status)
                window = self.windows.get(source)
            if window is None:
                # A row may come late (its request's arrival time): its window starts
                # no earlier than the newest, keeping self.windows in order.
                self.newest = max(self.newest, now)
                window = self.windows[source] = _Window(self.newest)
        if window.written < self.per_minute:
            window.written += 1
            return True
        if window.first is None:
            window.first = list(row)
        window.folded += 1
        return False

    def due(self, now: float, everything: bool = False) -> list[list]:
        """The summary rows of the windows that have ended (all of them: the log closes)."""
        closing = []
        for source, window in self.windows.items():  # oldest first: stop at the first still open
            if not everything and now - window.start < WINDOW_S:
                break
            closing.append((source, window))
        for source, window in closing:
            self._ended(source, window)
        ended, self.ended = self.ended, []
        return ended

    def _ended(self, source: tuple[str, str, int], window: _Window) -> None:
        del self.windows[source]
        if window.first is not None:
            window.first[self.folded] = window.folded
            self.ended.append(window.first)


def _host(client: str | None) -> str:
    """The host of host:port ([v6]:port keeps its brackets); a host alone as it is (an
    address a trusted proxy named without a port: gateway/forwarded.py); "" for none."""
    if not client:
        return ""
    if client.endswith("]") or ":" not in client:  # a host alone: [v6], or v4
        return client
    return client.rsplit(":", 1)[0]
