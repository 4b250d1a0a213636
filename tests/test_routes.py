"""Routes and fallback through the real daemon, with a fake commercial provider
(tests/fake_engine.py, started on its own) that records every request it gets."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import threading
from pathlib import Path

import httpx
import pytest

from .conftest import FAKE_ENGINE, PY, fake_model, free_port, wait_until

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


class Recorder:
    """The fake commercial provider: every request it receives is counted."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen([PY, str(FAKE_ENGINE), "--port", str(self.port), "--model", "cloud"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self._up, 15, what="the fake provider")

    def _up(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def requests(self) -> int:
        return httpx.get(f"{self.url}/fake/stats", timeout=5).json()["requests"]

    def last_body(self) -> dict:
        return httpx.get(f"{self.url}/fake/stats", timeout=5).json()["last_body"]


@pytest.fixture(scope="module")
def recorder(tmp_path_factory):
    rec = Recorder(tmp_path_factory.mktemp("rec"))
    yield rec
    rec.proc.kill()
    rec.proc.wait()


def provider(rec: Recorder, tmp: Path) -> str:
    key = tmp / "cloud.key"
    key.write_text("sk-test-secret-never-logged\n")
    key.chmod(0o600)  # a key file others may read is refused
    return (f'[[providers]]\nname = "cloud"\nbase_url = "{rec.url}/v1"\napi_key_file = "{key}"\n'
            'models = { general = "cloud-large" }\nread_timeout_s = 5\n\n')


def route(name: str, model: str, target: str, regulated: bool, fallbacks=(), extra: str = "") -> str:
    fb = ", ".join(f'"{f}"' for f in fallbacks)
    return (f'[[routes]]\nname = "{name}"\nmodel = "{model}"\ntarget = "{target}"\n'
            f"regulated = {'true' if regulated else 'false'}\nfallbacks = [{fb}]\n{extra}\n")


FAILING_MODELS = (
    fake_model("down", "--fail-status", "500", "--fail-from", "1")  # never ready: cannot start
    + fake_model("err5xx", "--fail-status", "500")
    + fake_model("slowpoke", "--latency", "30", "--latency-from", "2")
    + fake_model("midstream", "--chunks", "6", "--chunk-delay", "0.2", "--die-mid-stream", "2")
    + fake_model("busy", "--chunks", "40", "--chunk-delay", "0.05", extra="parallel = 1")
    + fake_model("cold", "--slow-start", "1.5",
                 extra="[models.autoscaling]\nmin_replicas = 0\nmax_replicas = 1")
)
FAILURES = {"down": "down", "err5xx": "err5xx", "timeout": "slowpoke", "midstream": "midstream",
            "busy": "busy", "cold": "cold"}


@pytest.fixture(scope="module")
def policy_daemon(tmp_path_factory, recorder):
    from .conftest import DaemonFactory

    tmp = tmp_path_factory.mktemp("routes")
    factory = DaemonFactory(tmp)
    routes = "".join(route(f"reg-{k}", f"reg-{k}", m, True) for k, m in FAILURES.items())
    routes += "".join(route(f"gen-{k}", f"gen-{k}", m, False, ["cloud"], "burst_at_queue = 0")
                      for k, m in FAILURES.items())
    routes += route("general", "general", "err5xx", False, ["cloud"])
    limits = "[upstream]\nread_timeout_s = 1\n\n[queue]\ntimeout_s = 3\nkeepalive_s = 0\n\n"
    daemon = factory.start(FAILING_MODELS, extra=limits + provider(recorder, tmp) + routes, wait=False,
                           supervisor="max_crashes = 5\ncrash_window_s = 60\nstartup_timeout_s = 10")

    def up() -> bool:
        assert daemon.proc.poll() is None, daemon.log_text()
        try:
            models = {m["name"]: m for m in daemon.status()["models"]}
        except httpx.HTTPError:
            return False
        return all(models[n]["ready"] for n in ("err5xx", "slowpoke", "midstream", "busy"))

    wait_until(up, 30, what="the failing models' replicas")
    yield daemon
    factory.cleanup()


def _chat(daemon, model: str, stream: bool = False, timeout: float = 20) -> httpx.Response:
    with daemon.client(timeout=timeout) as c:
        if not stream:
            return c.post("/v1/chat/completions", json={**CHAT, "model": model})
        with c.stream("POST", "/v1/chat/completions", json={**CHAT, "model": model, "stream": True}) as r:
            r.read()
            return r


def _hold_busy(daemon, model: str) -> threading.Thread:
    """A long stream on the one slot of "busy", so the next request finds it saturated."""
    t = threading.Thread(target=_chat, args=(daemon, model, True), daemon=True)
    t.start()
    wait_until(lambda: daemon.replicas("busy")[0]["inflight"] >= 1, 10, what="busy's slot to fill")
    return t


@pytest.mark.parametrize("failure", list(FAILURES))
def test_a_regulated_route_never_reaches_the_provider_whatever_fails(policy_daemon, recorder, failure):
    before = recorder.requests()
    holder = _hold_busy(policy_daemon, f"reg-{failure}") if failure == "busy" else None
    unary = _chat(policy_daemon, f"reg-{failure}")
    streamed = _chat(policy_daemon, f"reg-{failure}", stream=True)
    if holder is not None:
        holder.join(15)
    assert recorder.requests() == before
    if failure in ("busy", "cold"):  # saturated or cold: it waits and is served here
        assert unary.status_code == 200 and streamed.status_code == 200
    elif failure == "midstream":
        assert b'"error"' in streamed.content and b"tok0" in streamed.content
    else:
        assert unary.status_code in (502, 503, 504), unary.text
        assert unary.json()["error"]["message"]


def test_a_permitted_route_fails_over_on_an_outage_with_the_providers_model_name(policy_daemon, recorder):
    before = recorder.requests()
    resp = _chat(policy_daemon, "general")
    assert resp.status_code == 200, resp.text
    assert recorder.requests() == before + 1
    assert recorder.last_body()["model"] == "cloud-large"  # the provider's name for "general"


@pytest.mark.parametrize("failure", ["down", "timeout"])
def test_a_permitted_route_fails_over_when_the_model_cannot_start_or_times_out(policy_daemon, recorder,
                                                                            failure):
    before = recorder.requests()
    resp = _chat(policy_daemon, f"gen-{failure}")
    assert resp.status_code == 200, resp.text
    assert recorder.requests() == before + 1


def test_a_permitted_route_bursts_when_the_local_model_is_saturated(policy_daemon, recorder):
    holder = _hold_busy(policy_daemon, "reg-busy")  # a stream on busy's only slot
    before = recorder.requests()
    resp = _chat(policy_daemon, "gen-busy")
    holder.join(15)
    assert resp.status_code == 200 and recorder.requests() == before + 1


def test_no_fallback_after_the_first_streamed_byte(policy_daemon, recorder):
    wait_until(lambda: policy_daemon.replicas("midstream")[0]["state"] == "READY", 20,
               what="midstream back from an earlier crash")
    before = recorder.requests()
    resp = _chat(policy_daemon, "gen-midstream", stream=True)
    events = [line for line in resp.text.splitlines() if line.startswith("data: ")]
    assert len(events) >= 2 and "error" in events[-1], (resp.text, recorder.requests() - before)
    assert json.loads(events[0][6:])["choices"][0]["delta"]["content"] == "tok0 "
    assert "error" in json.loads(events[-1][6:])
    assert recorder.requests() == before


def test_fallback_decisions_are_audited_and_counted(policy_daemon):
    _chat(policy_daemon, "general")
    db = Path(policy_daemon.config.read_text().split('state_dir = "', 1)[1].split('"', 1)[0]) / "appliance.db"

    def rows():
        with sqlite3.connect(db) as conn:
            return conn.execute("SELECT route, served_by, status, fallback_reason, prompt_tokens, "
                                "request_text FROM audit WHERE route = 'general'").fetchall()

    found = wait_until(rows, 10, what="the audit rows")
    assert ("general", "provider:cloud", 200, "engine_error", 5, None) in found
    metrics = httpx.get(f"{policy_daemon.url}/metrics").text
    assert 'appliance_fallbacks_total{reason="engine_error",route="general",target="cloud"}' in metrics
    assert "sk-test-secret" not in policy_daemon.log_text()
    # The status (what the TUI's routes view shows) counts each fallback that fired.
    routes = {r["name"]: r for r in httpx.get(f"{policy_daemon.url}/admin/status").json()["routes"]}
    assert routes["general"]["regulated"] is False and routes["general"]["fired"]["cloud"] >= 1


def test_config_refuses_a_regulated_route_with_a_commercial_fallback(tmp_path, recorder):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(provider(recorder, tmp_path) + fake_model("m")
                   + route("claims", "claims", "m", True, ["cloud"]))
    result = subprocess.run([PY, "-m", "appliance.cli", "serve", "--config", str(cfg)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert "routes[0].fallbacks" in result.stderr and "route 'claims' is regulated" in result.stderr
