"""An attacker's tries at the audit log through the real daemon: what one request may
make it keep."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import httpx

from .conftest import fake_model, wait_until


def _models_audited(d) -> list[str]:
    db = Path(d.config.read_text().split('state_dir = "', 1)[1].split('"', 1)[0]) / "appliance.db"
    with sqlite3.connect(db) as conn:
        return [r[0] for r in conn.execute("SELECT model FROM audit ORDER BY id")]


def test_a_model_name_of_megabytes_costs_the_audit_log_a_bounded_row(daemons):
    # Regression: the audit row kept the model name as sent, up to the body limit (4 MiB):
    # any client (a key holder, any local user of a keyless box) could grow the state
    # database by megabytes a request with 404s that cost the daemon nothing else.
    d = daemons.start(fake_model("fake"))
    name = "m" * 1_000_000
    resp = httpx.post(d.url + "/v1/chat/completions", timeout=30,
                      json={"model": name, "messages": [{"role": "user", "content": "x"}]})
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "model_not_found"
    [audited] = wait_until(lambda: _models_audited(d), 15, what="the audit row")
    assert len(audited) < 1000, len(audited)
    assert audited.startswith("m" * 100) and "1000000" in audited  # what it was, and how long
    # A name of a served model's length is kept whole.
    assert httpx.post(d.url + "/v1/chat/completions", timeout=30,
                      json={"model": "fake", "messages": [{"role": "user", "content": "x"}]}).status_code == 200
    wait_until(lambda: _models_audited(d)[-1:] == ["fake"], 15, what="the second row")
