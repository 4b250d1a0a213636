"""A key revoked (or its budget lowered below what it used) while its requests are in
flight: a stream of it ends at its next piece with its API's error event, charged and
audited for what it generated; another key's stream goes on (access/keys.py Standing,
gateway/relay.py _pump)."""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path

import httpx
import pytest

from appliance.access.keys import Gate, KeyStore, ended_error

from .conftest import DaemonFactory, fake_model, wait_until
from .test_keys import keys_cli

LONG = {"model": "long", "messages": [{"role": "user", "content": "hi"}], "stream": True}


@pytest.fixture(scope="module", params=["", "workers = 2"], ids=["alone", "workers=2"])
def long_streams(tmp_path_factory, request):
    factory = DaemonFactory(tmp_path_factory.mktemp("revoke"))
    # 400 pieces, 50 ms apart: a 20 s stream, long enough to revoke its key in the middle.
    daemon = factory.start(fake_model("long", "--chunks", "400", "--chunk-delay", "0.05"), server=request.param,
                           extra="[keys]\nrequired = true\n\n[audit]\nflush_interval_s = 0.2\n")
    yield daemon
    factory.cleanup()


def _audit_row(daemon, key_id: str):
    db = Path(daemon.config.read_text().split('state_dir = "')[1].split('"')[0]) / "appliance.db"

    def row():
        with sqlite3.connect(db) as conn:
            return conn.execute("SELECT status, completion_tokens FROM audit WHERE key_id = ?", (key_id,)).fetchone()

    return wait_until(row, 10, what="the stream's audit row")


class _Stream(threading.Thread):
    """One stream read to its end in the background: its events, and when it had some."""

    def __init__(self, daemon, token: str) -> None:
        super().__init__(daemon=True)
        self.url, self.token = daemon.url, token
        self.events: list[str] = []
        self.started = threading.Event()

    def run(self) -> None:
        headers = {"Authorization": f"Bearer {self.token}"}
        with httpx.stream("POST", f"{self.url}/v1/chat/completions", json=LONG, headers=headers, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    self.events.append(line[6:])
                    if len(self.events) >= 3:
                        self.started.set()
        self.started.set()


def test_a_revoked_keys_stream_ends_with_the_error_event_and_is_charged_for_what_it_got(long_streams):
    revoked = keys_cli(long_streams, "create", "--name", "leaving")
    other = keys_cli(long_streams, "create", "--name", "staying")
    cut, kept = _Stream(long_streams, revoked), _Stream(long_streams, other)
    cut.start()
    kept.start()
    assert cut.started.wait(20) and kept.started.wait(20)
    key_id = revoked.split("-")[1]
    keys_cli(long_streams, "revoke", key_id)
    cut.join(30)
    assert not cut.is_alive(), "the revoked key's stream went on"
    last = json.loads(cut.events[-1])
    assert last["error"]["code"] == "invalid_api_key" and "revoked" in last["error"]["message"]
    assert "[DONE]" not in cut.events and len(cut.events) < 400
    status, completion = _audit_row(long_streams, key_id)
    assert status == 401 and completion > 0
    # Another key's stream is untouched: it runs to its end.
    kept.join(60)
    assert kept.events[-1] == "[DONE]" and not any('"error"' in e for e in kept.events)


def _gate(tmp_path, budget: int = 0):
    store = KeyStore(tmp_path / "keys.db")
    key, _ = store.create("k", budget_tokens=budget)
    gate = Gate(store, required=True, charge=lambda *a: None, clock=lambda: 1_700_000_000.0)
    return store, gate, gate.keys[key.id]


def test_a_keys_standing_is_kept_across_refreshes_and_ended_by_its_revocation(tmp_path):
    """A request holds the ApiKey it was admitted with; the gate makes new ones every
    second (refresh): the revocation must reach the one a request in flight holds."""
    store, gate, admitted = _gate(tmp_path)
    gate.refresh()
    gate.refresh()
    assert admitted.standing.ended is None and gate.keys[admitted.id].standing is admitted.standing
    store.revoke(admitted.id)
    gate.refresh()
    assert admitted.standing.ended == "revoked"
    assert ended_error(admitted.standing).status == 401


def test_a_keys_budget_lowered_below_what_it_used_ends_its_requests_in_flight(tmp_path):
    store, gate, admitted = _gate(tmp_path, budget=1000)
    gate.settle(admitted, gate.admit(admitted, None, prompt=100, cap=100), 100, 100)
    store.set_limits(admitted.id, budget_tokens=500)  # above the 200 used: goes on
    gate.refresh()
    assert admitted.standing.ended is None
    store.set_limits(admitted.id, budget_tokens=150)
    gate.refresh()
    assert admitted.standing.ended == "budget" and ended_error(admitted.standing).status == 429


def test_a_budget_raised_again_after_it_ended_the_keys_streams_lets_its_new_requests_run(tmp_path):
    """The ended standing stays with the requests it cut, never with the key: a raised
    budget (or a new period, or no budget) must not cut every later stream of the key."""
    store, gate, admitted = _gate(tmp_path, budget=1000)
    gate.settle(admitted, gate.admit(admitted, None, prompt=100, cap=100), 100, 100)
    store.set_limits(admitted.id, budget_tokens=150)
    gate.refresh()
    assert admitted.standing.ended == "budget"
    store.set_limits(admitted.id, budget_tokens=100_000)
    gate.refresh()
    again = gate.keys[admitted.id]
    assert again.standing.ended is None and admitted.standing.ended == "budget"
    gate.refresh()  # and the next refresh keeps the new standing, not the ended one
    assert gate.keys[admitted.id].standing is again.standing and again.standing.ended is None
