"""What the admin API shows beyond /admin/status: the GPUs with the replicas on
them and the CPU budget (/admin/gpus), a replica's log tail (.../log)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from appliance.errors import BadRequest, NotFound
from appliance.logview import Tail

if TYPE_CHECKING:
    from appliance.fleet.replica import Replica
    from appliance.fleet.supervisor import Supervisor

MAX_LOG_LINES = 5000


def gpu_view(sup: Supervisor) -> dict:
    inventory = sup.probe.read()
    on_gpu: dict[int, list[dict]] = {}
    for r in sup.replicas():
        if r.slot is None:
            continue
        for g in r.slot.gpus:
            on_gpu.setdefault(g, []).append(
                {
                    "replica": r.name,
                    "state": r.state.value,
                    "memory_fraction": r.slot.memory_fraction,
                    "reserved_bytes": r.slot.bytes_per_gpu or None,
                }
            )
    return {
        "source": inventory.source,
        "error": inventory.error,
        "gpus": [
            {
                "index": g.index,
                "name": g.name,
                "kind": g.kind,
                "total_bytes": g.total_bytes,
                "used_bytes": g.used_bytes,
                "utilization_pct": g.utilization_pct,
                "replicas": on_gpu.get(g.index, []),
            }
            for g in inventory.gpus
        ],
        "cpu": sup.cpu_budget(),
    }


def replica_log(replica: Replica, lines: str) -> dict:
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
    return {"replica": replica.name, "file": str(path), "lines": text}
