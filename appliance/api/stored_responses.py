"""Calls on a stored Response (GET, DELETE, cancel, input_items): sent to the replica
that stored it, for the key that made it only (another key's is a 404, like one that
never was), refused to web pages as the front door refuses them, audited and
rate-limited like any request, charged nothing. Input items are answered from what the
daemon kept (appliance/gateway/response_items.py): no engine lists them."""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING

from litestar import Request, Response, delete, get, post

from appliance.api.callers import authorization, runtime
from appliance.api.http_errors import JSON, request_id
from appliance.errors import ApplianceError, StateWriteFailed
from appliance.gateway import response_items
from appliance.gateway.api_responses import ResponsesRequest, refuse_streamed_retrieve, stored_answer
from appliance.gateway.capabilities import Endpoint
from appliance.gateway.ledger import committed, finish
from appliance.gateway.relay import FREE
from appliance.gateway.request import ProxyRequest, engine_request_id, new_request_id, peer_of

if TYPE_CHECKING:
    from appliance.api.app import Runtime


@get("/v1/responses/{response_id:str}")
async def get_response(request: Request) -> Response:
    """A stored Response, from the replica that stored it, for the key that made it."""
    return await _stored_response(request, "GET", "", "responses_get")


@delete("/v1/responses/{response_id:str}", status_code=200)
async def delete_response(request: Request) -> Response:
    """Delete a stored Response on the replica that holds it (the key that made it only)."""
    return await _stored_response(request, "DELETE", "", "responses_delete")


@post("/v1/responses/{response_id:str}/cancel", status_code=200)
async def cancel_response(request: Request) -> Response:
    """Cancel a background Response on the replica that runs it (the key that made it only)."""
    return await _stored_response(request, "POST", "/cancel", "responses_cancel")


@get("/v1/responses/{response_id:str}/input_items")
async def list_input_items(request: Request) -> Response:
    """A stored Response's input items (the key that made it only), from the input the
    daemon kept: no engine lists them (appliance/gateway/response_items.py)."""
    return await _stored_response(request, "GET", "/input_items", "responses_input_items")


# Calls on a stored Response: audited, rate-limited like any request, charged nothing.
_STORED = {
    name: Endpoint(name, ResponsesRequest, "", generates=False, free=True)
    for name in ("responses_get", "responses_delete", "responses_cancel", "responses_input_items")
}


async def _stored_response(request: Request, method: str, suffix: str, endpoint: str) -> Response:
    """A call on a stored Response, sent to the replica that stored it for the key
    that made it (another key's response is a 404, like one that never was),
    audited like any request; runs no inference, so charges nothing."""
    rt = runtime(request)
    rid = request_id(request) or new_request_id()
    client = peer_of(request.scope.get("client"))
    req = ProxyRequest(rid, time.perf_counter(), time.time(), _STORED[endpoint], request.receive, client, usage=FREE)
    if rt.proxies is not None:
        rt.proxies.name_client(req, request.scope.get("client"), request.scope["headers"])
    try:
        _refuse_web_pages(rt, request)
        auth = authorization(request)
        req.key = rt.gate.authenticate(auth) if auth is not None or rt.gate.required else None
        rt.audit.admit(req.accountable)
        response_id = request.path_params["response_id"]
        listing = response_items.query(request.query_params) if suffix == "/input_items" else None
        if method == "GET" and not suffix:
            refuse_streamed_retrieve(request.query_params)
        replica = rt.response_homes.find(response_id, req.key, "response_id")
        req.model, req.served_by = replica.model.name, replica.name
        if listing is not None:  # kept here: answered without the engine
            data = response_items.listed(rt.response_homes.inputs(response_id), response_id, listing)
            status, content_type = 200, JSON
        else:
            path = f"/v1/responses/{response_id}{suffix}"
            # Made unique whoever chose the id (a rare call: no need to ask who did).
            sent = {"X-Request-Id": engine_request_id(rid, True)}
            status, data, content_type = await rt.proxy.unary(replica, path, None, sent, method)
            if status == 200 and method != "DELETE":  # cut at its cap: incomplete, as its create said
                data = stored_answer(data, response_items.kept_cap(rt.response_homes.inputs(response_id)))
    except ApplianceError as exc:
        finish(rt, req, exc.status)
        if not isinstance(exc, StateWriteFailed):
            with contextlib.suppress(StateWriteFailed):
                await committed(req)
        raise
    if method == "DELETE":
        rt.response_homes.forget(response_id)
    finish(rt, req, status)
    await committed(req)
    return Response(rt.tenancy.answer(data), status_code=status, media_type=content_type)


def _refuse_web_pages(rt: Runtime, request: Request) -> None:
    """What the front door refuses of a web page, for a call on a stored Response: another
    origin's (a "simple" cross-site POST .../cancel would run), and, with no key required,
    one that rebound its name to this server (a same-origin GET reads the answer: the
    model API's other GETs' Host rule, appliance/api/callers.py)."""
    headers = request.headers
    rt.admin.refuse_cross_site(headers.get("origin"), headers.get("sec-fetch-site"), "API", "use")
    if not rt.gate.required:
        rt.admin.check_host(request, "API")
