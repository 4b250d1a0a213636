"""The state database, ``<state_dir>/appliance.db``: the operator's decisions
(``model_control``, appliance/state/decisions.py), API keys (``api_keys``, appliance/access/keys.py), the
audit log and the token ledger (``audit``, ``usage_ledger``, appliance/access/audit.py).

Its schema is MIGRATIONS below and nothing else (appliance/state/migrations.py runs it). To
change it, append a step, e.g.::

    def _v2_audit_cached_tokens(db):
        add_column(db, "audit", "cached_tokens", "INTEGER")

    MIGRATIONS = Registry("state database", (_v1_tables, _v2_audit_cached_tokens))

and never edit a step that has shipped.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from appliance.state.migrations import Registry, add_column, run_script
from appliance.state.migrations import connect as _connect


def _v1_tables(db: sqlite3.Connection) -> None:
    """The tables of appliance 0.1.0 (a database it wrote, version 0, has some or all)."""
    run_script(
        db,
        """
CREATE TABLE IF NOT EXISTS model_control (
    model      TEXT PRIMARY KEY,
    override   INTEGER,          -- replicas the operator asked for; NULL = autoscale
    pinned     INTEGER NOT NULL DEFAULT 0,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS api_keys (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    secret_sha256 TEXT NOT NULL,
    routes        TEXT NOT NULL DEFAULT '[]',   -- JSON list; [] = every route
    tag           TEXT NOT NULL DEFAULT '',
    rpm           INTEGER NOT NULL DEFAULT 0,   -- requests per minute; 0 = no limit
    budget_tokens INTEGER NOT NULL DEFAULT 0,   -- per budget_period; 0 = no budget
    budget_period TEXT NOT NULL DEFAULT 'day',
    created_at    REAL NOT NULL,
    revoked_at    REAL
);
CREATE TABLE IF NOT EXISTS audit (
    id                INTEGER PRIMARY KEY,
    ts                REAL NOT NULL,      -- unix time the request arrived
    request_id        TEXT NOT NULL,
    key_id            TEXT,               -- NULL: a keyless local client
    route             TEXT,               -- NULL: the model was requested directly
    model             TEXT NOT NULL,      -- the model the client asked for
    endpoint          TEXT NOT NULL,
    served_by         TEXT,               -- a replica (model#n) or provider:<name>
    status            INTEGER NOT NULL,
    prompt_tokens     INTEGER,
    completion_tokens INTEGER,
    latency_ms        REAL NOT NULL,
    ttft_ms           REAL,
    fallback_reason   TEXT,
    request_text      TEXT,               -- only with audit.include_text
    response_text     TEXT
);
CREATE INDEX IF NOT EXISTS audit_ts ON audit (ts);
CREATE TABLE IF NOT EXISTS usage_ledger (
    key_id       TEXT NOT NULL,
    period_start INTEGER NOT NULL,
    tokens       INTEGER NOT NULL,
    PRIMARY KEY (key_id, period_start)
);
""",
    )


def _v2_audit_client(db: sqlite3.Connection) -> None:
    """Who sent each request: the peer's address, host:port (NULL: rows written before,
    and requests on the admin socket, which has no address)."""
    add_column(db, "audit", "client", "TEXT")


def _v3_audit_folded(db: sqlite3.Connection) -> None:
    """A summary row of a refusal flood: how many refusals it stands for (NULL: one row,
    one request; appliance/access/refusals.py)."""
    add_column(db, "audit", "folded", "INTEGER")


def _v4_audit_proxy(db: sqlite3.Connection) -> None:
    """The trusted reverse proxy a request came through, its host:port, when client is
    the address that proxy named ([server] trusted_proxies; NULL: the client connected
    itself, or rows written before)."""
    add_column(db, "audit", "proxy", "TEXT")


# Append only: step N takes the schema from version N-1 to N.
MIGRATIONS = Registry("state database", (_v1_tables, _v2_audit_client, _v3_audit_folded, _v4_audit_proxy))


def connect(path: Path | str) -> sqlite3.Connection:
    """A connection to the state database (autocommit: see audit.transaction), migrated."""
    if str(path) != ":memory:":
        _create_closed(Path(path))
    return _connect(path, MIGRATIONS)


def _create_closed(path: Path) -> None:
    """Audit rows (prompts, with audit.include_text) and key hashes are not for other users,
    even in a state directory open to them (one an operator made 0755): the file is made
    0640 before SQLite would make it 0644, and its -wal and -shm files take its mode. An
    existing file is left as it is."""
    path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640))
    except FileExistsError:
        pass


def path_in(state_dir: str | Path) -> Path:
    return Path(state_dir) / "appliance.db"
