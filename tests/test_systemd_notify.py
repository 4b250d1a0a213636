"""The daemon under systemd's notify protocol, against a fake NOTIFY_SOCKET: a unix
datagram socket this test binds and reads, as systemd would."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import threading
from pathlib import Path

import httpx
import pytest

from appliance.daemon.sdnotify import Notifier
from appliance.daemon.service_manager import replica_summary

from .conftest import PY, ROOT, fake_model, pid_alive


class FakeSystemd:
    """The receiving end of NOTIFY_SOCKET: every datagram, in arrival order."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.messages: list[dict[str, str]] = []

    def next(self, timeout: float = 30) -> dict[str, str]:
        self.sock.settimeout(timeout)
        data = self.sock.recv(4096).decode()
        msg = dict(line.split("=", 1) for line in data.splitlines())
        self.messages.append(msg)
        return msg

    def until(self, predicate, timeout: float = 30) -> list[dict[str, str]]:
        """Messages up to and including the first one predicate accepts."""
        seen = []
        while True:
            msg = self.next(timeout)
            seen.append(msg)
            if predicate(msg):
                return seen

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def fake_systemd():
    short = tempfile.mkdtemp(prefix="sdn-", dir="/tmp")  # AF_UNIX paths are limited to 108 bytes
    fake = FakeSystemd(os.path.join(short, "notify"))
    yield fake
    fake.close()
    os.unlink(fake.address)
    os.rmdir(short)


def _start(daemons, fake: FakeSystemd, module: str = "appliance.cli", env: dict | None = None,
           models: str | None = None):
    cfg, port = daemons.write_config(models or fake_model("fake"))
    log = daemons.tmp / f"daemon-{port}.log"
    proc = subprocess.Popen(
        [PY, "-m", module, "serve", "--config", str(cfg)], cwd=ROOT,
        stdout=log.open("wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        env={**os.environ, "NOTIFY_SOCKET": fake.address, **(env or {})}, start_new_session=True)
    from .conftest import Daemon

    daemon = Daemon(proc, port, cfg, log)
    daemons.daemons.append(daemon)
    return daemon


def test_ready_arrives_once_the_api_listens_and_status_follows_the_replicas(daemons, fake_systemd):
    daemon = _start(daemons, fake_systemd)
    before = fake_systemd.until(lambda m: m.get("READY") == "1")
    # The moment READY arrives, the API answers: systemd may order clients after us.
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=5):
        pass
    assert httpx.get(f"{daemon.url}/healthz", timeout=5).status_code == 200
    # ... and so does the admin socket: `systemctl start` then the CLI finds it listening.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as admin:
        admin.connect(str(daemon.admin_socket))
    assert all("READY" not in m for m in before[:-1])
    assert "replicas ready" in before[-1]["STATUS"]
    # STATUS follows the replica to READY.
    fake_systemd.until(lambda m: m.get("STATUS", "").startswith("1/1 replicas ready"))
    daemon.wait_ready()

    daemon.proc.send_signal(signal.SIGTERM)
    stopping = fake_systemd.until(lambda m: m.get("STOPPING") == "1")[-1]
    assert stopping["STATUS"].startswith("draining")
    # Asked for the whole drain and engine stop: 2 x 10s drain + 2s grace + 10s.
    assert int(stopping["EXTEND_TIMEOUT_USEC"]) == 32_000_000
    assert daemon.proc.wait(timeout=30) == 0


def test_engines_do_not_inherit_the_notify_socket(daemons, fake_systemd):
    daemon = _start(daemons, fake_systemd, env={"WATCHDOG_USEC": "10000000"})
    fake_systemd.until(lambda m: m.get("READY") == "1")
    daemon.wait_ready()
    (engine_pid,) = daemon.engine_pids
    environ = Path(f"/proc/{engine_pid}/environ").read_bytes().split(b"\0")
    names = {entry.split(b"=", 1)[0] for entry in environ}
    assert not names & {b"NOTIFY_SOCKET", b"WATCHDOG_USEC", b"WATCHDOG_PID"}
    assert daemon.terminate() == 0
    assert not pid_alive(engine_pid)


def test_a_blocked_event_loop_stops_the_watchdog_pings(daemons, fake_systemd):
    # WatchdogSec=0.4s: a ping every 0.2s; the loop is then blocked for 2s (10 pings' worth).
    daemon = _start(daemons, fake_systemd, module="tests.blocking_daemon",
                    env={"WATCHDOG_USEC": "400000", "TEST_BLOCK_S": "2"})
    fake_systemd.until(lambda m: m.get("READY") == "1")
    pings = 0
    while pings < 3:  # the watchdog runs
        pings += fake_systemd.next().get("WATCHDOG") == "1"

    daemon.proc.send_signal(signal.SIGUSR1)
    fake_systemd.until(lambda m: m.get("X-TEST-BLOCK") == "begin")
    during = fake_systemd.until(lambda m: m.get("X-TEST-BLOCK") == "end")
    assert [m for m in during if "WATCHDOG" in m] == []

    # Unblocked, the loop pings again.
    fake_systemd.until(lambda m: m.get("WATCHDOG") == "1")
    assert daemon.terminate() == 0


def test_a_watchdog_meant_for_another_process_is_ignored():
    env = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    notifier = Notifier.from_environ(env)
    assert notifier.enabled and notifier.watchdog_interval is None
    assert env == {}  # consumed: child processes never see them


def test_the_watchdog_pings_at_half_of_watchdog_usec():
    env = {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "30000000",
           "WATCHDOG_PID": str(os.getpid())}
    assert Notifier.from_environ(env).watchdog_interval == 15.0


def test_without_notify_socket_nothing_is_sent():
    notifier = Notifier.from_environ({"WATCHDOG_USEC": "1000000"})
    assert not notifier.enabled and notifier.watchdog_interval is None
    assert notifier.ready("x") is False and notifier.status("y") is False


def test_an_abstract_notify_socket_is_reached(fake_systemd):
    abstract = FakeSystemd(f"@appliance-test-{os.getpid()}")
    try:
        assert Notifier(abstract.address).status("loading\nmulti-line  text")
        assert abstract.next(5) == {"STATUS": "loading multi-line text"}
    finally:
        abstract.close()


def test_replica_summary_names_what_is_not_ready():
    class R:
        def __init__(self, name, state):
            self.name, self.state = name, state

    from appliance.fleet.replica_state import State

    replicas = [R("a#0", State.READY), R("b#0", State.STARTING), R("b#1", State.BACKOFF)]
    assert replica_summary(replicas) == "1/3 replicas ready; b#0 starting, b#1 backoff"
    many = [R(f"m#{i}", State.STARTING) for i in range(9)]
    assert replica_summary(many).endswith("m#5 starting and 3 more")


def test_the_drain_waits_for_a_request_at_a_provider_and_reports_it(daemons, fake_systemd, tmp_path):
    # Regression: STOPPING said "draining 0 in-flight requests" while a request was at a
    # provider, which the drain waits for (it counted only the replicas' requests).
    from .conftest import FAKE_ENGINE, free_port, wait_until
    from .test_routes import provider, route

    port = free_port()
    cloud = subprocess.Popen([PY, str(FAKE_ENGINE), "--port", str(port), "--model", "cloud", "--latency", "3"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        stats = f"http://127.0.0.1:{port}/fake/stats"
        wait_until(lambda: _answers(stats), 15, what="the slow provider")
        local = fake_model("err5xx", "--fail-status", "500")  # its engine fails: the route fails over
        rec = type("Rec", (), {"url": f"http://127.0.0.1:{port}"})()
        daemon = _start(daemons, fake_systemd, models=local + provider(rec, tmp_path)
                        + route("general", "general", "err5xx", False, ["cloud"]))
        daemon.wait_ready()
        answers: list[httpx.Response] = []
        body = {"model": "general", "messages": [{"role": "user", "content": "hi"}]}
        asking = threading.Thread(target=lambda: answers.append(
            httpx.post(f"{daemon.url}/v1/chat/completions", json=body, timeout=30)))
        asking.start()
        wait_until(lambda: httpx.get(stats, timeout=5).json()["requests"] == 1, 15, what="the request at the provider")

        daemon.proc.send_signal(signal.SIGTERM)
        stopping = fake_systemd.until(lambda m: m.get("STOPPING") == "1")[-1]
        assert stopping["STATUS"] == "draining 1 in-flight requests"
        asking.join(30)
        assert answers[0].status_code == 200, answers[0].text  # answered before the daemon stopped
        assert daemon.proc.wait(timeout=30) == 0
    finally:
        cloud.kill()
        cloud.wait()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_sighup_reloads_between_reloading_and_ready(daemons, fake_systemd):
    daemon = _start(daemons, fake_systemd)
    fake_systemd.until(lambda m: m.get("READY") == "1")
    daemon.wait_ready()
    daemons.write_config(fake_model("fake") + fake_model("second"), port=daemon.port)

    daemon.proc.send_signal(signal.SIGHUP)
    reloading = fake_systemd.until(lambda m: m.get("RELOADING") == "1")[-1]
    assert int(reloading["MONOTONIC_USEC"]) > 0  # systemd 253+ matches it to its own reload
    ready = fake_systemd.until(lambda m: m.get("READY") == "1")[-1]
    assert ready["STATUS"].startswith("config reloaded: 1 models added")
    assert httpx.get(f"{daemon.url}/v1/models", timeout=5).json()["data"][-1]["id"] == "second"

    # A broken file: refused, READY again with the reason, the daemon still up.
    daemon.config.write_text(daemon.config.read_text() + "\n[bogus]\n")
    daemon.proc.send_signal(signal.SIGHUP)
    fake_systemd.until(lambda m: m.get("RELOADING") == "1")
    refused = fake_systemd.until(lambda m: m.get("READY") == "1")[-1]
    assert refused["STATUS"].startswith("reload refused, running the previous config") and "bogus" in refused["STATUS"]
    assert daemon.proc.poll() is None


def test_a_reload_by_the_cli_or_the_admin_api_notifies_systemd_as_sighup_does(daemons, fake_systemd):
    daemon = _start(daemons, fake_systemd)
    fake_systemd.until(lambda m: m.get("READY") == "1")
    daemon.wait_ready()
    daemons.write_config(fake_model("fake") + fake_model("second"), port=daemon.port)

    done = subprocess.run([PY, "-m", "appliance.cli", "reload", "--config", str(daemon.config)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    reloading = fake_systemd.until(lambda m: m.get("RELOADING") == "1")[-1]
    assert int(reloading["MONOTONIC_USEC"]) > 0
    ready = fake_systemd.until(lambda m: m.get("READY") == "1")[-1]
    assert ready["STATUS"].startswith("config reloaded: 1 models added")

    # Refused over the admin API: READY again with the reason, as after a refused SIGHUP.
    daemon.config.write_text(daemon.config.read_text() + "\n[bogus]\n")
    answer = httpx.post(f"{daemon.url}/admin/reload", json={}, timeout=30)
    assert answer.status_code == 400, answer.text
    fake_systemd.until(lambda m: m.get("RELOADING") == "1")
    refused = fake_systemd.until(lambda m: m.get("READY") == "1")[-1]
    assert refused["STATUS"].startswith("reload refused, running the previous config") and "bogus" in refused["STATUS"]
