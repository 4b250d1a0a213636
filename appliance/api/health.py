"""Liveness, readiness and the Prometheus metrics: what probes and scrapers read."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from litestar import Request, Response, get
from litestar.openapi import ResponseSpec

from appliance.api.callers import caller, deployment_of, models_of, runtime
from appliance.api.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from appliance.errors import Forbidden, Unauthorized
from appliance.status import Readiness

if TYPE_CHECKING:
    from appliance.access.keys import ApiKey
    from appliance.api.app import Runtime

JSON = "application/json"


@get("/healthz")
async def healthz() -> Response:
    return Response({"status": "alive"}, media_type=JSON)


@get(
    "/readyz",
    responses={
        503: ResponseSpec(Readiness, description="Not ready (starting or draining): the same body, with Retry-After")
    },
)
async def readyz(request: Request) -> Response[Readiness]:
    rt = runtime(request)
    ready = rt.supervisor.ready and not rt.draining
    body = Readiness(status="draining" if rt.draining else ("ready" if ready else "starting"))
    with contextlib.suppress(Unauthorized, Forbidden):  # no model names without a credential
        body.models = _models_ready(rt, caller(request)[1])
    headers = {} if ready else {"Retry-After": "5"}
    return Response(body, status_code=200 if ready else 503, media_type=JSON, headers=headers)


def _models_ready(rt: Runtime, key: ApiKey | None) -> dict[str, bool]:
    """Whether each model the caller is shown is ready (an adapter: as its base; a
    route's name: as its target)."""
    return {name: dep.ready for name in models_of(rt, key) if (dep := deployment_of(rt, name)) is not None}


@get("/metrics", media_type=METRICS_CONTENT_TYPE)
async def metrics(request: Request) -> Response[bytes]:
    rt = runtime(request)
    if not rt.cfg.server.metrics_public:
        _refuse_confined_key(caller(request)[1])
    else:  # open to anyone who reaches the port, not to a page that rebound its name to it
        rt.admin.check_host(request, "API")
    return Response(rt.metrics.render(), media_type=METRICS_CONTENT_TYPE)


def _refuse_confined_key(key: ApiKey | None) -> None:
    """The metrics label every model and route by name, with its requests and tokens:
    a key confined to its routes, shown its own models alone (models_of), may not read
    the others' there (another team's traffic)."""
    if key is not None and key.routes:
        raise Forbidden("This API key may use some routes only: /metrics is for a key with every route or the admin")
