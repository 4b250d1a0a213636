"""The audit writer: a batch of audit rows and its ledger charges commit together,
no write is abandoned midway, and a failing disk bounds what waits."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time

import pytest

from appliance.access.audit import COLUMNS, AuditLog
from appliance.access.refusals import RefusalFolding
from appliance.config import AuditConfig


def _row(rid: str) -> tuple:
    return (time.time(), rid, "k1", None, "m", "chat", "m#0", 200, 5, 4, 1.0, None, None, None, None, "127.0.0.1:5000", None, None)


def _count(path) -> int:
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT count(*) FROM audit").fetchone()[0]


def test_an_audit_batch_and_its_ledger_charges_commit_together_or_not_at_all(tmp_path):
    # Regression: the connection is in autocommit mode, where `with db:` opens no
    # transaction, so each audit row committed on its own before the ledger failed.
    path = tmp_path / "audit.db"

    async def scenario() -> None:
        log = AuditLog(path, AuditConfig())
        log.record(_row("a"))
        log.record(_row("b"))
        log.charge(None, 0, 9)  # type: ignore[arg-type]  # key_id NOT NULL: the ledger write fails
        with pytest.raises(sqlite3.IntegrityError):
            await log.flush()
        assert _count(path) == 0, "audit rows committed without their ledger charges"
        assert [r[1] for r in log.rows] == ["a", "b"], "the failed batch is kept for the next flush"
        log.ledger.clear()
        log.charge("k1", 0, 9)
        await log.flush()
        await log.close()

    asyncio.run(scenario())
    assert _count(path) == 2
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT key_id, tokens FROM usage_ledger").fetchall() == [("k1", 9)]


class _SlowWrites:
    """Wraps AuditLog._write: each write waits for `release` (a write in progress, in
    its thread) and may fail like a full disk."""

    def __init__(self, log: AuditLog, fail: bool = False) -> None:
        self.original = log._write
        self.started = threading.Event()
        self.release = threading.Event()
        self.fail = fail
        self.calls = 0
        log._write = self

    def __call__(self, rows, ledger) -> None:
        self.calls += 1
        self.started.set()
        self.release.wait(10)
        if self.fail:
            raise sqlite3.OperationalError("database or disk is full")
        self.original(rows, ledger)


async def _until(event: threading.Event) -> None:
    while not event.is_set():
        await asyncio.sleep(0.01)


def test_a_shutdown_during_a_write_waits_for_it_and_loses_no_row(tmp_path):
    # Regression: close() cancelled the periodic flush while its thread was writing,
    # closed the connection under that thread, and the rows it had taken were lost.
    path = tmp_path / "audit.db"

    async def scenario() -> None:
        log = AuditLog(path, AuditConfig(flush_interval_s=0.05))
        slow = _SlowWrites(log)
        log.start()
        for i in range(5):
            log.record(_row(f"r{i}"))
        log.charge("k1", 0, 40)
        await _until(slow.started)  # the writer's thread is inside its write
        closing = asyncio.ensure_future(log.close())
        await asyncio.sleep(0.1)
        log.record(_row("late"))  # answered while the shutdown drains
        slow.release.set()
        await closing

    asyncio.run(scenario())
    assert _count(path) == 6
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT tokens FROM usage_ledger WHERE key_id = 'k1'").fetchone() == (40,)


def test_a_cancelled_flush_keeps_the_rows_of_its_failed_write(tmp_path):
    # Regression: CancelledError is a BaseException, so `except Exception` did not put
    # back the rows a cancelled flush had taken; the write then failed, and they were gone.
    async def scenario() -> AuditLog:
        log = AuditLog(tmp_path / "audit.db", AuditConfig())
        slow = _SlowWrites(log, fail=True)
        log.record(_row("a"))
        log.record(_row("b"))
        flushing = asyncio.ensure_future(log.flush())
        await _until(slow.started)
        flushing.cancel()
        slow.release.set()
        with pytest.raises(asyncio.CancelledError):
            await flushing
        return log

    log = asyncio.run(scenario())
    assert [r[1] for r in log.rows] == ["a", "b"]


def test_a_failing_disk_fails_the_waiting_answers_and_bounds_the_queue(tmp_path):
    from appliance.errors import StateWriteFailed

    async def scenario() -> None:
        log = AuditLog(tmp_path / "audit.db", AuditConfig(flush_rows=2, max_pending_rows=4))
        slow = _SlowWrites(log, fail=True)
        slow.release.set()
        receipt = log.record(_row("keyed"), durable=True)
        with pytest.raises(sqlite3.OperationalError):
            await log.flush()
        with pytest.raises(StateWriteFailed):
            await receipt  # the answer that waited for it fails (503), its row is kept
        with pytest.raises(StateWriteFailed):
            log.admit(True)  # keyed and regulated requests are refused while the disk fails
        for i in range(3):
            log.admit(False)
            log.record(_row(f"free{i}"))
        with pytest.raises(StateWriteFailed):
            log.admit(False)  # 4 rows wait: memory stays bounded
        slow.fail = False
        await log.flush()
        log.admit(True)
        await log.close()

    asyncio.run(scenario())
    assert _count(tmp_path / "audit.db") == 4


def test_concurrent_durable_rows_share_one_commit(tmp_path):
    async def scenario() -> int:
        log = AuditLog(tmp_path / "audit.db", AuditConfig())
        slow = _SlowWrites(log)
        slow.release.set()
        log.start()
        receipts = [log.record(_row(f"r{i}"), durable=True) for i in range(50)]
        await asyncio.gather(*receipts)
        await log.close()
        return slow.calls

    assert asyncio.run(scenario()) == 1
    assert _count(tmp_path / "audit.db") == 50


def _refusal(at: float, client: str, status: int = 401, endpoint: str = "chat") -> list:
    return [at, f"r{at}-{client}", None, None, "", endpoint, None, status, None, None, 1.0, None, None, None, None,
            client, None, None]


def test_a_flood_of_refused_credentials_leaves_a_few_rows_and_one_summary_a_minute(tmp_path):
    # Each refusal wrote a row: a local client sending wrong keys as fast as it could
    # (~1,100 a second, bench/refusal_flood.py) grew the state database by ~0.5 GB an
    # hour, kept until retention. Per client host, endpoint and status, a few rows a
    # minute are written one by one, the rest counted in one summary row.
    path = tmp_path / "audit.db"

    async def scenario() -> None:
        log = AuditLog(path, AuditConfig(refusal_rows_per_minute=3))
        now = time.time()
        for i in range(100):  # one host, a new port each time: one source
            log.record(_refusal(now + i * 0.01, f"10.0.0.9:{40000 + i}"))
        for i in range(2):  # another host: its own few rows
            log.record(_refusal(now, f"10.0.0.8:{50000 + i}"))
        log.record(_refusal(now, "10.0.0.9:1", status=403))  # another reason: its own
        log.record(_row("keyed"))  # a keyed request's row is never folded
        await log.flush()
        with sqlite3.connect(path) as conn:
            written = conn.execute("SELECT client, status, folded FROM audit ORDER BY id").fetchall()
        assert written == [
            *((f"10.0.0.9:{40000 + i}", 401, None) for i in range(3)),
            ("10.0.0.8:50000", 401, None),
            ("10.0.0.8:50001", 401, None),
            ("10.0.0.9:1", 403, None),
            ("127.0.0.1:5000", 200, None),
        ]
        # The minute's end (or the log's close) writes the summary: the first refusal
        # not written, standing for all 97.
        await log.close()

    asyncio.run(scenario())
    with sqlite3.connect(path) as conn:
        summary = conn.execute("SELECT client, status, endpoint, folded FROM audit WHERE folded IS NOT NULL").fetchall()
        total = conn.execute("SELECT sum(coalesce(folded, 1)) FROM audit WHERE client LIKE '10.0.0.9:4%'").fetchone()[0]
    assert summary == [("10.0.0.9:40003", 401, "chat", 97)]
    assert total == 100  # every refusal is counted, once


def test_a_refusal_flood_past_its_minute_starts_a_new_window_after_its_summary(tmp_path):
    path = tmp_path / "audit.db"

    async def scenario() -> None:
        log = AuditLog(path, AuditConfig(refusal_rows_per_minute=1))
        start = time.time() - 120  # two minutes ago, then now
        for at in (start, start + 1, start + 2, time.time()):
            log.record(_refusal(at, "10.0.0.7:1"))
        await log.flush()
        await log.close()

    asyncio.run(scenario())
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT request_id, folded FROM audit ORDER BY id").fetchall()
    assert [folded for _, folded in rows] == [None, None, 2]  # first, next minute's first, then the summary of 2


class _CountedWindows(dict):
    """The folding's windows, counting how many of them a flush looks at."""

    looked = 0

    def items(self):
        for item in super().items():
            self.looked += 1
            yield item


def test_a_flush_during_a_flood_from_many_hosts_looks_only_at_the_windows_that_ended():
    # RefusalFolding.due walked every open window at each flush: 10,000 hosts' windows
    # (MAX_SOURCES) cost the daemon's loop ~3 ms a flush. They are kept oldest first, so
    # it stops at the first still open; a row that comes late starts no earlier window.
    folding = RefusalFolding(1, COLUMNS)
    now = time.time()
    folding.windows = _CountedWindows()
    for i in range(3):  # three hosts refused a minute ago, twice each: their summaries are due
        for _ in range(2):
            folding.admit(_refusal(now - 61, f"10.1.0.{i}:1"))
    for i in range(5000):  # a flood from many hosts now: open windows
        folding.admit(_refusal(now, f"10.2.{i // 250}.{i % 250}:1"))
    folding.admit(_refusal(now - 70, "10.3.0.1:1"))  # late: its window starts with the newest
    folding.windows.looked = 0
    due = folding.due(now)
    assert sorted(row[15] for row in due) == ["10.1.0.0:1", "10.1.0.1:1", "10.1.0.2:1"]
    assert folding.windows.looked == 4  # the three that ended, and the first still open
    assert len(folding.windows) == 5001
    assert len(folding.due(now, everything=True)) == 0  # none of the rest had folded a row
