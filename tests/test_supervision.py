"""Supervision through the real daemon: crashes, restarts, FATAL, failures as
errors, and shutdown that leaves no engine process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import httpx

from .conftest import ROOT, fake_model, pid_alive, wait_until

CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}


def request_in_flight(d) -> tuple[threading.Thread, dict]:
    """A chat request sent from a thread, returned once the replica is serving it;
    result["resp"] holds the answer after the thread is joined."""
    result: dict = {}

    def call() -> None:
        with d.client() as c:
            result["resp"] = c.post("/v1/chat/completions", json=CHAT)

    t = threading.Thread(target=call)
    t.start()
    wait_until(lambda: d.replicas("fake")[0]["inflight"] == 1, timeout=5, what="request in flight")
    return t, result


def test_a_crashed_replica_is_restarted_and_serves_again(daemons):
    d = daemons.start(fake_model("fake", "--crash-after", "2"))
    first_pid = d.replicas("fake")[0]["pid"]
    with d.client() as c:
        assert c.post("/v1/chat/completions", json=CHAT).status_code == 200
        assert c.post("/v1/chat/completions", json=CHAT).status_code == 200  # engine exits after this
    wait_until(lambda: not pid_alive(first_pid), timeout=5, what="the engine to crash")

    def back() -> dict | None:
        r = d.replicas("fake")[0]
        return r if r["state"] == "READY" and r["pid"] != first_pid else None

    replica = wait_until(back, timeout=15, what="a new READY replica")
    assert replica["restarts"] == 1
    assert "exit code 3" in replica["last_error"]
    with d.client() as c:
        assert c.post("/v1/chat/completions", json=CHAT).status_code == 200


def test_repeated_crashes_mark_the_replica_fatal_with_its_log_tail(daemons, tmp_path):
    # An engine that dies at start every time, saying why on its way out.
    script = tmp_path / "broken_engine.py"
    script.write_text("import sys\nprint('CUDA error: out of memory (pretend)')\nsys.exit(7)\n")
    model = (f'[[models]]\nname = "broken"\nserver = "openai"\n'
             f'command = ["{sys.executable}", "{script}", "--port", "{{port}}"]\n')
    d = daemons.start(model, wait=False, supervisor="max_crashes = 2")
    wait_until(lambda: _reachable(d), timeout=15, what="daemon up")

    def fatal() -> dict | None:
        r = d.replicas("broken")[0]
        return r if r["state"] == "FATAL" else None

    replica = wait_until(fatal, timeout=30, what="FATAL")
    assert replica["restarts"] == 2  # two restarts, the third crash is one too many
    assert "exit code 7" in replica["last_error"]
    assert any("CUDA error: out of memory" in line for line in replica["log_tail"])
    with d.client() as c:
        resp = c.post("/v1/chat/completions", json={**CHAT, "model": "broken"})
        ready = c.get("/readyz")
    assert resp.status_code == 503
    assert int(resp.headers["retry-after"]) > 0
    assert resp.json()["error"]["code"] == "no_capacity"
    assert ready.status_code == 503
    assert "FATAL" in d.log_text() and "CUDA error" in d.log_text()


def _reachable(d) -> bool:
    try:
        httpx.get(f"{d.url}/healthz", timeout=1)
        return True
    except httpx.HTTPError:
        return False


def test_an_engine_5xx_becomes_502_in_the_envelope(daemons):
    d = daemons.start(fake_model("fake", "--fail-status", "500"))
    with d.client() as c:
        resp = c.post("/v1/chat/completions", json=CHAT)
    assert resp.status_code == 502
    err = resp.json()["error"]
    assert err["code"] == "engine_error"
    assert "fake failure" in err["message"]


def test_an_engine_4xx_keeps_its_status_in_our_envelope(daemons):
    d = daemons.start(fake_model("fake", "--fail-status", "400"))
    with d.client() as c:
        resp = c.post("/v1/chat/completions", json=CHAT)
    assert resp.status_code == 400
    assert resp.json()["error"]["message"] == "fake failure"
    assert set(resp.json()["error"]) == {"message", "type", "param", "code"}


def test_an_engine_that_dies_mid_request_is_retried_once_it_restarts(daemons):
    """No byte had come back: the request is requeued, not failed."""
    d = daemons.start(fake_model("fake", "--latency", "1"))
    pid = d.replicas("fake")[0]["pid"]
    t, result = request_in_flight(d)
    os.kill(pid, signal.SIGKILL)
    t.join(timeout=30)
    resp = result["resp"]
    assert resp.status_code == 200, resp.text
    assert d.replicas("fake")[0]["pid"] != pid
    assert "retrying request" in d.log_text()


def test_an_engine_that_hangs_mid_request_times_out_with_504(daemons):
    d = daemons.start(fake_model("fake", "--latency", "30", "--latency-from", "2"),
                      extra="[upstream]\nread_timeout_s = 1\n")
    with d.client() as c:
        resp = c.post("/v1/chat/completions", json=CHAT)
    assert resp.status_code == 504
    assert resp.json()["error"]["code"] == "engine_timeout"


def test_sigterm_lets_in_flight_requests_finish_then_exits_0_with_no_orphans(daemons):
    d = daemons.start(fake_model("fake", "--latency", "1.5"))
    engine_pid = d.replicas("fake")[0]["pid"]
    t, result = request_in_flight(d)
    code = d.terminate(signal.SIGTERM)
    t.join(timeout=10)
    assert code == 0
    assert result["resp"].status_code == 200
    assert result["resp"].json()["choices"][0]["message"]["content"]
    assert not pid_alive(engine_pid)
    assert "DRAINING" in d.log_text()


def test_an_engine_ignoring_sigterm_is_killed_after_the_grace_period(daemons):
    d = daemons.start(fake_model("fake", "--ignore-sigterm"))
    engine_pid = d.replicas("fake")[0]["pid"]
    assert d.terminate(signal.SIGTERM) == 0
    assert not pid_alive(engine_pid)
    assert "ignored SIGTERM" in d.log_text()


def test_no_engine_outlives_a_daemon_killed_with_sigkill(daemons):
    d = daemons.start(fake_model("fake") + fake_model("other", "--ignore-sigterm"))
    pids = {r["pid"] for m in ("fake", "other") for r in d.replicas(m)}
    assert len(pids) == 2 and all(pid_alive(p) for p in pids)
    d.terminate(signal.SIGKILL)
    wait_until(lambda: not any(pid_alive(p) for p in pids), timeout=5,
               what="engines to die with the daemon")


def test_an_operator_restart_of_the_only_replica_does_not_start_a_second_one(daemons):
    # Regression: while the replica drained for its restart it did not count as live,
    # so the autoscaler (min_replicas = 1) started another to cover the gap.
    d = daemons.start(fake_model("fake", "--ignore-sigterm",
                                 extra="[models.autoscaling]\nmin_replicas = 1\nmax_replicas = 3\n"),
                      extra="[autoscaling]\ninterval_s = 0.2\n")  # ticks all through the 2 s grace
    [before] = d.replicas("fake")
    assert httpx.post(f"{d.url}/admin/models/fake/replicas/{before['index']}/restart", json={}, timeout=10).status_code == 200
    wait_until(lambda: any(r["pid"] not in (None, before["pid"]) and r["state"] == "READY"
                           for r in d.replicas("fake")), timeout=30, what="the restarted engine")
    assert [r["index"] for r in d.replicas("fake")] == [before["index"]]


def test_appliance_status_prints_a_fatal_replicas_log_tail_without_the_terminal_obeying_it(daemons, tmp_path):
    script = tmp_path / "loud_engine.py"
    script.write_text("import sys\nprint('bad model\\x1b]0;owned\\x07\\x1b[2J')\nsys.exit(7)\n")
    model = (f'[[models]]\nname = "loud"\nserver = "openai"\n'
             f'command = ["{sys.executable}", "{script}", "--port", "{{port}}"]\n')
    d = daemons.start(model, wait=False, supervisor="max_crashes = 1")
    wait_until(lambda: _reachable(d), timeout=15, what="daemon up")
    wait_until(lambda: d.replicas("loud")[0]["state"] == "FATAL", timeout=30, what="FATAL")
    shown = subprocess.run([sys.executable, "-m", "appliance.cli", "status", "--config", str(d.config)],
                           capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert "bad model\\x1b]0;owned\\x07\\x1b[2J" in shown.stdout
    assert "\x1b" not in shown.stdout and "\x07" not in shown.stdout
