"""Domain errors map to HTTP in one place, always in the OpenAI envelope."""

from __future__ import annotations

import asyncio
import json
import os

import pytest

from appliance.errors import (
    BadRequest,
    EngineFailure,
    EngineTimeout,
    ModelNotFound,
    NoCapacity,
    PayloadTooLarge,
    ShuttingDown,
    error_for_status,
)
from appliance.fleet.process import CappedLog


@pytest.mark.parametrize(
    ("error", "status", "type_", "code"),
    [
        (BadRequest("bad", param="messages"), 400, "invalid_request_error", "invalid_request"),
        (ModelNotFound("gpt-x"), 404, "invalid_request_error", "model_not_found"),
        (PayloadTooLarge("big"), 413, "invalid_request_error", "request_too_large"),
        (NoCapacity("busy"), 503, "server_error", "no_capacity"),
        (ShuttingDown("bye"), 503, "server_error", "shutting_down"),
        (EngineFailure("boom"), 502, "server_error", "engine_error"),
        (EngineTimeout("slow"), 504, "server_error", "engine_timeout"),
    ],
)
def test_each_domain_error_has_its_status_and_envelope(error, status, type_, code):
    assert error.status == status
    body = json.loads(error.envelope())
    assert body == {"error": {"message": error.message, "type": type_, "param": error.param, "code": code}}


def test_capacity_errors_carry_retry_after_and_others_do_not():
    assert NoCapacity("busy", retry_after=7).headers() == {"Retry-After": "7"}
    assert BadRequest("bad").headers() == {}


def test_model_not_found_names_only_the_requested_model():
    err = ModelNotFound("gpt-x")
    assert err.message == "The model 'gpt-x' does not exist" and err.param == "model"


def test_framework_statuses_map_to_openai_types():
    assert error_for_status(401, "no").type == "authentication_error"
    assert error_for_status(429, "slow down").type == "rate_limit_error"
    assert error_for_status(418, "teapot").type == "server_error"
    assert error_for_status(413, "big").status == 413


def test_a_replica_log_is_never_written_through_a_link_planted_at_its_name(tmp_path):
    # Regression: CappedLog opened its path with a plain open(), following a link a
    # local user planted in a log_dir open to others: the daemon appended engine output
    # to whatever file the link named. Refused now, the target untouched.
    target = tmp_path / "victim"
    target.write_bytes(b"precious\n")
    (tmp_path / "m-0.log").symlink_to(target)
    with pytest.raises(OSError, match="link there is never followed"):
        CappedLog(tmp_path / "m-0.log", max_bytes=4096)
    assert target.read_bytes() == b"precious\n"
    fresh = CappedLog(tmp_path / "m-1.log", max_bytes=4096)
    fresh.write(b"one\n")
    fresh.close()
    again = CappedLog(tmp_path / "m-1.log", max_bytes=4096)  # appends where the file ends
    again.write(b"two\n")
    again.close()
    assert (tmp_path / "m-1.log").read_bytes() == b"one\ntwo\n"
    assert (tmp_path / "m-1.log").stat().st_mode & 0o777 == 0o640 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_replica_logs_are_capped_and_keep_one_rotated_copy(tmp_path):
    path = tmp_path / "m-0.log"
    log = CappedLog(path, max_bytes=4096, keep_lines=3)
    for i in range(200):
        log.write(f"line {i:04d} {'x' * 40}\n".encode())
    log.close()
    assert path.stat().st_size <= 4096
    rotated = path.with_name("m-0.log.1")
    assert rotated.exists() and rotated.stat().st_size <= 4096
    assert "line 0199" in path.read_text()
    assert list(log.lines) == [f"line {i:04d} {'x' * 40}" for i in (197, 198, 199)]


def _call_front_door(runtime) -> list[dict]:
    """One POST /v1/chat/completions through the daemon's ASGI front door, in process."""
    from litestar.datastructures import State

    from appliance.api.app import create_app, front_door
    from appliance.config import Config

    app = create_app(Config())
    app.state = State({"runtime": runtime})
    sent: list[dict] = []
    body = [{"type": "http.request", "body": b'{"model":"m","messages":[]}', "more_body": False}]

    async def receive():
        return body.pop(0) if body else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": [],
             "query_string": b"", "http_version": "1.1", "scheme": "http", "root_path": ""}
    asyncio.run(front_door(app)(scope, receive, send))
    return sent


def test_an_unexpected_error_on_the_proxy_fast_path_is_a_500_envelope_not_a_dropped_connection(caplog):
    # The front door bypasses Litestar's exception middleware for the proxy endpoints;
    # it must still answer every failure in the envelope and log the traceback.
    sent = _call_front_door(runtime=None)  # no runtime: _forward fails on its first attribute
    start, body = sent
    assert start["status"] == 500
    headers = dict(start["headers"])
    assert headers[b"content-type"] == b"application/json"
    err = json.loads(body["body"])["error"]
    assert err["type"] == "server_error" and "Traceback" not in err["message"]
    assert "appliance's log" in err["message"]
    assert any(r.exc_info for r in caplog.records), "the traceback goes to the log"


def test_an_engine_log_never_holds_the_replica_key_even_split_across_writes(tmp_path):
    # SGLang prints its server_args (api_key included) at start: the key is redacted,
    # wherever the pipe's reads cut it.
    secret = "k" * 20 + "0123456789abcdef" * 3
    log = CappedLog(tmp_path / "m-0.log", max_bytes=1 << 20, redact=secret)
    text = f"server_args=ServerArgs(api_key='{secret}', port=1)\nagain {secret}\n".encode()
    for cut in (5, 40, 61, 70, len(text) - 3):
        log.write(text[:cut])
        log.write(text[cut:])
    log.close()
    written = (tmp_path / "m-0.log").read_text()
    assert secret not in written and written.count("<redacted>") == 10
    assert "server_args=ServerArgs(api_key='<redacted>', port=1)" in log.lines
