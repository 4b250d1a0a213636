"""An attacker's tries at the key check without a key: what a request with a made-up key
costs the daemon. A real state database, a second connection writing to it as the
daemon's audit writer and the CLI do."""

from __future__ import annotations

import sqlite3

import pytest

from appliance.access.keys import Gate, KeyStore
from appliance.errors import Unauthorized


def test_a_made_up_key_id_reloads_no_keys_however_busy_the_database(tmp_path):
    # Regression: a key id the daemon did not know reloaded every key (and every budgeted
    # key's usage) whenever another connection had committed since: with the audit writer
    # committing under load, each request with a made-up "ak-<id>-..." cost a full reload
    # (33 ms with 1,000 keys), a flood of them the event loop.
    store = KeyStore(tmp_path / "appliance.db")
    for i in range(3):
        store.create(f"k{i}", budget_tokens=100)
    gate = Gate(store, required=True, charge=lambda *a: None)
    reloads = []
    real_all = store.all
    store.all = lambda: reloads.append(1) or real_all()  # type: ignore[method-assign]
    writer = sqlite3.connect(tmp_path / "appliance.db")  # the audit writer's, the CLI's connection
    writer.execute("CREATE TABLE busy (n INTEGER)")
    for n in range(20):
        writer.execute("INSERT INTO busy VALUES (?)", (n,))
        writer.commit()
        with pytest.raises(Unauthorized):
            gate.authenticate(f"Bearer ak-{n:012x}-guessed".encode())
    assert reloads == []
    # A key the CLI created a moment ago is still known at once.
    key, token = KeyStore(tmp_path / "appliance.db").create("new")
    assert gate.authenticate(f"Bearer {token}".encode()).id == key.id
    assert reloads == [1]
