"""What the admin API shows beyond /admin/status: the capacity market (/admin/gpus:
the GPUs with what each replica holds on them, the CPU cores and host RAM with the
replicas that hold them, sleeping ones included, and recent evictions), a replica's
log tail (.../log)."""

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
    on_gpu = sup.gpu_holdings(inventory)
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
        "evictions": sup.market.recent(),
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
