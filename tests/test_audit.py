"""The audit writer: a batch of audit rows and its ledger charges commit together."""

from __future__ import annotations

import asyncio
import sqlite3
import time

import pytest

from appliance.audit import AuditLog
from appliance.config import AuditConfig


def _row(rid: str) -> tuple:
    return (time.time(), rid, "k1", None, "m", "chat", "m#0", 200, 5, 4, 1.0, None, None, None, None)


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
