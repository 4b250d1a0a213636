"""The TUI's only way to the daemon: its admin API, over the admin unix socket
(file permissions decide who may administer) or over TCP with the admin token."""

from __future__ import annotations

from typing import Any, Protocol

import httpx

from appliance.daemon.admin_client import AdminError, DaemonDown, Target, answer, target_from_config

__all__ = ["Admin", "AdminClient", "AdminError", "DaemonDown", "Target", "target_from_config"]


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
    def __init__(
        self, *, socket: str | None = None, url: str | None = None, token: str = "", timeout: float = 5.0
    ) -> None:
        self.target = Target(socket=socket, url=url or (None if socket else "http://127.0.0.1:8000"), token=token)
        self.where = self.target.where
        transport = httpx.AsyncHTTPTransport(uds=socket) if socket else None
        self.http = httpx.AsyncClient(transport=transport, timeout=timeout, **self.target.client_options())

    @classmethod
    def to(cls, target: Target) -> AdminClient:
        return cls(socket=target.socket, url=target.url, token=target.token)

    async def _call(self, method: str, path: str, **kw: Any) -> dict:
        try:
            resp = await self.http.request(method, path, **kw)
        except httpx.TransportError as exc:
            raise DaemonDown(self.target.why_down(exc)) from None
        return answer(resp)

    async def status(self) -> dict:
        return await self._call("GET", "/admin/status")

    async def gpus(self) -> dict:
        return await self._call("GET", "/admin/gpus")

    async def log(self, model: str, index: int, lines: int) -> dict:
        return await self._call("GET", f"/admin/models/{model}/replicas/{index}/log", params={"lines": lines})

    # State-changing calls send JSON (an empty object where there is nothing to say):
    # the daemon refuses any other content type.
    async def scale(self, model: str, replicas: int | None) -> dict:
        return await self._call("POST", f"/admin/models/{model}/scale", json={"replicas": replicas})

    async def model_action(self, model: str, action: str) -> dict:
        return await self._call("POST", f"/admin/models/{model}/{action}", json={})

    async def replica_action(self, model: str, index: int, action: str) -> dict:
        return await self._call("POST", f"/admin/models/{model}/replicas/{index}/{action}", json={})

    async def close(self) -> None:
        await self.http.aclose()
