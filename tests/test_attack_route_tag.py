"""An attacker's tries at the route tag (the `x-appliance-tag` header), through the real
daemon and a fake commercial provider that counts what reaches it.

A tag picks a model's route, and so whether a request is regulated: a reverse proxy in
front may stamp a department's tag on every request it passes. A client that adds its
own, different tag header must not choose which of the two is obeyed."""

from __future__ import annotations

import httpx
import pytest

from .conftest import DaemonFactory, fake_model
from .test_routes import Recorder, provider, route

CHAT = {"model": "general", "messages": [{"role": "user", "content": "a regulated record"}]}
TAG = "x-appliance-tag"


@pytest.fixture(scope="module")
def recorder(tmp_path_factory):
    rec = Recorder(tmp_path_factory.mktemp("rec"))
    yield rec
    rec.proc.kill()
    rec.proc.wait()


@pytest.fixture(scope="module")
def tagged_daemon(tmp_path_factory, recorder):
    """Model "general": tag "claims" is regulated and stays on this box; tag "public"
    is not, and falls back to the commercial provider when its engine fails."""
    tmp = tmp_path_factory.mktemp("tags")
    factory = DaemonFactory(tmp)
    routes = (route("claims", "general", "fake", True, extra='tag = "claims"')
              + route("public", "general", "err5xx", False, ["cloud"], 'tag = "public"'))
    models = fake_model("fake") + fake_model("err5xx", "--fail-status", "500")
    yield factory.start(models, extra=provider(recorder, tmp) + routes)
    factory.cleanup()


def _chat(daemon, tags: list[str]) -> httpx.Response:
    with daemon.client() as c:
        return c.post("/v1/chat/completions", json=CHAT, headers=[(TAG, t) for t in tags])


def test_two_different_route_tags_are_refused_and_nothing_leaves_the_box(tagged_daemon, recorder):
    before = recorder.requests()
    # The public route does reach the provider (its engine fails): what a wrong pick would do.
    assert _chat(tagged_daemon, ["public"]).json()["model"] == "cloud-large"
    assert recorder.requests() == before + 1
    for tags in (["claims", "public"], ["public", "claims"]):  # a proxy's tag first or last
        resp = _chat(tagged_daemon, tags)
        assert resp.status_code == 400, (tags, resp.text)
        error = resp.json()["error"]
        assert error["code"] == "two_tags" and TAG in error["message"], error
    assert recorder.requests() == before + 1
    # The same tag twice is one tag: the regulated route, served here.
    resp = _chat(tagged_daemon, ["claims", "claims"])
    assert resp.status_code == 200 and resp.json()["model"] == "fake", resp.text
    assert recorder.requests() == before + 1
