"""The admin API's handlers (/admin/*): the daemon's status, its GPUs and logs, and the
operator's control (scale, model and replica actions, reload). The CLI and the TUI use
these; who may is api/admin_access.py's, what they show api/admin_views.py's."""

from __future__ import annotations

import logging
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, TypeVar

import msgspec
from litestar import Request, get, post
from litestar.params import Parameter

from appliance.api.admin_paths import model_name
from appliance.api.admin_views import daemon_log, daemon_status, gpu_view, model_status, replica_log
from appliance.api.body import read_body
from appliance.api.callers import admin
from appliance.errors import NotFound, quoted
from appliance.gateway.protocol import decode_request
from appliance.status import (
    SCALE,
    ActionBody,
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
)

if TYPE_CHECKING:
    from appliance.api.app import Runtime

log = logging.getLogger("appliance.api")

Action = TypeVar("Action", bound=StrEnum)


@get("/admin/status")
async def admin_status(request: Request) -> DaemonStatus:
    """The daemon, its models and replicas (with the autoscaler's last decisions), routes, key usage."""
    return daemon_status(admin(request), version())


@get("/admin/gpus")
async def admin_gpus(request: Request) -> GpusStatus:
    """Each GPU (NVML or the simulated inventory) with the replicas placed on it,
    and the CPU engines' core budget."""
    return gpu_view(admin(request).supervisor)


@get("/admin/log")
async def admin_daemon_log(request: Request) -> DaemonLog:
    """The last ``?lines=N`` (default 100) lines of the daemon's own log: server.log_file,
    or the systemd journal (what `appliance logs` shows)."""
    rt = admin(request)
    return await daemon_log(rt.cfg, request.query_params.get("lines", "100"))


@get("/admin/models/{model:str}/replicas/{index:int}/log")
async def admin_replica_log(request: Request) -> ReplicaLog:
    """The last ``?lines=N`` (default 100) lines of a replica's engine log."""
    rt = admin(request)
    p = request.path_params
    replica = rt.supervisor.replica(model_name(p["model"]), p["index"])
    return replica_log(replica, request.query_params.get("lines", "100"))


# --- admin: operator control (the CLI and the TUI use these) ----------------------


# A path's action, documented as one of the vocabulary's (an unknown one is a 404 from
# ``_action`` that lists them, not Litestar's 400).
ModelActionName = Annotated[str, Parameter(schema_extra={"enum": [a.value for a in ModelAction]})]
ReplicaActionName = Annotated[str, Parameter(schema_extra={"enum": [a.value for a in ReplicaAction]})]


async def _admin_write(request: Request) -> tuple[Runtime, bytes]:
    """A state-changing admin call: allowed, and its whole body read (a malformed
    one is refused before anything changes)."""
    rt = admin(request)
    declared = request.headers.get("content-length")
    body = await read_body(
        request.receive,
        declared.encode() if declared else None,
        rt.cfg.server.max_body_bytes,
        rt.cfg.server.body_read_timeout_s,
    )
    return rt, body


@post("/admin/models/{model:str}/scale", status_code=200, opt={"body": ScaleBody})
async def admin_scale(request: Request) -> ModelStatus:
    """Set the model's replica count (kept across restarts); null hands it back to the autoscaler."""
    rt, raw = await _admin_write(request)
    model = model_name(request.path_params["model"])
    body = decode_request(raw, ScaleBody)
    said = rt.supervisor.scale(model, body.replicas)
    return msgspec.structs.replace(model_status(rt, model), said=said)


@post("/admin/models/{model:str}/{action:str}", status_code=200, opt={"body": ActionBody})
async def admin_model_action(request: Request, action: ModelActionName) -> ModelStatus:
    """Load, unload, pin or unpin the model (appliance/status.py: ModelAction)."""
    rt, raw = await _admin_write(request)
    decode_request(raw, ActionBody)
    model, sup = model_name(request.path_params["model"]), rt.supervisor
    carry_out = {
        ModelAction.LOAD: lambda: sup.load(model),
        ModelAction.UNLOAD: lambda: sup.unload(model),
        ModelAction.PIN: lambda: sup.pin(model, True),
        ModelAction.UNPIN: lambda: sup.pin(model, False),
    }
    said = carry_out[_action(ModelAction, action, "admin action", [*ModelAction, SCALE])]()
    return msgspec.structs.replace(model_status(rt, model), said=said)


@post("/admin/models/{model:str}/replicas/{index:int}/{action:str}", status_code=200, opt={"body": ActionBody})
async def admin_replica_action(request: Request, action: ReplicaActionName) -> ReplicaStatus:
    """Restart or drain one replica (appliance/status.py: ReplicaAction)."""
    rt, raw = await _admin_write(request)
    decode_request(raw, ActionBody)
    p = request.path_params
    replica = rt.supervisor.replica(model_name(p["model"]), p["index"])
    if _action(ReplicaAction, action, "replica action", list(ReplicaAction)) is ReplicaAction.RESTART:
        said = rt.supervisor.restart_replica(replica)
    else:
        said = rt.supervisor.drain_replica(replica)
    return msgspec.structs.replace(replica.snapshot(), said=said)


@post("/admin/reload", status_code=200, opt={"body": ReloadBody})
async def admin_reload(request: Request) -> ReloadReport:
    """Read the config file again and apply what changed (appliance/api/reload.py); an
    invalid file, or a change only a restart may make, is a 400 naming the file and the
    field, and changes nothing."""
    rt, raw = await _admin_write(request)
    body = decode_request(raw, ReloadBody)
    assert rt.reloader is not None, "the lifespan made it"
    log.info("operator reload requested over the admin API")
    return await rt.reloader.reload(wait=body.wait)


def _action(kind: type[Action], name: str, what: str, known: list[str]) -> Action:
    """The action a path names; an unknown one is a 404 that lists the known ones."""
    try:
        return kind(name)
    except ValueError:
        raise NotFound(f"No {what} {quoted(name)} ({', '.join(known)})") from None


def version() -> str:
    from appliance import __version__

    return __version__
