"""An attacker's tries at another tenant's data with one valid API key, on a shared box
(keys required; one team's key confined to its route), against the real daemon and a
fake engine. Each test is named after what it guards."""

from __future__ import annotations

import httpx
import pytest

from .conftest import fake_model
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
