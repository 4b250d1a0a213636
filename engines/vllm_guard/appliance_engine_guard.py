"""The replica key on every path of a vLLM server, loaded by vLLM itself.

vLLM's own API key (VLLM_API_KEY) guards only the paths under /v1: /tokenize,
/detokenize, /pooling, /classify, /score, /invocations, /metrics, /server_info and
the dev-mode /sleep, /wake_up, /collective_rpc and /reset_prefix_cache answer
anyone who reaches the server. The replica listens on a unix socket in its private
directory, but every engine runs as the daemon's user, and Landlock does not
mediate connecting to a unix socket, so another engine could call those paths
around the daemon's policy.

The vLLM adapter (engines/vllm.py) starts vLLM with ``--middleware
appliance_engine_guard.EngineKeyGuard`` and this file's directory (it holds
nothing else) on PYTHONPATH; vLLM adds the class with ``app.add_middleware``, the
outermost layer of its app. Every HTTP request and websocket, on every path and
method (/health and OPTIONS included), must carry exactly one ``Authorization:
Bearer <key>`` header, the key being $VLLM_API_KEY (the replica's secret, which
vLLM already gets); anything else is answered 401 before vLLM sees it. Without a
key in the environment every request is refused: the guard fails closed.

It runs inside vLLM's own Python: the standard library only (tests check it).
"""

from __future__ import annotations

import hmac
import os
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

KEY_VARIABLE = "VLLM_API_KEY"
REFUSAL = b'{"error":"Unauthorized"}'
# A websocket closed before it is accepted: the server answers the handshake 403.
POLICY_VIOLATION = 1008


class EngineKeyGuard:
    """Pure ASGI middleware: the lifespan passes, every request needs the key."""

    def __init__(self, app: App) -> None:
        self.app = app
        key = os.environ.get(KEY_VARIABLE, "")
        # None: no key, so no header can match (hmac.compare_digest never runs).
        self.expected = b"Bearer " + key.encode() if key else None
        if self.expected is None:
            print(f"appliance_engine_guard: ${KEY_VARIABLE} is empty: every request is refused", file=sys.stderr)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope.get("type")
        if kind == "lifespan":
            await self.app(scope, receive, send)
        elif kind in ("http", "websocket") and self.admits(scope):
            await self.app(scope, receive, send)
        elif kind == "http":
            await refuse_http(send)
        elif kind == "websocket":
            await send({"type": "websocket.close", "code": POLICY_VIOLATION})
        # Any other kind of scope is not served at all.

    def admits(self, scope: Scope) -> bool:
        """Exactly one Authorization header, equal to "Bearer <key>" (compared in
        constant time: the time taken says nothing about how much of it matched)."""
        sent = [value for name, value in scope.get("headers", ()) if name.lower() == b"authorization"]
        if self.expected is None or len(sent) != 1:
            return False
        return hmac.compare_digest(bytes(sent[0]), self.expected)


async def refuse_http(send: Send) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 401,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(REFUSAL)).encode()),
                (b"www-authenticate", b"Bearer"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": REFUSAL})
