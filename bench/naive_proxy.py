"""The baselines for bench/gateway_overhead.py: proxies on Granian with no features.

    python bench/naive_proxy.py PORT UPSTREAM_URL [--raw | --rsgi]

Default: what DEVELOPERS.md calls the bar to beat, written the obvious way: a
Litestar ``@post`` handler that takes the request, forwards its body with one
shared aiohttp ``ClientSession`` and returns the engine's answer; Granian (ASGI)
in front. No routing, no audit, no metrics: only the proxying. A streamed answer
(the engine's text/event-stream) is relayed as it comes: each piece read from the
engine is sent on at once (Litestar's ``Stream``).

--raw: the floor of the stack: a bare ASGI callable (no framework) doing the same
forwarding with the same session on the same server, a stream relayed piece by
piece as aiohttp reads it (one ASGI send per read). Nothing built on Granian's
ASGI and aiohttp's client can be much cheaper per request, or per chunk, than this.

--rsgi: the same floor on Granian's RSGI protocol instead of ASGI (the request's body
read with ``await proto()``, an answer written with ``response_bytes``, a stream with
``response_stream`` and one ``send_bytes`` per read: no message dict per hand-off). What
serving the hot path over RSGI could save at most, measured in the same run as the
ASGI floor.
"""

from __future__ import annotations

import sys

import aiohttp
import uvloop
from granian.constants import Interfaces
from granian.server.embed import Server
from litestar import Litestar, Request, Response, get, post
from litestar.response import Stream

UPSTREAM = sys.argv[2] if len(sys.argv) > 2 else "http://127.0.0.1:8001"
SESSION: dict[str, aiohttp.ClientSession] = {}


@post("/v1/chat/completions", status_code=200)
async def chat(request: Request) -> Response:
    body = await request.body()
    resp = await SESSION["s"].post(UPSTREAM + "/v1/chat/completions", data=body,
                                   headers={"Content-Type": "application/json"})
    if resp.content_type == "text/event-stream":
        return Stream(_pieces(resp), status_code=resp.status, media_type="text/event-stream")
    async with resp:
        data = await resp.read()
        return Response(data, status_code=resp.status, media_type="application/json")


async def _pieces(resp: aiohttp.ClientResponse):
    """What the engine has sent so far, read by read, until it ends; the connection released after."""
    try:
        async for data in resp.content.iter_any():
            yield data
    finally:
        resp.release()


@get("/health")
async def health() -> str:
    return "ok"


async def open_session() -> None:
    SESSION["s"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))


async def close_session() -> None:
    await SESSION["s"].close()


async def raw_app(scope, receive, send) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await open_session()
            await send({"type": "lifespan.startup.complete"})
        await close_session()
        await send({"type": "lifespan.shutdown.complete"})
        return
    if scope["path"] == "/health":
        data, status = b"ok", 200
    else:
        body = (await receive())["body"]
        async with SESSION["s"].post(UPSTREAM + scope["path"], data=body,
                                     headers={"Content-Type": "application/json"}) as resp:
            if resp.content_type == "text/event-stream":
                await relay_stream(resp, send)
                return
            data, status = await resp.read(), resp.status
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data, "more_body": False})


async def relay_stream(resp: aiohttp.ClientResponse, send) -> None:
    """The floor of relaying a stream: each read from the engine sent on at once."""
    await send({"type": "http.response.start", "status": resp.status,
                "headers": [(b"content-type", b"text/event-stream")]})
    async for data in resp.content.iter_any():
        await send({"type": "http.response.body", "body": data, "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def rsgi_app(scope, proto) -> None:
    """The floor on RSGI: raw_app's forwarding, without ASGI's message dicts."""
    if scope.path == "/health":
        proto.response_bytes(200, [("content-type", "text/plain")], b"ok")
        return
    body = await proto()
    if "s" not in SESSION:  # RSGI has no async start-up hook: the first request opens it
        await open_session()
    async with SESSION["s"].post(UPSTREAM + scope.path, data=body,
                                 headers={"Content-Type": "application/json"}) as resp:
        if resp.content_type == "text/event-stream":
            out = proto.response_stream(resp.status, [("content-type", "text/event-stream")])
            async for data in resp.content.iter_any():
                await out.send_bytes(data)
            return
        data = await resp.read()
    proto.response_bytes(resp.status, [("content-type", "application/json")], data)


async def main(port: int, kind: str) -> None:
    interface = Interfaces.RSGI if kind == "rsgi" else Interfaces.ASGI
    app = {"rsgi": rsgi_app, "raw": raw_app}.get(kind) or Litestar(
        [chat, health], on_startup=[open_session], on_shutdown=[close_session], openapi_config=None)
    await Server(app, address="127.0.0.1", port=port, interface=interface, log_enabled=False,
                 backlog=1024).serve()


if __name__ == "__main__":
    flags = sys.argv[3:]
    uvloop.run(main(int(sys.argv[1]), "rsgi" if "--rsgi" in flags else "raw" if "--raw" in flags else "naive"))
