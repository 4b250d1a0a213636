"""API keys, limits, usage and audit through the real daemon; the fail-closed
guard against a real recording provider."""

from __future__ import annotations

import json
import socket
import sqlite3
import subprocess
from pathlib import Path

import aiohttp
import anthropic
import httpx
import msgspec
import openai
import pytest

from appliance.access.keys import ApiKey
from appliance.api.metrics import Metrics
from appliance.config import RouteConfig, parse_config
from appliance.errors import NoCapacity, RegulatedFailClosed
from appliance.gateway.providers import Breaker, load_providers
from appliance.gateway.capabilities import ENDPOINTS
from appliance.gateway.request import ProxyRequest
from appliance.gateway.routing import Routes, forward

from .conftest import PY, ROOT, fake_model, wait_until
from .test_routes import Recorder, provider, recorder  # noqa: F401  (the module fixture)

CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}


def keys_cli(daemon, *args: str) -> str:
    result = subprocess.run([PY, "-m", "appliance.cli", "keys", *args, "--config", str(daemon.config)],
                            capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    from .conftest import DaemonFactory

    factory = DaemonFactory(tmp_path_factory.mktemp("keys"))
    daemon = factory.start(fake_model("fake", "--chunks", "3"), server="",
                           extra="[keys]\nrequired = true\n\n[audit]\nflush_interval_s = 0.2\n\n"
                                 '[[routes]]\nname = "r1"\nmodel = "m1"\ntarget = "fake"\n\n'
                                 '[[routes]]\nname = "r2"\nmodel = "m2"\ntarget = "fake"\n')
    yield daemon
    factory.cleanup()


def post(daemon, key: str | None, body=CHAT, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with daemon.client() as c:
        return c.post("/v1/chat/completions", json=body, headers=headers, **kw)


def test_a_missing_or_wrong_key_gets_401_in_the_envelope(keyed):
    assert post(keyed, None).status_code == 401
    token = keys_cli(keyed, "create", "--name", "app")
    wrong = token[:-4] + ("aaaa" if not token.endswith("aaaa") else "bbbb")
    for resp in (post(keyed, None), post(keyed, wrong), post(keyed, "sk-something-else")):
        assert resp.status_code == 401
        assert resp.json()["error"]["type"] == "authentication_error"
    assert post(keyed, token).status_code == 200


def test_a_401_challenges_for_a_bearer_token_and_says_how_anthropics_sdk_sends_one(keyed):
    # Regression: no WWW-Authenticate (RFC 6750), and a Messages client was told only of
    # Authorization, which its SDK does not send (x-api-key).
    missing, wrong = post(keyed, None), post(keyed, "ak-nope-nope")
    assert missing.headers["www-authenticate"] == 'Bearer realm="appliance"'
    assert wrong.headers["www-authenticate"] == 'Bearer realm="appliance", error="invalid_token"'
    with keyed.client() as c:
        models = c.get("/v1/models")
        said = {"model": "fake", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}
        messages = c.post("/v1/messages", json=said)
    assert models.status_code == 401 and models.headers["www-authenticate"].startswith("Bearer")
    assert "x-api-key" not in missing.json()["error"]["message"]
    assert messages.status_code == 401 and messages.headers["www-authenticate"].startswith("Bearer")
    assert "x-api-key" in messages.json()["error"]["message"], messages.json()
    claude = anthropic.Anthropic(base_url=keyed.url, api_key="ak-nope-nope", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        claude.messages.create(**said)


def test_a_key_is_shown_once_and_stored_hashed(keyed):
    token = keys_cli(keyed, "create", "--name", "hashed")
    listing = keys_cli(keyed, "ls", "--json")
    assert token.split("-", 2)[2] not in listing
    db = sqlite3.connect(Path(keyed.config.read_text().split('state_dir = "')[1].split('"')[0]) / "appliance.db")
    assert token.split("-", 2)[2] not in json.dumps(db.execute("SELECT * FROM api_keys").fetchall())


@pytest.mark.parametrize("name", ["\x1b]0;owned\x07\x1b[2J", "line\nbreak", "", " "])
def test_a_key_name_a_terminal_would_obey_is_refused_with_a_clear_error(keyed, name):
    result = subprocess.run([PY, "-m", "appliance.cli", "keys", "create", "--name", name,
                             "--config", str(keyed.config)], capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert result.returncode == 2 and result.stdout == ""
    assert "'--name'" in result.stderr and "printable" in result.stderr and "Traceback" not in result.stderr
    assert all(k["name"] != name for k in json.loads(keys_cli(keyed, "ls", "--json")))


def test_a_revoked_key_is_refused(keyed):
    token = keys_cli(keyed, "create", "--name", "leaving")
    assert post(keyed, token).status_code == 200
    keys_cli(keyed, "revoke", token.split("-")[1])
    wait_until(lambda: post(keyed, token).status_code == 401, 10, what="the revocation to apply")


def test_keys_set_changes_a_keys_budget_in_place_and_ls_shows_it_in_tokens_with_what_is_used(keyed):
    """A key's budget changed without a new key (its clients keep theirs): too small for a
    request, it is raised with `keys set` and the same key is served within a second;
    `keys ls` says the budget in tokens per period, and the tokens used of it, never the secret."""
    token = keys_cli(keyed, "create", "--name", "grower", "--budget-tokens", "10")
    key_id = token.split("-")[1]
    assert post(keyed, token).json()["error"]["code"] == "request_exceeds_budget"
    said = keys_cli(keyed, "set", key_id, "--budget-tokens", "100000")
    assert said == f"key {key_id} (grower): rpm -, budget 100,000 tokens/day (was rpm -, budget 10 tokens/day)"
    wait_until(lambda: post(keyed, token).status_code == 200, 10, what="the new budget to apply")
    # The answer's usage (5 prompt + 3 completion) settled before it ended: counted at once.
    row = next(line for line in keys_cli(keyed, "ls").splitlines() if line.startswith(key_id))
    assert "100,000 tokens/day" in row and "8 (0%)" in row and token.split("-", 2)[2] not in row  # the secret (it may hold a "-")
    listed = next(k for k in json.loads(keys_cli(keyed, "ls", "--json")) if k["id"] == key_id)
    assert listed["budget_tokens"] == 100000 and listed["budget_used_tokens"] == 8 and "key" not in listed


def test_keys_set_refuses_a_revoked_or_unknown_key_and_an_empty_change(keyed):
    token = keys_cli(keyed, "create", "--name", "gone")
    key_id = token.split("-")[1]
    keys_cli(keyed, "revoke", key_id)

    def run(*args):
        return subprocess.run([PY, "-m", "appliance.cli", "keys", "set", *args, "--config", str(keyed.config)],
                              capture_output=True, text=True, cwd=ROOT, timeout=30)

    revoked = run(key_id, "--rpm", "5")
    assert revoked.returncode == 1 and f"no active key with id {key_id!r}" in revoked.stderr
    empty = run(key_id)
    assert empty.returncode == 2 and "nothing to change" in empty.stderr


def test_a_key_over_its_rate_gets_429_with_retry_after(keyed):
    token = keys_cli(keyed, "create", "--name", "chatty", "--rpm", "2")
    assert [post(keyed, token).status_code for _ in range(2)] == [200, 200]
    resp = post(keyed, token)
    assert resp.status_code == 429 and int(resp.headers["retry-after"]) >= 1
    assert resp.json()["error"]["code"] == "rate_limited"


def test_a_key_over_its_token_budget_gets_429_until_the_period_ends(keyed):
    # A request holds its prompt's bound (one token per byte of body) plus max_tokens while
    # it runs; the fake engine's usage is 5 prompt + 3 completion tokens, a stream's too.
    streamed = json.dumps({**CHAT, "max_tokens": 3, "stream": True}).encode()
    token = keys_cli(keyed, "create", "--name", "thrifty", "--budget-tokens", str(len(streamed) + 3 + 15),
                     "--budget-period", "day")
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    assert post(keyed, token, {**CHAT, "max_tokens": 3}).status_code == 200
    with keyed.client() as c, c.stream("POST", "/v1/chat/completions", content=streamed, headers=headers) as r:
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    # The client did not ask for usage: the extra usage-only event was kept from it...
    assert all('"usage"' not in e for e in events) and events[-1] == "data: [DONE]"
    with keyed.client() as c:  # ...but it was counted: 16 used, one token short for this one
        resp = c.post("/v1/chat/completions", content=streamed, headers=headers)
    assert resp.status_code == 429 and resp.json()["error"]["code"] == "budget_exceeded"
    assert 0 < int(resp.headers["retry-after"]) <= 86400


def test_a_stream_that_asks_for_usage_gets_it(keyed):
    token = keys_cli(keyed, "create", "--name", "meter")
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    with keyed.client() as c, c.stream("POST", "/v1/chat/completions", json=body,
                                      headers={"Authorization": f"Bearer {token}"}) as r:
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert len(events) >= 2, (r.status_code, events)
    assert json.loads(events[-2][6:])["usage"]["completion_tokens"] == 3
    usage = {u["key"]: u for u in keyed.status()["usage"]}
    assert usage["meter"]["requests"] == 1 and usage["meter"]["completion_tokens"] == 3


def test_a_key_may_use_only_its_routes_and_its_tag_picks_the_route(keyed):
    token = keys_cli(keyed, "create", "--name", "scoped", "--route", "r1")
    assert post(keyed, token, {**CHAT, "model": "m1"}).status_code == 200
    denied = post(keyed, token, {**CHAT, "model": "m2"})
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "route_not_allowed"
    assert post(keyed, token, {**CHAT, "model": "fake"}).status_code == 403


def test_a_key_lists_only_the_models_its_routes_let_it_call(keyed):
    """/v1/models listed every model to any key, and /v1/models/{id} described one the
    key's routes refuse: a key sees what it may call; any other is a 404 to it, in
    OpenAI's shape and Anthropic's, as a model not served is."""
    scoped = {"Authorization": f"Bearer {keys_cli(keyed, 'create', '--name', 'listed', '--route', 'r1')}"}
    anyone = {"Authorization": f"Bearer {keys_cli(keyed, 'create', '--name', 'lister')}"}
    anthropic_scoped = {**scoped, "anthropic-version": "2023-06-01"}
    with keyed.client() as c:
        assert [m["id"] for m in c.get("/v1/models", headers=anyone).json()["data"]] == ["fake", "m1", "m2"]
        assert c.get("/v1/models/fake", headers=anyone).status_code == 200
        assert [m["id"] for m in c.get("/v1/models", headers=scoped).json()["data"]] == ["m1"]
        assert [m["id"] for m in c.get("/v1/models", headers=anthropic_scoped).json()["data"]] == ["m1"]
        hidden = c.get("/v1/models/fake", headers=scoped)
        anthropic_hidden = c.get("/v1/models/fake", headers=anthropic_scoped)
    assert hidden.status_code == 404 and hidden.json()["error"]["code"] == "model_not_found"
    assert anthropic_hidden.status_code == 404 and anthropic_hidden.json()["type"] == "error"


def test_readyz_names_to_a_key_only_the_models_it_may_call(keyed):
    scoped = {"Authorization": f"Bearer {keys_cli(keyed, 'create', '--name', 'ready-scoped', '--route', 'r1')}"}
    anyone = {"Authorization": f"Bearer {keys_cli(keyed, 'create', '--name', 'ready-any')}"}
    with keyed.client() as c:
        assert c.get("/readyz", headers=anyone).json()["models"] == {"fake": True, "m1": True, "m2": True}
        assert c.get("/readyz", headers=scoped).json()["models"] == {"m1": True}


def test_a_key_limited_to_routes_lists_and_reads_the_route_names_it_may_call(keyed):
    """A route's name for a model (m1, served by fake) was in /v1/models for nobody: a key
    limited to such routes saw an empty list, though it may call m1. The list names what
    a caller may call, in OpenAI's shape and Anthropic's, as /v1/models/{id} does."""
    token = keys_cli(keyed, "create", "--name", "route-lister", "--route", "r1")
    oai = openai.OpenAI(base_url=f"{keyed.url}/v1", api_key=token, max_retries=0)
    claude = anthropic.Anthropic(base_url=keyed.url, api_key=token, max_retries=0)
    assert [m.id for m in oai.models.list()] == ["m1"]
    assert oai.models.retrieve("m1").id == "m1"
    assert [m.id for m in claude.models.list()] == ["m1"]
    assert claude.models.retrieve("m1").id == "m1"
    assert oai.chat.completions.create(model="m1", messages=[{"role": "user", "content": "hi"}]).choices
    for name in ("fake", "m2"):  # not through its routes: unknown to it
        with pytest.raises(openai.NotFoundError):
            oai.models.retrieve(name)
        with pytest.raises(anthropic.NotFoundError):
            claude.models.retrieve(name)


def test_a_key_may_call_a_model_through_any_route_it_lists_under_a_tag_it_may_send():
    routes = Routes([RouteConfig("plain", "a", "a"), RouteConfig("gold", "b", "b", tag="gold"),
                     RouteConfig("other", "c", "c")])
    key = ApiKey("k", "k", "", routes=["plain", "gold"])
    assert [m for m in "abcd" if routes.allows(key, m)] == ["a", "b"]
    bound = ApiKey("k", "k", "", routes=["plain", "gold"], tag="silver")  # its tag binds it: no "gold" header
    assert [m for m in "abcd" if routes.allows(bound, m)] == ["a"]
    assert all(routes.allows(ApiKey("k", "k", ""), m) for m in "abcd")  # no routes: any


def test_every_request_gets_an_audit_row_without_text(keyed):
    token = keys_cli(keyed, "create", "--name", "audited")
    assert post(keyed, token, {**CHAT, "model": "m1"}).status_code == 200
    key_id = token.split("-")[1]
    db = Path(keyed.config.read_text().split('state_dir = "')[1].split('"')[0]) / "appliance.db"

    def row():
        with sqlite3.connect(db) as conn:
            return conn.execute("SELECT route, model, served_by, status, prompt_tokens, completion_tokens, "
                                "latency_ms, request_text, response_text FROM audit WHERE key_id = ?",
                                (key_id,)).fetchone()

    route, model, served_by, status, p, c, latency, req_text, resp_text = wait_until(row, 10, what="a row")
    assert (route, model, served_by, status, p, c) == ("r1", "m1", "fake#0", 200, 5, 3)
    assert latency > 0 and req_text is None and resp_text is None
    metrics = httpx.get(f"{keyed.url}/metrics", headers={"Authorization": f"Bearer {token}"}).text
    assert 'appliance_tokens_total{kind="prompt",model="m1"}' in metrics


def test_a_refused_credential_leaves_an_audit_row_on_every_surface_not_only_the_front_door(keyed):
    """401s on /v1/models, /v1/models/{id}, /metrics and /readyz, and the 403 for an admin
    token on /admin/*, wrote no row and no log line: a key-guessing client was invisible
    (6 guesses, 1 row). A request that sent no credential (a probe) leaves none."""
    token = keys_cli(keyed, "create", "--name", "guessed")
    guess = token[:-6] + "zzzzzz"
    db = Path(keyed.config.read_text().split('state_dir = "')[1].split('"')[0]) / "appliance.db"
    wanted = {"/v1/models": ("models", 401), "/v1/models/fake": ("models", 401), "/metrics": ("metrics", 401),
              "/admin/status": ("admin", 403), "/readyz": ("readyz", 401)}
    with keyed.client() as c:
        before = c.get("/readyz").status_code  # no credential: a probe, not a guess
        for path, (_, status) in wanted.items():
            answer = c.get(path, headers={"Authorization": f"Bearer {guess}"})
            assert answer.status_code == (200 if path == "/readyz" else status), (path, answer.text)
    assert before == 200

    def rows():
        with sqlite3.connect(db) as conn:
            found = conn.execute("SELECT endpoint, status, key_id, model FROM audit WHERE endpoint IN "
                                 "('models', 'metrics', 'admin', 'readyz') AND status IN (401, 403)").fetchall()
        return found if len(found) >= len(wanted) else None

    found = wait_until(rows, 10, what="a row per refused credential")
    assert sorted(found) == sorted((e, s, None, "") for e, s in wanted.values())
    with sqlite3.connect(db) as conn:
        assert guess.split("-", 2)[2] not in json.dumps(conn.execute("SELECT * FROM audit").fetchall())


def test_requests_refused_before_routing_are_counted_in_metrics_by_status(keyed):
    """appliance_requests_total counted a request only once routed: 401s, 413s and 429s
    (rate, budget) never showed in Prometheus. They count under model "" (a refused
    request's model name is the client's word, not a bounded label)."""
    token = keys_cli(keyed, "create", "--name", "refused", "--rpm", "1")
    assert post(keyed, token).status_code == 200
    assert post(keyed, token).status_code == 429
    assert post(keyed, "ak-nope-nope", {**CHAT, "model": "no-such-model-x"}).status_code == 401
    assert httpx.get(f"{keyed.url}/v1/models", headers={"Authorization": "Bearer ak-nope-nope"}).status_code == 401
    with keyed.client() as c:
        big = c.post("/v1/chat/completions", content=b"x" * (4 * 1024 * 1024 + 1),
                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    assert big.status_code == 413
    reader = keys_cli(keyed, "create", "--name", "scraper")
    text = httpx.get(f"{keyed.url}/metrics", headers={"Authorization": f"Bearer {reader}"}).text
    for status in (401, 413, 429):
        assert f'appliance_requests_total{{endpoint="chat",model="",status="{status}"}}' in text, text
    assert 'appliance_requests_total{endpoint="models",model="",status="401"}' in text  # a refused key anywhere
    assert "no-such-model-x" not in text


def test_a_non_loopback_address_without_keys_refuses_to_start(tmp_path):
    cfg = tmp_path / "open.toml"
    cfg.write_text(f'[paths]\nstate_dir = "{tmp_path}"\n' + fake_model("fake"))
    result = subprocess.run([PY, "-m", "appliance.cli", "serve", "--config", str(cfg), "--host", "0.0.0.0"],
                            capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert result.returncode != 0 and "keys.required" in result.stderr


# --- the fail-closed guard, with validation bypassed -----------------------------


class _Rt:
    """What routing reads from the runtime."""

    def __init__(self, cfg, session) -> None:
        from appliance.gateway.proxy import EngineProxy

        self.providers = load_providers(cfg)
        self.routes = Routes(cfg.routes)  # the live policy, checked again before data leaves
        self.proxy = EngineProxy(cfg, session)
        from appliance.fleet.market import Market

        self.supervisor = type("S", (), {"deployments": {}, "market": Market(), "status": lambda self: []})()
        self.metrics = Metrics(self.supervisor)
        self.fallbacks_fired: dict = {}


class _DownDeployment:
    """A local deployment that cannot take the request."""

    replicas: list = []
    waiters: list = []
    inflight = 0
    lora = None  # serves no LoRA adapters

    def __init__(self, model) -> None:
        self.model = model

    async def acquire(self, **_):
        raise NoCapacity("local model down")

    def take_ready(self, *_):
        return None  # none READY: the request waits (hold)

    async def hold(self, *_):
        raise NoCapacity("local model down")


async def test_the_runtime_check_fails_closed_even_when_config_validation_was_bypassed(tmp_path, recorder):
    cfg = parse_config(provider(recorder, tmp_path) + fake_model("m")
                       + '[[routes]]\nname = "claims"\nmodel = "claims"\ntarget = "m"\n')
    # A reloaded or hand-built config that slipped a commercial fallback into a regulated route:
    route = msgspec.structs.replace(cfg.routes[0], fallbacks=["cloud"], regulated=True, burst_at_queue=0)
    before = recorder.requests()
    async with aiohttp.ClientSession() as session:
        rt = _Rt(cfg, session)
        rt.routes = Routes([route])
        path = "/v1/chat/completions"
        req = ProxyRequest("rid", 0.0, 0.0, ENDPOINTS[path], None, model="claims", route=route, target="m",
                           deployment=_DownDeployment(cfg.models[0]), path=path, forwarded=json.dumps(CHAT).encode())
        with pytest.raises(RegulatedFailClosed) as info:
            await forward(rt, req)
        assert info.value.status == 503 and "regulated" in info.value.message
        # The same route, not regulated, does reach the provider: the recorder records.
        req.route = msgspec.structs.replace(route, regulated=False)
        rt.routes = Routes([req.route])
        status, _, _ = await forward(rt, req)
    assert status == 200
    assert recorder.requests() == before + 1


def test_the_circuit_breaker_opens_after_failures_and_half_opens_after_the_reset():
    now = [0.0]
    b = Breaker(failures=2, reset_s=10, clock=lambda: now[0])
    b.failure()
    assert b.allow()
    b.failure()
    assert not b.allow() and b.state == "open"
    now[0] = 10.0
    assert b.allow() and not b.allow()  # one trial request
    b.failure()
    assert b.state == "open"
    now[0] = 20.0
    assert b.allow()
    b.success()
    assert b.state == "closed" and b.allow()


def test_provider_keys_never_show_in_a_repr(tmp_path, recorder):
    cfg = parse_config(provider(recorder, tmp_path))
    p = load_providers(cfg)["cloud"]
    assert "sk-test" not in repr(p) and "sk-test" not in repr(p.__dict__)
    assert p.headers({})["Authorization"] == "Bearer sk-test-secret-never-logged"


def test_revoking_a_key_by_its_name_says_which_id_to_revoke(tmp_path):
    """`keys revoke` takes an id (names need not be unique); given a name it said only
    "no active key 'ci-bot'", beside a `keys ls` listing an active ci-bot."""
    cfg = tmp_path / "appliance.toml"
    cfg.write_text(f'[paths]\nstate_dir = "{tmp_path}/state"\n')

    def cli(*args):
        return subprocess.run([PY, "-m", "appliance.cli", "keys", *args, "--config", str(cfg)],
                              capture_output=True, text=True, cwd=ROOT, timeout=30)

    first, second = (cli("create", "--name", "ci-bot").stdout.split("-")[1] for _ in range(2))
    out = cli("revoke", "ci-bot")
    assert out.returncode == 1
    assert "no key with id 'ci-bot'" in out.stderr
    assert f"keys named 'ci-bot': {first}, {second}" in out.stderr
    assert cli("revoke", first).returncode == 0
    assert "no key with id 'nobody'" in cli("revoke", "nobody").stderr


def test_revoking_a_revoked_or_unknown_key_says_which_truthfully(tmp_path):
    """A second `keys revoke` of a key said "no active key with id X" and exited 1, as
    for an id that never was: an operator could not tell a typo from a key revoked
    already (a retried rotation script failed). A pasted key was echoed whole."""
    cfg = tmp_path / "appliance.toml"
    cfg.write_text(f'[paths]\nstate_dir = "{tmp_path}/state"\n')

    def cli(*args):
        return subprocess.run([PY, "-m", "appliance.cli", "keys", *args, "--config", str(cfg)],
                              capture_output=True, text=True, cwd=ROOT, timeout=30)

    token = cli("create", "--name", "rotated").stdout.strip()
    key_id = token.split("-")[1]
    first = cli("revoke", token)  # the whole key pasted: named by its id only
    assert first.returncode == 0 and first.stdout.startswith(f"key {key_id} revoked at "), first.stdout
    assert token.split("-", 2)[2] not in first.stdout + first.stderr
    revoked_at = json.loads(cli("ls", "--json").stdout)[0]["revoked_at"]
    again = cli("revoke", key_id, "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout) == {"id": key_id, "revoked": True, "revoked_at": revoked_at, "already_revoked": True}
    said = cli("revoke", key_id)
    assert said.returncode == 0 and "was already revoked at" in said.stdout and "nothing changed" in said.stdout
    unknown = cli("revoke", "ak-0123456789ab-notasecret")
    assert unknown.returncode == 1
    assert "no key with id '0123456789ab'; `appliance keys ls` lists them" in unknown.stderr
    assert "notasecret" not in unknown.stderr


def test_the_bearer_scheme_is_read_in_any_case(keyed):
    """RFC 9110: an auth scheme is case-insensitive. "bearer ak-..." (some HTTP clients
    write it so) was a 401 with keys required, and without them the key was not read
    at all: the request ran keyless, its key's budget and routes never applied."""
    token = keys_cli(keyed, "create", "--name", "lowercase")
    for scheme in ("bearer", "BEARER", "Bearer"):
        headers = {"Authorization": f"{scheme} {token}"}
        with keyed.client() as c:
            assert c.post("/v1/chat/completions", json=CHAT, headers=headers).status_code == 200, scheme
            assert c.get("/v1/models", headers=headers).status_code == 200, scheme
    with keyed.client() as c:  # another scheme is no key
        assert c.post("/v1/chat/completions", json=CHAT, headers={"Authorization": f"Basic {token}"}).status_code == 401


def _sent_with(daemon, method: str, path: str, pairs: list[tuple[str, str]], body: bytes = b"") -> tuple[int, bytes]:
    """A request carrying exactly these header pairs (repeats kept): its status and body."""
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: application/json\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in pairs) + f"Content-Length: {len(body)}\r\n\r\n"
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=30) as sock:
        sock.sendall(head.encode() + body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return int(answer.split(b" ", 2)[1]), answer.split(b"\r\n\r\n", 1)[1]


def test_two_different_keys_in_one_request_are_refused_whichever_header_carries_them(keyed):
    # Authorization twice (the last one won) or beside x-api-key (Authorization won): which
    # header wins decided whose key was charged, and a proxy in front checking one passed
    # the other unseen. Now two different keys are a 401; the same key twice is that key.
    alice, bob = keys_cli(keyed, "create", "--name", "alice"), keys_cli(keyed, "create", "--name", "bob")
    chat = json.dumps(CHAT).encode()
    said = json.dumps({"model": "fake", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}).encode()
    for pairs in ([("Authorization", "Bearer ak-nope-nope"), ("Authorization", f"Bearer {alice}")],
                  [("Authorization", f"Bearer {alice}"), ("Authorization", f"Bearer {bob}")],
                  [("x-api-key", bob), ("Authorization", f"Bearer {alice}")],
                  [("Authorization", f"Bearer {alice}"), ("x-api-key", bob)]):
        for method, path, body in (("POST", "/v1/chat/completions", chat), ("POST", "/v1/messages", said),
                                   ("GET", "/v1/models", b"")):
            status, answer = _sent_with(keyed, method, path, pairs, body)
            assert status == 401 and b"Two different API keys" in answer, (pairs, path, answer)
    for pairs in ([("Authorization", f"Bearer {alice}"), ("Authorization", f"bearer {alice}")],
                  [("x-api-key", alice), ("Authorization", f"Bearer {alice}")]):
        assert _sent_with(keyed, "POST", "/v1/chat/completions", pairs, chat)[0] == 200, pairs
        assert _sent_with(keyed, "GET", "/v1/models", pairs)[0] == 200, pairs
