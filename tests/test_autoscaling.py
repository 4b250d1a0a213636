"""Replicas follow the load, idle to zero, and a cold start holds requests:
through the real daemon with fake-engine replicas."""

from __future__ import annotations

import concurrent.futures
import json
import signal
import subprocess
import threading
import time

import anthropic
import httpx
import pytest

from .conftest import PY, ROOT, fake_model, wait_until

CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}
FAST = ("[autoscaling]\ninterval_s = 0.2\nstabilization_s = 1.5\ncooldown_s = 0.5\n"
        "[queue]\ntimeout_s = 30\nkeepalive_s = 0\n")


def scaling(min_r: int, max_r: int, target: float = 5, ttl: str = "") -> str:
    ttl_line = f'scale_to_zero_after = "{ttl}"\n' if ttl else ""
    return (f"[models.autoscaling]\nmin_replicas = {min_r}\nmax_replicas = {max_r}\n"
            f"target_rps_per_replica = {target}\n{ttl_line}")


def model_status(d, name="fake") -> dict:
    return next(m for m in d.status()["models"] if m["name"] == name)


def admin(d, path: str, body: dict | None = None) -> httpx.Response:
    return httpx.post(f"{d.url}/admin/models/{path}", json={} if body is None else body, timeout=30)


def test_a_request_to_a_model_at_zero_is_held_and_answered(daemons):
    d = daemons.start(fake_model("fake", "--slow-start", "1", extra=scaling(0, 1)), extra=FAST)
    assert model_status(d)["replicas"] == []
    with d.client() as c:
        resp = c.post("/v1/chat/completions", json=CHAT)
    assert resp.status_code == 200, resp.text  # held while the engine started, not failed
    status = model_status(d)
    assert [r["state"] for r in status["replicas"]] == ["READY"]
    assert status["last_cold_start_s"] is not None
    assert "a request arrived for a model at zero" in d.log_text()


def test_a_held_stream_gets_keepalive_comments_then_the_answer(daemons):
    d = daemons.start(fake_model("fake", "--slow-start", "1.5", extra=scaling(0, 1)),
                      extra=FAST.replace("keepalive_s = 0", "keepalive_s = 0.3"))
    with d.client() as c, c.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as resp:
        assert resp.status_code == 200
        lines = [line for line in resp.iter_lines() if line]
    assert lines[0] == ": model is loading"
    assert lines[-1] == "data: [DONE]"
    assert any(line.startswith("data: {") for line in lines)


def test_a_held_stream_that_times_out_after_its_keepalives_ends_with_the_error_event(daemons):
    """The answer began with keepalive comments, then the hold timed out: the stream ends with
    the API's error event (not a bare disconnect), and the request is finished and counted."""
    d = daemons.start(fake_model("fake", "--slow-start", "30", extra=scaling(0, 1)),
                      extra=FAST.replace("keepalive_s = 0", "keepalive_s = 0.3").replace("timeout_s = 30",
                                                                                         "timeout_s = 1.5"))
    with d.client() as c, c.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as resp:
        assert resp.status_code == 200
        lines = [line for line in resp.iter_lines() if line]
    assert lines[0] == ": model is loading"
    assert lines[-1].startswith("data: {"), lines
    assert json.loads(lines[-1][len("data: "):])["error"]["code"] == "queue_timeout"
    assert "TypeError" not in d.log_text()


def test_queue_full_gives_429_with_retry_after(daemons):
    d = daemons.start(fake_model("fake", "--slow-start", "3", extra=scaling(0, 1)),
                      extra=FAST + "max_held = 1\n")
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        first = pool.submit(lambda: httpx.post(f"{d.url}/v1/chat/completions", json=CHAT, timeout=30))
        wait_until(lambda: model_status(d)["queued"] == 1, 5, what="one request queued")
        second = httpx.post(f"{d.url}/v1/chat/completions", json=CHAT, timeout=30)
        assert second.status_code == 429
        assert second.json()["error"]["code"] == "queue_full"
        assert int(second.headers["retry-after"]) > 0
        assert first.result().status_code == 200


def test_queue_timeout_gives_503_with_retry_after(daemons):
    d = daemons.start(fake_model("fake", "--slow-start", "30", extra=scaling(0, 1)),
                      extra=FAST.replace("timeout_s = 30", "timeout_s = 1"))
    with d.client() as c:
        resp = c.post("/v1/chat/completions", json=CHAT)
    assert resp.status_code == 503
    assert resp.json()["error"]["code"] == "queue_timeout"
    assert int(resp.headers["retry-after"]) > 0
    # To the Anthropic SDK: overloaded_error, on 503 (Anthropic's own is 529), which it
    # raises as an InternalServerError and retries, as it does a 529, after Retry-After.
    claude = anthropic.Anthropic(base_url=d.url, api_key="unused", max_retries=0, timeout=30)
    with pytest.raises(anthropic.ServiceUnavailableError) as err:
        claude.messages.create(model="fake", max_tokens=3, messages=[{"role": "user", "content": "hi"}])
    assert isinstance(err.value, anthropic.InternalServerError) and err.value.body["error"]["type"] == "overloaded_error"
    assert int(err.value.response.headers["retry-after"]) > 0


def test_a_client_that_disconnects_while_queued_leaves_the_queue_and_the_load_continues(daemons):
    d = daemons.start(fake_model("fake", "--slow-start", "2", extra=scaling(0, 1)), extra=FAST)
    try:
        httpx.post(f"{d.url}/v1/chat/completions", json=CHAT, timeout=0.5)
    except httpx.ReadTimeout:
        pass
    wait_until(lambda: model_status(d)["queued"] == 0, 5, what="the queue to empty")
    wait_until(lambda: [r["state"] for r in model_status(d)["replicas"]] == ["READY"], 15,
               what="the replica to finish loading anyway")


def test_ramp_up_then_down_with_zero_failed_requests(daemons):
    d = daemons.start(fake_model("fake", "--latency", "0.02", extra=scaling(1, 3, target=5)), extra=FAST)
    results: list[int] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(base_url=d.url, timeout=30) as c:
            while not stop.is_set():
                results.append(c.post("/v1/chat/completions", json=CHAT).status_code)
                time.sleep(0.05)

    threads = [threading.Thread(target=load) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len([r for r in model_status(d)["replicas"] if r["state"] == "READY"]) >= 2,
                   20, what="a scale-up")
    finally:
        stop.set()
        for t in threads:
            t.join()
    wait_until(lambda: len(model_status(d)["replicas"]) == 1, 30, what="the scale-down to min_replicas")
    assert results and set(results) == {200}, {s: results.count(s) for s in set(results)}
    assert "autoscale fake: up 1 -> " in d.log_text() and "autoscale fake: down " in d.log_text()
    assert model_status(d)["decisions"][-1]["action"] in ("down", "hold")


def test_an_idle_model_goes_to_zero_and_comes_back_on_demand(daemons):
    d = daemons.start(fake_model("fake", extra=scaling(1, 1, ttl="1s")), extra=FAST)
    wait_until(lambda: model_status(d)["replicas"] == [], 15, what="idle to zero")
    with d.client() as c:
        assert c.get("/readyz").status_code == 200  # at zero, still ready: the next request starts it
        assert c.post("/v1/chat/completions", json=CHAT).status_code == 200


def test_drain_on_scale_down_loses_nothing(daemons):
    d = daemons.start(fake_model("fake", "--latency", "1.5", "--latency-from", "2",
                                 extra=scaling(2, 2)), extra=FAST)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        calls = [pool.submit(lambda: httpx.post(f"{d.url}/v1/chat/completions", json=CHAT, timeout=30))
                 for _ in range(4)]
        wait_until(lambda: model_status(d)["inflight"] == 4, 5, what="four requests in flight")
        assert admin(d, "fake/scale", {"replicas": 0}).status_code == 200
        assert [c.result().status_code for c in calls] == [200] * 4
    wait_until(lambda: model_status(d)["replicas"] == [], 15, what="both replicas drained and gone")


def test_pins_and_desired_counts_survive_a_daemon_restart(daemons):
    models = fake_model("fake", extra=scaling(1, 3, ttl="1s"))
    d = daemons.start(models, extra=FAST)
    assert admin(d, "fake/scale", {"replicas": 2}).json()["override"] == 2
    assert admin(d, "fake/pin").json()["pinned"] is True
    wait_until(lambda: [r["state"] for r in model_status(d)["replicas"]] == ["READY", "READY"], 15,
               what="two replicas")
    port = d.port
    d.terminate(signal.SIGKILL)
    again = daemons.start(models, extra=FAST, port=port)
    status = model_status(again)
    assert status["pinned"] is True and status["override"] == 2
    wait_until(lambda: len([r for r in model_status(again)["replicas"] if r["state"] == "READY"]) == 2,
               15, what="two replicas after the restart")
    time.sleep(1.5)  # past the idle TTL: pinned and scaled, it stays
    assert len(model_status(again)["replicas"]) == 2
    assert admin(again, "fake/scale", {"replicas": None}).json()["override"] is None


def test_operator_commands_from_the_cli(daemons):
    d = daemons.start(fake_model("fake", extra=scaling(0, 2)), extra=FAST)
    cfg = str(d.config)

    def cli(*args):
        out = subprocess.run([PY, "-m", "appliance.cli", *args, "--config", cfg], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout

    cli("load", "fake")
    wait_until(lambda: [r["state"] for r in model_status(d)["replicas"]] == ["READY"], 15, what="load")
    assert "replicas 2" in cli("scale", "fake", "2")
    wait_until(lambda: len(model_status(d)["replicas"]) == 2, 15, what="scale to 2")
    cli("pin", "fake")
    assert model_status(d)["pinned"] is True
    cli("unpin", "fake")
    cli("unload", "fake")
    wait_until(lambda: model_status(d)["replicas"] == [], 15, what="unload")
    assert "autoscaling" in cli("scale", "fake", "auto")
    out = json.loads(cli("status", "--json"))
    assert out["models"][0]["override"] is None


def test_admin_errors_use_the_envelope(daemons):
    d = daemons.start(fake_model("fake"), extra=FAST)
    assert admin(d, "nope/load").status_code == 404
    bad = admin(d, "fake/scale", {"replicas": -1})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "replicas"
    assert admin(d, "fake/explode").json()["error"]["code"] == "not_found"


def test_an_unloaded_model_is_not_brought_back_by_the_traffic_before_it(daemons):
    d = daemons.start(fake_model("fake", extra=scaling(0, 1)), extra=FAST)
    with d.client() as c:
        for _ in range(5):
            assert c.post("/v1/chat/completions", json=CHAT).status_code == 200
    admin(d, "fake/unload")
    wait_until(lambda: model_status(d)["replicas"] == [], 10, what="unload")
    time.sleep(1)  # several autoscaler ticks
    assert model_status(d)["replicas"] == []


def test_unload_sticks_for_a_model_with_min_replicas_until_a_request_comes(daemons):
    d = daemons.start(fake_model("fake", extra=scaling(1, 2)), extra=FAST)
    admin(d, "fake/unload")
    wait_until(lambda: model_status(d)["replicas"] == [], 10, what="unload")
    time.sleep(1)  # several autoscaler ticks: min_replicas does not bring it back
    assert model_status(d)["replicas"] == []
    with d.client() as c:
        assert c.post("/v1/chat/completions", json=CHAT).status_code == 200
    time.sleep(1)
    assert len(model_status(d)["replicas"]) == 1  # in use again: min_replicas holds
