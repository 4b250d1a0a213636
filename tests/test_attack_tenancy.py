"""An attacker's tries at another tenant's data with one valid API key, on a shared box
(keys required; one team's key confined to its route), against the real daemon and a
fake engine. Each test is named after what it guards."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import httpx
import pytest

from .conftest import engine_client, fake_model, wait_until
from .test_keys import keys_cli

ROUTES = ('[[routes]]\nname = "team-a"\nmodel = "assistant-a"\ntarget = "fake"\n\n'
          '[[routes]]\nname = "secret-team-b"\nmodel = "assistant-b"\ntarget = "fake"\n')


@pytest.fixture(scope="module")
def shared_box(tmp_path_factory):
    from .conftest import DaemonFactory

    factory = DaemonFactory(tmp_path_factory.mktemp("tenancy"))
    daemon = factory.start(fake_model("fake"), server="", extra="[keys]\nrequired = true\n\n" + ROUTES)
    yield daemon
    factory.cleanup()


def _bearer(daemon, *args: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {keys_cli(daemon, 'create', *args).split()[0]}"}


def test_a_refused_model_names_no_other_teams_route_and_reads_as_one_never_served(shared_box):
    """A key confined to its route was told 'may not use route secret-team-b' for another
    team's model, and 'may not use this model' for a name never served: the refusal named
    the other team's route and told which models exist (the model list hides both)."""
    headers = _bearer(shared_box, "--name", "team-a-app", "--route", "team-a")
    refusals = []
    for model in ("assistant-b", "no-such-model"):
        resp = httpx.post(shared_box.url + "/v1/chat/completions", headers=headers, timeout=30,
                          json={"model": model, "messages": [{"role": "user", "content": "hi"}]})
        assert resp.status_code == 403, resp.text
        assert "secret-team-b" not in resp.text
        error = resp.json()["error"]
        refusals.append((error["code"], error["message"].replace(model, "MODEL")))
    assert refusals[0] == refusals[1], refusals


def test_a_key_confined_to_its_routes_cannot_read_other_teams_models_in_metrics(shared_box):
    """/metrics labels every model and route by name with its requests and tokens: a key
    the model list shows one model to read them all there (another team's traffic)."""
    scoped = _bearer(shared_box, "--name", "team-a-metrics", "--route", "team-a")
    resp = httpx.get(shared_box.url + "/metrics", headers=scoped, timeout=10)
    assert resp.status_code == 403, resp.text[:300]
    assert "assistant-b" not in resp.text and "secret-team-b" not in resp.text
    # A key with every route still reads them (it may call every model).
    assert httpx.get(shared_box.url + "/metrics", headers=_bearer(shared_box, "--name", "ops"),
                     timeout=10).status_code == 200


@pytest.mark.parametrize("workers", [1, 2], ids=["alone", "workers=2"])
def test_a_response_request_cannot_name_its_id_and_overwrite_another_keys_stored_response(daemons, workers):
    """vLLM stores a Response under the request_id its body names (its extra field): a key
    that learnt another key's response id could overwrite that Response in the engine's
    store, and take it over in the daemon's index. Refused before the engine."""
    server = f"workers = {workers}\n" if workers > 1 else ""
    d = daemons.start(fake_model("stateful"), server=server, extra="[keys]\nrequired = true\n", wait=False)
    d.wait_ready(status=False)
    victim, attacker = _bearer(d, "--name", "victim"), _bearer(d, "--name", "attacker")
    made = httpx.post(d.url + "/v1/responses", headers=victim, timeout=30,
                      json={"model": "stateful", "input": "my secret plan", "store": True})
    assert made.status_code == 200, made.text
    taken = httpx.post(d.url + "/v1/responses", headers=attacker, timeout=30,
                       json={"model": "stateful", "input": "x", "store": True, "request_id": made.json()["id"]})
    assert taken.status_code == 400, taken.text
    error = taken.json()["error"]
    assert error["code"] == "request_id_not_allowed" and error["param"] == "request_id", error
    # The victim's Response is still its own.
    again = httpx.get(f"{d.url}/v1/responses/{made.json()['id']}", headers=victim, timeout=30)
    assert again.status_code == 200, again.text


@pytest.mark.parametrize("workers", [1, 2], ids=["alone", "workers=2"])
def test_a_clients_own_request_id_never_becomes_the_engines_id_for_its_request(daemons, workers):
    """vLLM takes X-Request-Id as its own id for the request, one table for every key:
    two tenants sending the same id at once broke or hung each other's requests. The
    engine gets the client's id made unique; the answer and the audit row keep the client's."""
    server = f"workers = {workers}\n" if workers > 1 else ""
    d = daemons.start(fake_model("fake"), server=server, extra="[keys]\nrequired = true\n", wait=False)
    d.wait_ready(status=False)
    key = _bearer(d, "--name", "tenant")
    chat = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}
    answer = httpx.post(d.url + "/v1/chat/completions", headers={**key, "X-Request-Id": "shared-id"},
                        json=chat, timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-request-id"] == "shared-id"
    with engine_client(d.replicas("fake")[0]) as engine:
        engines = engine.get("/fake/stats").json()["last_request_id"]
    assert engines != "shared-id" and engines.startswith("shared-id."), engines
    db = Path(d.config.read_text().split('state_dir = "')[1].split('"')[0]) / "appliance.db"

    def audited():
        with sqlite3.connect(db) as conn:
            return conn.execute("SELECT request_id FROM audit WHERE endpoint = 'chat'").fetchone()

    assert wait_until(audited, 10, what="the chat's audit row") == ("shared-id",)


@pytest.mark.parametrize("workers", [1, 2], ids=["alone", "workers=2"])
def test_a_body_cannot_name_the_engines_own_id_for_its_request(daemons, workers):
    """vLLM also takes a body's request_id as its id for the request (chat, completions,
    its pooling requests): one tenant could collide with another's. Refused before the
    engine, as on Responses."""
    server = f"workers = {workers}\n" if workers > 1 else ""
    d = daemons.start(fake_model("fake"), server=server, extra="[keys]\nrequired = true\n", wait=False)
    d.wait_ready(status=False)
    key = _bearer(d, "--name", "tenant")
    with engine_client(d.replicas("fake")[0]) as engine:
        before = engine.get("/fake/stats").json()["requests"]  # the daemon's own warm-up, if any
    for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                       ("/v1/completions", {"prompt": "hi"})):
        refused = httpx.post(d.url + path, headers=key, json={"model": "fake", "request_id": "theirs", **body},
                             timeout=30)
        assert refused.status_code == 400, (path, refused.text)
        error = refused.json()["error"]
        assert error["code"] == "request_id_not_allowed" and error["param"] == "request_id", (path, error)
    with engine_client(d.replicas("fake")[0]) as engine:
        assert engine.get("/fake/stats").json()["requests"] == before
