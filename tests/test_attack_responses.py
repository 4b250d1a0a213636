"""An attacker's tries at a key's budget through the Responses API, against the real daemon
and a fake engine that keeps Responses (the openai adapter's, as vLLM's does).

vLLM answers ``background: true`` at once (status "queued", no usage) and generates the
Response afterwards, in a task of its own: the daemon would settle the request's hold at
its prompt (nothing generated yet), release the replica's slot, and the client would read
the Response with a retrieve, which is charged nothing (vLLM's serving_responses, read in
its source: its background task; not run here)."""

from __future__ import annotations

import httpx

from .conftest import engine_client, fake_model
from .test_keys import keys_cli


def _engine_requests(d) -> int:
    with engine_client(d.replicas("stateful")[0]) as c:
        return c.get("/fake/stats").json()["requests"]


def test_a_background_response_is_refused_before_the_engine_so_a_budget_holds(daemons):
    d = daemons.start(fake_model("stateful"), extra="[keys]\nrequired = true\n", wait=False)
    d.wait_ready(status=False)
    token = keys_cli(d, "create", "--name", "budgeted", "--budget-tokens", "100000").split()[0]
    before = _engine_requests(d)
    headers = {"Authorization": f"Bearer {token}"}
    for body in ({"background": True, "store": True}, {"background": True, "store": True, "stream": True}):
        resp = httpx.post(d.url + "/v1/responses", headers=headers, timeout=30,
                          json={"model": "stateful", "input": "a long essay", "max_output_tokens": 900, **body})
        assert resp.status_code == 400, resp.text
        error = resp.json()["error"]
        assert error["code"] == "background_not_supported" and error["param"] == "background", error
    assert _engine_requests(d) == before
    # The same request in the foreground is served (and charged from its answer).
    resp = httpx.post(d.url + "/v1/responses", headers=headers, timeout=30,
                      json={"model": "stateful", "input": "a long essay", "max_output_tokens": 9, "store": True,
                            "background": False})
    assert resp.status_code == 200 and resp.json()["status"] == "completed", resp.text
