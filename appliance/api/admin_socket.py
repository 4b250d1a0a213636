"""The admin API on a local unix socket (``server.admin_socket``).

A second embedded Granian server, bound with ``uds=``, serves the same app: who
may open the socket file (mode 0660: its owner and group) may send requests, and each
must carry the socket's token (appliance/socket_token.py; the daemon writes it before
the socket listens) or the admin token. Requests that arrive through it are marked in
the ASGI scope, where ``AdminAccess`` asks for that token; only ``/admin/`` paths and
``/healthz`` are served.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from pathlib import Path

from granian.constants import Interfaces
from granian.server.embed import Server

from appliance.api.admin_paths import routed_whole
from appliance.errors import encode_error

log = logging.getLogger("appliance.admin_socket")

MODE = 0o660
SCOPE_KEY = "appliance.admin_socket"


def via_admin_socket(scope) -> bool:
    """True for a request that came through the admin socket (TCP clients cannot set this)."""
    return bool(scope.get(SCOPE_KEY))


class SocketApp:
    """The app as the socket serves it: marked, admin paths only."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            path = scope.get("path", "")
            if not (path.startswith("/admin/") or path == "/healthz"):
                body = encode_error("The admin socket serves /admin/ only", "invalid_request_error", None, "not_found")
                await send(
                    {
                        "type": "http.response.start",
                        "status": 404,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": body, "more_body": False})
                return
            scope = routed_whole(scope)  # an ORG/NAME model's name kept one segment
            scope[SCOPE_KEY] = True
        await self.app(scope, receive, send)


def admin_socket_server(app, path: str) -> Server:
    """A Granian server for the admin socket. No lifespan (ASGINL): the TCP server
    runs the app's lifespan; start this one after it."""
    sock = Path(path)
    sock.parent.mkdir(parents=True, exist_ok=True)
    clear_stale(sock)
    server = Server(SocketApp(app), uds=sock, interface=Interfaces.ASGINL, log_enabled=False)
    server.uds_permissions = MODE  # granian applies it when it binds
    return server


def clear_stale(path: Path) -> None:
    """Remove a socket left by a daemon that was killed; refuse to take over a live one."""
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_socket():
        raise OSError(f"{path} exists and is not a socket (server.admin_socket)")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            log.info("removed a stale admin socket %s", path)
            return
    raise OSError(f"{path}: another daemon answers on this admin socket")
