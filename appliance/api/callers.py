"""Who calls, for the handlers besides the front door: the app's runtime, the client's
key header, and the two checks (a client's key or the admin credential; the admin
credential alone). A credential either check refuses leaves an audit row, as the front
door's 401s do (``refused``): a key- or token-guessing client is seen."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from litestar import Request

from appliance.access.keys import one_key
from appliance.errors import ApplianceError, Forbidden, StateWriteFailed, Unauthorized
from appliance.gateway.api_responses import ResponsesRequest
from appliance.gateway.capabilities import Endpoint
from appliance.gateway.ledger import finish
from appliance.gateway.request import ProxyRequest, new_request_id, peer_of

if TYPE_CHECKING:
    from appliance.access.keys import ApiKey
    from appliance.api.app import Runtime
    from appliance.fleet.deployment import Deployment


def runtime(request: Request) -> Runtime:
    return request.app.state.runtime


def client_or_admin(request: Request) -> Runtime:
    """What the API shows about the box (its models, its metrics): with keys required,
    only to a caller with an API key or the admin credential; without, only to a
    request naming this server in Host (AdminAccess.check_host: not a DNS-rebinding page)."""
    return caller(request)[0]


def caller(request: Request) -> tuple[Runtime, ApiKey | None]:
    """client_or_admin's check, and the caller's key: None for the admin credential
    and on a box whose keys are not required (they see every model)."""
    rt = runtime(request)
    if not rt.gate.required:  # no key guards the answer from a DNS-rebinding page: its Host must be ours
        rt.admin.check_host(request, "API")
    elif not rt.admin.is_admin(request):
        try:
            return rt, rt.gate.authenticate(authorization(request))
        except Unauthorized as exc:
            refused(rt, request, exc)
            raise
    return rt, None


def models_of(rt: Runtime, key: ApiKey | None) -> list[str]:
    """The model names a caller is shown: the models served, then the names routes
    give them (a route's ``model``, which a client calls, served by its target); those
    its key may call (Routes.allows); every one to the admin credential and on a box
    whose keys are not required."""
    served = rt.supervisor.model_names()
    names = served + sorted(rt.routes.models.difference(served))
    return names if key is None else [name for name in names if rt.routes.allows(key, name)]


def deployment_of(rt: Runtime, name: str) -> Deployment | None:
    """What serves a name models_of shows: a route's target (its untagged route's,
    else any of its routes'), or the model of that name."""
    route = rt.routes.resolve(name, "") or next((r for r in rt.routes.named.values() if r.model == name), None)
    return rt.supervisor.find(route.target if route is not None else name)


def authorization(request: Request) -> bytes | None:
    """The client's key: Authorization, else the Anthropic SDK's x-api-key (two different
    keys: keys.TWO_KEYS, refused)."""
    headers = request.headers
    sent = [*headers.getall("authorization", []), *("Bearer " + k for k in headers.getall("x-api-key", []))]
    auth: bytes | None = None
    for value in sent:
        auth = one_key(auth, value.encode("latin-1"))
    return auth


def admin(request: Request) -> Runtime:
    """Admin routes: the one credential model (appliance/api/admin_access.py)."""
    rt = runtime(request)
    try:
        rt.admin.check(request)
    except (Unauthorized, Forbidden) as exc:
        refused(rt, request, exc)
        raise
    return rt


# The surfaces besides the front door, as an audit row's endpoint: "models", "metrics",
# "readyz", "admin", "openapi" (the first part of the path a routed handler serves).
_SURFACES: dict[str, Endpoint] = {}


def refused(rt: Runtime, request: Request, exc: ApplianceError) -> None:
    """An audit row for a credential refused here, like the front door's for its 401s
    (status, endpoint, no key id: the key is what failed; never the credential itself).
    A request that sent none (a health probe, a scraper without its token) guessed
    nothing and leaves none; nor does one while the audit writer is full."""
    if request.headers.get("authorization") is None and request.headers.get("x-api-key") is None:
        return
    try:
        rt.audit.admit(False)
    except StateWriteFailed:
        return
    name = request.url.path.removeprefix("/v1").strip("/").split("/", 1)[0].removesuffix(".json")
    endpoint = _SURFACES.get(name)
    if endpoint is None:
        endpoint = _SURFACES[name] = Endpoint(name, ResponsesRequest, "", generates=False, free=True)
    client = peer_of(request.scope.get("client"))
    req = ProxyRequest(new_request_id(), time.perf_counter(), time.time(), endpoint, request.receive, client)
    if rt.proxies is not None:
        rt.proxies.name_client(req, request.scope.get("client"), request.scope["headers"])
    finish(rt, req, exc.status)
