"""What the admin API shows, as appliance/status.py's Structs: the daemon's status
(/admin/status), the capacity market (/admin/gpus: the GPUs with what each replica
holds on them, the CPU cores and host RAM with the replicas that hold them, sleeping
ones included, and recent evictions), a replica's log tail (.../log), the daemon's
own log tail (/admin/log)."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.errors import BadRequest, NotFound
from appliance.fleet.landlock import engine_landlock
from appliance.fleet.sandbox import engine_sandbox
from appliance.logview import LogError, Tail, daemon_log_file, journal_command
from appliance.status import (
    DaemonLog,
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
    from appliance.config import Config
    from appliance.fleet.replica import Replica
    from appliance.fleet.supervisor import Supervisor

MAX_LOG_LINES = 5000
JOURNAL_TIMEOUT_S = 10.0


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
        engines_sandboxed=engine_sandbox().enforced,
        engines_landlocked=engine_landlock().enforced,
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


def _line_count(lines: str) -> int:
    if not (lines.isdigit() and 0 < int(lines) <= MAX_LOG_LINES):
        raise BadRequest(f"'lines' must be 1-{MAX_LOG_LINES}", param="lines")
    return int(lines)


def _last_lines(path: Path, count: int) -> list[str]:
    tail = Tail(path)
    try:
        return tail.last_lines(count) if path.exists() else []
    finally:
        tail.close()


def replica_log(replica: Replica, lines: str) -> ReplicaLog:
    count = _line_count(lines)
    if not replica.supervised:
        raise NotFound(f"Replica {replica.name} is an external engine: it has no log here")
    path = replica.log_path
    return ReplicaLog(replica=replica.name, file=str(path), lines=_last_lines(path, count))


async def daemon_log(cfg: Config, lines: str) -> DaemonLog:
    """The daemon's own log where `appliance logs` finds it: server.log_file, else the journal."""
    count = _line_count(lines)
    argv = None if cfg.server.log_file else journal_command(count, follow=False)
    if argv is not None:
        return DaemonLog(source=" ".join(argv), lines=await _journal(argv))
    try:
        path = daemon_log_file(cfg)
    except LogError as exc:
        raise NotFound(str(exc)) from None
    return DaemonLog(source=str(path), lines=_last_lines(path, count))


async def _journal(argv: list[str]) -> list[str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), JOURNAL_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise NotFound(f"journalctl gave no answer in {JOURNAL_TIMEOUT_S:g}s") from None
    if proc.returncode != 0:  # e.g. the daemon's user may not read the system journal
        raise NotFound(f"journalctl failed: {err.decode(errors='replace').strip()}")
    return out.decode(errors="replace").splitlines()
