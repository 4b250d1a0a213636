"""Progress of long byte-bound work (store import, verify): never minutes of silence.

On a terminal a rich progress bar (bytes, rate, time left); otherwise (journald, a CI log,
a pipe) one plain line every few seconds; nothing with --quiet. Always on stderr, so
that --json output on stdout stays one document. The store calls it once per chunk read,
from the thread doing the work.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

import click

QUIET_OPTION = click.option("--quiet", "-q", is_flag=True, help="No progress output.")
PLAIN_EVERY_S = 5.0


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover - the loop returns


class ByteProgress:
    """Call it with each chunk's size; close() once the work is done (or failed)."""

    def __init__(
        self,
        label: str,
        total: int,
        *,
        quiet: bool = False,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
        every_s: float = PLAIN_EVERY_S,
    ) -> None:
        self.label, self.total = label, total
        self.stream = stream or sys.stderr
        self.clock, self.every_s = clock, every_s
        self.done = 0
        self.quiet = quiet
        self.started = self.last_line = clock()
        self._bar = None if quiet or not self.stream.isatty() else self._rich_bar()

    def _rich_bar(self):
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

        bar = Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=Console(file=self.stream),
        )
        bar.start()
        self._task = bar.add_task(self.label, total=self.total)
        return bar

    def __call__(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done)
            return
        if self.quiet:
            return
        now = self.clock()
        if now - self.last_line >= self.every_s:
            self.last_line = now
            self._line(now)

    def _line(self, now: float, final: bool = False) -> None:
        elapsed = max(now - self.started, 1e-9)
        rate = f"{human_bytes(self.done / elapsed)}/s"
        if final:
            text = f"{self.label}: {human_bytes(self.done)} in {elapsed:.0f}s ({rate})"
        else:
            share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
            text = f"{self.label}: {human_bytes(self.done)} of {human_bytes(self.total)}{share}, {rate}"
        print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
        elif not self.quiet and self.clock() - self.started >= self.every_s:
            self._line(self.clock(), final=True)  # a long run says how it ended

    def __enter__(self) -> ByteProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
