"""Live reload through the real daemon (SIGHUP, `appliance reload`), under a steady load
of real requests to fake engines, with the recording fake provider of test_routes."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import threading
import time

import httpx
import pytest

from .conftest import PY, ROOT, fake_model, over_admin_socket, pid_alive, wait_until
from .test_routes import provider, recorder, route  # noqa: F401  (the recording provider)

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


class Load:
    """Requests sent one after another per model, until stopped: every answer's status kept."""

    def __init__(self, daemon, models: list[str], pause: float = 0.05) -> None:
        self.daemon, self.pause = daemon, pause
        self.answers: list[tuple[str, int, str]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._send, args=(m,), daemon=True) for m in models]
        for t in self._threads:
            t.start()

    def _send(self, model: str) -> None:
        with self.daemon.client(timeout=30) as c:
            while not self._stop.is_set():
                r = c.post("/v1/chat/completions", json={**CHAT, "model": model})
                self.answers.append((model, r.status_code, r.text[:300]))
                time.sleep(self.pause)

    def stop(self) -> list[tuple[str, int, str]]:
        self._stop.set()
        for t in self._threads:
            t.join(30)
        return [a for a in self.answers if a[1] != 200]


def _reload_cli(daemon, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "appliance.cli", "reload", "--config", str(daemon.config), *flags],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


def _chat(daemon, model: str, **kw) -> httpx.Response:
    with daemon.client(timeout=kw.pop("timeout", 30)) as c:
        return c.post("/v1/chat/completions", json={**CHAT, "model": model}, **kw)


MODELS = (fake_model("steady", "--latency", "0.01")
          + fake_model("leaving", "--latency", "0.01")
          + fake_model("changing", "--latency", "0.01"))


def test_reload_under_load_adds_removes_rolls_and_regulates_without_a_failed_request(daemons, recorder, tmp_path):  # noqa: F811
    extra = provider(recorder, tmp_path) + route("general", "general", "steady", False, ["cloud"])
    daemon = daemons.start(MODELS, extra=extra)
    changing_pid = daemon.replicas("changing")[0]["pid"]
    leaving_pid = daemon.replicas("leaving")[0]["pid"]
    load = Load(daemon, ["steady", "changing", "general"])
    wait_until(lambda: len(load.answers) >= 20, 20, what="the load to run")

    new_models = (fake_model("steady", "--latency", "0.01")
                  + fake_model("changing", "--latency", "0.02")  # engine arguments: a roll
                  + fake_model("arriving", "--latency", "0.01"))
    daemons.write_config(new_models, extra=provider(recorder, tmp_path) + route("general", "general", "steady", True),
                         port=daemon.port)
    done = _reload_cli(daemon, "--json")
    time.sleep(0.5)  # requests keep coming after the swap too
    failed = load.stop()

    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["added"] == ["arriving"] and report["removed"] == ["leaving"]
    assert report["rolled"]["changing"].startswith("rolled 1 replica"), report
    assert "route general: fallbacks, regulated changed" in report["policy"]
    assert failed == [], failed[:5]
    assert len(load.answers) > 40
    # The new behaviour: the new model answers, the removed one is gone and its engine
    # stopped, the changed one runs a new engine, the route is regulated.
    assert _chat(daemon, "arriving").status_code == 200
    assert _chat(daemon, "leaving").status_code == 404
    wait_until(lambda: not pid_alive(leaving_pid), 20, what="the removed model's engine to stop")
    [replica] = daemon.replicas("changing")
    assert replica["pid"] != changing_pid and not pid_alive(changing_pid)
    routes = {r["name"]: r for r in daemon.status()["routes"]}
    assert routes["general"]["regulated"] is True


def test_an_invalid_config_changes_nothing_and_the_cli_names_the_field(daemons):
    daemon = daemons.start(fake_model("steady"))
    pid = daemon.replicas("steady")[0]["pid"]
    good = daemon.config.read_text()

    daemon.config.write_text(good + '\n[[models]]\nname = "broken"\nserver = "openai"\nparallel = "four"\n')
    bad = _reload_cli(daemon)
    assert bad.returncode == 1
    assert str(daemon.config) in bad.stderr and "parallel" in bad.stderr, bad.stderr

    daemon.config.write_text(good.replace("drain_timeout_s = 10", "drain_timeout_s = 10\nadmin_socket = 'x.sock'"))
    restart = _reload_cli(daemon)
    assert restart.returncode == 1
    assert "server.admin_socket" in restart.stderr and "restart" in restart.stderr, restart.stderr

    names = [m["name"] for m in daemon.status()["models"]]
    assert names == ["steady"] and daemon.replicas("steady")[0]["pid"] == pid
    assert _chat(daemon, "steady").status_code == 200


def test_a_reload_whose_new_model_has_missing_or_cut_weights_is_refused_and_the_old_model_keeps_serving(
    daemons, tmp_path
):
    """`serve` refuses to start on such a file; a reload applied it, drained the serving
    model and left an engine exiting at each start with only its exit code to say why."""
    from . import make_tiny_gguf

    daemon = daemons.start(fake_model("steady"))
    good = daemon.config.read_text()
    cut = tmp_path / "cut.gguf"
    make_tiny_gguf.main([str(cut)])
    with open(cut, "r+b") as f:
        f.truncate(cut.stat().st_size // 2)
    for source, problem in ((tmp_path / "gone.gguf", f"weights not found at {tmp_path / 'gone.gguf'}"),
                            (cut, f"{cut} is not a usable GGUF file: truncated")):
        daemon.config.write_text(good + f'\n[[models]]\nname = "new"\nsource = "{source}"\n')
        refused = _reload_cli(daemon)
        assert refused.returncode == 1, refused.stdout
        assert f"{daemon.config}: field 'models[1].source': model 'new': {problem}" in refused.stderr, refused.stderr
        assert [m["name"] for m in daemon.status()["models"]] == ["steady"]
    assert _chat(daemon, "steady").status_code == 200


def test_sighup_reloads_and_a_second_model_serves(daemons):
    daemon = daemons.start(fake_model("steady"))
    daemons.write_config(fake_model("steady") + fake_model("second"), port=daemon.port)
    daemon.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: _chat(daemon, "second").status_code == 200, 20, what="the reloaded model to answer")
    assert daemon.proc.poll() is None
    assert "config reloaded" in daemon.log_text()


def test_a_request_in_flight_when_its_route_becomes_regulated_never_reaches_the_provider(daemons, recorder, tmp_path):  # noqa: F811
    # "late" answers its first request at once (the readiness probe), then after 30 s;
    # the daemon gives up on it after 6 s and would fall back to the provider.
    models = fake_model("late", "--latency", "30", "--latency-from", "2")
    limits = "[upstream]\nread_timeout_s = 6\n\n"
    cfg = provider(recorder, tmp_path)
    daemon = daemons.start(models, extra=limits + cfg + route("general", "general", "late", False, ["cloud"]))
    before = recorder.requests()
    answer: list[httpx.Response] = []
    body = {**CHAT, "model": "general"}
    sender = threading.Thread(target=lambda: answer.append(daemon.client().post("/v1/chat/completions", json=body)))
    sender.start()
    wait_until(lambda: daemon.replicas("late")[0]["inflight"] >= 1, 10, what="the request to reach the engine")

    daemons.write_config(models, extra=limits + cfg + route("general", "general", "late", True), port=daemon.port)
    with over_admin_socket(daemon.admin_socket) as admin:
        done = admin.post("http://appliance/admin/reload", json={})
    assert done.status_code == 200 and done.json()["policy"] == ["route general: fallbacks, regulated changed"]
    assert answer == []  # still in flight at the swap
    sender.join(20)

    # Judged by one policy: admitted under the old route, its data did not leave the
    # box once the new one made the route regulated (fail closed, 503).
    assert recorder.requests() == before
    [r] = answer
    assert r.status_code == 503 and r.json()["error"]["code"] == "regulated_fail_closed", r.text
    # After the swap, a new request to the route is served locally or refused, never sent away.
    _chat(daemon, "general")
    assert recorder.requests() == before


def test_a_request_held_for_a_model_removed_by_a_reload_is_still_served(daemons):
    cold = fake_model("cold", "--slow-start", "5", extra="[models.autoscaling]\nmin_replicas = 0\nmax_replicas = 1")
    daemon = daemons.start(fake_model("steady") + cold)
    answer: list[httpx.Response] = []
    sender = threading.Thread(target=lambda: answer.append(_chat(daemon, "cold")))
    sender.start()
    wait_until(lambda: next(m for m in daemon.status()["models"] if m["name"] == "cold")["queued"] >= 1, 10,
               what="the request to be held")
    daemons.write_config(fake_model("steady"), port=daemon.port)
    done = _reload_cli(daemon, "--json")
    assert done.returncode == 0 and json.loads(done.stdout)["removed"] == ["cold"], done.stderr
    assert _chat(daemon, "cold").status_code == 404  # no new request reaches it
    sender.join(30)
    [r] = answer
    assert r.status_code == 200, r.text  # the held one was not failed by the reload
    wait_until(lambda: "stopping the replicas of cold" in daemon.log_text(), 20, what="the removed model to stop")


def test_a_reload_says_a_removed_model_drains_while_its_requests_run_not_that_it_stopped(daemons):
    daemon = daemons.start(fake_model("steady") + fake_model("leaving", "--latency", "3"))
    answer: list[httpx.Response] = []
    sender = threading.Thread(target=lambda: answer.append(_chat(daemon, "leaving")))
    sender.start()
    wait_until(lambda: next(m for m in daemon.status()["models"] if m["name"] == "leaving")["inflight"] >= 1, 10,
               what="the request to run")
    daemons.write_config(fake_model("steady"), port=daemon.port)
    done = _reload_cli(daemon)
    assert done.returncode == 0, done.stderr
    # The reload answers while the request runs: its model drains, it has not stopped.
    assert "  model leaving: removed: draining, stops when its 1 request ends\n" in done.stdout, done.stdout
    sender.join(30)
    [r] = answer
    assert r.status_code == 200, r.text
    wait_until(lambda: "stopping the replicas of leaving" in daemon.log_text(), 20, what="the removed model to stop")


def test_a_removed_models_words_count_the_requests_it_finishes_before_it_stops():
    from appliance.status import ReloadReport

    report = ReloadReport(config="c", removed=["idle", "one", "busy"], removing={"one": 1, "busy": 3})
    assert [report.removal(name) for name in report.removed] == [
        "removed: stopping (no request to finish)",
        "removed: draining, stops when its 1 request ends",
        "removed: draining, stops when its 3 requests end",
    ]


def test_the_diff_tells_rolls_from_live_changes_and_restart_only_settings():
    from appliance.api.reload import diff_models, restart_only
    from appliance.config import parse_config

    old = parse_config(fake_model("a") + fake_model("b") + fake_model("c"))
    new = parse_config("[server]\nport = 9\nmax_body_bytes = 10000\n[queue]\ntimeout_s = 5\n"
                       + fake_model("a", extra="priority = 3\n[models.autoscaling]\nmax_replicas = 2")
                       + fake_model("b", "--latency", "1") + fake_model("d"))
    diff = diff_models(old.models, new.models)
    assert [m.name for m in diff.added] == ["d"] and diff.removed == ["c"]
    assert diff.rolled == {"b": ["command"]}
    assert diff.updated == {"a": ["autoscaling.max_replicas", "priority"]}
    assert restart_only(old, new) == ["server.port"]  # body limits and the queue change live


def test_a_request_whose_body_arrives_across_a_reload_is_judged_by_the_policy_it_started_with(daemons):
    daemon = daemons.start(fake_model("steady"), extra=route("alias", "alias", "steady", True))
    body = json.dumps({**CHAT, "model": "alias"}).encode()
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=30) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body[:10])
        time.sleep(0.3)  # admitted: its policy read, its body still coming
        daemons.write_config(fake_model("steady"), port=daemon.port)  # the route "alias" is gone
        done = _reload_cli(daemon, "--no-wait")
        assert done.returncode == 0, done.stderr
        s.sendall(body[10:])
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
    assert _chat(daemon, "alias").status_code == 404  # a new request: the new policy


def test_a_roll_whose_new_replica_never_gets_ready_stops_and_the_old_one_keeps_serving(daemons):
    daemon = daemons.start(fake_model("changing"), supervisor="startup_timeout_s = 3")
    old_pid = daemon.replicas("changing")[0]["pid"]
    load = Load(daemon, ["changing"])
    daemons.write_config(fake_model("changing", "--fail-status", "500", "--fail-from", "1"),
                         port=daemon.port, supervisor="startup_timeout_s = 3")
    done = _reload_cli(daemon)
    failed = load.stop()
    assert done.returncode == 1 and "not all applied: changing: stopped at" in done.stderr, done.stdout + done.stderr
    assert failed == [], failed[:5]
    wait_until(lambda: [r["pid"] for r in daemon.replicas("changing")] == [old_pid], 20,
               what="the failed replica to go")
    assert _chat(daemon, "changing").status_code == 200


def test_the_regulated_check_runs_on_the_built_policy():
    from appliance.api.reload import check_regulated
    from appliance.config import ConfigError, ProviderConfig, RouteConfig
    from appliance.gateway.providers import Provider
    from appliance.gateway.routing import Routes

    routes = Routes([RouteConfig(name="r", model="m", target="t", regulated=True, fallbacks=["cloud"])])
    cloud = Provider(ProviderConfig(name="cloud", base_url="http://127.0.0.1:9/v1"), "")
    with pytest.raises(ConfigError, match="routes.r.fallbacks"):
        check_regulated(routes, {"cloud": cloud}, "appliance.toml")
    on_prem = Provider(ProviderConfig(name="cloud", base_url="http://127.0.0.1:9/v1", commercial=False), "")
    check_regulated(routes, {"cloud": on_prem}, "appliance.toml")


def test_a_reload_while_the_daemon_shuts_down_is_refused_and_reads_nothing():
    import asyncio
    from types import SimpleNamespace

    from appliance.api.reload import Reloader
    from appliance.errors import ShuttingDown

    read = []
    reloader = Reloader(SimpleNamespace(draining=True), lambda: read.append("config") or pytest.fail("read"))
    with pytest.raises(ShuttingDown, match="shutting down"):
        asyncio.run(reloader.reload())
    assert read == [] and reloader.rolling == {}


def test_a_reload_after_the_default_config_file_was_removed_is_refused_not_the_built_in_defaults(
    tmp_path, monkeypatch
):
    """`appliance serve` with no --config reads /etc/appliance/appliance.toml; once that file
    is gone, a reload must not read "no file" as the built-in defaults (no models at all)."""
    from click.testing import CliRunner

    from appliance.cli.main import main
    from appliance.config import ConfigError

    from .conftest import free_port

    default = tmp_path / "appliance.toml"
    default.write_text(f'[server]\nport = {free_port()}\n[paths]\nstate_dir = "{tmp_path}/state"\n'
                       f'cache_dir = "{tmp_path}/cache"\nlog_dir = "{tmp_path}/log"\n' + fake_model("steady"))
    monkeypatch.delenv("APPLIANCE_CONFIG", raising=False)
    monkeypatch.setattr("appliance.config.loading.DEFAULT_CONFIG_PATH", default)
    reread = []

    def run(cfg, reread_config):  # the daemon, as far as serve hands it its reread
        default.unlink()
        with pytest.raises(ConfigError, match="config file not found"):
            reread_config()
        reread.append(cfg.origin)
        return 0

    monkeypatch.setattr("appliance.daemon.server.run", lambda cfg, reread: run(cfg, reread))
    monkeypatch.setattr("appliance.logs.setup_logging", lambda *args: None)  # the test session's logging kept
    result = CliRunner().invoke(main, ["serve"])
    assert result.exit_code == 0, result.output
    assert reread == [str(default)]


def test_a_reload_that_changes_nothing_says_so_and_a_port_change_says_it_needs_a_restart(daemons):
    """The operator's two puzzles after an edit: a reload of a file that says what already runs
    is said to change nothing (not five zeros to add up), and a new port is refused, naming
    the field and the restart, while the daemon keeps its port."""
    daemon = daemons.start(fake_model("fake"))
    same = _reload_cli(daemon)
    assert same.returncode == 0, same.stderr
    assert same.stdout.startswith(f"reloaded {daemon.config}") and "nothing changed" in same.stdout
    daemon.config.write_text(daemon.config.read_text().replace(f"port = {daemon.port}", f"port = {daemon.port + 1}"))
    moved = _reload_cli(daemon)
    assert moved.returncode == 1 and moved.stdout == ""
    assert "field 'server.port' cannot change while the daemon runs: restart it" in moved.stderr, moved.stderr
    assert _chat(daemon, "fake").status_code == 200
