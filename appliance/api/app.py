"""The Litestar app: thin handlers over the supervisor and the engine proxy.

Resources (HTTP session, supervisor...) open and close in the lifespan
(appliance/api/lifespan.py). Every error leaves through ``http_errors.error_response``
in its API's envelope.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, cast

from litestar import Litestar, Request, Response, asgi, get
from litestar.types import HTTPScope, Receive, Scope, Send

from appliance.access.keys import ApiKey, one_key
from appliance.access.tenancy import Tenancy, revealing, scrub
from appliance.api.admin import (
    admin_daemon_log,
    admin_gpus,
    admin_model_action,
    admin_reload,
    admin_replica_action,
    admin_replica_log,
    admin_scale,
    admin_status,
    version,
)
from appliance.api.admin_paths import PREFIX as ADMIN_MODELS
from appliance.api.admin_paths import routed_whole
from appliance.api.body import read_body as _read_body_asgi
from appliance.api.callers import admin
from appliance.api.health import healthz, metrics, readyz
from appliance.api.http_errors import error_parts, error_response, options_allow
from appliance.api.lifespan import Runtime, lifespan_for
from appliance.api.models import get_model, list_models
from appliance.api.stored_responses import cancel_response, delete_response, get_response, list_input_items
from appliance.config import Config
from appliance.errors import (
    ApplianceError,
    BadRequest,
    MethodNotAllowed,
    PayloadTooLarge,
    ShuttingDown,
    StateWriteFailed,
    UnsupportedMediaType,
    encode_error,
    quoted,
)
from appliance.fleet.deployment import Deployment
from appliance.fleet.hold import ClientGone
from appliance.fleet.prefix import engine_view
from appliance.fleet.replica import Replica
from appliance.gateway import api_audio, capabilities
from appliance.gateway.capabilities import Endpoint
from appliance.gateway.facts import Facts, facts_of
from appliance.gateway.ledger import committed, finish
from appliance.gateway.metering import StreamTap, stream_options, usage_option
from appliance.gateway.protocol import (
    decode_request,
)
from appliance.gateway.providers import set_fields
from appliance.gateway.proxy import AnswerTooLarge
from appliance.gateway.relay import answer_stream, answer_whole, send_whole
from appliance.gateway.request import ProxyRequest, engine_request_id, peer_of, request_id_of
from appliance.gateway.routing import Routes, one_tag
from appliance.logs import bind_request_id

log = logging.getLogger("appliance.api")

JSON = "application/json"
# The headers _forward reads (and the route tag's, which the config names): any other
# is passed over with one set lookup, not compared against each of these in turn.
_READ_HEADERS = frozenset(
    (
        b"x-request-id",
        b"content-length",
        b"authorization",
        b"x-api-key",
        b"content-type",
        b"origin",
        b"sec-fetch-site",
        b"content-encoding",
    )
)


async def _forward(scope: HTTPScope, receive: Receive, send: Send, path: str, ep: Endpoint) -> None:
    """The proxy hot path, as a raw ASGI handler: Litestar routes to it and its
    exception middleware turns anything raised here, before the answer starts,
    into the OpenAI envelope (``http_errors.error_response``)."""
    if scope["method"] != "POST":
        raise MethodNotAllowed(f"Method {scope['method']} is not allowed on {path}", allow="POST")
    started = time.perf_counter()
    rt: Runtime = scope["app"].state.runtime
    sent_id = declared = auth = tag = content_type = origin = fetch_site = encoding = None
    tag_header = rt.tag_header
    for name, value in scope["headers"]:
        if name not in _READ_HEADERS and name != tag_header:  # most of a client's headers (one lookup)
            continue
        if name == b"x-request-id":
            sent_id = value
        elif name == b"content-length":
            declared = value
        elif name == b"authorization":
            auth = value if auth is None else one_key(auth, value)
        elif name == tag_header:
            tag = one_tag(tag, value)
        elif name == b"x-api-key":  # the Anthropic SDK's header
            auth = one_key(auth, b"Bearer " + value)
        elif name == b"content-type" and ep.form:  # a multipart upload's boundary
            content_type = value
        elif name == b"origin":
            origin = value
        elif name == b"sec-fetch-site":
            fetch_site = value
        elif name == b"content-encoding":
            encoding = value
    rid = request_id_of(sent_id)
    scope["request_id"] = rid  # type: ignore[typeddict-unknown-key]
    bind_request_id(rid)  # log lines of this request carry its id
    # What the engine is sent with the body, made once (not an empty dict replaced later).
    headers = {
        "Content-Type": content_type.decode("latin-1") if content_type is not None else JSON,
        "X-Request-Id": engine_request_id(rid, sent_id is not None),
    }
    req = ProxyRequest(rid, started, time.time(), ep, receive, peer_of(scope.get("client")), headers=headers)
    if rt.proxies is not None:  # behind a trusted reverse proxy: the client it names
        rt.proxies.name_client(req, scope.get("client"), scope["headers"])
    # The front door's error path reads whether the answer started (req.bytes_sent):
    # no wrapper around send, which would cost a call per streamed piece.
    scope["proxy_request"] = req  # type: ignore[typeddict-unknown-key]
    if rt.tracing is not None:
        req.trace = rt.tracing.begin(req, path, scope["headers"])
    rt.inflight += 1
    try:
        if origin is not None or fetch_site is not None:  # only browsers send these
            site = fetch_site.decode("latin-1") if fetch_site is not None else None
            rt.admin.refuse_cross_site(origin.decode("latin-1") if origin else None, site, "API", "use")
        if encoding is not None:
            _refuse_encoded(encoding)
        # A worker's request comes with its facts (appliance/dataplane/authority.py).
        await _serve(rt, req, send, path, declared, auth, tag, content_type, scope.get("facts"))  # type: ignore[arg-type]
    except ApplianceError as exc:
        if isinstance(exc, AnswerTooLarge):
            req.dropped_at = exc.cap
        finish(rt, req, exc.status)
        if not isinstance(exc, StateWriteFailed):
            with contextlib.suppress(StateWriteFailed):
                await committed(req)  # an error answer is accounted for like any other
        raise
    except BaseException as exc:
        # A client that left (499), or a bug (500): its row, and its budget hold released.
        finish(rt, req, 499 if isinstance(exc, (ClientGone, asyncio.CancelledError)) else 500)
        raise
    finally:
        rt.inflight -= 1
        if not req.finished:  # every path finishes its request; never leave a budget hold behind
            log.warning("request %s ended without being finished", rid)
            finish(rt, req, 500)


def _refuse_encoded(encoding: bytes) -> None:
    """A compressed request body (Content-Encoding: gzip, ...): the body is read and
    forwarded as it came, so it would be read as malformed JSON; say what is wrong."""
    if encoding.strip().lower() not in (b"", b"identity"):
        raise UnsupportedMediaType(
            f"Content-Encoding {quoted(encoding.decode('latin-1'))} is not supported on request bodies: "
            "send the body uncompressed",
            code="unsupported_content_encoding",
        )


async def _serve(
    rt: Runtime,
    req: ProxyRequest,
    send: Send,
    path: str,
    declared: bytes | None,
    auth: bytes | None,
    tag: bytes | None,
    content_type: bytes | None,
    facts: Facts | None = None,
) -> None:
    """The front door's part: who asks (key), what for (body, model, route), what
    it may cost (reservation), which deployment, with what the engine is sent;
    then routing forwards it and the relay answers. facts: what a worker read of
    the body it keeps (appliance/dataplane/worker_client.py); None: the body is read here."""
    if rt.draining:
        raise ShuttingDown("The appliance is shutting down; retry on another instance or shortly", retry_after=5)
    # The policy as it is now, for the whole request: a reload swaps these (Gateway.adopt)
    # in one step, and the body's read below must not let a request see half of each.
    gate, cfg, routes, tenancy = rt.gate, rt.cfg, rt.routes, rt.tenancy
    ep = req.endpoint
    req.key = gate.authenticate(auth) if (auth is not None or gate.required) else None
    limit = cfg.server.max_upload_bytes if ep.form else cfg.server.max_body_bytes
    if facts is None:
        body = req.body = await _read_body_asgi(req.receive, declared, limit, cfg.server.body_read_timeout_s)
        req.body_taken = True
        # One of the endpoints' Structs (capabilities.ENDPOINTS), read by what it has.
        request: Any = api_audio.decode(body, content_type) if ep.form else decode_request(body, ep.cls)
        facts = facts_of(ep, body, request, keyed=req.key is not None)
    elif facts.size > limit:
        raise PayloadTooLarge(f"Request body of {facts.size} bytes exceeds the limit of {limit} bytes")
    else:
        req.guess, req.body_taken = facts.guess, True
    fields = _decide(rt, req, path, facts, tag, cfg, routes, tenancy)
    if req.body:
        with_body(cfg, req, req.body, fields)
    else:  # its worker has the body: it sets these (appliance/dataplane/authority.py)
        req.fields = fields
    if rt.answer is not None:  # workers: the data plane answers it (appliance/dataplane/authority.py)
        await rt.answer(rt, req, send)
    elif req.stream:
        await answer_stream(rt, req, send)
    else:
        await answer_whole(rt, req, send)


def _decide(
    rt: Runtime,
    req: ProxyRequest,
    path: str,
    facts: Facts,
    tag: bytes | None,
    cfg: Config,
    routes: Routes,
    tenancy: Tenancy,
) -> dict:
    """The policy on a request's facts, the same whoever read its body: its route,
    its reservation, its deployment and what that serves, its stream's tap, its
    tenant's cache salt, its prefix's hashes. The fields to set in its body."""
    ep = req.endpoint
    key = req.key
    model = req.model = facts.model
    route = req.route = routes.match(model, tag.decode("latin-1") if tag else "", key, cfg.routing.tag_header)
    rt.audit.admit(req.accountable)
    target = req.target = route.target if route is not None else model
    fields: dict = {} if target == model else {"model": target}
    if key is not None:
        _reserve(rt, req, key, facts, fields)
    deployment = req.deployment = rt.supervisor.deployment(target)
    capabilities.check(path, ep, deployment.model, facts.stateful)
    capabilities.check_fields(cfg, ep, deployment.model, facts)
    fields |= capabilities.engine_fields(ep, deployment.model, req.body)
    req.path = ep.engine_path or path
    # Responses an engine stores: where each lives (a conversation goes back there).
    stores = req.stores = ep is RESPONSES_ENDPOINT and capabilities.keeps_responses(deployment.model)
    if stores:
        req.pinned = _home_of(rt, facts, key, deployment)
    stream = req.stream = facts.stream
    if stream and (cfg.audit.enabled or key is not None or tenancy.isolated or stores):
        _tap(req, facts, tenancy.isolated, fields)
    tenant = tenancy.tenant(key, route)
    if tenant is not None and ep.generates and not ep.form:
        req.salt = tenancy.salt(tenant, facts.cache_salt)
    if len(deployment.replicas) > 1 and cfg.routing.prefix_aware and ep.view != "":
        seed = tenancy.seed(tenant) ^ deployment.lora.seed(target) if deployment.lora else tenancy.seed(tenant)
        view = facts.view if facts.view is not None else engine_view(req.body, ep.view)
        req.prefix = deployment.prefix.view_hashes(view, seed)
    return fields


def with_body(cfg: Config, req: ProxyRequest, body: bytes, fields: dict) -> None:
    """What is sent on of the request's body: the front door's fields set in it (and
    the audit's copy of its text, [audit] include_text)."""
    req.body = body
    req.forwarded = set_fields(body, **fields) if fields else body
    if cfg.audit.include_text:
        req.request_text = api_audio.without_audio(body) if req.endpoint.form else req.forwarded
        req.response_text, req.response_text_cap = b"", cfg.upstream.max_answer_bytes  # collected up to that cap


def _home_of(rt: Runtime, facts: Facts, key: ApiKey | None, deployment: Deployment) -> Replica | None:
    """The replica a Responses request with previous_response_id must run on."""
    previous = facts.previous
    if previous is None:
        return None
    replica = rt.response_homes.find(previous, key, "previous_response_id")
    if replica not in deployment.replicas:
        raise BadRequest(
            f"Response {quoted(previous)} was made by another model than {quoted(facts.model)}",
            param="previous_response_id",
            code="response_model_mismatch",
        )
    return replica


def _tap(req: ProxyRequest, facts: Facts, isolated: bool, fields: dict) -> None:
    """A metered or tenant-isolated stream: the engine is asked for its usage (an
    event kept from a client that did not ask for it), and the relay watches the
    events (appliance/gateway/metering.py: StreamTap). Responses and Messages streams
    always carry their usage, in their own events (appliance/gateway/dialects.py)."""
    dialect = req.endpoint.dialect
    if not dialect.asks_usage:
        req.tap = StreamTap(
            False,
            scrub if isolated else None,
            revealing if isolated else None,
            usage_of=dialect.usage,
            usage_marker=dialect.usage_marker,
            terminal=dialect.terminal,
        )
        return
    asked = facts.usage_asked
    if not asked:
        options = facts.options if facts.options is not None else stream_options(req.body)
        fields["stream_options"] = usage_option(options)
    req.tap = StreamTap(not asked, scrub, revealing) if isolated else StreamTap(not asked)


def _reserve(rt: Runtime, req: ProxyRequest, key: ApiKey, facts: Facts, fields: dict) -> None:
    """Admit the key's request against its limits and hold the most it may cost
    against its budget (appliance/access/keys.py). A request that set no completion
    length is reserved at the model's default cap (default_max_tokens, else its
    context); when the budget leaves less, or the default is below the context,
    the engine is told the cap, so it can never generate more than was reserved."""
    route = req.route.name if req.route is not None else None
    dep = rt.supervisor.find(req.target)
    if dep is None:  # the 404 comes next, once the key may ask (a 403 first)
        req.reservation = rt.gate.admit(key, route)
        return
    ep = req.endpoint
    context = dep.model.context_length
    ceiling = dep.model.default_max_tokens or context
    budget = facts.budget
    if budget is None:  # a worker reads it of every request it passes on with a key's header
        raise ApplianceError("Internal error: a keyed request came without its budget's facts")
    cap, n, prompt = budget.cap, budget.n, budget.prompt
    res = req.reservation = rt.gate.admit(key, route, prompt, cap, ceiling, n)
    req.completion_cap = cap if cap is not None else (res.completion or ceiling) * n
    limit = None
    if res.completion is not None and res.completion < context and ep.length_field:
        # Keep prompt + max_tokens within the context (the prompt is at most its bound).
        limit = min(res.completion, context - prompt) if context - prompt >= 1 else res.completion
        fields[ep.length_field] = limit
    n_predict = budget.n_predict
    if key.budget_tokens and n_predict is not None and (limit is not None or (n_predict < 0 and cap)):
        # llama.cpp reads n_predict before max_tokens, and a negative one runs to the context's end.
        fields["n_predict"] = limit if limit is not None else (cap or 0) // n


# Its requests may ask the engine to store the response (gateway/response_homes.py).
RESPONSES_ENDPOINT = capabilities.ENDPOINTS["/v1/responses"]


async def _proxy_endpoint(scope: HTTPScope, receive: Receive, send: Send) -> None:
    path = scope["path"]
    try:
        await _forward(scope, receive, send, path, capabilities.ENDPOINTS[path])
    except ClientGone:
        return


@asgi(list(capabilities.ENDPOINTS), copy_scope=False)
async def proxy_endpoints(scope: Scope, receive: Receive, send: Send) -> None:
    """The proxy endpoints as Litestar routes them (its TestClient, methods other than POST)."""
    await _proxy_endpoint(cast("HTTPScope", scope), receive, send)


def front_door(app: Litestar):
    """The ASGI callable the server runs. A POST to a proxy endpoint (nearly all of
    the traffic) goes straight to the hot path: Litestar's routing, scope copy and
    exception middleware cost a measurable share of a proxied request (see
    bench/gateway_overhead.py). Everything else goes through Litestar, which also
    routes the proxy endpoints to the same code (its TestClient, other methods).
    Errors take the same shape either way (``error_parts``)."""

    endpoints = capabilities.ENDPOINTS

    # The server's own scope: plain strings where Litestar's types say enums.
    async def front(scope: Any, receive: Receive, send: Send) -> None:
        # (No coroutine between the server and _forward: each one in the chain is
        # re-entered every time the request's task resumes.)
        if scope["type"] == "http" and scope["method"] == "POST" and (ep := endpoints.get(scope["path"])) is not None:
            scope["app"] = app  # _forward finds the runtime here
            try:
                await _forward(scope, receive, send, scope["path"], ep)
            except ClientGone:
                return
            except Exception as exc:
                req = scope.get("proxy_request")
                if req is not None and req.bytes_sent:  # the answer is on its way: nothing sane to add to it
                    raise
                status, headers, body = error_parts(exc, "POST", scope["path"], scope.get("request_id"))
                if req is not None and not req.body_taken:
                    # Refused before its body was read (no key, cross-origin, compressed, too
                    # large): the rest of it is never read, so the connection closes. Said
                    # here, not left to Granian, which keeps it only when the body happened
                    # to be in its buffer already; with workers the body always is.
                    headers["connection"] = "close"
                with contextlib.suppress(Exception):  # the client may have gone already
                    await send_whole(send, status, JSON, body, headers)
            return
        if scope["type"] == "http" and scope["path"].startswith(ADMIN_MODELS):
            scope = routed_whole(scope)  # an ORG/NAME model's name kept one segment
        if scope["type"] == "http" and scope["method"] == "HEAD":
            send = _without_body(_with_request_id(scope, send))
            await app(cast("HTTPScope", {**scope, "method": "GET"}), receive, send)
            return
        await app(scope, receive, _with_request_id(scope, send) if scope["type"] == "http" else send)

    return front


def _with_request_id(scope: Any, send: Send) -> Send:
    """Every answer carries X-Request-Id, as the proxied ones do: the client's own
    (``request_id_of``), else a new one; an error's envelope names the same
    (``error_parts`` reads scope["request_id"]), and the SDKs show it on their errors."""
    sent = next((v for k, v in scope["headers"] if k == b"x-request-id"), None)
    scope["request_id"] = rid = request_id_of(sent)

    async def send_with_id(message: Any) -> None:
        if message["type"] == "http.response.start":
            headers = list(message.get("headers", ()))
            if not any(k.lower() == b"x-request-id" for k, _ in headers):
                headers.append((b"x-request-id", rid.encode("latin-1")))
            message = {**message, "headers": headers}
        await send(message)

    return send_with_id


def _without_body(send: Send) -> Send:
    """HEAD: what GET answers, status and headers (its Content-Length too), without
    the body (RFC 9110 9.3.2): a monitor's `curl -I /healthz` gets 200, not 405."""

    async def send_head(message: Any) -> None:
        if message["type"] == "http.response.body":
            message = {**message, "body": b""}
        await send(message)

    return send_head


@get("/openapi.json", include_in_schema=False)
async def openapi_document(request: Request) -> Response:
    """The API's OpenAPI document (appliance/api/openapi.py); admin access, like /admin/*."""
    rt = admin(request)
    if rt.openapi is None:
        from appliance.api.openapi import build

        rt.openapi = build(ROUTE_HANDLERS, rt.supervisor.model_names(), version())
    return Response(rt.openapi, media_type=JSON)


# --- the app --------------------------------------------------------------------

ROUTE_HANDLERS = [
    proxy_endpoints,
    list_models,
    get_model,
    get_response,
    delete_response,
    cancel_response,
    list_input_items,
    healthz,
    readyz,
    metrics,
    admin_status,
    admin_scale,
    admin_model_action,
    admin_replica_action,
    admin_reload,
    admin_gpus,
    admin_replica_log,
    admin_daemon_log,
    openapi_document,
]


def create_app(cfg: Config, reread: Callable[[], Config] | None = None) -> Litestar:
    """reread: the config as the daemon's command line reads it, for reloads (default:
    the file cfg came from)."""

    return Litestar(
        route_handlers=ROUTE_HANDLERS,
        lifespan=[lifespan_for(cfg, reread)],
        exception_handlers={Exception: error_response},
        before_send=[options_allow],
        request_max_body_size=cfg.server.max_body_bytes,
        openapi_config=None,
        logging_config=None,
        debug=False,
    )


__all__ = ["Runtime", "create_app", "encode_error", "error_parts", "front_door"]
