"""Domain errors and their one mapping to HTTP and the OpenAI error envelope.

Every error the API returns has the shape
``{"error": {"message": ..., "type": ..., "param": ..., "code": ...}}``.
"""

from __future__ import annotations

import msgspec

# The most of a client's value (a model name, an id) an error message quotes: enough to
# recognise it, never the whole of a 10 KB one sent back (every API's envelope).
QUOTE_LIMIT = 120


def quoted(value: object, limit: int = QUOTE_LIMIT) -> str:
    """A value the client sent, in single quotes, as an error message names it: cut
    after ``limit`` characters, and then marked as cut, with its whole length."""
    text = str(value)
    if len(text) <= limit:
        return f"'{text}'"
    return f"'{text[:limit]}...' (cut: {len(text)} characters in all)"


class ErrorBody(msgspec.Struct, omit_defaults=False):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorEnvelope(msgspec.Struct):
    error: ErrorBody


class ApplianceError(Exception):
    """Base of every error that becomes an HTTP answer."""

    status = 500
    type = "server_error"
    code: str | None = "internal_error"

    def __init__(
        self, message: str, *, param: str | None = None, code: str | None = None, retry_after: int | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.retry_after = retry_after

    def envelope(self) -> bytes:
        return encode_error(self.message, self.type, self.param, self.code)

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}


class BadRequest(ApplianceError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class Unauthorized(ApplianceError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"
    # RFC 6750 3: the scheme to authenticate with; a credential was sent, and is not valid.
    challenge = 'Bearer realm="appliance", error="invalid_token"'

    def headers(self) -> dict[str, str]:
        return {**super().headers(), "WWW-Authenticate": self.challenge}


class MissingCredential(Unauthorized):
    """No key where one is required: the message says how to send one."""

    challenge = 'Bearer realm="appliance"'
    # In Anthropic's envelope (gateway/dialects.py): its SDKs send the key as x-api-key.
    anthropic_message = "Missing API key: send 'x-api-key: ak-...' (or 'Authorization: Bearer ak-...')"


class BeyondBudget(BadRequest):
    """A request that may cost more than its API key's whole budget: no reset of the
    budget period will ever admit it, so it is no 429 (the SDKs retry those on their
    own, here for hours) but a 400 saying how to make it smaller."""

    code = "request_exceeds_budget"


class NotFound(ApplianceError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"

    def __init__(self, model: str) -> None:
        # Name only what the caller sent; never list what else the box serves.
        super().__init__(f"The model {quoted(model)} does not exist", param="model")


class MethodNotAllowed(ApplianceError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"

    def __init__(self, message: str, allow: str) -> None:
        super().__init__(message)
        self.allow = allow  # the methods the path answers (RFC 9110: a 405 says them)

    def headers(self) -> dict[str, str]:
        return {**super().headers(), "Allow": self.allow}


class RequestTimeout(ApplianceError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class PayloadTooLarge(ApplianceError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class UnsupportedMediaType(ApplianceError):
    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


class NoCapacity(ApplianceError):
    """No replica can take the request now; the client should retry later."""

    status = 503
    type = "server_error"
    code = "no_capacity"

    def __init__(self, message: str, retry_after: int = 5) -> None:
        super().__init__(message, retry_after=retry_after)


class ShuttingDown(NoCapacity):
    code = "shutting_down"


class QueueFull(ApplianceError):
    """Too many requests already wait for this model to start."""

    status = 429
    type = "rate_limit_error"
    code = "queue_full"

    def __init__(self, message: str, retry_after: int = 5) -> None:
        super().__init__(message, retry_after=retry_after)


class QueueTimeout(NoCapacity):
    code = "queue_timeout"


class StateWriteFailed(ApplianceError):
    """The state database refused a write (disk full, read-only): nothing changed."""

    status = 503
    type = "server_error"
    code = "state_write_failed"

    def __init__(self, message: str, retry_after: int = 30) -> None:
        super().__init__(message, retry_after=retry_after)


class Forbidden(ApplianceError):
    status = 403
    type = "permission_error"
    code = "forbidden"


class EngineFailure(ApplianceError):
    """The engine broke the request: refused connection, reset, timeout, 5xx."""

    status = 502
    type = "server_error"
    code = "engine_error"
    # True when the engine failed before answering a byte in a way that did not
    # depend on the request (refused, reset): another replica may take it.
    retryable = False


class EngineTimeout(EngineFailure):
    status = 504
    code = "engine_timeout"


class RegulatedFailClosed(NoCapacity):
    """A fallback would send a regulated route's request to a commercial provider: refused."""

    code = "regulated_fail_closed"


class RateLimited(ApplianceError):
    """An API key is over its requests-per-minute limit or its token budget."""

    status = 429
    type = "rate_limit_error"
    code = "rate_limited"

    def __init__(self, message: str, retry_after: int, code: str | None = None) -> None:
        super().__init__(message, retry_after=max(1, retry_after), code=code)


def encode_error(message: str, type_: str, param: str | None = None, code: str | None = None) -> bytes:
    return msgspec.json.encode(ErrorEnvelope(ErrorBody(message, type_, param, code)))


# Status codes that reach us from frameworks (Litestar, Granian) rather than our
# own code, mapped to the envelope's type and code.
_STATUS_KIND: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "invalid_request"),
    401: ("authentication_error", "invalid_api_key"),
    403: ("permission_error", "forbidden"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "request_too_large"),
    415: ("invalid_request_error", "unsupported_media_type"),
    429: ("rate_limit_error", "rate_limited"),
}


def error_for_status(status: int, message: str) -> ApplianceError:
    err_type, code = _STATUS_KIND.get(status, ("server_error", "internal_error"))
    err = ApplianceError(message, code=code)
    err.status = status
    err.type = err_type
    return err
