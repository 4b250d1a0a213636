"""An attacker's tries at making the engine fetch a URL (SSRF from inside the box),
through the real daemon (alone, and with two workers) and a fake engine.

An engine serving a multimodal model (llama-server with --mmproj, vLLM) downloads the
media a request names by URL: cloud metadata, internal services, the daemon's own
loopback port. The front door refuses every media reference holding a URL other than
a data: URL, in each API's own envelope, before the engine sees the request; only the
prefixes an operator lists in [server] media_url_prefixes are let through, compared in
one normal form, so look-alikes of an allowed prefix are refused
(appliance/gateway/media_urls.py, appliance/config/urls.py)."""

from __future__ import annotations

import json

import httpx
import pytest

from appliance.config import ConfigError, parse_config
from appliance.gateway.media_urls import allowed

from .conftest import engine_client, fake_model, over_admin_socket, wait_until

MODEL = "seer"
ALLOWED = "http://images.internal/cat/"
METADATA = "http://169.254.169.254/latest/meta-data/"
PNG = "data:image/png;base64,iVBORw0KGgo="


def chat(*parts: dict) -> dict:
    return {"model": MODEL, "max_tokens": 3, "messages": [{"role": "user", "content": [*parts]}]}


def image(url: object) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def responses(*parts: dict) -> dict:
    return {"model": MODEL, "max_output_tokens": 3, "input": [{"role": "user", "content": [*parts]}]}


def messages(*blocks: dict) -> dict:
    return {"model": MODEL, "max_tokens": 3, "messages": [{"role": "user", "content": [*blocks]}]}


def source(kind: str, url: str) -> dict:
    return {"type": kind, "source": {"type": "url", "url": url}}


TEXT = {"type": "text", "text": "what is this?"}

# name -> (path, body, the field the 400 names)
REFUSED = {
    "chat image_url": ("/v1/chat/completions", chat(TEXT, image(METADATA)), "messages[0].content[1].image_url.url"),
    "chat image_url as a string (vLLM)": (
        "/v1/chat/completions",
        chat({"image_url": "http://127.0.0.1:8000/admin/status"}),
        "messages[0].content[0].image_url",
    ),
    "chat video_url (vLLM)": (
        "/v1/chat/completions",
        chat({"type": "video_url", "video_url": {"url": "https://internal.example/v.mp4"}}),
        "messages[0].content[0].video_url.url",
    ),
    "chat audio_url (vLLM)": (
        "/v1/chat/completions",
        chat({"type": "audio_url", "audio_url": {"url": "ftp://files.internal/a.wav"}}),
        "messages[0].content[0].audio_url.url",
    ),
    "chat input_audio holding a URL": (
        "/v1/chat/completions",
        chat({"type": "input_audio", "input_audio": {"data": METADATA, "format": "wav"}}),
        "messages[0].content[0].input_audio.data",
    ),
    "chat file_data holding a URL": (
        "/v1/chat/completions",
        chat({"type": "file", "file": {"file_data": "file:///etc/shadow", "filename": "x.pdf"}}),
        "messages[0].content[0].file.file_data",
    ),
    "an upper-case scheme after spaces": ("/v1/chat/completions", chat(image("  HTTP://10.0.0.1/")), None),
    "Responses input_image": (
        "/v1/responses",
        responses({"type": "input_image", "image_url": METADATA}),
        "input[0].content[0].image_url",
    ),
    "Responses input_file": (
        "/v1/responses",
        responses({"type": "input_file", "file_url": "https://internal.example/report.pdf"}),
        "input[0].content[0].file_url",
    ),
    "Anthropic image source": (
        "/v1/messages",
        messages(source("image", METADATA)),
        "messages[0].content[0].source.url",
    ),
    "Anthropic document source": (
        "/v1/messages",
        messages(TEXT, source("document", "http://[::1]:8000/admin/status")),
        "messages[0].content[1].source.url",
    ),
    "Anthropic count_tokens": (
        "/v1/messages/count_tokens",
        {"model": MODEL, "messages": messages(source("image", METADATA))["messages"]},
        "messages[0].content[0].source.url",
    ),
}

# A URL whose ':' or '/' the JSON spells as an escape: the engine's parser reads it as the URL.
ESCAPED = {
    "escaped slashes": "http:\\/\\/169.254.169.254\\/latest\\/",
    "an escaped colon": "http\\u003a//169.254.169.254/",
    "escaped colon and slashes": "http\\u003A\\u002F\\u002f169.254.169.254/",
    # Backslashes for slashes: a WHATWG URL parser (browsers, many HTTP clients) reads
    # http:\\host/ as http://host/.
    "backslashes for slashes": "http:\\\\\\\\169.254.169.254/",
}

# Look-alikes of ALLOWED, each fetching elsewhere (or from outside the prefix).
BYPASSES = {
    "userinfo": "http://images.internal@evil.example/cat/a.png",
    "userinfo naming the prefix": "http://images.internal/cat/@evil.example/",  # a path: allowed (see below)
    "a longer host": "http://images.internal.evil.example/cat/a.png",
    "a backslash": "http://evil.example\\@images.internal/cat/a.png",
    "dot segments": "http://images.internal/cat/../secret",
    "percent-encoded dots": "http://images.internal/cat/%2e%2e/secret",
    "percent-encoded slash": "http://images.internal/cat%2F..%2Fsecret",
    "a segment's prefix only": "http://images.internal/catalog/a.png",
    "another scheme": "https://images.internal/cat/a.png",
    "another port": "http://images.internal:8080/cat/a.png",
    "the prefix in the query": "http://evil.example/?u=http://images.internal/cat/",
    "a tab in the host": "http://images.in\tternal/cat/a.png",
}
PATH_NOT_HOST = "userinfo naming the prefix"  # '@' after the path's first '/': the host is images.internal


@pytest.fixture(scope="module", params=[1, 2], ids=["alone", "workers=2"])
def daemon(request, tmp_path_factory):
    from .conftest import DaemonFactory

    factory = DaemonFactory(tmp_path_factory.mktemp("media"))
    server = f'media_url_prefixes = ["{ALLOWED}"]\n' + (f"workers = {request.param}\n" if request.param > 1 else "")
    d = factory.start(fake_model(MODEL), server=server)
    wait_until(lambda: _post(d, "/v1/chat/completions", chat(TEXT)).status_code == 200, 60, what="the engine")
    yield d
    factory.cleanup()


def _post(d, path: str, body: dict | bytes) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", "anthropic-version": "2023-06-01"}
    return httpx.post(d.url + path, content=content, headers=headers, timeout=30)


def _engine_requests(d) -> int:
    [replica] = d.replicas(MODEL)
    with engine_client(replica) as c:
        return c.get("/fake/stats").json()["requests"]


def _refused(resp: httpx.Response, path: str, param: str | None) -> None:
    assert resp.status_code == 400, (resp.status_code, resp.text[:300])
    body = resp.json()
    if path.startswith("/v1/messages"):  # Anthropic's envelope
        assert body["type"] == "error", body
        assert body["error"]["type"] == "invalid_request_error", body
        message = body["error"]["message"]
    else:
        error = body["error"]
        assert error["code"] == "media_url_not_allowed", body
        if param is not None:
            assert error["param"] == param, body
        message = error["message"]
    assert "data: URL" in message, message
    if param is not None:
        assert param in message, message


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_media_url_is_refused_before_the_engine_in_the_apis_envelope(daemon, case):
    path, body, param = REFUSED[case]
    before = _engine_requests(daemon)
    _refused(_post(daemon, path, body), path, param)
    assert _engine_requests(daemon) == before


@pytest.mark.parametrize("case", list(ESCAPED))
def test_a_media_url_spelled_with_json_escapes_is_refused_before_the_engine(daemon, case):
    raw = json.dumps(chat(image("@@"))).encode().replace(b"@@", ESCAPED[case].encode())
    assert json.loads(raw)["messages"][0]["content"][0]["image_url"]["url"].startswith(("http:", "http\u003a"))
    before = _engine_requests(daemon)
    _refused(_post(daemon, "/v1/chat/completions", raw), "/v1/chat/completions", "messages[0].content[0].image_url.url")
    assert _engine_requests(daemon) == before


def test_media_as_a_data_url_and_urls_in_text_reach_the_engine(daemon):
    before = _engine_requests(daemon)
    mention = {"type": "text", "text": f"is {METADATA} reachable? see also image_url: http://x/"}
    assert _post(daemon, "/v1/chat/completions", chat(mention, image(PNG))).status_code == 200
    assert _post(daemon, "/v1/chat/completions", chat(image(" DATA:image/png;base64,AA=="))).status_code == 200
    assert _post(daemon, "/v1/messages", messages(TEXT)).status_code == 200
    assert _engine_requests(daemon) == before + 3


@pytest.mark.parametrize("url", [ALLOWED + "a.png", "HTTP://Images.Internal:80/cat/b.png?size=2"])
def test_a_media_url_under_an_allowed_prefix_reaches_the_engine(daemon, url):
    before = _engine_requests(daemon)
    resp = _post(daemon, "/v1/chat/completions", chat(TEXT, image(url)))
    assert resp.status_code == 200, resp.text[:300]
    assert _engine_requests(daemon) == before + 1


@pytest.mark.parametrize("case", [c for c in BYPASSES if c != PATH_NOT_HOST])
def test_a_look_alike_of_an_allowed_prefix_is_refused_before_the_engine(daemon, case):
    before = _engine_requests(daemon)
    resp = _post(daemon, "/v1/chat/completions", chat(image(BYPASSES[case])))
    _refused(resp, "/v1/chat/completions", "messages[0].content[0].image_url.url")
    assert _engine_requests(daemon) == before


def test_a_prefix_is_compared_on_the_url_as_fetched():
    # The same checks without a daemon: the normal form decides, not the spelling.
    assert allowed(BYPASSES[PATH_NOT_HOST], [ALLOWED])  # its host is images.internal
    for case, url in BYPASSES.items():
        if case != PATH_NOT_HOST:
            assert not allowed(url, [ALLOWED]), case
    assert not allowed(ALLOWED + "a.png", [])


@pytest.mark.parametrize(
    "prefix",
    [
        "http://images.internal/cat",  # no trailing '/'
        "ftp://images.internal/",
        "http://user@images.internal/",
        "HTTP://images.internal/",  # not in normal form
        "http://images.internal:80/",
        "http://images.internal/a/../",
        "images.internal/",
    ],
)
def test_a_media_url_prefix_that_is_no_plain_http_prefix_is_a_config_error(prefix):
    with pytest.raises(ConfigError, match=r"server\.media_url_prefixes\[0\]"):
        parse_config(f'[server]\nmedia_url_prefixes = ["{prefix}"]\n')
    parse_config(f'[server]\nmedia_url_prefixes = ["{ALLOWED}", "https://[fd00::1]:8443/img/"]\n')


def test_without_prefixes_every_media_url_is_refused_and_a_reload_allows_one(daemons):
    d = daemons.start(fake_model(MODEL))
    url = ALLOWED + "a.png"
    resp = _post(d, "/v1/chat/completions", chat(TEXT, image(url)))
    _refused(resp, "/v1/chat/completions", "messages[0].content[1].image_url.url")
    assert "media_url_prefixes" in resp.json()["error"]["message"]  # the operator's way out, named

    daemons.write_config(fake_model(MODEL), server=f'media_url_prefixes = ["{ALLOWED}"]\n', port=d.port)
    with over_admin_socket(d.admin_socket) as admin:
        assert admin.post("http://appliance/admin/reload", json={}).status_code == 200
    before = _engine_requests(d)
    assert _post(d, "/v1/chat/completions", chat(TEXT, image(url))).status_code == 200
    assert _engine_requests(d) == before + 1
    _refused(_post(d, "/v1/chat/completions", chat(image(METADATA))), "/v1/chat/completions", None)
