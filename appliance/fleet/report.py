"""What the supervisor reports: every deployment as the admin API shows it, and what the
replicas placed on each GPU hold. Called through ``Supervisor.status`` and
``Supervisor.gpu_holdings``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from appliance.config import idle_ttl_s
from appliance.fleet.autoscaler import Decision
from appliance.fleet.process import descendants
from appliance.gpu.probe import Inventory
from appliance.status import Decision as DecisionStatus
from appliance.status import ModelStatus, PlacedReplica, at_wall_clock

if TYPE_CHECKING:
    from appliance.fleet.supervisor import Supervisor


def status(sup: Supervisor) -> list[ModelStatus]:
    """Every deployment as the admin API shows it (appliance/status.py)."""
    now = sup.clock.monotonic()
    wall = time.time()
    return [
        ModelStatus(
            name=d.model.name,
            server=d.model.server,
            source=d.model.source or d.model.url or None,
            ready=d.ready,
            pinned=d.control.pinned,
            override=d.control.override,
            rps_10s=round(d.rate.rate(10), 3),
            rps_60s=round(d.rate.rate(60), 3),
            inflight=d.inflight,
            queued=len(d.waiters),
            idle_s=round(now - d.rate.last_event, 1),
            idle_ttl_s=idle_ttl_s(sup.cfg, d.model),
            last_cold_start_s=d.last_cold_start_s,
            min_replicas=d.model.autoscaling.min_replicas,
            max_replicas=d.model.autoscaling.max_replicas,
            blocked=d.blocked,
            waiting_for_room=d.no_room if d.waiters or len(d.kept()) < d.standing_count() else None,
            replicas=[r.snapshot() for r in d.replicas],
            decisions=[_decision(x, now, wall) for x in sup.autoscaler.recent(d.model.name, 5)],
            prefix_routing=dict(d.prefix.outcomes),
            adapters={a.name: d.lora.refused.get(a.name, "") for a in d.model.adapters} if d.lora else {},
        )
        for d in sup.deployments.values()
    ]


def gpu_holdings(sup: Supervisor, inventory: Inventory) -> dict[int, list[PlacedReplica]]:
    """Per GPU index, what each replica placed on it holds: reserved by the placer, and
    used as NVML measures it once its engine runs (its whole process tree)."""
    on_gpu: dict[int, list[PlacedReplica]] = {}
    by_index = {g.index: g for g in inventory.gpus}
    for r in sup.replicas():
        if r.slot is None:
            continue
        pids = descendants(r.pid) if r.pid else set()
        for i in r.slot.gpus:
            gpu = by_index.get(i)
            on_gpu.setdefault(i, []).append(
                PlacedReplica(
                    replica=r.name,
                    state=r.state.value,
                    memory_fraction=r.slot.memory_fraction,
                    reserved_bytes=r.slot.bytes_per_gpu or None,
                    used_bytes=(gpu.used_by(pids) or None) if gpu is not None and pids else None,
                )
            )
    return on_gpu


def _decision(d: Decision, now: float, wall: float) -> DecisionStatus:
    """An autoscaler decision with its monotonic time as a wall-clock timestamp."""
    inputs = {k: v for k, v in d.inputs.items() if k != "now"}
    return DecisionStatus(
        model=d.model,
        at=at_wall_clock(d.at, now, wall),
        current=d.current,
        desired=d.desired,
        action=d.action,
        reason=d.reason,
        inputs=inputs,
    )
