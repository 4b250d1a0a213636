"""Who sent a request: every audit row names the client's address (host:port, as the
connection's peer), the refusals of a credential above all, through one process and
through the workers alike, and `appliance audit export` shows it."""

from __future__ import annotations

import json
import socket
import subprocess

import pytest

from .conftest import PY, ROOT, fake_model, wait_until
from .test_keys import keys_cli

CHAT = json.dumps({"model": "fake", "messages": [{"role": "user", "content": "hi"}]})


def _sent_from(port: int, head: str, body: str = "") -> tuple[int, str]:
    """One request on a connection of its own: its answer's status and the address it came from."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        host, local = sock.getsockname()[:2]
        length = f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n" if body else ""
        sock.sendall(f"{head}\r\nHost: 127.0.0.1\r\nConnection: close\r\n{length}\r\n{body}".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1]), f"{host}:{local}"


def _exported(daemon) -> dict[str, dict]:
    out = subprocess.run([PY, "-m", "appliance.cli", "audit", "export", "--config", str(daemon.config)],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    return {row["client"]: row for row in map(json.loads, out.stdout.splitlines()) if row["client"]}


@pytest.mark.parametrize("workers", [1, 2])
def test_every_audit_row_names_the_clients_address_refusals_included(daemons, workers):
    # A security reviewer asked who tried a key: the rows said what, when and which
    # endpoint, never from where.
    daemon = daemons.start(fake_model("fake"), extra="[keys]\nrequired = true\n", server=f"workers = {workers}")
    token = keys_cli(daemon, "create", "--name", "client")
    sent = {
        "no key": _sent_from(daemon.port, "POST /v1/chat/completions HTTP/1.1", CHAT),
        "wrong key": _sent_from(daemon.port, "POST /v1/chat/completions HTTP/1.1\r\nAuthorization: Bearer ak-0-no", CHAT),
        "wrong key, models": _sent_from(daemon.port, "GET /v1/models HTTP/1.1\r\nAuthorization: Bearer ak-0-no"),
        "keyed": _sent_from(daemon.port, f"POST /v1/chat/completions HTTP/1.1\r\nAuthorization: Bearer {token}", CHAT),
    }
    assert [status for status, _ in sent.values()] == [401, 401, 401, 200]
    rows = wait_until(lambda: r if len(r := _exported(daemon)) == len(sent) else None, 15, what="the rows")
    assert {what: (rows[client]["status"], rows[client]["endpoint"]) for what, (_, client) in sent.items()} == {
        "no key": (401, "chat"),
        "wrong key": (401, "chat"),
        "wrong key, models": (401, "models"),
        "keyed": (200, "chat"),
    }


@pytest.mark.parametrize("workers", [1, 2])
def test_a_flood_of_wrong_keys_leaves_its_first_rows_and_one_summary_counting_the_rest(daemons, workers):
    # Every refusal was a row: a local flood of wrong keys filled the disk up to retention.
    daemon = daemons.start(fake_model("fake"), extra="[keys]\nrequired = true\n[audit]\nrefusal_rows_per_minute = 2\n",
                           server=f"workers = {workers}")
    sent = [_sent_from(daemon.port, "POST /v1/chat/completions HTTP/1.1\r\nAuthorization: Bearer ak-0-no", CHAT)
            for _ in range(7)]
    assert [status for status, _ in sent] == [401] * 7
    assert daemon.terminate() == 0  # the log's close writes the summary of the minute so far
    rows = _exported(daemon)
    assert [(rows[client]["status"], rows[client]["folded"]) for _, client in sent if client in rows] == [
        (401, None), (401, None), (401, 5)  # the first two, then the third standing for five
    ]
    assert list(rows) == [client for _, client in sent[:3]]
