"""The audit log and the token ledger: one row per request, written off the hot path.

The request path only appends a tuple to a list; a background task writes the
batch to SQLite (its own connection, in a thread) every ``audit.flush_interval_s``
or as soon as ``audit.flush_rows`` rows wait. Token usage per API key and
budget period goes to the ``usage_ledger`` table in the same transaction. Both
tables are in the state database; their schema is appliance/statedb.py's migrations.

Also here: reading token usage from an engine's answer, unary or streamed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec

from .config import AuditConfig
from .statedb import connect
from .upstreams import set_fields

log = logging.getLogger("appliance.audit")

COLUMNS = ("ts", "request_id", "key_id", "route", "model", "endpoint", "served_by", "status",
           "prompt_tokens", "completion_tokens", "latency_ms", "ttft_ms", "fallback_reason",
           "request_text", "response_text")


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
    def __init__(self, path: Path | str, cfg: AuditConfig) -> None:
        self.cfg = cfg
        self.db = connect(path)
        self.rows: list[tuple] = []
        self.ledger: dict[tuple[str, int], int] = {}
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()

    def record(self, row: tuple) -> None:
        if self.cfg.enabled:
            self.rows.append(row)
            if len(self.rows) >= self.cfg.flush_rows:
                self._wake.set()

    def charge(self, key_id: str, period_start: int, tokens: int) -> None:
        k = (key_id, period_start)
        self.ledger[k] = self.ledger.get(k, 0) + tokens

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="audit-writer")

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.cfg.flush_interval_s)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.flush()
            except Exception:  # keep serving; the next flush retries what is left
                log.exception("audit flush failed")

    async def flush(self) -> None:
        async with self._lock:
            rows, self.rows = self.rows, []
            ledger, self.ledger = self.ledger, {}
            if rows or ledger:
                try:
                    await asyncio.to_thread(self._write, rows, ledger)
                except Exception:
                    self.rows[:0] = rows
                    for k, v in ledger.items():
                        self.ledger[k] = self.ledger.get(k, 0) + v
                    raise

    def _write(self, rows: list[tuple], ledger: dict[tuple[str, int], int]) -> None:
        with transaction(self.db):
            self.db.executemany(f"INSERT INTO audit ({', '.join(COLUMNS)}) VALUES "
                                f"({', '.join('?' * len(COLUMNS))})", rows)
            self.db.executemany(
                "INSERT INTO usage_ledger (key_id, period_start, tokens) VALUES (?, ?, ?) "
                "ON CONFLICT(key_id, period_start) DO UPDATE SET tokens = tokens + excluded.tokens",
                [(k, p, t) for (k, p), t in ledger.items()])

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        await self.flush()
        self.db.close()


# --- token usage from engines' answers -------------------------------------------


class Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _WithUsage(msgspec.Struct):
    usage: Usage | None = None


class _StreamEvent(msgspec.Struct):
    usage: Usage | None = None
    choices: list[msgspec.Raw] | None = None


_UNARY = msgspec.json.Decoder(_WithUsage)
_EVENT = msgspec.json.Decoder(_StreamEvent)


class _StreamOptions(msgspec.Struct):
    include_usage: bool | None = None


class _StreamShape(msgspec.Struct):
    stream_options: _StreamOptions | None = None


_SHAPE = msgspec.json.Decoder(_StreamShape)


def unary_usage(data: bytes) -> Usage | None:
    try:
        return _UNARY.decode(data).usage
    except msgspec.MsgspecError:
        return None


def ask_stream_usage(body: bytes) -> tuple[bytes, bool]:
    """The body with stream_options.include_usage on, and whether we added it
    (then the extra usage-only event is kept from the client)."""
    try:
        opts = _SHAPE.decode(body).stream_options
    except msgspec.MsgspecError:
        return body, False
    if opts is not None and opts.include_usage:
        return body, False
    return set_fields(body, stream_options={"include_usage": True}), True


@dataclass
class UsageTap:
    """Watches a relayed SSE stream for the usage event; drops the usage-only
    event (empty choices) when the client did not ask for it."""

    strip: bool
    usage: Usage | None = None
    _buf: bytes = b""

    def feed(self, chunk: bytes) -> bytes:
        if not self._buf and b'"usage"' not in chunk and chunk.endswith(b"\n\n"):
            return chunk
        data = self._buf + chunk
        cut = data.rfind(b"\n\n")
        if cut < 0:
            self._buf = data
            return b""
        complete, self._buf = data[:cut + 2], data[cut + 2:]
        if b'"usage"' not in complete:
            return complete
        out = []
        for event in complete.split(b"\n\n")[:-1]:
            if b'"usage"' in event and event.startswith(b"data: {"):
                try:
                    parsed = _EVENT.decode(event[6:])
                except msgspec.MsgspecError:
                    parsed = None
                if parsed is not None and parsed.usage is not None:
                    self.usage = parsed.usage
                    if self.strip and not parsed.choices:
                        continue
            out.append(event + b"\n\n")
        return b"".join(out)

    def rest(self) -> bytes:
        rest, self._buf = self._buf, b""
        return rest


Charge = Callable[[str, int], None]
