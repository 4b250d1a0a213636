"""What the admin API shows, as appliance/status.py's Structs: the daemon's status
(/admin/status), the capacity market (/admin/gpus: the GPUs with what each replica
holds on them, the CPU cores and host RAM with the replicas that hold them, sleeping
ones included, and recent evictions), a replica's log tail (.../log)."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from appliance.errors import BadRequest, NotFound
from appliance.logview import Tail
from appliance.status import (
    DaemonStatus,
    GpusStatus,
    GpuStatus,
    KeyUsage,
    ModelStatus,
    Paths,
    ReplicaLog,
    RouteStatus,
)

if TYPE_CHECKING:
    from appliance.api.app import Runtime
    from appliance.fleet.replica import Replica
    from appliance.fleet.supervisor import Supervisor

MAX_LOG_LINES = 5000


def daemon_status(rt: Runtime, version: str) -> DaemonStatus:
    cfg, sup = rt.cfg, rt.supervisor
    now = time.time()
    return DaemonStatus(
        version=version,
        config=cfg.origin,
        started=datetime.fromtimestamp(rt.started, UTC),
        now=datetime.fromtimestamp(now, UTC),
        uptime_s=round(now - rt.started, 1),
        draining=rt.draining,
        ready=sup.ready,
        listen=f"{cfg.server.host}:{cfg.server.port}",
        paths=Paths(state=cfg.paths.state_dir, cache=cfg.paths.cache_dir, logs=cfg.paths.log_dir),
        models=models_status(rt),
        routes=[
            RouteStatus(
                name=r.name,
                model=r.model,
                tag=r.tag,
                target=r.target,
                regulated=r.regulated,
                fallbacks=list(r.fallbacks),
                fired={f: rt.fallbacks_fired.get((r.name, f), 0) for f in r.fallbacks},
            )
            for r in cfg.routes
        ],
        usage=[
            KeyUsage(key=name, requests=n, prompt_tokens=p, completion_tokens=c, tokens=p + c)
            for name, (n, p, c) in sorted(rt.gate.usage.items())
        ],
        evictions=sup.market.recent(),
    )


def models_status(rt: Runtime) -> list[ModelStatus]:
    """Each deployment, with its time to first token."""
    models = rt.supervisor.status()
    for m in models:
        m.ttft_p50_ms = rt.ttft.p50_ms(m.name)
    return models


def model_status(rt: Runtime, name: str) -> ModelStatus:
    """The answer to a model action: the model as it is now."""
    return next(m for m in models_status(rt) if m.name == name)


def gpu_view(sup: Supervisor) -> GpusStatus:
    inventory = sup.probe.read()
    on_gpu = sup.gpu_holdings(inventory)
    return GpusStatus(
        source=inventory.source,
        error=inventory.error,
        gpus=[
            GpuStatus(
                index=g.index,
                name=g.name,
                kind=g.kind,
                total_bytes=g.total_bytes,
                used_bytes=g.used_bytes,
                utilization_pct=g.utilization_pct,
                replicas=on_gpu.get(g.index, []),
            )
            for g in inventory.gpus
        ],
        cpu=sup.cpu_budget(),
        evictions=sup.market.recent(),
    )


def replica_log(replica: Replica, lines: str) -> ReplicaLog:
    if not (lines.isdigit() and 0 < int(lines) <= MAX_LOG_LINES):
        raise BadRequest(f"'lines' must be 1-{MAX_LOG_LINES}", param="lines")
    if not replica.supervised:
        raise NotFound(f"Replica {replica.name} is an external engine: it has no log here")
    path = replica.log_path
    tail = Tail(path)
    try:
        text = tail.last_lines(int(lines)) if path.exists() else []
    finally:
        tail.close()
    return ReplicaLog(replica=replica.name, file=str(path), lines=text)
