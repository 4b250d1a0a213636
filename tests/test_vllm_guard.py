"""The guard vLLM loads (--middleware appliance_engine_guard.EngineKeyGuard): the
replica's key on every path, not only /v1 (vLLM's own key), so another engine that
connects to a vLLM replica's unix socket gets nothing from it. No vLLM here: the
guard runs around a tiny ASGI app, loaded the way vLLM loads a --middleware."""

from __future__ import annotations

import ast
import importlib
import sys

import aiohttp
import pytest
from aiohttp import web

from engines import CannotLaunch
from engines.vllm import GUARD_DIR, GUARD_MIDDLEWARE, guard_in_force

KEY = "k3y-" + "f" * 60
# vLLM's paths outside /v1 (the ones its own key leaves open), /v1 itself and the probes'.
PATHS = [
    "/tokenize", "/detokenize", "/pooling", "/classify", "/score", "/rerank", "/invocations",
    "/sleep", "/wake_up", "/is_sleeping", "/collective_rpc", "/reset_prefix_cache", "/metrics",
    "/server_info", "/health", "/ping", "/version", "/load", "/docs", "/openapi.json",
    "/v1/completions", "/v1/models", "/", "/no/such/path",
]


def load_guard(monkeypatch):
    """The class, as vLLM gets it: import_module on the module path, getattr the name."""
    monkeypatch.syspath_prepend(str(GUARD_DIR))
    sys.modules.pop("appliance_engine_guard", None)
    module_path, name = GUARD_MIDDLEWARE.rsplit(".", 1)
    return importlib.import_module(module_path), name


@pytest.fixture
def guard_module(monkeypatch):
    monkeypatch.setenv("VLLM_API_KEY", KEY)
    module, _ = load_guard(monkeypatch)
    return module


class TinyApp:
    """An ASGI app that answers 200 "served" and records every scope it was given."""

    def __init__(self):
        self.seen = []

    async def __call__(self, scope, receive, send):
        self.seen.append(scope)
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"served"})
        elif scope["type"] == "websocket":
            await send({"type": "websocket.accept"})


async def call(guard, scope):
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    await guard(scope, receive, send)
    return sent


def http(path, method="GET", headers=()):
    return {"type": "http", "method": method, "path": path, "raw_path": path.encode(), "query_string": b"",
            "headers": list(headers)}


def bearer(key):
    return (b"authorization", f"Bearer {key}".encode())


@pytest.mark.parametrize("method", ["GET", "POST", "OPTIONS"])
async def test_every_path_is_refused_without_the_key_and_never_reaches_vllm(guard_module, method):
    inner = TinyApp()
    guard = guard_module.EngineKeyGuard(inner)
    for path in PATHS:
        sent = await call(guard, http(path, method))
        assert sent[0]["status"] == 401, path
        assert sent[1]["body"] == b'{"error":"Unauthorized"}'
    assert inner.seen == []


async def test_every_path_is_served_with_the_key(guard_module):
    inner = TinyApp()
    guard = guard_module.EngineKeyGuard(inner)
    for path in PATHS:
        sent = await call(guard, http(path, "POST", [(b"content-type", b"application/json"), bearer(KEY)]))
        assert (sent[0]["status"], sent[1]["body"]) == (200, b"served"), path
    assert [s["path"] for s in inner.seen] == PATHS


@pytest.mark.parametrize(
    "headers",
    [
        [bearer("k3y-wrong")],
        [bearer(KEY[:-1])],
        [bearer(KEY + "0")],
        [(b"authorization", KEY.encode())],  # no scheme
        [(b"authorization", f"Basic {KEY}".encode())],
        [(b"x-api-key", KEY.encode())],  # vLLM's Anthropic header is not the replica's door
        [bearer("k3y-wrong"), bearer(KEY)],  # two headers: which one a layer reads is not ours to guess
        [bearer(KEY), bearer(KEY)],
    ],
    ids=["wrong", "short", "long", "no-scheme", "basic", "x-api-key", "wrong-then-right", "twice"],
)
async def test_anything_but_exactly_one_bearer_with_the_key_is_refused(guard_module, headers):
    inner = TinyApp()
    sent = await call(guard_module.EngineKeyGuard(inner), http("/sleep", "POST", headers))
    assert sent[0]["status"] == 401 and inner.seen == []


async def test_the_header_name_is_matched_in_any_case(guard_module):
    inner = TinyApp()
    sent = await call(guard_module.EngineKeyGuard(inner), http("/metrics", headers=[(b"Authorization", b"Bearer " + KEY.encode())]))
    assert sent[0]["status"] == 200


async def test_the_key_is_compared_in_constant_time_by_hmac(guard_module, monkeypatch):
    compared = []
    real = guard_module.hmac.compare_digest

    def spy(a, b):
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(guard_module.hmac, "compare_digest", spy)
    guard = guard_module.EngineKeyGuard(TinyApp())
    await call(guard, http("/tokenize", headers=[bearer("k3y-wrong")]))
    await call(guard, http("/tokenize", headers=[bearer(KEY)]))
    expected = f"Bearer {KEY}".encode()
    assert compared == [(b"Bearer k3y-wrong", expected), (expected, expected)]


async def test_a_websocket_without_the_key_is_closed_before_it_is_accepted(guard_module):
    inner = TinyApp()
    guard = guard_module.EngineKeyGuard(inner)
    refused = await call(guard, {"type": "websocket", "path": "/v1/realtime", "headers": []})
    assert refused == [{"type": "websocket.close", "code": 1008}] and inner.seen == []
    accepted = await call(guard, {"type": "websocket", "path": "/v1/realtime", "headers": [bearer(KEY)]})
    assert accepted == [{"type": "websocket.accept"}]


async def test_the_lifespan_passes_and_unknown_scopes_are_not_served(guard_module):
    inner = TinyApp()
    guard = guard_module.EngineKeyGuard(inner)
    await call(guard, {"type": "lifespan"})
    await call(guard, {"type": "something-else", "headers": [bearer(KEY)]})
    assert [s["type"] for s in inner.seen] == ["lifespan"]


@pytest.mark.parametrize("value", [None, ""])
async def test_without_a_key_in_the_environment_every_request_is_refused(monkeypatch, value, capsys):
    if value is None:
        monkeypatch.delenv("VLLM_API_KEY", raising=False)
    else:
        monkeypatch.setenv("VLLM_API_KEY", value)
    module, name = load_guard(monkeypatch)
    inner = TinyApp()
    guard = getattr(module, name)(inner)
    for headers in ([], [(b"authorization", b"Bearer ")], [(b"authorization", b"Bearer")]):
        assert (await call(guard, http("/health", headers=headers)))[0]["status"] == 401
    assert inner.seen == []
    assert "every request is refused" in capsys.readouterr().err


def test_starlette_may_pass_the_app_by_position_or_by_name(guard_module):
    # Starlette builds a middleware class as cls(app, ...) (newer) or cls(app=app, ...) (older).
    inner = TinyApp()
    assert guard_module.EngineKeyGuard(inner).app is inner
    assert guard_module.EngineKeyGuard(app=inner).app is inner


def test_the_guard_imports_nothing_outside_the_standard_library():
    # It runs inside vLLM's own Python, where the appliance's packages are not installed.
    tree = ast.parse((GUARD_DIR / "appliance_engine_guard.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "no relative imports: it is a top-level module there"
            imported.add(node.module.split(".")[0])
    assert imported and imported <= set(sys.stdlib_module_names) | {"__future__"}, imported


# --- the replica's readiness: the guard must be in force on the socket ---------------


async def serve_on_socket(path, metrics_status):
    async def metrics(request):
        if request.headers.get("Authorization") == f"Bearer {KEY}":
            return web.Response(text="vllm:num_requests_running 0\n")
        return web.Response(status=metrics_status, text="anonymous")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.UnixSite(runner, str(path)).start()
    return runner


async def probe(tmp_path, metrics_status):
    sock = tmp_path / "engine.sock"
    runner = await serve_on_socket(sock, metrics_status)
    session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sock)),
                                    headers={"Authorization": f"Bearer {KEY}"})
    try:
        await guard_in_force(session, "http://localhost", timeout=10)
        # The replica's own session (and its key) is left as it was.
        async with session.get("http://localhost/metrics") as resp:
            assert resp.status == 200
    finally:
        await session.close()
        await runner.cleanup()


async def test_a_vllm_replica_that_answers_metrics_without_its_key_cannot_launch(tmp_path):
    with pytest.raises(CannotLaunch, match=r"answered GET /metrics sent without its key \(HTTP 200\).*--middleware"):
        await probe(tmp_path, 200)


@pytest.mark.parametrize("status", [401, 403])
async def test_a_vllm_replica_that_refuses_metrics_without_its_key_is_ready(tmp_path, status):
    await probe(tmp_path, status)
