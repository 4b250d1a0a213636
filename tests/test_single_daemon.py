"""One daemon per state directory: a second `appliance serve` on the same state dir exits
at once, non-zero, naming the first one's pid, having started nothing and written nothing;
a daemon killed with SIGKILL leaves no lock behind."""

from __future__ import annotations

import signal
import sqlite3

from .conftest import fake_model


def test_a_second_daemon_on_one_state_dir_exits_naming_the_first_and_a_crash_frees_it(daemons, tmp_path):
    first = daemons.start(fake_model("fake"))
    db = tmp_path / "state" / "appliance.db"
    with sqlite3.connect(db) as conn:
        tables_before = conn.execute("SELECT name FROM sqlite_master ORDER BY name").fetchall()

    second = daemons.start(fake_model("fake"), wait=False)  # same state_dir, another port
    code = second.proc.wait(timeout=60)
    assert code != 0
    lines = second.log_text().strip().splitlines()
    assert len(lines) == 1, lines
    assert f"pid {first.proc.pid}" in lines[0] and str(tmp_path / "state") in lines[0], lines[0]
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT name FROM sqlite_master ORDER BY name").fetchall() == tables_before
    with first.client() as c:  # the first one is untouched
        resp = c.post("/v1/completions", json={"model": "fake", "prompt": "hi", "max_tokens": 2})
    assert resp.status_code == 200

    first.terminate(signal.SIGKILL)
    again = daemons.start(fake_model("fake"))  # the kernel dropped the lock with its holder
    with again.client() as c:
        resp = c.post("/v1/completions", json={"model": "fake", "prompt": "hi", "max_tokens": 2})
    assert resp.status_code == 200
    assert (tmp_path / "state" / "daemon.lock").read_text().strip() == str(again.proc.pid)
