"""The one place domain errors become HTTP: any exception, a domain error
(appliance/errors.py), Litestar's own (404, 405) or a bug, becomes a status, headers and
the envelope of the request's API (`error_parts`), for the app's exception handler and
for the front door alike; OPTIONS and 405 say every method a path answers."""

from __future__ import annotations

import logging
from collections.abc import Collection

from litestar import Request, Response
from litestar.datastructures import MutableScopeHeaders
from litestar.exceptions import HTTPException, NotFoundException
from litestar.routes import HTTPRoute
from litestar.types import Message, Scope

from appliance.api.models import request_dialect
from appliance.errors import (
    ApplianceError,
    MethodNotAllowed,
    NoCapacity,
    NotFound,
    QueueFull,
    ShuttingDown,
    error_for_status,
)
from appliance.gateway.dialects import ANTHROPIC, Dialect, dialect_for_path
from appliance.logs import OncePer

log = logging.getLogger("appliance.api")

_REFUSALS = OncePer(60.0)
JSON = "application/json"
NO_SUCH_ENDPOINT = "Not found: no such endpoint"
# OpenAI's endpoints at a path the appliance answers with other methods (its SDK's
# chat.completions.list, responses.input_tokens.count, responses.compact): not served,
# so a 404, which the SDK raises as NotFoundError as for files or batches, not a 405.
_UNSERVED = frozenset(
    {
        ("GET", "/v1/chat/completions"),
        ("HEAD", "/v1/chat/completions"),
        ("POST", "/v1/responses/input_tokens"),
        ("POST", "/v1/responses/compact"),
    }
)


def error_response(request: Request, exc: Exception) -> Response:
    rid, dialect = request_id(request), request_dialect(request)
    if dialect is None and isinstance(exc, NotFoundException) and "anthropic-version" in request.headers:
        dialect = ANTHROPIC  # an endpoint Anthropic's SDK calls (its files, skills) not served here
    status, headers, body = error_parts(exc, request.method, request.url.path, rid, dialect)
    return Response(body, status_code=status, media_type=JSON, headers=headers)


def request_id(request: Request) -> str | None:
    """The id the front door gave a proxied request (scope["request_id"]), if it has one."""
    rid = request.scope.get("request_id")
    return rid if isinstance(rid, str) else None


def error_parts(
    exc: Exception, method: str, path: str, rid: str | None, dialect: Dialect | None = None
) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and the envelope for any exception: the one mapping. The
    envelope is the dialect's: the path's API unless the request said which it speaks."""
    if isinstance(exc, ApplianceError):
        err = exc
    elif isinstance(exc, HTTPException):
        err = error_for_status(exc.status_code, _framework_message(exc))
        if exc.status_code == 405:
            err = MethodNotAllowed(f"Method {method} is not allowed on {path}", allow=_allowed(exc))
    else:
        log.error("unhandled error on %s %s", method, path, exc_info=exc)
        err = ApplianceError("Internal error; the appliance's log has the details")
    if isinstance(err, MethodNotAllowed) and (method, path.rstrip("/")) in _UNSERVED:
        err = NotFound(NO_SUCH_ENDPOINT)
    # (An operator's refused action is logged by the supervisor, with its own words.)
    refused = isinstance(err, (NoCapacity, QueueFull)) and not isinstance(err, ShuttingDown)
    if refused and not path.startswith("/admin/"):
        _REFUSALS.log(log, logging.INFO, f"refused {method} {path}: {err.status} {err.code}: {err.message}")
    headers = err.headers()
    dialect = dialect or dialect_for_path(path)
    if rid:
        headers.update(dialect.id_headers(rid))
    return err.status, headers, dialect.envelope(err)


def _allowed(exc: HTTPException) -> str:
    """The Allow of Litestar's 405, with HEAD wherever GET is (the front door answers it)."""
    return _with_head([m.strip() for m in (exc.headers or {}).get("allow", "").split(",") if m.strip()])


def _with_head(methods: Collection[str]) -> str:
    return ", ".join(sorted({*methods, "HEAD"} if "GET" in methods else set(methods)))


async def options_allow(message: Message, scope: Scope) -> None:
    """OPTIONS says every method its path answers. Litestar's own OPTIONS answer lists
    only those of the first handler registered on the path (GET /v1/responses/{id},
    not its DELETE), and never HEAD, which the front door answers wherever GET is."""
    if message["type"] != "http.response.start" or scope.get("method") != "OPTIONS" or message["status"] != 204:
        return
    template = scope.get("path_template")
    routes = [r for r in scope["app"].routes if isinstance(r, HTTPRoute) and r.path_format == template]
    if methods := [m for r in routes for m in r.methods]:
        MutableScopeHeaders.from_message(message)["allow"] = _with_head(methods)


def _framework_message(exc: HTTPException) -> str:
    if exc.status_code == 404:
        return NO_SUCH_ENDPOINT
    return exc.detail or "Request rejected"
