"""`appliance plan`: where each GPU replica would be placed and why, without starting anything
(and, beside it, the running daemon's capacity market when one answers on its socket)."""

from __future__ import annotations

import json
import os
import sys

import click
import msgspec

from appliance.cli.options import CONFIG_HELP, load, read_inventory
from appliance.config import ConfigError
from appliance.status import GpusStatus, market_lines


@click.command()
@click.option("--config", "config", metavar="FILE", help=CONFIG_HELP)
@click.option(
    "--inventory", metavar="FILE", help="A simulated GPU inventory (TOML or JSON) instead of this machine's GPUs."
)
@click.option(
    "--gpus-per-node",
    type=click.IntRange(1, 64),
    metavar="N",
    help="For a model too large for this box: size its multi-node shape for machines of N GPUs (default: this box's).",
)
@click.option(
    "--gpu-memory",
    "gpu_gib",
    type=click.FloatRange(1, 4096),
    metavar="GIB",
    help="... and GIB GiB per GPU (default: this box's).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def plan(
    config: str | None, inventory: str | None, gpus_per_node: int | None, gpu_gib: float | None, as_json: bool
) -> None:
    """Show where each GPU replica would be placed, and why, without starting anything; for a model
    too large for this box, the smallest multi-node shape that would hold it."""
    import logging

    from appliance.gpu.planning import gpu_models
    from appliance.gpu.planning import plan as make_plan
    from appliance.gpu.probe import GiB

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg = load(config)
    inv = read_inventory(cfg, inventory)
    replicas = [(m, f"{m.name}#{i}") for m in gpu_models(cfg) for i in range(max(m.autoscaling.min_replicas, 1))]
    rows = make_plan(cfg, inv, replicas, gpus_per_node=gpus_per_node, gpu_gib=gpu_gib)
    market = _running_market(cfg)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "inventory": {
                        "source": inv.source,
                        "error": inv.error,
                        "gpus": [
                            {
                                "index": g.index,
                                "name": g.name,
                                "kind": g.kind,
                                "uuid": g.uuid,
                                "total_bytes": g.total_bytes,
                                "used_bytes": g.used_bytes,
                                "free_bytes": g.free_bytes,
                                "utilization_pct": g.utilization_pct,
                                "processes": [vars(p) for p in g.processes],
                            }
                            for g in inv.gpus
                        ],
                    },
                    "placements": [
                        {
                            "replica": r.replica,
                            "model": r.model,
                            "error": r.error,
                            "gpus": list(r.assignment.gpus) if r.assignment else None,
                            "tp": r.assignment.tp if r.assignment else None,
                            "bytes_per_gpu": r.assignment.bytes_per_gpu if r.assignment else None,
                            "memory_fraction": r.assignment.memory_fraction if r.assignment else None,
                            "reason": r.assignment.reason if r.assignment else None,
                            "beyond_this_box": r.beyond.as_dict() if r.beyond else None,
                        }
                        for r in rows
                    ],
                    # The running daemon's market (GET /admin/gpus), null with none running.
                    "market": msgspec.to_builtins(market) if market is not None else None,
                },
                indent=2,
            )
        )
    else:
        click.echo(f"GPUs ({inv.source}):" if inv.gpus else f"No GPUs: {inv.error or inv.source + ' lists none'}")
        taken: dict[int, int] = {}
        for r in rows:
            if r.assignment:
                for index in r.assignment.gpus:
                    taken[index] = taken.get(index, 0) + r.assignment.bytes_per_gpu
        for g in inv.gpus:
            procs = ", ".join(f"pid {p.pid} {p.used_bytes / GiB:.1f} GiB" for p in g.processes) or "none"
            util = f"{g.utilization_pct}%" if g.utilization_pct is not None else "n/a"
            click.echo(
                f"  GPU {g.index}  {g.name} ({g.kind})  {g.used_bytes / GiB:.1f}/"
                f"{g.total_bytes / GiB:.1f} GiB used, util {util}, processes: {procs}; "
                f"plan adds {taken.get(g.index, 0) / GiB:.1f} GiB"
            )
        if not rows:
            click.echo(
                "No GPU models in the config (server = vllm or sglang, or llamacpp with [models.gpus] count >= 1)."
            )
        for r in rows:
            click.echo(r.describe())
        if market is not None:
            click.echo("\nNow, in the running daemon (its capacity market):")
            for line in market_lines(market):
                click.echo(f"  {line}")
    if any(r.error for r in rows):
        # 3, as `status` not ready: the command worked and the answer is no. 2 is click's
        # usage error, which a script must be able to tell from "does not fit".
        sys.exit(3)


def _running_market(cfg) -> GpusStatus | None:
    """The running daemon's GPUs, sleeping replicas and evictions, asked on its admin
    socket (with its token); None when no daemon answers there."""
    from appliance.daemon.admin_client import AdminError, DaemonDown, call, target_from_config

    path = cfg.server.admin_socket
    if not path or not os.access(path, os.R_OK | os.W_OK):
        return None
    try:
        return call(target_from_config(cfg), "GET", "/admin/gpus", GpusStatus, timeout=2.0)
    except (DaemonDown, AdminError, ConfigError, OSError):
        return None
