"""An engine's (or a provider's) answer is read into memory only up to a bound: a whole
answer over upstream.max_answer_bytes is a 502 in the API's envelope naming the cap,
its connection closed; an error answer's body is kept to its first 64 KiB. Fake engines
sending more, the real daemon, alone and with workers."""

from __future__ import annotations

import json

import httpx
import pytest

from .conftest import DaemonFactory, fake_model, wait_until
from .test_keys import keys_cli
from .test_ledger import query

CAP = 1024 * 1024
MODELS = (fake_model("bulky", "--pad-bytes", str(3 * CAP))
          + fake_model("fits", "--pad-bytes", str(CAP // 2))
          + fake_model("wordy", "--fail-status", "500", "--fail-from", "2", "--pad-bytes", str(4 * CAP)))


@pytest.fixture(scope="module", params=[1, 2], ids=["alone", "workers"])
def capped(request, tmp_path_factory):
    factory = DaemonFactory(tmp_path_factory.mktemp(f"cap{request.param}"))
    daemon = factory.start(MODELS, extra=f"[keys]\nrequired = true\n\n[upstream]\nmax_answer_bytes = {CAP}\n",
                           server=f"workers = {request.param}")
    yield daemon
    factory.cleanup()


def ask(daemon, token: str, model: str, stream: bool = False) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    return httpx.post(f"{daemon.url}/v1/chat/completions", content=json.dumps(body), timeout=60,
                      headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})


def test_a_whole_answer_over_the_cap_is_a_502_naming_it_and_its_generation_is_charged(capped):
    # Regression: a provider's or an engine's whole answer was read into memory whatever its size.
    token = keys_cli(capped, "create", "--name", "bulk")
    key_id = token.split("-")[1]
    resp = ask(capped, token, "bulky")
    assert resp.status_code == 502
    error = resp.json()["error"]
    assert error["code"] == "answer_too_large" and f"upstream.max_answer_bytes ({CAP} bytes)" in error["message"]
    [(status, prompt, completion)] = wait_until(
        lambda: query(capped, "SELECT status, prompt_tokens, completion_tokens FROM audit WHERE key_id = ?", key_id),
        30, what="the audit row")
    # The engine made the answer: charged (its cap, or a token per 4 bytes it had at least),
    # not free generation for a key that asks for more than the cap again and again.
    assert status == 502 and prompt > 0 and completion >= 1
    assert wait_until(lambda: capped.replicas("bulky")[0]["inflight"] == 0, 30, what="the slot freed")
    assert ask(capped, token, "fits").status_code == 200  # under the cap: whole


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_an_engines_error_body_of_megabytes_is_kept_to_its_start(capped, stream):
    # Regression: an engine's error answer was read whole, and its message (megabytes) sent on.
    token = keys_cli(capped, "create", "--name", f"wordy-{stream}")
    resp = ask(capped, token, "wordy", stream=stream)
    assert resp.status_code == 502
    message = resp.json()["error"]["message"]
    assert "fake failure" in message and len(resp.content) < 64 * 1024
