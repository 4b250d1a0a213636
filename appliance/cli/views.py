"""What the operator looks at: `appliance status`, `ps` and `models ls` (the running
daemon's models and replicas, over its admin API), `logs` (the daemon's or the replicas'
log files, or the journal) and `tui`."""

from __future__ import annotations

import json
import sys
from datetime import datetime, timedelta

import click
import msgspec

from appliance.cli.options import CONFIG_HELP, PORT, admin_call, load
from appliance.cli.progress import human_bytes
from appliance.config import STORE_PREFIX, ConfigError
from appliance.logview import printable
from appliance.status import DaemonStatus, GpusStatus, ModelStatus, ReplicaStatus

PS_COLUMNS = ("REPLICA", "ENGINE", "IMAGE", "STATE", "ON", "MEMORY", "IN-FLIGHT", "IDLE UNLOAD", "UP")


@click.command()
@click.option("--config", "config", metavar="FILE", help=CONFIG_HELP)
@click.option("--port", type=PORT, help="Port of the running daemon (overrides server.port).")
@click.option("--json", "as_json", is_flag=True, help="Print the replicas as JSON (those of GET /admin/status).")
def ps(config: str | None, port: int | None, as_json: bool) -> None:
    """One line per replica: engine and image, state, its GPUs or cores, memory, requests
    in flight, time until an idle unload, uptime."""
    cfg = load(config)
    data = admin_call(cfg, port, "GET", "/admin/status", DaemonStatus, timeout=5.0)
    gpus = admin_call(cfg, port, "GET", "/admin/gpus", GpusStatus, timeout=5.0)
    on_gpu = {(p.replica, g.index): p for g in gpus.gpus for p in g.replicas}
    if as_json:
        # The replicas of GET /admin/status, with what the text columns add: the memory
        # measured (NVML on GPUs), when it became ready and when an idle unload is due (ISO).
        rows = [
            {
                "model": m.name,
                **msgspec.to_builtins(r),
                "memory_bytes": _measured(r, on_gpu),
                "ready_since": _iso(data.now, -r.uptime_s) if r.uptime_s is not None else None,
                "idle_unload_at": _iso(data.now, due) if (due := _unload_in_s(m)) is not None else None,
            }
            for m in data.models
            for r in m.replicas
        ]
        click.echo(json.dumps(rows, indent=2))
        return
    table = [PS_COLUMNS]
    for m in data.models:
        unload = "pinned" if m.pinned else _until_unload(m)
        for r in m.replicas:
            if r.gpus:
                where = "GPU " + ",".join(map(str, r.gpus))
            else:
                where = f"{len(r.cpus)} cores" if r.cpus else ("external" if not r.supervised else "-")
            memory = _measured(r, on_gpu)
            table.append(
                (
                    r.replica,
                    r.engine or m.server,
                    r.image or "-",
                    r.state,
                    where,
                    human_bytes(memory) if memory else "-",
                    str(r.inflight),
                    unload,
                    human_duration(r.uptime_s) if r.uptime_s is not None else "-",
                )
            )
    widths = [max(len(row[i]) for row in table) for i in range(len(PS_COLUMNS))]
    for row in table:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def _measured(r: ReplicaStatus, on_gpu: dict) -> int | None:
    """A replica's memory as measured: its engine's use of its GPUs (NVML), else its RSS."""
    if r.gpus:
        used = [on_gpu[(r.replica, g)].used_bytes for g in r.gpus if (r.replica, g) in on_gpu]
        return sum(u for u in used if u) or r.rss_bytes
    return r.rss_bytes


def _unload_in_s(m: ModelStatus) -> float | None:
    """Seconds until an idle unload (0: due now); None when none comes (pinned, a floor, no TTL)."""
    if m.pinned or m.min_replicas or not m.idle_ttl_s:
        return None
    return max(0.0, m.idle_ttl_s - m.idle_s)


def _iso(now: datetime, offset_s: float) -> str:
    return (now + timedelta(seconds=offset_s)).isoformat()


def _until_unload(m: ModelStatus) -> str:
    due = _unload_in_s(m)
    if due is None:
        return "never" if m.min_replicas else "-"
    return "now" if due == 0 else f"in {human_duration(due)}"


def human_duration(seconds: float) -> str:
    """12s, 4m05s, 3h02m, 2d04h: what a person reads at a glance."""
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


@click.command()
@click.option("--config", "config", metavar="FILE", help=CONFIG_HELP)
@click.option("--port", type=PORT, help="Port of the running daemon (overrides server.port).")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON (what GET /admin/status answers).")
def status(config: str | None, port: int | None, as_json: bool) -> None:
    """Show the running daemon's models and replicas."""
    data = admin_call(load(config), port, "GET", "/admin/status", DaemonStatus, timeout=5.0)
    if as_json:
        click.echo(msgspec.json.format(msgspec.json.encode(data), indent=2))
        return
    fatal = [r.replica for m in data.models for r in m.replicas if r.state == "FATAL"]
    state = "draining" if data.draining else ("ready" if data.ready else "starting")
    if fatal and not data.draining:  # not starting: no restart of these is coming
        state = f"not ready ({', '.join(fatal)} FATAL, below)"
    click.echo(
        f"appliance {data.version}  {state}  listening on {data.listen}  up {human_duration(data.uptime_s)}  "
        f"config {data.config}"
    )
    for m in data.models:
        click.echo(f"\n{m.name}  ({m.server})  {'ready' if m.ready else 'not ready'}")
        if m.blocked:
            click.echo(f"  not served: {m.blocked}")
        if m.waiting_for_room:
            click.echo(f"  {m.waiting_for_room}")
        if m.adapters:
            click.echo(f"  LoRA adapters: {', '.join(m.adapters)}")
            for reason in filter(None, m.adapters.values()):
                click.echo(f"  not served: {reason}")
        for r in m.replicas:
            where = f"pid {r.pid} port {r.port}" if r.pid else (r.url or "-")
            image = f"  image {r.image}" if r.image else ""
            mem = f"  mem {human_bytes(r.rss_bytes)}" if r.rss_bytes else ""
            up = f"  up {human_duration(r.uptime_s)}" if r.uptime_s is not None else ""
            click.echo(
                f"  #{r.index}  {r.state:<9} {where}  in-flight {r.inflight}  restarts {r.restarts}{mem}{up}{image}"
            )
            if r.last_error:
                click.echo(f"      last error: {printable(r.last_error)}")
            for line in r.log_tail:
                click.echo(f"      | {printable(line)}")
            if r.state == "FATAL":
                # The two next steps, as commands: the whole log, and another try.
                click.echo(
                    f"      its log: appliance logs --replica {r.replica} --no-follow; "
                    f"once fixed: appliance restart {r.replica}"
                )
    if not data.ready:
        sys.exit(3)


def _admin_url(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """--url is http(s)://HOST[:PORT]: anything else is a usage error, not a TUI retrying
    every second (ftp://, no scheme) or a traceback (http://[::1)."""
    from urllib.parse import urlsplit

    if value is None:
        return None
    try:
        url = urlsplit(value)
        url.port  # noqa: B018 (raises on a port that is not 0-65535)
    except ValueError as exc:
        raise click.BadParameter(f"{value!r} is not a URL: {exc}") from None
    if url.scheme not in ("http", "https") or not url.hostname:
        raise click.BadParameter(f"{value!r}: expected http://HOST:PORT (or https://)")
    return value


@click.command()
@click.option("--config", "config", metavar="FILE", help=CONFIG_HELP)
@click.option("--socket", metavar="PATH", help="The daemon's admin socket (default: server.admin_socket).")
@click.option(
    "--url",
    metavar="URL",
    callback=_admin_url,
    help="Reach the daemon over TCP instead (http://HOST:PORT), with the admin token.",
)
@click.option("--token-file", metavar="FILE", help="The admin token for --url (default: server.admin_token_file).")
def tui(config: str | None, socket: str | None, url: str | None, token_file: str | None) -> None:
    """The operator's terminal UI: GPUs, models, routes, logs, usage; scale, load, pin, restart."""
    from appliance.daemon.admin_client import DaemonDown
    from tui.app import ApplianceTUI
    from tui.client import AdminClient, target_from_config

    cfg = load(config)
    try:
        target = target_from_config(cfg, socket=socket, url=url, token_file=token_file)
    except (ConfigError, OSError, DaemonDown) as exc:
        raise click.ClickException(str(exc)) from None
    ApplianceTUI(AdminClient.to(target)).run()


@click.command()
@click.option("--config", "config", metavar="FILE", help=CONFIG_HELP)
@click.option(
    "--replica",
    "replicas",
    multiple=True,
    metavar="MODEL#N",
    help="Show this replica's engine log instead of the daemon's; MODEL: all its "
    "replicas, all: every replica. Repeatable.",
)
@click.option(
    "-n", "--lines", type=click.IntRange(min=0), default=50, show_default=True, help="Lines of history to show first."
)
@click.option(
    "-f/-F",
    "--follow/--no-follow",
    default=True,
    help="Keep printing what is appended until Ctrl-C (the default), or not.",
)
@click.option(
    "--json", "as_json", is_flag=True, help='One JSON object a line ({"source", "line"}; the journal\'s own).'
)
def logs(config: str | None, replicas: tuple[str, ...], lines: int, follow: bool, as_json: bool) -> None:
    """Follow the daemon's log (the journal under systemd, else server.log_file) or the replicas'."""
    import os

    from appliance.logview import LogError, daemon_log_file, journal_command, replica_log_files, show

    cfg = load(config)
    try:
        if replicas:
            files = replica_log_files(cfg, replicas)
        else:
            argv = journal_command(lines, follow, as_json=as_json)
            if argv is not None:
                os.execvp(argv[0], argv)
            files = [("appliance", daemon_log_file(cfg))]
        show(files, lines, follow, click.echo, as_json=as_json)
    except LogError as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        pass


@click.command("ls")
@click.option("--config", "config", metavar="FILE", help=CONFIG_HELP)
@click.option("--port", type=PORT, help="Port of the running daemon (overrides server.port).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def models_ls(config: str | None, port: int | None, as_json: bool) -> None:
    """List configured models, with their live state when the daemon runs, then the store's models."""
    from appliance.cli.store import store_rows
    from appliance.daemon.admin_client import AdminError, DaemonDown, call, target_from_config
    from appliance.store.weights import model_path

    cfg = load(config)
    live, down = None, "daemon not running"
    try:
        target = target_from_config(cfg, port=port, socket_if_usable=True)
        live = {m.name: m for m in call(target, "GET", "/admin/status", DaemonStatus, timeout=1.5).models}
    except DaemonDown:
        pass
    except (AdminError, ConfigError) as exc:
        down = "unknown"
        click.echo(f"warning: no live state: {exc}", err=True)
    rows: list[dict] = []
    for m in cfg.models:
        state = down
        if live is not None:
            info = live.get(m.name)
            states = [r.state for r in info.replicas] if info else []
            state = ",".join(states) or "unknown"
        path = model_path(cfg, m)
        rows.append(
            {
                "name": m.name,
                "server": m.server,
                "source": str(path) if path else (m.url or " ".join(m.command)),
                "replicas": max(m.autoscaling.min_replicas, 1),
                "state": state,
            }
        )
    configured = {m.source[len(STORE_PREFIX) :] for m in cfg.models if m.source.startswith(STORE_PREFIX)}
    rows += [dict(r, state=r["state"] + (", configured" if r["name"] in configured else "")) for r in store_rows(cfg)]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        titled = f'  "{r["title"]}"' if r.get("title") else ""
        click.echo(f"{r['name']:<{width}}  {r['server']:<8}  {r['state']:<18}  {r['source']}{titled}")
