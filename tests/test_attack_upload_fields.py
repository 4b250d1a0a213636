"""An attacker's tries at a multipart upload's field names (POST /v1/audio/transcriptions),
through the real daemon and a fake engine that reads the form as a mail parser does.

The appliance routes an upload by its ``model`` field and forwards the body byte for
byte (a route rewrites only that field's value). An engine's form parser that reads a
part's name otherwise than the appliance (an unquoted name, ``name*=``, a name given
twice, a second Content-Disposition, a folded header line, a second boundary in the
Content-Type) would find a ``model`` the policy never saw: another adapter of its base
model than the key may call, or another name than the route's target."""

from __future__ import annotations

import httpx
import pytest

from .conftest import engine_client, fake_model
from .test_routes import route

WAV = b"RIFF" + bytes(64_000 - 4)
BOUNDARY = "appliance-test-boundary"
SMUGGLED = "chatty"  # the model the attacker wants the engine to read


def part(headers: str, value: str) -> bytes:
    return f"--{BOUNDARY}\r\n{headers}\r\n\r\n{value}\r\n".encode()


def upload(*extra: bytes) -> bytes:
    """The route's model as an SDK sends it, the extra parts, then the audio."""
    audio = (
        (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
            "Content-Type: audio/wav\r\n\r\n"
        ).encode()
        + WAV
        + b"\r\n"
    )
    return (
        part('Content-Disposition: form-data; name="model"', "ears")
        + b"".join(extra)
        + audio
        + f"--{BOUNDARY}--\r\n".encode()
    )


SMUGGLED_PARTS = {
    "an unquoted name": part("Content-Disposition: form-data; name=model", SMUGGLED),
    "an RFC 2231 name": part("Content-Disposition: form-data; name*=utf-8''model", SMUGGLED),
    "a name given twice": part('Content-Disposition: form-data; name="prompt"; name="model"', SMUGGLED),
    "two Content-Dispositions": part(
        'Content-Disposition: form-data; name="prompt"\r\nContent-Disposition: form-data; name="model"', SMUGGLED
    ),
    "a folded Content-Disposition": part('Content-Disposition: form-data;\r\n name="model"', SMUGGLED),
}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    from .conftest import DaemonFactory

    factory = DaemonFactory(tmp_path_factory.mktemp("upload"))
    ear = 'tasks = ["transcribe"]'
    yield factory.start(
        fake_model("whisper", extra=ear) + fake_model("chatty", extra=ear) + route("ears", "ears", "whisper", False)
    )
    factory.cleanup()


def _post(d, body: bytes, content_type: str = f"multipart/form-data; boundary={BOUNDARY}") -> httpx.Response:
    return httpx.post(
        d.url + "/v1/audio/transcriptions", content=body, timeout=30, headers={"Content-Type": content_type}
    )


def _engine_requests(d) -> int:
    [replica] = d.replicas("whisper")
    with engine_client(replica) as c:
        return c.get("/fake/stats").json()["requests"]


@pytest.mark.parametrize("case", list(SMUGGLED_PARTS))
def test_a_form_field_name_an_engine_could_read_otherwise_is_refused_before_the_engine(daemon, case):
    before = _engine_requests(daemon)
    resp = _post(daemon, upload(SMUGGLED_PARTS[case]))
    assert resp.status_code == 400, (case, resp.status_code, resp.text[:300])
    assert resp.json()["error"]["code"] == "invalid_body", resp.text
    assert _engine_requests(daemon) == before
    # The same upload without the smuggled part is served, the route's target named.
    assert _post(daemon, upload()).status_code == 200


def test_a_file_name_that_holds_name_equals_is_still_one_name(daemon):
    body = upload().replace(b'filename="a.wav"', b'filename="my name=1; name=x.wav"')
    assert _post(daemon, body).status_code == 200


def test_a_second_boundary_in_the_content_type_is_refused_before_the_engine(daemon):
    # The appliance split the form by the first boundary; a parser taking the last would
    # find the parts hidden inside the "audio" (its own model field among them).
    hidden = (
        b'--other\r\nContent-Disposition: form-data; name="model"\r\n\r\n'
        + SMUGGLED.encode()
        + b'\r\n--other\r\nContent-Disposition: form-data; name="file"; filename="b.wav"\r\n\r\n'
        + WAV
        + b"\r\n--other--\r\n"
    )
    before = _engine_requests(daemon)
    for content_type in (
        f"multipart/form-data; boundary={BOUNDARY}; boundary=other",
        f"multipart/form-data; boundary={BOUNDARY}; BOUNDARY=other",
    ):
        resp = _post(
            daemon,
            upload(part('Content-Disposition: form-data; name="prompt"', hidden.decode("latin-1"))),
            content_type,
        )
        assert resp.status_code == 400, (content_type, resp.text[:300])
        assert resp.json()["error"]["code"] == "invalid_content_type", resp.text
    assert _engine_requests(daemon) == before


# Parts the appliance once named otherwise than a mail parser does: it now reads each
# part's name where that parser does, and so sees a second ``model`` (refused).
NAMED_ELSEWHERE = {
    "an RFC 2231 continuation": part('Content-Disposition: form-data; name="prompt"; name*0="model"', SMUGGLED),
    "a name= inside another parameter's quoted value": part(
        'Content-Disposition: form-data; x="a name="; name="model"', SMUGGLED
    ),
    "a name in a header that only ends in Content-Disposition": part(
        'X-Content-Disposition: form-data; name="prompt"\r\nContent-Disposition: form-data; name="model"', SMUGGLED
    ),
}


@pytest.mark.parametrize("case", list(NAMED_ELSEWHERE))
def test_a_part_named_model_where_a_mail_parser_reads_its_name_is_refused_before_the_engine(daemon, case):
    before = _engine_requests(daemon)
    resp = _post(daemon, upload(NAMED_ELSEWHERE[case]))
    assert resp.status_code == 400, (case, resp.status_code, resp.text[:300])
    assert _engine_requests(daemon) == before


def _engine_form(model: str) -> bytes:
    """A whole form in the engine's boundary (BOUNDARY), naming model."""
    return (
        part('Content-Disposition: form-data; name="model"', model)
        + f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="b.wav"\r\n\r\n'.encode()
        + WAV
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )


@pytest.mark.parametrize(
    "content_type",
    [
        # boundary=other inside another parameter's quoted value: the appliance took it.
        f'multipart/form-data; x="aboundary=other"; boundary={BOUNDARY}',
        # RFC 2231's continuation of a second boundary.
        f"multipart/form-data; boundary=other; boundary*0={BOUNDARY}",
    ],
)
def test_a_boundary_the_appliance_could_read_otherwise_than_the_engine_never_carries_a_hidden_model(
    daemon, content_type
):
    # The appliance's view (boundary "other"): the route's model and a file, which holds
    # a whole form in the engine's boundary naming another model.
    hidden = _engine_form(SMUGGLED)
    body = (
        b'--other\r\nContent-Disposition: form-data; name="model"\r\n\r\nears\r\n'
        + b'--other\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
        + hidden
        + b"\r\n--other--\r\n"
    )
    before = _engine_requests(daemon)
    resp = _post(daemon, body, content_type)
    assert resp.status_code == 400, (content_type, resp.status_code, resp.text[:300])
    assert resp.json()["error"]["code"] in ("invalid_body", "invalid_content_type"), resp.text
    assert _engine_requests(daemon) == before
