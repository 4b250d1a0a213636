"""Readiness by what the engine serves (issue 19): a chat-only OpenAI-compatible server
(no /v1/completions) becomes READY, external or supervised; a configured health_path
is what an external server is probed on; a replica stuck in STARTING says why."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

from appliance.config import ConfigError, parse_config

from .conftest import FAKE_ENGINE, PY, fake_model, free_port, wait_until


@pytest.fixture
def external_engine() -> Iterator:
    procs: list[subprocess.Popen] = []

    def start(name: str, *flags: str) -> int:
        port = free_port()
        procs.append(subprocess.Popen([PY, str(FAKE_ENGINE), "--port", str(port), "--model", name, *flags],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        return port

    yield start
    for p in procs:
        p.kill()
        p.wait(timeout=10)


def _external(name: str, port: int, extra: str = "") -> str:
    return f'[[models]]\nname = "{name}"\nserver = "openai"\nurl = "http://127.0.0.1:{port}/v1"\n{extra}\n'


def _chat(d, model: str) -> dict:
    with d.client() as c:
        resp = c.post("/v1/chat/completions", json={"model": model, "max_tokens": 2,
                                                    "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_a_chat_only_external_server_becomes_ready_and_answers_chat(daemons, external_engine):
    # Before: its readiness was a 1-token /v1/completions it never answers: STARTING forever.
    port = external_engine("chatonly", "--no-completions")
    d = daemons.start(_external("chatonly", port), wait=False)
    d.wait_ready(timeout=60)
    [replica] = d.replicas("chatonly")
    assert replica["state"] == "READY" and replica["last_error"] is None
    assert _chat(d, "chatonly")["choices"][0]["message"]["content"]


def test_a_supervised_chat_only_server_is_ready_and_still_checked_for_its_key(daemons):
    # `env -u` strips the key the appliance gives: that server answers anyone, on chat.
    open_door = fake_model("open", "--no-completions").replace(
        f'command = ["{PY}"', f'command = ["env", "-u", "ENGINE_API_KEY", "{PY}"')
    d = daemons.start(fake_model("chatonly", "--no-completions") + open_door, wait=False)

    def settled():
        try:
            states = {m: d.replicas(m)[0] for m in ("chatonly", "open")}
        except Exception:
            return None
        ok = states["chatonly"]["state"] == "READY" and states["open"]["state"] == "FATAL"
        return states if ok else None

    states = wait_until(settled, 60, what="chatonly READY and the open engine FATAL")
    assert "/v1/chat/completions sent without its key" in states["open"]["last_error"]
    assert _chat(d, "chatonly")["choices"]


def test_an_external_server_with_a_health_path_is_ready_by_it(daemons, external_engine):
    port = external_engine("healthy", "--no-completions")
    d = daemons.start(_external("healthy", port, 'health_path = "/health"'), wait=False)
    d.wait_ready(timeout=60)
    assert d.replicas("healthy")[0]["state"] == "READY"
    assert _chat(d, "healthy")["choices"]


def test_a_replica_stuck_starting_says_why_in_status_and_log(daemons, external_engine):
    # Every generation answers 500: the replica cannot become ready, and must say so.
    port = external_engine("broken", "--fail-status", "500", "--fail-from", "0")
    d = daemons.start(_external("broken", port), wait=False)

    def said_why():
        try:
            [replica] = d.replicas("broken")
        except Exception:
            return None
        return replica if replica["state"] == "STARTING" and replica["last_error"] else None

    replica = wait_until(said_why, 60, what="the stuck replica to say why")
    assert "not ready after" in replica["last_error"] and "answered 500" in replica["last_error"]
    wait_until(lambda: "still STARTING after" in d.log_text(), 30, what="the log line")


@pytest.mark.parametrize("path", ["health", "/a b", "/../admin", "/h?x=1", "http://x/health"])
def test_a_health_path_that_is_not_a_url_path_is_refused(path):
    with pytest.raises(ConfigError, match=r"models\[0\]\.health_path"):
        parse_config(_external("x", 9, f'health_path = "{path}"'))


def test_a_health_path_on_another_engine_is_refused():
    with pytest.raises(ConfigError, match="only an openai engine has one"):
        parse_config('[[models]]\nname = "x"\nsource = "builtin:x"\nhealth_path = "/health"\n')
