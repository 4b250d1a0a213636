"""The audit log and the token ledger: one row per request, written off the hot path.

The request path appends a row to a list; the writer (``AuditLog``) commits
them to SQLite, with the token usage per API key and budget period (table
``usage_ledger``) in the same transaction: at once, before the answer ends, for
a keyed or regulated request; in the background for the others. Both tables are
in the state database; their schema is appliance/state/db.py's migrations.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from pathlib import Path

from appliance.access.refusals import RefusalFolding
from appliance.config import AuditConfig
from appliance.errors import StateWriteFailed
from appliance.state.db import connect

log = logging.getLogger("appliance.audit")

COLUMNS = (
    "ts",
    "request_id",
    "key_id",
    "route",
    "model",
    "endpoint",
    "served_by",
    "status",
    "prompt_tokens",
    "completion_tokens",
    "latency_ms",
    "ttft_ms",
    "fallback_reason",
    "request_text",
    "response_text",
    "client",  # who sent it: the peer's host:port, or the address a trusted proxy named (v2)
    "folded",  # a summary row: how many refusals it stands for (access/refusals.py; v3)
    "proxy",  # the trusted reverse proxy it came through, host:port (gateway/forwarded.py; v4)
)


@contextlib.contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One explicit transaction. The connection is in autocommit mode
    (isolation_level=None), where ``with db:`` opens none: each statement, and each
    row of an executemany, would commit on its own (a WAL append and lock round trip
    per row) and a batch's audit rows and ledger charges would not commit together."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


class AuditLog:
    """The audit rows and ledger charges waiting for the disk, and the one writer
    (a task on the loop, its SQLite work on one thread of its own) that commits
    them, each batch in one transaction.

    Group commit: a keyed or regulated request's row comes with a future
    (``record(..., durable=True)``) that its answer waits for; the writer takes
    every row waiting (other requests' included) into one commit as soon as one
    such future waits, and resolves them all (``audit.durability``: "commit",
    or "fsync" to survive power loss too). Other rows wait up to
    ``flush_interval_s`` or ``flush_rows``; with ``durability = "batch"`` all do,
    and a crash loses at most that window.

    A failed write (disk full, read-only) keeps its rows for the next try and
    fails the requests waiting on it (503 state_write_failed); while the state
    database fails, ``admit`` refuses keyed and regulated requests, and every
    request once ``max_pending_rows`` wait, so memory stays bounded.

    A write is never abandoned midway: its thread's outcome always decides whether
    its rows are kept, a cancelled flush waits for it, and the connection closes
    on the writer's thread after its last write."""

    def __init__(self, path: Path | str, cfg: AuditConfig) -> None:
        self.cfg = cfg
        self.db = connect(path)
        if cfg.durability == "fsync":
            self.db.execute("PRAGMA synchronous=FULL")
        self.rows: list[list | tuple] = []
        self.ledger: dict[tuple[str, int], int] = {}
        self.waiters: list[asyncio.Future] = []
        self.failing: str | None = None  # why the last write failed, while it fails
        # A flood of refused credentials leaves a summary row past a few rows a minute.
        per_minute = cfg.refusal_rows_per_minute
        self.folding = RefusalFolding(per_minute, COLUMNS) if per_minute else None
        self._durable = cfg.durability != "batch"
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit-writer")
        self._writing: Future | None = None
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._stopping = False
        self._closed = False

    def admit(self, accountable: bool) -> None:
        """Refuse a request whose row or charge could not be kept: the state
        database fails (for keyed and regulated requests), or too many rows wait."""
        if len(self.rows) >= self.cfg.max_pending_rows or (accountable and self.failing and self._durable):
            raise StateWriteFailed(
                "The appliance cannot write its audit log and token ledger now "
                f"({self.failing or 'too many rows wait for the disk'}); retry later"
            )

    def record(self, row: list | tuple, durable: bool = False) -> asyncio.Future | None:
        """Queue one audit row; for a durable one, the future its answer awaits."""
        if self.cfg.enabled and (durable or self.folding is None or self.folding.admit(row)):
            self.rows.append(row)
        if durable and self._durable and (self.cfg.enabled or self.ledger):
            waiter = asyncio.get_running_loop().create_future()
            if self._closed:
                _fail(waiter, "the audit log is closed")
            else:
                self.waiters.append(waiter)
                self._wake.set()
            return waiter
        if len(self.rows) >= self.cfg.flush_rows:
            self._wake.set()
        return None

    def charge(self, key_id: str, period_start: int, tokens: int) -> None:
        k = (key_id, period_start)
        self.ledger[k] = self.ledger.get(k, 0) + tokens

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="audit-writer")

    async def _run(self) -> None:
        while not self._stopping:
            if not self.waiters:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.cfg.flush_interval_s):
                        await self._wake.wait()
            self._wake.clear()
            with contextlib.suppress(Exception):  # kept for the next flush; _decide logged it
                await self.flush()

    async def flush(self) -> None:
        """Write every row and charge waiting, in one transaction on the writer thread."""
        self._summaries()
        rows, ledger, waiters = self.rows, self.ledger, self.waiters
        self.rows, self.ledger, self.waiters = [], {}, []
        if not rows and not ledger:
            _resolve(waiters)
            return
        job = self._writing = self._thread.submit(self._write, rows, ledger)
        try:
            await asyncio.shield(asyncio.wrap_future(job))
        except asyncio.CancelledError:
            wait_futures([job])  # the thread's outcome decides, cancelled or not
            raise
        except Exception:
            pass  # decided below, from the job itself
        finally:
            self._writing = None
            self._decide(job, rows, ledger, waiters)
        if (error := job.exception()) is not None:
            raise error

    def _decide(self, job: Future, rows: list, ledger: dict, waiters: list) -> None:
        error = job.exception()
        if error is None:
            if self.failing is not None:
                log.warning("audit: the state database takes writes again")
            self.failing = None
            _resolve(waiters)
            return
        if self.failing is None:
            log.error(
                "audit: cannot write %d rows to the state database, keeping them to retry "
                "(keyed and regulated requests get 503 meanwhile): %s",
                len(rows),
                error,
            )
        self.failing = f"{type(error).__name__}: {error}"
        self.rows[:0] = rows
        for k, v in ledger.items():
            self.ledger[k] = self.ledger.get(k, 0) + v
        for waiter in waiters:
            _fail(waiter, self.failing)

    def _write(self, rows: list, ledger: dict[tuple[str, int], int]) -> None:
        with transaction(self.db):
            self.db.executemany(
                f"INSERT INTO audit ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})", rows
            )
            self.db.executemany(
                "INSERT INTO usage_ledger (key_id, period_start, tokens) VALUES (?, ?, ?) "
                "ON CONFLICT(key_id, period_start) DO UPDATE SET tokens = tokens + excluded.tokens",
                [(k, p, t) for (k, p), t in ledger.items()],
            )

    async def close(self) -> None:
        """Stop the writer after its current write, write what is left, close the
        database on the writer's thread. Cancelled midway, it finishes the same
        work blocking (shutdown must not lose the last rows)."""
        self._stopping = True
        self._wake.set()
        try:
            if self._task is not None:
                await asyncio.shield(self._task)
            await self.flush()
        except asyncio.CancelledError:
            self._close_blocking()
            raise
        except Exception:
            self._lost()
        self._closed = True
        await asyncio.wrap_future(self._thread.submit(self.db.close))
        self._thread.shutdown(wait=True)

    def _close_blocking(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._writing is not None:
            wait_futures([self._writing])
        self._closed = True
        self._summaries()
        job = self._thread.submit(self._write, self.rows, self.ledger)
        wait_futures([job])
        if job.exception() is None:
            self.rows, self.ledger = [], {}
        self._lost()
        self._thread.submit(self.db.close)
        self._thread.shutdown(wait=True)

    def _summaries(self) -> None:
        """The summary rows of the refusal floods whose minute has ended (every one, once
        the log is closing), queued with the rest."""
        if self.folding is not None:
            self.rows.extend(self.folding.due(time.time(), everything=self._stopping))

    def _lost(self) -> None:
        if self.rows or self.ledger:
            log.error(
                "audit: %d rows and %d ledger charges could not be written before shutdown (%s)",
                len(self.rows),
                len(self.ledger),
                self.failing or "write failed",
            )


def _resolve(waiters: list[asyncio.Future]) -> None:
    for waiter in waiters:
        if not waiter.done():
            waiter.set_result(None)


def _fail(waiter: asyncio.Future, why: str) -> None:
    if not waiter.done():
        waiter.set_exception(
            StateWriteFailed(f"The appliance could not write its audit log and token ledger ({why}); retry later")
        )
        waiter.exception()  # retrieved: a request that gave up waiting must not log it
