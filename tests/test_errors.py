"""Domain errors map to HTTP in one place, always in the OpenAI envelope."""

from __future__ import annotations

import json

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
from appliance.process import CappedLog


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
