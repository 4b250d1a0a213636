"""The TUI's only way to the daemon: its admin API, over the admin unix socket
(file permissions decide who may administer) or over TCP with the admin token."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import httpx


class DaemonDown(Exception):
    """The daemon does not answer (not running, or the socket is not ours to open)."""


class AdminError(Exception):
    """The daemon answered with an error; its message is for the operator."""


class Admin(Protocol):
    """What the TUI asks of the daemon (tests feed it fixed data through this seam)."""

    where: str

    async def status(self) -> dict: ...
    async def gpus(self) -> dict: ...
    async def log(self, model: str, index: int, lines: int) -> dict: ...
    async def scale(self, model: str, replicas: int | None) -> dict: ...
    async def model_action(self, model: str, action: str) -> dict: ...
    async def replica_action(self, model: str, index: int, action: str) -> dict: ...
    async def close(self) -> None: ...


class AdminClient:
    def __init__(self, *, socket: str | None = None, url: str | None = None, token: str = "",
                 timeout: float = 5.0) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if socket:
            self.where = f"unix:{socket}"
            transport = httpx.AsyncHTTPTransport(uds=socket)
            base = "http://appliance"
        else:
            self.where = base = (url or "http://127.0.0.1:8000").rstrip("/")
            transport = None
        self.socket = socket
        self.http = httpx.AsyncClient(base_url=base, transport=transport, headers=headers, timeout=timeout)

    async def _call(self, method: str, path: str, **kw: Any) -> dict:
        try:
            resp = await self.http.request(method, path, **kw)
        except httpx.TransportError as exc:
            raise DaemonDown(self._why_down(exc)) from None
        if resp.status_code >= 400:
            try:
                message = resp.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = f"HTTP {resp.status_code}"
            raise AdminError(message)
        try:
            return resp.json()
        except ValueError:
            raise AdminError(f"{method} {path}: the daemon's answer is not JSON") from None

    def _why_down(self, exc: Exception) -> str:
        text = str(exc) or type(exc).__name__
        if self.socket and "Permission denied" in text:
            return (f"no permission to open {self.socket}: administering needs its owner or group "
                    "(ls -l shows them)")
        if "No such file" in text or "Connection refused" in text or "Errno 111" in text:
            return f"the daemon is not running (nothing answers at {self.where})"
        return f"the daemon does not answer at {self.where}: {text}"

    async def status(self) -> dict:
        return await self._call("GET", "/admin/status")

    async def gpus(self) -> dict:
        return await self._call("GET", "/admin/gpus")

    async def log(self, model: str, index: int, lines: int) -> dict:
        return await self._call("GET", f"/admin/models/{model}/replicas/{index}/log", params={"lines": lines})

    async def scale(self, model: str, replicas: int | None) -> dict:
        return await self._call("POST", f"/admin/models/{model}/scale", json={"replicas": replicas})

    async def model_action(self, model: str, action: str) -> dict:
        return await self._call("POST", f"/admin/models/{model}/{action}")

    async def replica_action(self, model: str, index: int, action: str) -> dict:
        return await self._call("POST", f"/admin/models/{model}/replicas/{index}/{action}")

    async def close(self) -> None:
        await self.http.aclose()


@dataclass
class Target:
    """Where `appliance tui` connects, decided from the config and the options."""

    socket: str | None = None
    url: str | None = None
    token: str = ""

    def client(self) -> AdminClient:
        return AdminClient(socket=self.socket, url=self.url, token=self.token)


def target_from_config(cfg, *, socket: str | None = None, url: str | None = None,
                       token_file: str | None = None) -> Target:
    """--url: TCP with the admin token (--token-file, else server.admin_token_file);
    else the admin socket (--socket, else server.admin_socket); with the socket off,
    TCP to server.host:server.port."""
    from pathlib import Path

    from appliance.config import read_admin_token

    def token() -> str:
        if token_file:
            return Path(token_file).read_text().strip()
        return read_admin_token(cfg)

    if url:
        return Target(url=url, token=token())
    path = socket or cfg.server.admin_socket
    if path:
        return Target(socket=path)
    host = "127.0.0.1" if cfg.server.host in ("0.0.0.0", "::", "") else cfg.server.host
    if ":" in host:
        host = f"[{host}]"
    return Target(url=f"http://{host}:{cfg.server.port}", token=token())
