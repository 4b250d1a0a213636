"""Audit retention: rows older than ``audit.retention_days``, or beyond the newest
``audit.max_rows``, are deleted in small batches off the hot path, and the freed pages go
back to the filesystem (incremental vacuum), so the state database stops growing.

Each batch is its own short transaction: the audit writer and the key checks wait for
one batch at most, never for the whole purge. ``usage_ledger`` (budget periods) is not
touched: it is one row per key and period, and a budget must never forget a charge.

Export for compliance (``appliance audit export``) streams rows between two times as JSON
lines or CSV: the key's id, never the key (the database has only its digest, elsewhere). In
CSV, what a client wrote is neither a spreadsheet formula nor a terminal's escape (csv_cell).
"""

from __future__ import annotations

import csv
import json
import logging
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from appliance.access.audit import COLUMNS
from appliance.config import AuditConfig
from appliance.logs import escape_controls
from appliance.state.db import connect

log = logging.getLogger("appliance.audit")

BATCH_ROWS = 2_000
# Pages (4 KiB) handed back to the filesystem per purge.
VACUUM_PAGES = 25_000
INCREMENTAL = 2  # PRAGMA auto_vacuum


@dataclass(frozen=True)
class Purged:
    by_age: int
    by_count: int


def ensure_incremental_vacuum(db: sqlite3.Connection) -> bool:
    """Put the database in incremental auto-vacuum mode (a one-time VACUUM rewrites it:
    run before the daemon serves). True when it was converted now."""
    if db.execute("PRAGMA auto_vacuum").fetchone()[0] == INCREMENTAL:
        return False
    started = time.monotonic()
    db.execute("PRAGMA auto_vacuum = INCREMENTAL")
    db.execute("VACUUM")
    log.info("state database converted to incremental vacuum in %.1fs (once)", time.monotonic() - started)
    return True


def purge(
    db: sqlite3.Connection,
    *,
    retention_days: float,
    max_rows: int,
    now: float,
    batch: int = BATCH_ROWS,
    pause: Callable[[], None] = lambda: None,
) -> Purged:
    """Delete what retention says is gone, batch by batch (pause() between batches: the
    caller's way to yield to the hot path), then give free pages back."""
    by_age = by_count = 0
    if retention_days > 0:
        cutoff = now - retention_days * 86400
        by_age = _delete_while(db, "ts < ?", (cutoff,), batch, pause)
    if max_rows > 0:
        row = db.execute("SELECT id FROM audit ORDER BY id DESC LIMIT 1 OFFSET ?", (max_rows,)).fetchone()
        if row is not None:
            by_count = _delete_while(db, "id <= ?", (row[0],), batch, pause)
    if by_age or by_count:
        # It frees one page per step of the statement: run to completion by sqlite3_exec
        # (executescript), not execute(), which steps once.
        db.executescript(f"PRAGMA incremental_vacuum({VACUUM_PAGES});")
        log.info(
            "audit retention: deleted %d rows older than %g days, %d beyond %d rows",
            by_age,
            retention_days,
            by_count,
            max_rows,
        )
    return Purged(by_age, by_count)


def _delete_while(db: sqlite3.Connection, where: str, args: tuple, batch: int, pause: Callable[[], None]) -> int:
    deleted = 0
    while True:
        cur = db.execute(
            f"DELETE FROM audit WHERE id IN (SELECT id FROM audit WHERE {where} ORDER BY id LIMIT ?)",  # noqa: S608
            (*args, batch),
        )
        deleted += cur.rowcount
        if cur.rowcount < batch:
            return deleted
        pause()


# --- export --------------------------------------------------------------------------------


def rows_between(db: sqlite3.Connection, since: float | None, until: float | None) -> Iterator[dict]:
    """Audit rows with since <= ts < until, oldest first, one at a time (a cursor, not a list).
    A database an older appliance wrote (not yet migrated: no daemon of this version has
    started on it) is read as it is: a column that version did not have comes back None."""
    present = {row[1] for row in db.execute("PRAGMA table_info(audit)")}
    if not present:
        return  # no audit table yet: nothing audited
    clauses, args = [], []
    if since is not None:
        clauses.append("ts >= ?")
        args.append(since)
    if until is not None:
        clauses.append("ts < ?")
        args.append(until)
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    columns = ", ".join(c if c in present else "NULL" for c in ("id", *COLUMNS))
    for values in db.execute(f"SELECT {columns} FROM audit {where} ORDER BY id", args):  # noqa: S608
        yield dict(zip(("id", *COLUMNS), values, strict=True))


def write_jsonl(rows: Iterator[dict], out: IO[str]) -> int:
    n = 0
    for row in rows:
        out.write(json.dumps({**row, "ts": iso(row["ts"])}) + "\n")
        n += 1
    return n


def write_csv(rows: Iterator[dict], out: IO[str]) -> int:
    writer = csv.DictWriter(out, fieldnames=("id", *COLUMNS))
    writer.writeheader()
    n = 0
    for row in rows:
        writer.writerow({k: csv_cell(v) for k, v in row.items()} | {"ts": iso(row["ts"])})
        n += 1
    return n


# What makes a spreadsheet read a cell as a formula (OWASP, "CSV Injection").
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: object) -> object:
    """A text cell as a spreadsheet and a terminal show it without obeying it: clients
    wrote the model names, request ids and prompts in audit rows. A formula's leading
    character is quoted with ', control characters but tab and newline are \\xNN."""
    if not isinstance(value, str):
        return value
    if value.startswith(_FORMULA_START):
        value = "'" + value
    return value if value.isprintable() else escape_controls(value)


def iso(ts: float) -> str:
    """UTC, to the millisecond: 2026-11-30T06:30:00.123Z."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts * 1000) % 1000:03d}Z"


# --- the daemon's side ------------------------------------------------------------------


def retention_on(audit: AuditConfig) -> bool:
    return audit.retention_days > 0 or audit.max_rows > 0


def prepare(path: Path, audit: AuditConfig) -> None:
    """At start, before serving: a database that retention will shrink is converted once."""
    if not retention_on(audit):
        return
    db = connect(path)
    try:
        ensure_incremental_vacuum(db)
    finally:
        db.close()


def purge_now(path: Path, audit: AuditConfig, clock: Callable[[], float] = time.time) -> Purged:
    """One purge on a connection of its own (run in a worker thread: blocking SQLite),
    pausing a few milliseconds between batches so the audit writer gets the lock."""
    db = connect(path)
    try:
        return purge(
            db,
            retention_days=audit.retention_days,
            max_rows=audit.max_rows,
            now=clock(),
            pause=lambda: time.sleep(0.005),
        )
    finally:
        db.close()
