"""Faults under load, the short versions of bench/chaos.py: every request gets a
complete answer or a well-formed error, no engine process outlives its replica,
and the operator's state survives a daemon SIGKILL.

Each test runs the real daemon with fake-engine replicas and a steady load
(tests/chaos_load.py), breaks something on purpose, and judges every answer."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import httpx
import pytest

from .chaos_load import Load, chat
from .conftest import PY, ROOT, engine_client, fake_model, pid_alive, wait_until
from .make_tiny_gguf import opaque

FAST = ("[autoscaling]\ninterval_s = 0.2\nstabilization_s = 600\ncooldown_s = 0.5\n"
        "[queue]\ntimeout_s = 30\nkeepalive_s = 0\n")
BODIES = [chat("fake"), chat("fake", stream=True)]


def marked(tmp_path: Path) -> str:
    """Engines get this in their environment, so the test finds every one it caused."""
    return f'env = {{ CHAOS_RUN = "{tmp_path}" }}\n'


def engines_alive(tmp_path: Path) -> set[int]:
    needle = f"CHAOS_RUN={tmp_path}".encode()
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if needle in f.read().split(b"\0") and pid_alive(int(entry)):
                        found.add(int(entry))
            except OSError:
                continue
    return found


def replica_pids(d, model: str = "fake") -> set[int]:
    return {r["pid"] for r in d.replicas(model) if r["pid"]}


def no_orphans(d, tmp_path: Path, model: str = "fake") -> None:
    """Every engine process alive is a replica the daemon knows."""
    wait_until(lambda: engines_alive(tmp_path) <= replica_pids(d, model), 15,
               what="no engine process outside the daemon's replicas")


def two_replicas(tmp_path: Path, *flags: str) -> str:
    return fake_model("fake", "--chunks", "3", *flags,
                      extra=marked(tmp_path) + "[models.autoscaling]\nmin_replicas = 2\nmax_replicas = 2\n")


def ready_pids(d, n: int = 2) -> set[int]:
    def ready():
        rs = d.replicas("fake")
        return {r["pid"] for r in rs} if sum(r["state"] == "READY" for r in rs) == n else None
    return wait_until(ready, 20, what=f"{n} READY replicas")


def assert_nothing_lost(load: Load) -> None:
    tally = load.tally
    assert tally.sent > 0
    assert tally["lost"] == 0 and tally["refused"] == 0, tally.summary()


def test_a_replica_sigkilled_under_load_loses_no_request(daemons, tmp_path):
    d = daemons.start(two_replicas(tmp_path, "--latency", "0.05", "--latency-from", "2"), extra=FAST)
    victim, other = sorted(ready_pids(d))
    with Load(d.url, BODIES, rate=30) as load:
        load.wait_for(15)
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: len(ready_pids(d) - {victim, other}) == 1, 20, what="a new replica")
        load.wait_for(load.tally.sent + 15)
    assert_nothing_lost(load)
    assert load.tally["ok"] > 0
    no_orphans(d, tmp_path)


def test_a_hung_replica_is_noticed_by_health_checks_and_replaced(daemons, tmp_path):
    d = daemons.start(two_replicas(tmp_path), extra=FAST, supervisor="health_failures_before_restart = 2")
    victim = min(ready_pids(d))
    with Load(d.url, BODIES, rate=20) as load:
        load.wait_for(10)
        os.kill(victim, signal.SIGSTOP)  # a hang: the process lives, nothing answers
        try:
            replica = wait_until(lambda: next((r for r in d.replicas("fake") if r["restarts"]), None), 20,
                                 what="the hung replica restarted")
        finally:
            if pid_alive(victim):
                os.kill(victim, signal.SIGCONT)
        ready_pids(d)
        load.wait_for(load.tally.sent + 10)
    assert "unhealthy" in replica["last_error"]
    assert not pid_alive(victim)
    assert_nothing_lost(load)
    no_orphans(d, tmp_path)


def test_a_slow_replica_answers_slowly_or_times_out_in_the_envelope(daemons, tmp_path):
    d = daemons.start(two_replicas(tmp_path), extra=FAST + "[upstream]\nread_timeout_s = 1.5\n")
    slow, _ = sorted(ready_pids(d))
    replica = next(r for r in d.replicas("fake") if r["pid"] == slow)
    with engine_client(replica) as engine:
        engine.post("/fake/latency?seconds=0.5").raise_for_status()
    with Load(d.url, BODIES, rate=20, max_requests=40) as load:
        load.wait_for(40)
    assert_nothing_lost(load)
    assert load.tally["ok"] == 40  # slow is not broken: under read_timeout_s every answer arrives

    with engine_client(replica) as engine:
        engine.post("/fake/latency?seconds=5").raise_for_status()
    with Load(d.url, BODIES, rate=10, max_requests=20) as load:
        load.wait_for(20)
    assert_nothing_lost(load)
    timeouts = sum(n for k, n in load.tally.details.items() if "engine_timeout" in k)
    assert timeouts > 0, load.tally.summary()  # the slow one's answers: 504, or an SSE error event
    no_orphans(d, tmp_path)


def test_a_daemon_sigterm_under_load_answers_every_request_it_accepted(daemons, tmp_path):
    d = daemons.start(two_replicas(tmp_path, "--latency", "0.3", "--latency-from", "2"), extra=FAST)
    ready_pids(d)
    engines = engines_alive(tmp_path)
    with Load(d.url, BODIES, rate=20) as load:
        load.wait_for(10)
        assert d.terminate(signal.SIGTERM) == 0
        load.wait_for(load.tally.sent + 10)  # some of these are refused: nothing listens any more
    tally = load.tally
    assert tally["lost"] == 0, tally.summary()
    assert tally["refused"] > 0 and tally["ok"] > 0
    assert not any(pid_alive(p) for p in engines)
    assert engines_alive(tmp_path) == set()


def test_a_daemon_sigkill_takes_its_engines_along(daemons, tmp_path):
    d = daemons.start(two_replicas(tmp_path), extra=FAST)
    engines = ready_pids(d)
    d.terminate(signal.SIGKILL)
    wait_until(lambda: not any(pid_alive(p) for p in engines), 10, what="the engines to die with the daemon")
    assert engines_alive(tmp_path) == set()


def _cli(cfg: Path, *args: str) -> str:
    out = subprocess.run([PY, "-m", "appliance.cli", *args, "--config", str(cfg)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_state_survives_a_daemon_sigkill_and_restart_intact(daemons, tmp_path):
    # A model in the store, served from it; the operator's pin and count in appliance.db.
    weights = tmp_path / "tiny.gguf"
    weights.write_bytes(opaque(os.urandom(64 * 1024)))
    cfg, _ = daemons.write_config("")
    _cli(cfg, "models", "import", str(weights), "--name", "acme/tiny", "--license", "mit")
    stored = json.loads(_cli(cfg, "models", "ls", "--json", "--port", "1"))
    served = fake_model("fake", extra=marked(tmp_path) + 'source = "store:acme/tiny"\n'
                        "[models.autoscaling]\nmin_replicas = 1\nmax_replicas = 3\n")
    d = daemons.start(served, extra=FAST)
    admin = f"{d.url}/admin/models/fake"
    assert httpx.post(f"{admin}/scale", json={"replicas": 2}, timeout=10).json()["override"] == 2
    assert httpx.post(f"{admin}/pin", json={}, timeout=10).json()["pinned"] is True
    engines = ready_pids(d)
    with Load(d.url, BODIES, rate=20) as load:
        load.wait_for(10)
        d.terminate(signal.SIGKILL)  # mid-load, mid-write of nothing in particular
    wait_until(lambda: not any(pid_alive(p) for p in engines), 10, what="the engines to die with the daemon")

    again = daemons.start(served, extra=FAST, port=d.port)
    model = next(m for m in again.status()["models"] if m["name"] == "fake")
    assert model["pinned"] is True and model["override"] == 2
    ready_pids(again)
    assert json.loads(_cli(cfg, "models", "ls", "--json", "--port", "1")) == stored
    assert "ok" in _cli(cfg, "models", "verify", "acme/tiny").lower()
    with again.client() as c:
        assert c.post("/v1/chat/completions", json=chat("fake")).status_code == 200
    no_orphans(again, tmp_path)
def _can_mount_tmpfs() -> bool:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs root and mount namespaces (unshare -m)")
def test_a_full_state_disk_refuses_admin_writes_in_the_envelope_changes_nothing_and_serving_goes_on(daemons, tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    # The daemon runs in its own mount namespace with a 1 MiB tmpfs as its state dir;
    # this test reaches that tmpfs through /proc/<pid>/root.
    wrapper = tmp_path / "on_tmpfs.sh"
    wrapper.write_text(f'#!/bin/sh\nmount --make-rprivate / && mount -t tmpfs -o size=1m tmpfs "{state}" '
                       f'&& exec "$@"\n')
    wrapper.chmod(0o755)
    d = daemons.start(two_replicas(tmp_path), extra=FAST, wait=False, launcher=["unshare", "-m", str(wrapper)])
    d.wait_ready()
    seen = Path(f"/proc/{d.proc.pid}/root") / str(state).lstrip("/")
    assert (seen / "appliance.db").exists() and not (state / "appliance.db").exists()
    admin = f"{d.url}/admin/models/fake"
    assert httpx.post(f"{admin}/pin", json={}, timeout=10).status_code == 200

    with Load(d.url, BODIES, rate=20) as load:
        load.wait_for(5)
        with open(seen / "filler", "wb") as f:  # fill the disk to the last byte
            with pytest.raises(OSError):
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
        refused = httpx.post(f"{admin}/unpin", json={}, timeout=10)
        load.wait_for(load.tally.sent + 10)
    assert refused.status_code == 503, refused.text
    err = refused.json()["error"]
    assert err["code"] == "state_write_failed" and "full" in err["message"]
    assert "Retry-After" in refused.headers
    # The change was refused as a whole: the daemon did not unpin what it could not save.
    assert next(m for m in d.status()["models"] if m["name"] == "fake")["pinned"] is True
    assert_nothing_lost(load)
    assert load.tally["ok"] > 0
    (seen / "filler").unlink()
    assert httpx.post(f"{admin}/unpin", json={}, timeout=10).json()["pinned"] is False
    assert next(m for m in d.status()["models"] if m["name"] == "fake")["pinned"] is False


def test_keys_and_their_usage_survive_a_daemon_sigkill_and_restart(daemons, tmp_path):
    import sqlite3

    served = fake_model("fake", "--chunks", "3")
    extra = FAST + "\n[audit]\nflush_interval_s = 0.2\n"
    d = daemons.start(served, extra=extra)
    token = _cli(d.config, "keys", "create", "--name", "survivor", "--budget-tokens", "1000").splitlines()[0]
    headers = {"Authorization": f"Bearer {token}"}
    with d.client() as c:
        assert c.post("/v1/chat/completions", json=chat("fake"), headers=headers).status_code == 200
    db = Path(d.config.read_text().split('state_dir = "', 1)[1].split('"', 1)[0]) / "appliance.db"

    def used() -> int:
        with sqlite3.connect(db) as conn:
            row = conn.execute("SELECT sum(tokens) FROM usage_ledger").fetchone()
        return row[0] or 0

    before = wait_until(used, 10, what="the usage ledger to be written")
    d.terminate(signal.SIGKILL)
    again = daemons.start(served, extra=extra, port=d.port)
    keys = json.loads(_cli(again.config, "keys", "ls", "--json"))
    assert [k["name"] for k in keys if not k.get("revoked_at")] == ["survivor"]
    assert used() == before
    with again.client() as c:
        assert c.post("/v1/chat/completions", json=chat("fake"), headers=headers).status_code == 200
        assert c.post("/v1/chat/completions", json=chat("fake"),
                      headers={"Authorization": "Bearer ak-nope-nope"}).status_code == 401
