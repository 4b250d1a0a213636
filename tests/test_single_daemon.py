"""One daemon per state directory: a second `appliance serve` on the same state dir exits
at once, non-zero, naming the first one's pid, having started nothing and written nothing;
a daemon killed with SIGKILL leaves no lock behind."""

from __future__ import annotations

import json
import signal
import socket
import sqlite3

import pytest

from appliance.daemon.port_claim import PortBusy, claim_port

from .conftest import DaemonFactory, fake_model


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


@pytest.mark.parametrize("workers", [1, 2])
def test_a_second_daemon_on_a_used_port_exits_naming_the_first_and_binds_nothing(tmp_path, workers):
    # Granian bound with SO_REUSEPORT, and with workers the daemon's sockets are a reuseport
    # group: without the claim a second daemon of the same user could listen too and the
    # kernel would spread clients over two daemons with different configs.
    first_home, second_home = tmp_path / "first", tmp_path / "second"
    first_home.mkdir(), second_home.mkdir()
    firsts, seconds = DaemonFactory(first_home), DaemonFactory(second_home)
    try:
        first = firsts.start(fake_model("first"), server=f"workers = {workers}")
        second = seconds.start(fake_model("second"), port=first.port, wait=False, server=f"workers = {workers}")
        assert second.proc.wait(timeout=60) != 0
        lines = second.log_text().strip().splitlines()
        assert len(lines) == 1, lines
        assert f"port {first.port}" in lines[0] and f"pid {first.proc.pid}" in lines[0], lines[0]
        assert str(first.config) in lines[0], lines[0]
        assert not (second_home / "state" / "appliance.db").exists()  # started nothing
        with first.client() as c:  # every connection reaches the first daemon
            for _ in range(20):
                models = c.get("/v1/models").json()["data"]
                assert [m["id"] for m in models] == ["first"]
    finally:
        seconds.cleanup()
        firsts.cleanup()


def test_a_port_held_by_another_program_is_one_line_naming_the_port(daemons):
    with socket.socket() as other:  # the worst case: a listener that allows port sharing
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        daemon = daemons.start(fake_model("fake"), port=port, wait=False)
        assert daemon.proc.wait(timeout=60) != 0
    lines = daemon.log_text().strip().splitlines()
    assert len(lines) == 1, lines
    assert f"port {port} on 127.0.0.1 is already in use by another program" in lines[0], lines[0]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _as_nobody(port: int) -> tuple[bytes, str]:
    """What another local user (nobody, in a forked child) is told on connecting to the
    claim of 127.0.0.1:port, and the error its own `claim_port` there raises."""
    import os

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            os.setgid(65534)
            os.setuid(65534)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.settimeout(5)
                conn.connect(f"\0appliance-port:127.0.0.1:{port}")
                line = conn.makefile("rb").readline(4096)
            try:
                claim_port("127.0.0.1", port, config="/other/appliance.toml", state_dir="/other/state")
                error = "claimed"
            except PortBusy as exc:
                error = str(exc)
            os.write(write_end, json.dumps({"line": line.decode(), "error": error}).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as heard:
        told = json.loads(heard.read())
    os.waitpid(pid, 0)
    return told["line"].encode(), told["error"]


def test_the_ports_claim_names_the_config_and_state_dir_only_to_its_own_user(tmp_path):
    """The claim's abstract socket answered any local user with the holder's pid, config
    path and state directory: where an appliance keeps its keys and audit log is not
    another user's to learn. Its own user (and root) still hear it all."""
    import os

    port = _free_port()
    config, state = str(tmp_path / "appliance.toml"), str(tmp_path / "state")
    claim = claim_port("127.0.0.1", port, config=config, state_dir=state)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:  # its own user
            conn.settimeout(5)
            conn.connect(f"\0appliance-port:127.0.0.1:{port}")
            mine = json.loads(conn.makefile("rb").readline(4096))
        assert mine == {"pid": os.getpid(), "config": config, "state_dir": state}
        with pytest.raises(PortBusy) as busy:  # a second daemon of the same user names them
            claim_port("127.0.0.1", port, config="/second.toml", state_dir="/second")
        assert f"pid {os.getpid()}, config {config}, state directory {state}" in str(busy.value)
        if os.geteuid() != 0:
            pytest.skip("another user's view needs root to fork one")
        line, error = _as_nobody(port)
        assert json.loads(line) == {"held": "an appliance daemon holds this port"}
        assert str(tmp_path) not in line.decode()
        assert f"port {port} on 127.0.0.1 is already in use by another appliance daemon" in error
        assert f"pid {os.getpid()}, run by uid 0" in error and str(tmp_path) not in error, error
    finally:
        claim.close()
