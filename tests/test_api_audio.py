"""POST /v1/audio/transcriptions and /translations through the real daemon and fake
engines speaking vLLM's audio API: the openai SDK's multipart upload routed by its
``model`` form field, forwarded byte for byte, streamed event by event, bounded by
server.max_upload_bytes, charged by the audio's seconds, audited and counted, held
while its model starts, never sent off the server on a regulated route, and
falling back only to a provider that declares the API."""

from __future__ import annotations

import hashlib
import math
import sqlite3
from pathlib import Path

import httpx
import openai
import pytest

from appliance.gateway.api_audio import AUDIO_TOKENS_PER_SECOND, SETTLE_BYTES_PER_SECOND

from .conftest import engine_client, fake_model, wait_until
from .test_keys import keys_cli
from .test_routes import recorder, route  # noqa: F401  (the recording provider)

WAV = b"RIFF" + bytes(64_000 - 4)  # the fake engine hears 64000 / 32000 = 2 seconds
TEXT = "tok0 tok1 tok2"
MAX_UPLOAD = 200_000
BOUNDARY = "appliance-test-boundary"


def form(model: str, audio: bytes = WAV, **fields: str) -> bytes:
    """A multipart body as an SDK builds one, fields first."""
    parts = [f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in {"model": model, **fields}.items()]
    parts.append(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
                 "Content-Type: audio/wav\r\n\r\n".encode() + audio + b"\r\n")
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def post_form(d, body: bytes, path: str = "/v1/audio/transcriptions", **headers) -> httpx.Response:
    return httpx.post(d.url + path, content=body, timeout=30,
                      headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}", **headers})


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, recorder):
    from .conftest import DaemonFactory

    tmp = tmp_path_factory.mktemp("audio")
    key = tmp / "cloud.key"
    key.write_text("sk-test\n")
    key.chmod(0o600)
    providers = "".join(
        f'[[providers]]\nname = "{name}"\nbase_url = "{recorder.url}/v1"\napi_key_file = "{key}"\n'
        f"apis = {apis}\nread_timeout_s = 5\n[providers.models]\nlisten = \"whisper-1\"\n\n"
        for name, apis in (("chatcloud", '["chat"]'), ("earcloud", '["transcriptions"]')))
    routes = (route("secret", "secret", "deaf", True) + route("listen", "listen", "deaf", False,
                                                              ["chatcloud", "earcloud"])
              + route("ears", "ears", "whisper", False))
    ear = 'tasks = ["transcribe"]'
    models = (fake_model("whisper", extra=ear)
              + fake_model("deaf", "--fail-status", "500", extra=ear)
              + fake_model("chatty")
              + fake_model("sleeper", "--slow-start", "1",
                           extra=ear + "\n[models.autoscaling]\nmin_replicas = 0\nmax_replicas = 1"))
    factory = DaemonFactory(tmp)
    d = factory.start(models, extra="[audit]\ninclude_text = true\n\n" + providers + routes, server=f"max_upload_bytes = {MAX_UPLOAD}",
                      supervisor="max_crashes = 50\ncrash_window_s = 60")
    wait_until(lambda: all(m["ready"] for m in d.status()["models"] if m["name"] != "sleeper"), 30,
               what="the models")
    yield d
    factory.cleanup()


def _seen(d, model: str = "whisper") -> dict:
    [replica] = d.replicas(model)
    with engine_client(replica) as c:
        return c.get("/fake/stats").json()


def _audit(d) -> list[tuple]:
    db = Path(d.config.read_text().split('state_dir = "', 1)[1].split('"', 1)[0]) / "appliance.db"
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT model, endpoint, status, prompt_tokens, completion_tokens FROM audit").fetchall()


def _usage(d, name: str) -> tuple[int, int]:
    found = {u["key"]: u for u in d.status()["usage"]}.get(name)
    return (found["prompt_tokens"], found["completion_tokens"]) if found else (0, 0)


def _sdk(d, key: str = "x") -> openai.OpenAI:
    return openai.OpenAI(base_url=d.url + "/v1", api_key=key, max_retries=0, timeout=30)


def test_the_openai_sdks_transcription_is_answered_audited_counted_and_charged_by_its_seconds(daemon):
    key = keys_cli(daemon, "create", "--name", "scribe", "--budget-tokens", "1000000")
    got = _sdk(daemon, key).audio.transcriptions.create(model="whisper", file=("a.wav", WAV), language="en")
    assert got.text == TEXT
    seen = _seen(daemon)["last_body"]
    assert seen["model"] == "whisper" and seen["language"] == "en" and seen["file"]["size"] == len(WAV)
    # vLLM's usage: 2 seconds of audio; the text's 14 bytes are 4 tokens.
    assert _usage(daemon, "scribe") == (2 * AUDIO_TOKENS_PER_SECOND, 4)
    wait_until(lambda: ("whisper", "transcriptions", 200, 100, 4) in _audit(daemon), 10, what="the audit row")
    assert 'endpoint="transcriptions"' in httpx.get(daemon.url + "/metrics").text


def test_the_audit_log_keeps_the_forms_fields_not_its_audio(daemon):
    audio = b"RIFF" + b"\xab" * 40_000
    assert post_form(daemon, form("whisper", audio=audio, language="fr")).status_code == 200
    db = Path(daemon.config.read_text().split('state_dir = "', 1)[1].split('"', 1)[0]) / "appliance.db"

    def row():
        with sqlite3.connect(db) as conn:
            return conn.execute("SELECT request_text, response_text FROM audit WHERE request_text LIKE '%fr%' "
                                "AND endpoint = 'transcriptions'").fetchone()

    found = wait_until(row, 10, what="the audit row")
    assert 'name="language"' in found[0] and "(40004 bytes)" in found[0] and "\ufffd" not in found[0]
    assert TEXT in found[1]


def test_translations_and_every_answer_format_are_charged_never_free(daemon):
    key = keys_cli(daemon, "create", "--name", "formats", "--budget-tokens", "1000000")
    sdk = _sdk(daemon, key)
    assert sdk.audio.translations.create(model="whisper", file=("a.wav", WAV)).text == TEXT
    assert _usage(daemon, "formats") == (100, 4)
    verbose = sdk.audio.transcriptions.create(model="whisper", file=("a.wav", WAV), response_format="verbose_json")
    assert verbose.text == TEXT and verbose.duration == 2.0
    assert _usage(daemon, "formats") == (200, 8)
    # The text format says no duration: the upload's size decides (at 16 kB/s), the text its tokens.
    text = sdk.audio.transcriptions.create(model="whisper", file=("a.wav", WAV), response_format="text")
    assert text.strip() == TEXT
    prompt, completion = _usage(daemon, "formats")
    assert completion == 12 and prompt - 200 >= math.ceil(len(WAV) / SETTLE_BYTES_PER_SECOND * AUDIO_TOKENS_PER_SECOND)


def test_the_upload_reaches_the_engine_byte_for_byte_and_a_route_renames_only_its_model(daemon):
    body = form("whisper", prompt="Ünïcode names", temperature="0.2")
    assert post_form(daemon, body).status_code == 200
    assert _seen(daemon)["last_body"]["raw_sha256"] == hashlib.sha256(body).hexdigest()
    # The route "ears" targets whisper: the engine gets its own name, every other byte as sent.
    assert post_form(daemon, form("ears", prompt="Ünïcode names")).status_code == 200
    assert _seen(daemon)["last_body"]["raw_sha256"] == hashlib.sha256(form("whisper", prompt="Ünïcode names")).hexdigest()


def test_a_streamed_transcription_is_relayed_event_by_event_and_charged(daemon):
    key = keys_cli(daemon, "create", "--name", "streamer", "--budget-tokens", "1000000")
    with httpx.stream("POST", daemon.url + "/v1/audio/transcriptions", content=form("whisper", stream="true"),
                      headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
                               "Authorization": f"Bearer {key}"}, timeout=30) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        events = [line for line in resp.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and len(events) == 4 and '"tok0 "' in events[0]
    prompt, completion = _usage(daemon, "streamer")
    assert completion == 3 and prompt >= len(WAV) / SETTLE_BYTES_PER_SECOND * AUDIO_TOKENS_PER_SECOND
    # The SDK's stream iterates the same events.
    chunks = list(_sdk(daemon).audio.transcriptions.create(model="whisper", file=("a.wav", WAV), stream=True))
    assert len(chunks) == 3


@pytest.mark.parametrize("chunked", [False, True])
def test_an_upload_over_max_upload_bytes_is_a_413_in_the_envelope(daemon, chunked):
    body = form("whisper", audio=bytes(MAX_UPLOAD + 1))
    content = iter([body[i:i + 65536] for i in range(0, len(body), 65536)]) if chunked else body
    resp = httpx.post(daemon.url + "/v1/audio/transcriptions", content=content, timeout=30,
                      headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
    assert resp.status_code == 413 and resp.json()["error"]["type"] == "invalid_request_error", resp.text
    # A JSON endpoint keeps its own, smaller limit; an upload within max_upload_bytes passes.
    assert post_form(daemon, form("whisper", audio=bytes(MAX_UPLOAD // 2))).status_code == 200


def test_a_model_that_does_not_transcribe_gets_a_400_naming_endpoint_and_model(daemon):
    before = _seen(daemon, "chatty")["requests"]
    resp = post_form(daemon, form("chatty"))
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "endpoint_not_supported"
    assert "/v1/audio/transcriptions" in resp.json()["error"]["message"] and "'chatty'" in resp.text
    assert _seen(daemon, "chatty")["requests"] == before


@pytest.mark.parametrize(("body", "content_type", "param"), [
    (form("whisper").replace(b'name="model"', b'name="modal"'), None, "model"),
    (form("whisper").replace(b'name="file"; filename="a.wav"', b'name="audio"; filename="a.wav"'), None, "file"),
    (form("whisper").replace(b"--" + BOUNDARY.encode() + b"\r\n", b"--" + BOUNDARY.encode()
                             + b'\r\nContent-Disposition: form-data; name="model"\r\n\r\nchatty\r\n--'
                             + BOUNDARY.encode() + b"\r\n", 1), None, "model"),  # two models: the engine might read the other one
    (b'{"model": "whisper"}', "application/json", None),
    (b"garbage", None, None),
])
def test_a_malformed_upload_is_a_400_naming_what_is_wrong(daemon, body, content_type, param):
    headers = {"Content-Type": content_type} if content_type else {}
    resp = post_form(daemon, body, **headers)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param


def test_a_transcription_for_a_model_at_zero_is_held_while_it_starts(daemon):
    assert daemon.replicas("sleeper") == []
    assert _sdk(daemon).audio.transcriptions.create(model="sleeper", file=("a.wav", WAV)).text == TEXT
    assert [r["state"] for r in daemon.replicas("sleeper")] == ["READY"]


def test_a_regulated_route_never_sends_an_upload_off_the_server(daemon, recorder):
    before = recorder.requests()
    for fields in ({}, {"stream": "true"}):
        resp = post_form(daemon, form("secret", **fields))
        assert resp.status_code in (200, 502), resp.text  # the local failure, or its stream's error event
    assert recorder.requests() == before


def test_a_route_falls_back_only_to_a_provider_that_declares_transcriptions(daemon, recorder):
    before = recorder.requests()
    resp = post_form(daemon, form("listen", language="de"))
    assert resp.status_code == 200 and resp.json()["text"] == TEXT, resp.text
    assert recorder.requests() == before + 1
    seen = recorder.last_body()  # the provider's model name, the rest of the form as sent
    assert seen["model"] == "whisper-1" and seen["language"] == "de" and seen["file"]["size"] == len(WAV)
    metrics = httpx.get(daemon.url + "/metrics").text
    assert 'target="skipped:chatcloud"' in metrics and 'target="earcloud"' in metrics
