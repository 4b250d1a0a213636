"""The TUI's only way to the daemon: its admin API, over the admin unix socket
(file permissions decide who may open it; each request carries the token the daemon
wrote next to it) or over TCP with the admin token."""

from __future__ import annotations

from typing import Any, Protocol, TypeVar

import httpx

from appliance.daemon.admin_client import (
    JSON_BODY,
    AdminError,
    DaemonDown,
    Target,
    answer,
    encode_body,
    socket_token,
    target_from_config,
)
from appliance.status import (
    SCALE,
    DaemonLog,
    DaemonStatus,
    GpusStatus,
    ModelAction,
    ModelStatus,
    ReloadBody,
    ReloadReport,
    ReplicaAction,
    ReplicaLog,
    ReplicaStatus,
    ScaleBody,
    model_path,
)

T = TypeVar("T")

__all__ = ["Admin", "AdminClient", "AdminError", "DaemonDown", "Target", "target_from_config"]


class Admin(Protocol):
    """What the TUI asks of the daemon (tests feed it fixed data through this seam)."""

    where: str

    async def status(self) -> DaemonStatus: ...
    async def gpus(self) -> GpusStatus: ...
    async def log(self, model: str, index: int, lines: int) -> ReplicaLog: ...
    async def daemon_log(self, lines: int) -> DaemonLog: ...
    async def scale(self, model: str, replicas: int | None) -> ModelStatus: ...
    async def model_action(self, model: str, action: ModelAction) -> ModelStatus: ...
    async def replica_action(self, model: str, index: int, action: ReplicaAction) -> ReplicaStatus: ...
    async def reload(self) -> ReloadReport: ...
    async def close(self) -> None: ...


class AdminClient:
    def __init__(
        self, *, socket: str | None = None, url: str | None = None, token: str = "", timeout: float = 5.0
    ) -> None:
        if socket and not token:
            token = socket_token(socket)
        self.target = Target(socket=socket, url=url or (None if socket else "http://127.0.0.1:8000"), token=token)
        self.where = self.target.where
        transport = httpx.AsyncHTTPTransport(uds=socket) if socket else None
        self.http = httpx.AsyncClient(transport=transport, timeout=timeout, **self.target.client_options())

    @classmethod
    def to(cls, target: Target) -> AdminClient:
        return cls(socket=target.socket, url=target.url, token=target.token)

    async def _call(self, method: str, path: str, into: type[T], **kw: Any) -> T:
        resp = await self._request(method, path, **kw)
        if resp.status_code == 401 and (renewed := self.target.reread()) is not None:
            # The daemon restarted while the TUI ran: its socket has a new token.
            self.target = renewed
            self.http.headers.update(renewed.client_options()["headers"])
            resp = await self._request(method, path, **kw)
        return answer(resp, into)

    async def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            return await self.http.request(method, path, **kw)
        except httpx.TransportError as exc:
            raise DaemonDown(self.target.why_down(exc)) from None

    async def status(self) -> DaemonStatus:
        return await self._call("GET", "/admin/status", DaemonStatus)

    async def gpus(self) -> GpusStatus:
        return await self._call("GET", "/admin/gpus", GpusStatus)

    async def log(self, model: str, index: int, lines: int) -> ReplicaLog:
        path = model_path(model, "replicas", index, "log")
        return await self._call("GET", path, ReplicaLog, params={"lines": lines})

    async def daemon_log(self, lines: int) -> DaemonLog:
        return await self._call("GET", "/admin/log", DaemonLog, params={"lines": lines})

    # State-changing calls send JSON (an empty object where there is nothing to say):
    # the daemon refuses any other content type.
    async def scale(self, model: str, replicas: int | None) -> ModelStatus:
        return await self._post(model_path(model, SCALE), ModelStatus, ScaleBody(replicas=replicas))

    async def model_action(self, model: str, action: ModelAction) -> ModelStatus:
        return await self._post(model_path(model, action), ModelStatus)

    async def replica_action(self, model: str, index: int, action: ReplicaAction) -> ReplicaStatus:
        return await self._post(model_path(model, "replicas", index, action), ReplicaStatus)

    async def reload(self) -> ReloadReport:
        return await self._post("/admin/reload", ReloadReport, ReloadBody())

    async def _post(self, path: str, into: type[T], body: ScaleBody | ReloadBody | None = None) -> T:
        return await self._call("POST", path, into, content=encode_body(body), headers=JSON_BODY)

    async def close(self) -> None:
        await self.http.aclose()
