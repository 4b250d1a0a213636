"""Schema versions and forward-only migrations: a state database and a store manifest
written by appliance 0.1.0 (tests/data/db-0.1.0, committed as that version wrote them)
open in this version and every later one with every key, pin, usage row, audit row and
store record intact; migrations run once, in one transaction; a database from a newer
appliance, or a damaged one, is refused in one line naming it and is left byte-identical."""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest

from appliance.access.audit import AuditLog
from appliance.access.keys import Gate, KeyStore
from appliance.config import AuditConfig
from appliance.state import db as statedb
from appliance.state.decisions import StateStore
from appliance.state.migrations import Registry, SchemaError, connect, schema_version
from appliance.store.manifest import MIGRATIONS as STORE_MIGRATIONS
from appliance.store.store import Store, StoreError

from .conftest import PY, ROOT, fake_model

FIXTURE = ROOT / "tests" / "data" / "db-0.1.0"
CONTENTS = json.loads((FIXTURE / "contents.json").read_text())


@pytest.fixture
def old_dbs(tmp_path) -> tuple[Path, Path]:
    """Copies of the 0.1.0 state database and store manifest, where a config puts them."""
    (tmp_path / "state").mkdir()
    (tmp_path / "cache").mkdir()
    shutil.copy(FIXTURE / "appliance.db", tmp_path / "state" / "appliance.db")
    shutil.copy(FIXTURE / "store.db", tmp_path / "cache" / "store.db")
    return tmp_path / "state" / "appliance.db", tmp_path / "cache" / "store.db"


def _rows(path: Path, table: str, columns: list[str]) -> list[list]:
    db = sqlite3.connect(path)
    try:
        return [list(r) for r in db.execute(f"SELECT {', '.join(columns)} FROM {table} ORDER BY rowid")]
    finally:
        db.close()


def _assert_0_1_0_rows_intact(path: Path, name: str) -> None:
    for table, expected in CONTENTS["tables"][name].items():
        assert _rows(path, table, expected["columns"]) == expected["rows"], table


def test_a_0_1_0_state_database_opens_with_every_key_pin_usage_and_audit_row(old_dbs):
    state_db, _ = old_dbs
    assert schema_version(state_db) == 0
    state = StateStore(state_db)
    keys = KeyStore(state_db)
    audit = AuditLog(state_db, AuditConfig())
    assert schema_version(state_db) == statedb.MIGRATIONS.latest
    _assert_0_1_0_rows_intact(state_db, "appliance.db")

    # Read through today's code: the pins and counts, the keys (the revoked one stays revoked).
    controls = state.all()
    assert (controls["smollm2-135m-instruct"].override, controls["smollm2-135m-instruct"].pinned) == (2, True)
    assert controls["chat-large"].pinned and controls["chat-large"].override is None
    by_name = {k.name: k for k in keys.all()}
    assert set(by_name) == {"billing-app", "ci", "retired"}
    billing = by_name["billing-app"]
    assert (billing.routes, billing.tag, billing.rpm, billing.budget_tokens, billing.budget_period) == (
        ["chat"], "prod", 120, 50000, "month")
    assert by_name["retired"].revoked_at is not None
    gate = Gate(keys, required=True, charge=lambda *a: None, clock=lambda: 1764460800.0 + 60)
    tokens = CONTENTS["tokens"]
    assert gate.authenticate(f"Bearer {tokens['ci']}".encode()).name == "ci"
    assert gate.used[by_name["ci"].id] == (1764460800, 21)  # the ledger row, this hour's
    with pytest.raises(Exception, match="Invalid or revoked"):
        gate.authenticate(f"Bearer {tokens['retired']}".encode())
    for closing in (state, keys):
        closing.close()
    audit.db.close()


def test_a_0_1_0_store_manifest_opens_with_every_record(old_dbs):
    _, store_db = old_dbs
    store = Store(store_db.parent, allowed_licenses=["MIT"])
    records = {r.name: r for r in store.models()}
    assert schema_version(store_db) == STORE_MIGRATIONS.latest
    _assert_0_1_0_rows_intact(store_db, "store.db")
    assert set(records) == {"smollm2", "acme/llama-restricted", "broken"}
    assert records["smollm2"].pinned and records["smollm2"].license == "Apache-2.0"
    assert records["acme/llama-restricted"].license_accepted_by == "ops@example"
    assert store.license_ok(records["acme/llama-restricted"])
    assert records["broken"].state == "quarantined" and "expected 11" in records["broken"].state_reason
    assert [f["path"] for f in records["smollm2"].files] == ["m.gguf"]
    store.close()


def test_a_fresh_database_and_a_migrated_one_have_the_same_tables(tmp_path, old_dbs):
    state_db, store_db = old_dbs
    for old, registry in ((state_db, statedb.MIGRATIONS), (store_db, STORE_MIGRATIONS)):
        connect(old, registry).close()
        connect(tmp_path / f"fresh-{old.name}", registry).close()

        def tables(path):
            db = sqlite3.connect(path)
            out = {t: [r[1:3] for r in db.execute(f"PRAGMA table_info({t})")]
                   for (t,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            db.close()
            return out

        assert tables(old) == tables(tmp_path / f"fresh-{old.name}")


def test_migrations_run_once_and_all_or_nothing(tmp_path):
    ran: list[str] = []

    def v1(db):
        ran.append("v1")
        db.execute("CREATE TABLE t (a TEXT)")

    def v2(db):
        ran.append("v2")
        db.execute("ALTER TABLE t ADD COLUMN b TEXT")

    def v3_fails(db):
        db.execute("CREATE TABLE half_done (x)")
        raise RuntimeError("disk trouble")

    path = tmp_path / "x.db"
    connect(path, Registry("test database", (v1,))).close()
    assert schema_version(path) == 1 and ran == ["v1"]
    connect(path, Registry("test database", (v1, v2))).close()
    connect(path, Registry("test database", (v1, v2))).close()
    assert schema_version(path) == 2 and ran == ["v1", "v2"]  # each step once
    with pytest.raises(RuntimeError, match="disk trouble"):
        connect(path, Registry("test database", (v1, v2, v3_fails)))
    db = sqlite3.connect(path)
    assert db.execute("SELECT name FROM sqlite_master WHERE name = 'half_done'").fetchone() is None
    assert db.execute("PRAGMA user_version").fetchone()[0] == 2
    db.close()


def _newer(path: Path, registry: Registry) -> str:
    """Make path a database a later appliance wrote (WAL mode, a higher schema version);
    its bytes' sha256."""
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA user_version = {registry.latest + 1}")
    db.execute("CREATE TABLE IF NOT EXISTS from_the_future (x)")
    db.commit()
    db.close()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_newer_database_is_refused_and_left_byte_identical(old_dbs):
    state_db, store_db = old_dbs
    digests = {state_db: _newer(state_db, statedb.MIGRATIONS), store_db: _newer(store_db, STORE_MIGRATIONS)}
    for opener in (StateStore, KeyStore, lambda p: AuditLog(p, AuditConfig()), statedb.connect):
        with pytest.raises(SchemaError) as refused:
            opener(state_db)
        message = str(refused.value)
        assert str(state_db) in message and "newer appliance" in message and "install.sh --rollback" in message
    with pytest.raises(StoreError, match=f"{store_db}: store manifest schema version {STORE_MIGRATIONS.latest + 1} was written by a newer"):
        Store(store_db.parent).models()
    for path, digest in digests.items():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
        assert not list(path.parent.glob(path.name + "-*"))  # no -wal or -shm left beside it


def _serve(tmp_path: Path, models: str) -> subprocess.CompletedProcess:
    cfg = tmp_path / "appliance.toml"
    cfg.write_text(f'[server]\nport = 1\n[paths]\nstate_dir = "{tmp_path}/state"\ncache_dir = "{tmp_path}/cache"\n'
                   f'log_dir = "{tmp_path}/log"\n{models}')
    return subprocess.run([PY, "-m", "appliance.cli", "serve", "--config", str(cfg)], capture_output=True,
                          text=True, cwd=ROOT, timeout=60)


def test_the_daemon_refuses_a_newer_database_in_one_line_and_changes_nothing(old_dbs, tmp_path):
    state_db, _ = old_dbs
    digest = _newer(state_db, statedb.MIGRATIONS)
    result = _serve(tmp_path, fake_model("m"))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"Error: {state_db}: state database schema version {statedb.MIGRATIONS.latest + 1} was written by a "
        f"newer appliance (this one knows up to {statedb.MIGRATIONS.latest}); it was left unchanged: run the "
        "newer appliance again, or `install.sh --rollback` restores the copy taken before the upgrade")
    assert hashlib.sha256(state_db.read_bytes()).hexdigest() == digest


@pytest.mark.parametrize("damage", [b"this is not a database at all" * 10, b"SQLite format 3\0" + b"\xff" * 4080])
def test_a_damaged_database_stops_the_start_in_one_line_naming_it_and_the_fix(old_dbs, tmp_path, damage):
    state_db, _ = old_dbs
    state_db.write_bytes(damage)
    result = _serve(tmp_path, fake_model("m"))
    assert result.returncode == 1
    [line] = [x for x in result.stderr.splitlines() if x.strip()]
    assert line.startswith(f"Error: {state_db}: not a usable SQLite database (") and "restore it from a backup" in line
    assert state_db.read_bytes() == damage


def test_appliance_check_reads_and_writes_nothing(old_dbs, tmp_path):
    state_db, store_db = old_dbs
    before = {p: p.read_bytes() for p in (state_db, store_db)}
    cfg = tmp_path / "check.toml"
    cfg.write_text(f'[paths]\nstate_dir = "{tmp_path}/state"\ncache_dir = "{tmp_path}/cache"\n' + fake_model("m"))
    result = subprocess.run([PY, "-m", "appliance.cli", "check", "--config", str(cfg)], capture_output=True,
                            text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"ok: {cfg}")
    assert {p: p.read_bytes() for p in before} == before
    assert sorted(p.name for p in state_db.parent.iterdir()) == ["appliance.db"]


def test_audit_export_reads_a_database_an_older_appliance_wrote_before_any_daemon_migrated_it(old_dbs, tmp_path):
    """After an upgrade and before the new daemon's first start (the one that migrates), an
    export reads the old file as it is: every row, the columns that version did not have
    empty, and the file left byte-identical (the export never writes the database)."""
    state_db, _ = old_dbs
    before = state_db.read_bytes()
    cfg = tmp_path / "export.toml"
    cfg.write_text(f'[paths]\nstate_dir = "{tmp_path}/state"\ncache_dir = "{tmp_path}/cache"\n')
    result = subprocess.run([PY, "-m", "appliance.cli", "audit", "export", "--config", str(cfg)],
                            capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    expected = CONTENTS["tables"]["appliance.db"]["audit"]
    assert [[row[c] for c in expected["columns"] if c != "ts"] for row in rows] == [
        [v for c, v in zip(expected["columns"], values, strict=True) if c != "ts"] for values in expected["rows"]]
    assert all(row["client"] is None and row["proxy"] is None for row in rows)
    assert result.stderr.strip().splitlines()[-1].startswith("exported 4 rows")
    assert state_db.read_bytes() == before
