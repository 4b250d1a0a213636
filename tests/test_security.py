"""Security defaults: loopback bind, the admin API over TCP only with the admin
token, and no secret or request body in logs, errors or /metrics."""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import tempfile
from pathlib import Path

import httpx
import pytest

from appliance.config import parse_config

from .conftest import fake_model


def test_the_daemon_binds_loopback_unless_configured_otherwise():
    assert parse_config("").server.host == "127.0.0.1"


def _non_loopback_address() -> str | None:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing address
            address = s.getsockname()[0]
    except OSError:
        return None
    return None if address.startswith("127.") else address


NON_LOOPBACK = _non_loopback_address()
ADMIN_PATHS = ["/admin/status", "/openapi.json"]


@pytest.mark.skipif(NON_LOOPBACK is None, reason="no non-loopback IPv4 address on this machine")
def test_a_non_loopback_bind_never_serves_admin_over_tcp_without_a_token(daemons):
    # A non-loopback bind needs API keys (issue 6): required, none created yet.
    d = daemons.start(fake_model("fake"), server='host = "0.0.0.0"', extra="[keys]\nrequired = true\n")
    outside = f"http://{NON_LOOPBACK}:{d.port}"
    for base in (outside, d.url):  # loopback too: a local user is no operator
        for path in ADMIN_PATHS:
            resp = httpx.get(base + path, timeout=10)
            assert resp.status_code == 403 and resp.json()["error"]["code"] == "forbidden"
            assert "admin_token_file" in resp.json()["error"]["message"]
        assert httpx.post(base + "/admin/models/fake/unload", json={}, timeout=10).status_code == 403
    assert httpx.get(outside + "/v1/models", timeout=10).status_code == 401  # keys are required
    # The operator's way in without a token: the admin socket.
    assert [r["state"] for r in d.replicas("fake")] == ["READY"]


@pytest.mark.skipif(NON_LOOPBACK is None, reason="no non-loopback IPv4 address on this machine")
def test_with_an_admin_token_the_admin_api_needs_it_from_everywhere(daemons, tmp_path):
    token = secrets.token_urlsafe(24)
    (tmp_path / "admin.token").write_text(token + "\n")
    d = daemons.start(fake_model("fake"),
                      server=f'host = "0.0.0.0"\nadmin_token_file = "{tmp_path}/admin.token"',
                      extra="[keys]\nrequired = true\n", wait=False)
    d.wait_ready(status=False)  # /admin/status needs the token here
    for base in (f"http://{NON_LOOPBACK}:{d.port}", d.url):
        for path in ADMIN_PATHS:
            for sent in (None, "wrong", token[:-1], token + "x"):
                headers = {"Authorization": f"Bearer {sent}"} if sent else {}
                resp = httpx.get(base + path, headers=headers, timeout=10)
                assert resp.status_code == 401, (base, path, sent)
                assert resp.json()["error"]["code"] == "invalid_admin_token"
            ok = httpx.get(base + path, headers={"Authorization": f"Bearer {token}"}, timeout=10)
            assert ok.status_code == 200


def test_secrets_and_request_bodies_never_reach_logs_errors_or_metrics(daemons, tmp_path):
    token = "admintoken-" + secrets.token_hex(16)
    body_canary = "bodycanary-" + secrets.token_hex(8)
    (tmp_path / "admin.token").write_text(token)
    d = daemons.start(fake_model("fake") + fake_model("broken", "--fail-status", "500"),
                      server=f'admin_token_file = "{tmp_path}/admin.token"\nlog_level = "debug"', wait=False)
    d.wait_ready(status=False)  # /admin/status needs the token here
    auth = {"Authorization": f"Bearer {token}"}
    seen: list[str] = []
    with d.client() as c:
        chat = {"model": "fake", "messages": [{"role": "user", "content": body_canary}]}
        seen.append(c.post("/v1/chat/completions", json=chat, headers=auth).text)
        seen.append(c.post("/v1/chat/completions", json={**chat, "model": "broken"}, headers=auth).text)
        seen.append(c.post("/v1/chat/completions", json={**chat, "max_tokens": -1}).text)
        seen.append(c.post("/v1/chat/completions", content=b'{"model": "' + body_canary.encode() + b'"',
                           headers=auth).text)
        seen.append(c.get("/admin/status", headers={"Authorization": f"Bearer {token}x"}).text)
        seen.append(c.get("/admin/status", headers=auth).text)
        seen.append(c.get("/metrics").text)
    d.terminate()
    logs = d.log_text() + "".join(p.read_text(errors="replace") for p in (tmp_path / "log").rglob("*.log"))
    for where, text in [("answers", "\n".join(seen)), ("logs", logs)]:
        assert token not in text, f"the admin token leaked into {where}"
    assert body_canary not in logs, "a request body reached the logs"
    assert body_canary not in seen[-1], "a request body reached /metrics"


def test_the_state_and_log_dirs_the_daemon_makes_are_closed_to_other_users(tmp_path):
    import os

    from appliance.config import check_writable_dirs
    from appliance.state.db import connect
    from appliance.state.lock import hold_state_dir

    old = os.umask(0o022)  # a user's shell: new directories world-readable by default
    try:
        cfg = parse_config(f'[paths]\nstate_dir = "{tmp_path}/state"\ncache_dir = "{tmp_path}/cache"\n'
                           f'log_dir = "{tmp_path}/log"\n')
        check_writable_dirs(cfg)
        hold_state_dir(tmp_path / "locked").close()  # `appliance serve` takes its lock first
        connect(tmp_path / "keys-first" / "appliance.db").close()  # `appliance keys create`
    finally:
        os.umask(old)
    for made in ("state", "log", "locked", "keys-first"):
        assert (tmp_path / made).stat().st_mode & 0o007 == 0, made


def test_the_state_database_is_closed_to_other_users_in_a_state_dir_open_to_them(tmp_path):
    """An operator's `mkdir /var/lib/appliance` (0755) is kept; the database in it, its audit
    rows and key hashes, and its -wal and -shm files were made 0644 for every user to read."""
    import os

    from appliance.access.keys import KeyStore

    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    old = os.umask(0o022)
    try:
        keys = KeyStore(state / "appliance.db")  # `appliance keys create`, or the daemon's start
        keys.create(name="app")
        made = sorted(p.name for p in state.iterdir())
        modes = {p.name: p.stat().st_mode & 0o777 for p in state.iterdir()}
        keys.close()
    finally:
        os.umask(old)
    assert made == ["appliance.db", "appliance.db-shm", "appliance.db-wal"]
    assert all(mode & 0o007 == 0 for mode in modes.values()), modes


def _dead_pid() -> int:
    import subprocess

    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_engine_directories_of_a_killed_daemon_are_removed_and_nothing_else(tmp_path):
    # Regression: a daemon killed with SIGKILL (no atexit) left /tmp/appliance-engines-*
    # with its engines' secrets, and each start made another.
    import os
    import subprocess

    from appliance.fleet.engine_access import remove_abandoned_roots

    dead, outside = _dead_pid(), tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("x")
    left = tmp_path / f"appliance-engines-{dead}-abc123"
    (left / "r0").mkdir(parents=True)
    (left / "r0" / "api-key").write_text("secret\n")
    (left / "r0" / "link").symlink_to(outside)  # a link inside is removed, not followed
    alive = subprocess.Popen(["sleep", "30"])
    try:
        running = tmp_path / f"appliance-engines-{alive.pid}-def456"
        running.mkdir()
        linked = tmp_path / f"appliance-engines-{dead}-lnk"
        linked.symlink_to(outside)  # a local user's link, named as ours
        plain = tmp_path / f"appliance-engines-{dead}-file"
        plain.write_text("x")
        legacy, other = tmp_path / "appliance-engines-k2j3h4", tmp_path / f"other-{dead}-abc"
        legacy.mkdir()
        other.mkdir()
        theirs = tmp_path / f"appliance-engines-{dead}-theirs"
        theirs.mkdir()
        kept = [running, linked, plain, legacy, other]
        if os.getuid() == 0:
            os.chown(theirs, 65534, 65534)  # another user's directory, named as ours
            kept.append(theirs)
        removed = remove_abandoned_roots(tmp_path)
        assert left in removed and not set(kept) & set(removed)
        assert not left.exists() and (outside / "keep").exists()
        assert all(p.exists() or p.is_symlink() for p in kept)
    finally:
        alive.kill()
        alive.wait()


def test_a_restarted_daemon_removes_the_engine_directory_its_killed_predecessor_left(daemons):
    import shutil
    import signal

    from .conftest import wait_until

    tmp = Path(tempfile.mkdtemp(prefix="ae", dir="/tmp"))  # short: the engines' sockets are under it
    try:
        first = daemons.start(fake_model("fake"), env={"TMPDIR": str(tmp)})
        [left] = list(tmp.glob("appliance-engines-*"))
        first.terminate(signal.SIGKILL)
        for pid in first.engine_pids:  # its orphaned engine (not what is under test here)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        second = daemons.start(fake_model("fake"), env={"TMPDIR": str(tmp)})
        wait_until(lambda: not left.exists(), 10, what="the killed daemon's engine directory to go")
        assert [p.name.split("-")[2] for p in tmp.glob("appliance-engines-*")] == [str(second.proc.pid)]
        second.terminate()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
