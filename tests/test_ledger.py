"""Every token accounted, nothing learned across tenants (issue 14), through the
real daemon with fake-engine replicas: budgets reserved and settled, request
validation of what the appliance acts on, binding tags, unary cancellation, the
prompt-cache oracle across keys, and accounting that survives SIGKILL and SIGTERM."""

from __future__ import annotations

import json
import math
import random
import signal
import sqlite3
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from .conftest import DaemonFactory, engine_client, fake_model, wait_until
from .test_keys import keys_cli

CHAT = {"messages": [{"role": "user", "content": "hi"}]}

MODELS = (fake_model("fake", "--chunks", "3")
          + fake_model("slow", "--chunks", "50", "--chunk-delay", "0.05")
          + fake_model("long", "--chunks", "50")
          + fake_model("sleepy", "--latency", "30", "--latency-from", "2")
          + fake_model("usageless", "--chunks", "6", "--no-usage")
          + fake_model("cachey", "--cache-report", "--chunks", "2")
          + fake_model("brief", "--chunks", "50", extra="default_max_tokens = 7"))
ROUTES = ('[[routes]]\nname = "claims"\nmodel = "assistant"\ntag = "claims"\ntarget = "fake"\n\n'
          '[[routes]]\nname = "ops"\nmodel = "assistant"\ntag = "ops"\ntarget = "fake"\n\n'
          '[[routes]]\nname = "general"\nmodel = "assistant"\ntarget = "fake"\nregulated = false\n\n')


@pytest.fixture(scope="module")
def ledger(tmp_path_factory):
    factory = DaemonFactory(tmp_path_factory.mktemp("ledger"))
    daemon = factory.start(MODELS, extra="[keys]\nrequired = true\n\n[queue]\nkeepalive_s = 0\n\n" + ROUTES)
    yield daemon
    factory.cleanup()


def db_of(daemon) -> Path:
    return Path(daemon.config.read_text().split('state_dir = "')[1].split('"')[0]) / "appliance.db"


def query(daemon, sql: str, *args):
    with sqlite3.connect(db_of(daemon)) as conn:
        return conn.execute(sql, args).fetchall()


def charged(daemon, token: str) -> int:
    rows = query(daemon, "SELECT coalesce(sum(tokens), 0) FROM usage_ledger WHERE key_id = ?", token.split("-")[1])
    return rows[0][0]


def auth(token: str, **extra) -> dict:
    return {"Authorization": f"Bearer {token}", "Content-Type": "application/json", **extra}


def chat(daemon, token: str, body: dict, stream: bool = False, timeout: float = 30, **headers):
    """(status, answer text, events) of one request, sent as compact JSON."""
    payload = json.dumps({**CHAT, **body, **({"stream": True} if stream else {})}).encode()
    with httpx.Client(base_url=daemon.url, timeout=timeout) as c:
        if not stream:
            r = c.post("/v1/chat/completions", content=payload, headers=auth(token, **headers))
            return r.status_code, r.text, []
        with c.stream("POST", "/v1/chat/completions", content=payload, headers=auth(token, **headers)) as r:
            text = r.read().decode()
        return r.status_code, text, [line[6:] for line in text.splitlines() if line.startswith("data: ")]


def engine_stats(daemon, model: str) -> dict:
    with engine_client(daemon.replicas(model)[0]) as engine:
        return engine.get("/fake/stats").json()


# --- request validation owns what the appliance acts on ----------------------------


@pytest.mark.parametrize("field, value", [
    ("stream_options", "x"), ("stream_options", []), ("stream_options", 1), ("stream_options", True),
    ("stream_options", {"include_usage": "yes"}), ("n_predict", "lots"), ("n_predict", -3),
    ("cache_salt", 5), ("cache_salt", ""), ("max_completion_tokens", "many"), ("n", 1.5)])
def test_a_wrong_type_for_a_field_the_appliance_acts_on_is_a_400_naming_it(ledger, field, value):
    # Regression: "stream_options": "x" skipped the usage injection, and the stream went uncharged.
    token = keys_cli(ledger, "create", "--name", f"strict-{field}", "--budget-tokens", "200")
    status, text, _ = chat(ledger, token, {"model": "fake", field: value}, stream=True)
    assert status == 400, text
    assert json.loads(text)["error"]["param"].split(".")[0] == field
    assert charged(ledger, token) == 0


def test_other_stream_options_pass_through_with_the_usage_request(ledger):
    token = keys_cli(ledger, "create", "--name", "options")
    status, _, events = chat(ledger, token, {"model": "fake", "stream_options": {"continuous_usage_stats": True}},
                             stream=True)
    assert status == 200 and events[-1] == "[DONE]" and all('"usage"' not in e for e in events)
    assert engine_stats(ledger, "fake")["last_body"]["stream_options"] == {"continuous_usage_stats": True,
                                                                           "include_usage": True}


# --- reserve, then settle ------------------------------------------------------------


def test_a_concurrent_burst_never_spends_more_than_the_budget(ledger):
    # Regression: the budget was only checked at admission, so 12 concurrent requests on a
    # small key were all served (12 x 55 tokens on a 300-token key). Each request now
    # holds its prompt's bound (one token per byte of body) plus its completion cap while
    # it runs, and the fake engine's real usage (5 prompt tokens, at most max_tokens or,
    # without one, the cap the appliance set) never exceeds that: the settle error of a
    # request is 0, so the key is charged at most its budget, exactly.
    budget = 300
    token = keys_cli(ledger, "create", "--name", "burst", "--budget-tokens", str(budget))
    bodies = [{"model": "slow", "max_tokens": 50}, {"model": "slow"}] * 6

    def one(i: int):
        return chat(ledger, token, bodies[i], stream=i % 3 == 0)

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(one, range(12)))
    served = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] == 429]
    assert served and refused and len(served) + len(refused) == 12, [r[:2] for r in results]
    assert {json.loads(r[1])["error"]["code"] for r in refused} == {"budget_exceeded"}
    spent = charged(ledger, token)
    assert 0 < spent <= budget
    usage = {u["key"]: u for u in ledger.status()["usage"]}
    assert usage["burst"]["tokens"] == spent  # the ledger on disk and the daemon agree


def test_a_request_that_can_never_fit_the_budget_is_a_400_the_sdks_do_not_retry(ledger):
    """A request costing more than the key's whole budget was a 429 with Retry-After until
    the period's end: no reset would ever admit it, and the SDKs retry a 429 on their own.
    It is a 400 naming the budget, the request's cost and the fix, with no Retry-After."""
    token = keys_cli(ledger, "create", "--name", "big-ask", "--budget-tokens", "500", "--budget-period", "hour")
    with httpx.Client(base_url=ledger.url) as c:
        resp = c.post("/v1/chat/completions", json={**CHAT, "model": "fake", "max_tokens": 1000},
                      headers=auth(token))
    error = resp.json()["error"]
    assert resp.status_code == 400 and "retry-after" not in resp.headers, resp.headers
    assert error["type"] == "invalid_request_error" and error["code"] == "request_exceeds_budget"
    assert "500 tokens per hour" in error["message"] and "max_tokens" in error["message"], error
    sdk = openai.OpenAI(base_url=f"{ledger.url}/v1", api_key=token, max_retries=2)
    with pytest.raises(openai.BadRequestError):
        sdk.chat.completions.create(model="fake", messages=CHAT["messages"], max_tokens=1000)
    huge = chat(ledger, token, {"model": "fake", "max_tokens": 1, "messages": [{"role": "user", "content": "x" * 600}]})
    assert huge[0] == 400 and "shorter" in json.loads(huge[1])["error"]["message"]
    assert chat(ledger, token, {"model": "fake", "max_tokens": 10})[0] == 200


def test_a_request_larger_than_the_budget_left_is_refused_until_the_period_ends(ledger):
    token = keys_cli(ledger, "create", "--name", "spent", "--budget-tokens", "500", "--budget-period", "hour")
    # It holds its prompt's bound (85 bytes) + 410 of 500, and uses 5 + 3: 492 left, 495 asked.
    assert chat(ledger, token, {"model": "fake", "max_tokens": 410})[0] == 200
    status, text, _ = chat(ledger, token, {"model": "fake", "max_tokens": 410})
    assert status == 429 and json.loads(text)["error"]["code"] == "budget_exceeded", text
    with httpx.Client(base_url=ledger.url) as c:
        resp = c.post("/v1/chat/completions", content=json.dumps({**CHAT, "model": "fake", "max_tokens": 410}),
                      headers=auth(token))
    assert resp.status_code == 429 and 0 < int(resp.headers["retry-after"]) <= 3600


def test_n_choices_are_reserved_for_and_charged_each(ledger):
    # The reservation holds max_tokens for every choice: room for one answer is not room for two.
    ask = {"model": "fake", "max_tokens": 100}
    payload = json.dumps({**CHAT, **ask, "n": 2}).encode()
    token = keys_cli(ledger, "create", "--name", "two-ways", "--budget-tokens", str(len(payload) + 150))
    status, text, _ = chat(ledger, token, {**ask, "n": 2})  # more than the whole budget: never fits
    assert status == 400 and json.loads(text)["error"]["code"] == "request_exceeds_budget", text
    assert chat(ledger, token, {**ask, "n": 1})[0] == 200
    # What n choices cost is charged: the engine's usage, or each choice's relayed events.
    rich = keys_cli(ledger, "create", "--name", "n-choices", "--budget-tokens", "100000")
    status, text, _ = chat(ledger, rich, {"model": "fake", "n": 2})
    answer = json.loads(text)
    assert status == 200 and [c["index"] for c in answer["choices"]] == [0, 1], text
    assert answer["usage"]["completion_tokens"] == 6 and charged(ledger, rich) == 5 + 6
    status, _, events = chat(ledger, rich, {"model": "fake", "n": 3, "stream_options": {"include_usage": True}},
                             stream=True)
    chunks = [json.loads(e) for e in events[:-1]]
    assert status == 200 and sorted({c["choices"][0]["index"] for c in chunks if c["choices"]}) == [0, 1, 2]
    assert chunks[-1]["usage"]["completion_tokens"] == 9 and charged(ledger, rich) == 11 + 5 + 9
    status, _, events = chat(ledger, rich, {"model": "usageless", "n": 2}, stream=True)
    body = json.dumps({**CHAT, "model": "usageless", "n": 2, "stream": True}).encode()
    assert status == 200 and len(events) == 2 * 6 + 1
    assert charged(ledger, rich) == 25 + math.ceil(len(body) / 4) + 2 * 6  # metering.prompt_guess


def test_a_request_without_max_tokens_is_capped_at_what_the_budget_leaves(ledger):
    body = json.dumps({**CHAT, "model": "long"}).encode()
    token = keys_cli(ledger, "create", "--name", "capped", "--budget-tokens", str(len(body) + 20))
    status, text, _ = chat(ledger, token, {"model": "long"})
    assert status == 200, text
    assert engine_stats(ledger, "long")["last_body"]["max_tokens"] == 20
    assert json.loads(text)["usage"]["completion_tokens"] == 20  # not the 50 it would have said
    assert charged(ledger, token) == 5 + 20


def test_a_models_default_max_tokens_caps_a_budgeted_request_without_one(ledger):
    token = keys_cli(ledger, "create", "--name", "brief", "--budget-tokens", "100000")
    status, text, _ = chat(ledger, token, {"model": "brief"})
    assert status == 200 and json.loads(text)["usage"]["completion_tokens"] == 7, text
    free = keys_cli(ledger, "create", "--name", "unbudgeted")  # no budget: nothing to reserve for
    status, text, _ = chat(ledger, free, {"model": "brief"})
    assert status == 200 and json.loads(text)["usage"]["completion_tokens"] == 50, text


def test_llama_cpps_n_predict_cannot_outrun_the_reservation(ledger):
    # llama-server reads n_predict before max_tokens, and -1 generates to the context's end.
    token = keys_cli(ledger, "create", "--name", "n-predict", "--budget-tokens", "100000")
    status, text, _ = chat(ledger, token, {"model": "long", "max_tokens": 2, "n_predict": -1})
    assert status == 200 and json.loads(text)["usage"]["completion_tokens"] == 2, text
    assert engine_stats(ledger, "long")["last_body"]["n_predict"] == 2


def test_a_stream_whose_engine_reports_no_usage_is_charged_what_was_relayed(ledger):
    # Regression: an engine that sends no usage event left the stream uncharged.
    token = keys_cli(ledger, "create", "--name", "no-usage", "--budget-tokens", "100000")
    status, _, events = chat(ledger, token, {"model": "usageless"}, stream=True)
    assert status == 200 and len(events) == 7 and events[-1] == "[DONE]"
    body = json.dumps({**CHAT, "model": "usageless", "stream": True}).encode()
    prompt = math.ceil(len(body) / 4)  # metering.prompt_guess
    assert charged(ledger, token) == prompt + 6
    [(p, c)] = query(ledger, "SELECT prompt_tokens, completion_tokens FROM audit WHERE key_id = ?",
                     token.split("-")[1])
    assert (p, c) == (prompt, 6)


def test_a_client_that_leaves_a_stream_is_charged_what_was_relayed(ledger):
    # Regression: a client that disconnected before the final usage event was charged nothing.
    token = keys_cli(ledger, "create", "--name", "leaver", "--budget-tokens", "100000")
    key_id = token.split("-")[1]
    cancelled = engine_stats(ledger, "slow")["streams_cancelled"]
    payload = json.dumps({**CHAT, "model": "slow", "stream": True}).encode()
    seen = 0
    with httpx.Client(base_url=ledger.url, timeout=30) as c:
        with c.stream("POST", "/v1/chat/completions", content=payload, headers=auth(token)) as r:
            for line in r.iter_lines():
                seen += line.startswith("data: {")
                if seen == 5:
                    break
    rows = wait_until(lambda: query(ledger, "SELECT status, completion_tokens FROM audit WHERE key_id = ?", key_id),
                      10, what="the audit row")
    [(status, completion)] = rows
    assert status == 499 and 5 <= completion < 50
    assert charged(ledger, token) >= 5 + completion - 5  # its prompt's guess plus what was relayed
    wait_until(lambda: engine_stats(ledger, "slow")["streams_cancelled"] > cancelled, 10,
               what="the engine to stop generating")


def test_a_unary_client_that_leaves_frees_the_engine_and_is_audited_499(ledger):
    # Regression: an abandoned unary request kept the engine decoding for nobody.
    token = keys_cli(ledger, "create", "--name", "impatient", "--budget-tokens", "100000")
    before = engine_stats(ledger, "sleepy")
    rid = uuid.uuid4().hex
    with pytest.raises(httpx.ReadTimeout):
        chat(ledger, token, {"model": "sleepy"}, timeout=1, **{"X-Request-Id": rid})
    wait_until(lambda: engine_stats(ledger, "sleepy")["unary_cancelled"] == before["unary_cancelled"] + 1, 10,
               what="the engine's cancel counter")
    [(status, prompt)] = wait_until(lambda: query(ledger, "SELECT status, prompt_tokens FROM audit "
                                                          "WHERE request_id = ?", rid), 10, what="the row")
    assert status == 499 and prompt > 0
    assert engine_stats(ledger, "sleepy")["unary_completed"] == before["unary_completed"]
    assert ledger.replicas("sleepy")[0]["inflight"] == 0


# --- binding tags ----------------------------------------------------------------------


def test_a_keys_tag_binds_it_and_an_unknown_tag_is_a_400(ledger):
    # Regression: a key tagged "claims" sent `x-appliance-tag: nonexistent`, fell through to
    # the permitted catch-all route, and its prompt could reach a commercial provider.
    token = keys_cli(ledger, "create", "--name", "claims-team", "--tag", "claims")
    key_id = token.split("-")[1]
    assert chat(ledger, token, {"model": "assistant"})[0] == 200
    assert chat(ledger, token, {"model": "assistant"}, **{"x-appliance-tag": "claims"})[0] == 200
    status, text, _ = chat(ledger, token, {"model": "assistant"}, **{"x-appliance-tag": "nonexistent"})
    assert status == 400 and json.loads(text)["error"]["code"] == "unknown_tag"
    status, text, _ = chat(ledger, token, {"model": "assistant"}, **{"x-appliance-tag": "ops"})
    assert status == 403 and json.loads(text)["error"]["code"] == "tag_not_allowed"
    routes = wait_until(lambda: query(ledger, "SELECT route, status FROM audit WHERE key_id = ? ORDER BY id",
                                      key_id) if len(query(ledger, "SELECT 1 FROM audit WHERE key_id = ?",
                                                           key_id)) == 4 else None, 10, what="4 rows")
    assert routes == [("claims", 200), ("claims", 200), (None, 400), (None, 403)]
    # A key with no tag of its own picks a route by the header, as before.
    free = keys_cli(ledger, "create", "--name", "free")
    assert chat(ledger, free, {"model": "assistant"}, **{"x-appliance-tag": "ops"})[0] == 200


@pytest.mark.parametrize("flag, value, names", [("--route", "nope", "claims, ops, general"),
                                                ("--tag", "nope", "claims, ops")])
def test_keys_create_refuses_a_route_or_tag_the_config_lacks(ledger, flag, value, names):
    import subprocess

    from .conftest import PY, ROOT

    result = subprocess.run([PY, "-m", "appliance.cli", "keys", "create", "--name", "x", flag, value,
                             "--config", str(ledger.config)], capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert result.returncode != 0 and not result.stdout
    assert repr(value) in result.stderr and names in result.stderr


# --- nothing learned across tenants --------------------------------------------------

SECRET = "the vault code is 8 3 5 1 and nobody else may know it"
GUESSES = ["the vault code is 1", "the vault code is 8 3", "the vault code is 8 3 5 1"]
REVEALING = ("cached_tokens", "timings", "cache_n", "prompt_n")


def _oracle(daemon, victim: str, attacker: str) -> list[str]:
    """Key A sends a secret; key B sends its prefix plus guesses, unary and streamed:
    everything B gets back."""
    assert chat(daemon, victim, {"model": "cachey", "messages": [{"role": "user", "content": SECRET}]})[0] == 200
    seen = []
    for guess in GUESSES:
        body = {"model": "cachey", "messages": [{"role": "user", "content": guess}]}
        status, text, _ = chat(daemon, attacker, body)
        assert status == 200, text
        seen.append(text)
        status, text, _ = chat(daemon, attacker, {**body, "stream_options": {"include_usage": True}}, stream=True)
        assert status == 200 and '"usage"' in text, text
        seen.append(text)
    return seen


def test_a_second_key_sees_no_cache_signal_from_the_first(ledger):
    # Regression: answers were relayed byte for byte, cached_tokens and llama-server's timings
    # included, and one key read another's secret token by token.
    victim = keys_cli(ledger, "create", "--name", "victim")
    attacker = keys_cli(ledger, "create", "--name", "attacker")
    for answer in _oracle(ledger, victim, attacker):
        assert not any(name in answer for name in REVEALING), answer
    assert engine_stats(ledger, "cachey")["last_cached"] > 0  # the engine did see the shared prefix


def test_shared_isolation_relays_the_cache_counters(daemons):
    # The same sequence on a single-team box (tenant_isolation = "shared") shows what the
    # default keeps from a tenant: the guesses' cached prefix grows with every right word.
    d = daemons.start(fake_model("cachey", "--cache-report", "--chunks", "2"),
                      extra='[keys]\nrequired = true\n\n[routing]\ntenant_isolation = "shared"\n')
    victim, attacker = (keys_cli(d, "create", "--name", n) for n in ("a", "b"))
    answers = _oracle(d, victim, attacker)
    cached = [json.loads(a)["usage"]["prompt_tokens_details"]["cached_tokens"] for a in answers[::2]]
    assert cached[0] < cached[1] < cached[2] and '"timings"' in answers[0]


def test_vllm_gets_a_cache_salt_per_key_that_no_client_can_name(daemons, tmp_path):
    from .conftest import FAKE_ENGINE, PY
    from .test_gpu_supervision import DATA, make_model

    model = make_model(tmp_path, "gpu-model", 14)
    fake = f'["{PY}", "{FAKE_ENGINE}", "--as-engine", "vllm"]'
    d = daemons.start(f'[[models]]\nname = "vl"\nserver = "vllm"\nsource = "{model}"\nkv_cache_tokens = 32768\n'
                      'args = ["--cache-report"]\n',
                      extra=f'[keys]\nrequired = true\n\n[gpu]\ninventory = "{DATA / "inventory-8xh100.toml"}"\n'
                            f"[engines.vllm]\ncommand = {fake}\noverhead_gib = 2\n")
    a, b = (keys_cli(d, "create", "--name", n) for n in ("a", "b"))
    body = {"model": "vl", "messages": [{"role": "user", "content": SECRET}]}

    def salt_and_cached(token: str, **extra) -> tuple[str, int]:
        status, text, _ = chat(d, token, {**body, **extra})
        assert status == 200 and "cached_tokens" not in text, text
        stats = engine_stats(d, "vl")
        return stats["last_body"]["cache_salt"], stats["last_cached"]

    salt_a, _ = salt_and_cached(a)
    assert salt_and_cached(a) == (salt_a, len(SECRET.split()))  # a key's own cache still works
    salt_b, cached = salt_and_cached(b)
    assert cached == 0 and salt_b != salt_a  # never another key's
    # A client's own cache_salt narrows its key's partition, and cannot join another's.
    salt_named, cached = salt_and_cached(b, cache_salt=salt_a)
    assert cached == 0 and salt_named not in (salt_a, salt_b)


# --- accounting that survives a crash and a shutdown ---------------------------------


def test_sigkill_right_after_answers_leaves_every_row_and_charge(daemons):
    # Regression: rows and charges waited in memory for the next flush (1 s): 25 answered
    # keyed requests, then SIGKILL, left 0 rows and 0 tokens charged.
    d = daemons.start(fake_model("fake", "--chunks", "3"), extra="[keys]\nrequired = true\n")
    token = keys_cli(d, "create", "--name", "crashy")
    n = 25
    for i in range(n):
        status, _, _ = chat(d, token, {"model": "fake", "max_tokens": 3}, stream=i % 2 == 1)
        assert status == 200
    d.terminate(signal.SIGKILL)
    assert query(d, "SELECT count(*), sum(prompt_tokens + completion_tokens) FROM audit WHERE key_id = ?",
                 token.split("-")[1]) == [(n, n * 8)]
    assert charged(d, token) == n * 8


def test_sigterm_under_load_loses_no_answered_requests_row(daemons):
    # Regression: SIGTERM at a random moment of a load lost audit rows (the flush in its
    # thread was cancelled, its rows not put back, the connection closed under it).
    rounds = 4
    for r in range(rounds):
        d = daemons.start(fake_model("fake", "--chunks", "3", "--latency", "0.005"),
                          extra="[audit]\nflush_interval_s = 0.3\n", port=None)
        keyed_token = keys_cli(d, "create", "--name", f"load-{r}")
        answered: list[str] = []
        stop = threading.Event()

        def client(i: int) -> None:
            with httpx.Client(base_url=d.url, timeout=10) as c:
                while not stop.is_set():
                    rid = uuid.uuid4().hex
                    headers = {"X-Request-Id": rid, **({"Authorization": f"Bearer {keyed_token}"} if i % 2 else {})}
                    body = {**CHAT, "model": "fake", "max_tokens": 3, "stream": i % 4 >= 2}
                    try:
                        resp = c.post("/v1/chat/completions", json=body, headers=headers)
                    except httpx.ConnectError:
                        return  # the daemon stopped listening
                    except httpx.HTTPError:
                        continue  # cut by the shutdown: not an answer
                    if resp.status_code == 200 and (not body["stream"] or resp.text.endswith("[DONE]\n\n")):
                        answered.append(rid)
                    elif resp.status_code == 503:
                        return

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(8)]
        for t in threads:
            t.start()
        wait_until(lambda: len(answered) >= 20, 60, what="the load to run")
        threading.Event().wait(random.uniform(0, 1.0))  # then a random moment of it
        assert d.terminate(signal.SIGTERM) == 0
        stop.set()
        for t in threads:
            t.join(15)
        logged = {row[0] for row in query(d, "SELECT request_id FROM audit WHERE status = 200")}
        missing = set(answered) - logged
        assert not missing, f"round {r}: {len(missing)} of {len(answered)} answered requests have no row"
        assert "stopped" in d.log_text()
