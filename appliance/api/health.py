"""Liveness, readiness and the Prometheus metrics: what probes and scrapers read."""

from __future__ import annotations

from litestar import Request, Response, get
from litestar.openapi import ResponseSpec

from appliance.api.callers import client_or_admin, runtime
from appliance.api.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from appliance.errors import Forbidden, Unauthorized
from appliance.status import Readiness

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
    if _has_credential(request):  # the box's model names: for callers with a key (keyless: our own Host)
        supervisor = rt.supervisor  # an adapter is as ready as its base
        body.models = {name: d.ready for name in supervisor.model_names() if (d := supervisor.find(name)) is not None}
    headers = {} if ready else {"Retry-After": "5"}
    return Response(body, status_code=200 if ready else 503, media_type=JSON, headers=headers)


def _has_credential(request: Request) -> bool:
    try:
        client_or_admin(request)
    except (Unauthorized, Forbidden):
        return False
    return True


@get("/metrics", media_type=METRICS_CONTENT_TYPE)
async def metrics(request: Request) -> Response[bytes]:
    rt = runtime(request)
    if not rt.cfg.server.metrics_public:
        client_or_admin(request)
    else:  # open to anyone who reaches the port, not to a page that rebound its name to it
        rt.admin.check_host(request, "API")
    return Response(rt.metrics.render(), media_type=METRICS_CONTENT_TYPE)
