"""The `appliance` command: serve, status, models."""

from __future__ import annotations

import json
import os
import sys
from datetime import datetime, timedelta
from typing import TypeVar

import click
import msgspec

from appliance.cli.options import CONFIG_HELP, load, read_inventory
from appliance.cli.progress import human_bytes
from appliance.config import (
    BUILTIN_PREFIX,
    EMBEDDED_MODEL_SHA256,
    STORE_PREFIX,
    Config,
    ConfigError,
    uses_gpus,
)
from appliance.status import (
    MODEL_ACTION_HELP,
    SCALE,
    DaemonStatus,
    GpusStatus,
    ModelAction,
    ModelStatus,
    ReloadBody,
    ReloadReport,
    ReplicaStatus,
    ScaleBody,
    market_lines,
)

T = TypeVar("T")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="appliance")
def main() -> None:
    """Sovereign on-prem LLM serving: an OpenAI-compatible API on localhost."""


@main.command()
@click.option("--config", "config", metavar="FILE", help=CONFIG_HELP)
@click.option("--host", help="Address to bind (overrides server.host).")
@click.option("--port", type=int, help="Port to bind (overrides server.port).")
def serve(config: str | None, host: str | None, port: int | None) -> None:
    """Run the daemon in the foreground until SIGTERM or Ctrl-C."""
    import logging

    import msgspec

    from appliance.config import ConfigError, check_writable_dirs
    from appliance.daemon.port_claim import PortBusy, claim_port
    from appliance.daemon.server import run
    from appliance.logs import setup_logging
    from appliance.state.lock import StateDirBusy, hold_state_dir

    overrides = {k: v for k, v in (("host", host), ("port", port)) if v is not None}

    def read() -> Config:
        """The config as this command line reads it: at start, and again on each reload."""
        from appliance.config import load_config

        cfg = load_config(started_from)
        return msgspec.structs.replace(cfg, server=msgspec.structs.replace(cfg.server, **overrides))

    cfg = load(config)
    # A reload reads the file this start read: one removed since is refused, never taken
    # for the built-in defaults (which would remove every model).
    started_from = config or (None if cfg.origin.startswith("<") else cfg.origin)
    if overrides:
        cfg = msgspec.structs.replace(cfg, server=msgspec.structs.replace(cfg.server, **overrides))
    try:
        # The directories first, so an unwritable one is named with its field and fix.
        check_writable_dirs(cfg)
        lock = hold_state_dir(cfg.paths.state_dir)  # before anything starts; held until exit
        claim = claim_port(cfg.server.host, cfg.server.port, config=cfg.origin, state_dir=cfg.paths.state_dir)
    except PortBusy as exc:
        raise click.ClickException(str(exc)) from None
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    except StateDirBusy as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"cannot lock state directory {cfg.paths.state_dir}: {exc}") from None
    setup_logging(cfg.server.log_level, cfg.server.log_file or None)
    for warning in cfg.deprecations:
        logging.getLogger("appliance.config").warning("%s", warning)
    _check_policy(cfg)
    _check_files(cfg)
    _check_databases(cfg, migrate=True)
    code = run(cfg, reread=read)
    claim.close()
    lock.close()
    sys.exit(code)


@main.command()
@click.option("--config", "config", metavar="FILE", help=CONFIG_HELP)
@click.option(
    "--wait-ready",
    "wait_ready",
    type=float,
    metavar="SECONDS",
    help="Then wait up to SECONDS for the running daemon's /readyz to answer 200.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON (a failed check: its one line on stderr, exit 1).")
def check(config: str | None, wait_ready: float | None, as_json: bool) -> None:
    """Whether the daemon can start: the config (renamed keys are warned about), the engine
    and model files, the databases (readable, none from a newer appliance). Writes nothing;
    install.sh runs it as an upgrade's readiness check."""
    cfg = load(config)
    for warning in cfg.deprecations:
        click.echo(f"warning: {warning}", err=True)
    _check_policy(cfg)
    _check_files(cfg)
    _check_databases(cfg, migrate=False)
    if wait_ready is not None:
        _wait_ready(cfg, wait_ready)
    if as_json:
        document = {"ok": True, "config": cfg.origin, "models": [m.name for m in cfg.models]}
        click.echo(json.dumps({**document, "ready": True} if wait_ready is not None else document, indent=2))
        return
    click.echo(
        f"ok: {cfg.origin}: {len(cfg.models)} model(s), config, engine files and databases usable"
        + (", the daemon is ready" if wait_ready is not None else "")
    )


def _check_databases(cfg: Config, migrate: bool) -> None:
    """The state database and the store manifest: migrated to this version's schema (once,
    in a transaction), or with migrate=False only checked that they can be (read-only). A
    damaged one, or one written by a newer appliance, stops here in one line."""
    import sqlite3

    from appliance.access import retention
    from appliance.state import db as statedb
    from appliance.state.migrations import SchemaError, schema_version, too_new
    from appliance.store.store import MIGRATIONS as STORE_MIGRATIONS
    from appliance.store.store import Store, StoreError

    store = Store.from_config(cfg)
    dbs = ((statedb.path_in(cfg.paths.state_dir), statedb.MIGRATIONS), (store.db_path, STORE_MIGRATIONS))
    try:
        for path, registry in dbs:
            if not migrate:
                version = schema_version(path) if path.exists() else 0
                if version > registry.latest:
                    raise too_new(path, registry, version)
            elif registry is statedb.MIGRATIONS:
                statedb.connect(path).close()
                retention.prepare(path, cfg.audit)  # incremental vacuum, once, before serving
            elif path.exists():
                store.db  # noqa: B018 - opening it migrates it
                store.close()
    except (SchemaError, StoreError) as exc:
        raise click.ClickException(str(exc)) from None
    except sqlite3.Error as exc:
        raise click.ClickException(f"{path}: {exc}") from None


def _wait_ready(cfg: Config, seconds: float) -> None:
    import time
    import urllib.error
    import urllib.request

    host = "127.0.0.1" if cfg.server.host in ("0.0.0.0", "::", "") else cfg.server.host
    url = f"http://{host}:{cfg.server.port}/readyz"
    deadline = time.monotonic() + seconds
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except OSError as exc:
            last = str(getattr(exc, "reason", exc))
        time.sleep(1)
    raise click.ClickException(
        f"the daemon was not ready within {seconds:.0f} s ({url}: {last}); "
        "`appliance status` and `appliance logs` say why"
    )


def _check_policy(cfg: Config) -> None:
    """Refuse to start on a non-loopback address without keys, or without a provider's key."""
    from appliance.config import bind_error
    from appliance.gateway.providers import load_providers

    problem = bind_error(cfg)
    if problem:
        raise click.ClickException(f"{cfg.origin}: {problem}")
    try:
        load_providers(cfg)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


def _check_files(cfg: Config) -> None:
    """Fail at start, with the fix, when the CPU engine or a model file is missing."""
    import os

    from appliance.dist.images import llamacpp_binary
    from appliance.store.store import model_path

    for m in cfg.models:
        if m.server != "llamacpp":
            continue
        binary = llamacpp_binary(cfg)
        if not uses_gpus(m) and not os.access(binary, os.X_OK):
            raise click.ClickException(
                f"llama-server not found at {binary}: run ./install.sh, or set engines.llamacpp.binary"
            )
        if m.source.startswith(STORE_PREFIX):
            continue  # the supervisor checks store models and marks them FATAL with the reason
        path = model_path(cfg, m)
        if path is not None and not path.is_file():
            raise click.ClickException(
                f"model '{m.name}': weights not found at {path} (models[].source); run ./install.sh "
                "for the bundled model"
            )
        if m.source.startswith(BUILTIN_PREFIX) and path is not None:
            digest = _sha256(path)
            if digest != EMBEDDED_MODEL_SHA256:
                raise click.ClickException(
                    f"model '{m.name}': {path} has sha256 {digest}, expected {EMBEDDED_MODEL_SHA256}; "
                    "the file is damaged: run ./install.sh to restore it"
                )
        if path is not None:  # never hand llama.cpp a file that is not a whole GGUF
            from appliance.store.gguf import GgufError, read_shape

            try:
                read_shape(path)
            except GgufError as exc:
                raise click.ClickException(f"model '{m.name}': {path} is not a usable GGUF file: {exc}") from None


def _sha256(path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _admin_call(
    cfg: Config,
    port: int | None,
    method: str,
    path: str,
    into: type[T],
    body: msgspec.Struct | None = None,
    timeout: float = 30.0,
) -> T:
    """The running daemon's admin API: its admin socket when this user may open it,
    else TCP (--port, server.port) with the admin token (appliance/daemon/admin_client.py);
    the answer decoded into its type (appliance/status.py)."""
    from appliance.daemon.admin_client import AdminError, DaemonDown, call, target_from_config

    try:
        return call(target_from_config(cfg, port=port, socket_if_usable=True), method, path, into, body, timeout)
    except (DaemonDown, AdminError, ConfigError) as exc:
        raise click.ClickException(str(exc)) from None


PS_COLUMNS = ("REPLICA", "ENGINE", "IMAGE", "STATE", "ON", "MEMORY", "IN-FLIGHT", "IDLE UNLOAD", "UP")


@main.command()
@click.option("--config", "config", metavar="FILE", help=CONFIG_HELP)
@click.option("--port", type=int, help="Port of the running daemon (overrides server.port).")
@click.option("--json", "as_json", is_flag=True, help="Print the replicas as JSON (those of GET /admin/status).")
def ps(config: str | None, port: int | None, as_json: bool) -> None:
    """One line per replica: engine and image, state, its GPUs or cores, memory, requests
    in flight, time until an idle unload, uptime."""
    cfg = load(config)
    data = _admin_call(cfg, port, "GET", "/admin/status", DaemonStatus, timeout=5.0)
    gpus = _admin_call(cfg, port, "GET", "/admin/gpus", GpusStatus, timeout=5.0)
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


@main.command()
@click.option("--config", "config", metavar="FILE", help=CONFIG_HELP)
@click.option("--port", type=int, help="Port of the running daemon (overrides server.port).")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON (what GET /admin/status answers).")
def status(config: str | None, port: int | None, as_json: bool) -> None:
    """Show the running daemon's models and replicas."""
    data = _admin_call(load(config), port, "GET", "/admin/status", DaemonStatus, timeout=5.0)
    if as_json:
        click.echo(msgspec.json.format(msgspec.json.encode(data), indent=2))
        return
    state = "draining" if data.draining else ("ready" if data.ready else "starting")
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
                click.echo(f"      last error: {r.last_error}")
            for line in r.log_tail:
                click.echo(f"      | {line}")
    if not data.ready:
        sys.exit(3)


@main.command()
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
        click.echo(f"GPUs ({inv.source}):" if inv.gpus else f"No GPUs: {inv.error}")
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
        sys.exit(2)


def _running_market(cfg) -> GpusStatus | None:
    """The running daemon's GPUs, sleeping replicas and evictions, asked on its admin
    socket (no token needed); None when no daemon answers there."""
    from appliance.daemon.admin_client import AdminError, DaemonDown, call, target_from_config

    path = cfg.server.admin_socket
    if not path or not os.access(path, os.R_OK | os.W_OK):
        return None
    try:
        return call(target_from_config(cfg), "GET", "/admin/gpus", GpusStatus, timeout=2.0)
    except (DaemonDown, AdminError, ConfigError, OSError):
        return None


def _model_line(m: ModelStatus) -> str:
    states = ",".join(r.state for r in m.replicas) or "none"
    how = f"operator set {m.override}" if m.override is not None else "autoscaling"
    pin = ", pinned" if m.pinned else ""
    line = f"{m.name}: replicas {len(m.replicas)} [{states}] ({how}{pin})"
    return f"{m.said}\n{line}" if m.said else line


_MODEL_OPTIONS = [
    click.option("--config", "config", metavar="FILE", help=CONFIG_HELP),
    click.option("--port", type=int, help="Port of the running daemon."),
    click.option("--json", "as_json", is_flag=True, help="Print the model as it is after the action (JSON)."),
]


def _print_model(m: ModelStatus, as_json: bool) -> None:
    click.echo(msgspec.json.format(msgspec.json.encode(m), indent=2).decode() if as_json else _model_line(m))


def _with_model_options(f):
    for option in reversed(_MODEL_OPTIONS):
        f = option(f)
    return f


@main.command()
@click.argument("model")
@click.argument("replicas")
@_with_model_options
def scale(model: str, replicas: str, config: str | None, port: int | None, as_json: bool) -> None:
    """Set MODEL's replica count (kept across restarts); REPLICAS 'auto' hands it back to the autoscaler."""
    cfg = load(config)
    if replicas == "auto":
        value = None
    elif replicas.isdigit():
        value = int(replicas)
    else:
        raise click.BadParameter("a number of replicas, or 'auto'", param_hint="REPLICAS")
    path = f"/admin/models/{model}/{SCALE}"
    _print_model(_admin_call(cfg, port, "POST", path, ModelStatus, ScaleBody(replicas=value)), as_json)


def _model_action(action: ModelAction):
    @click.argument("model")
    @_with_model_options
    def command(model: str, config: str | None, port: int | None, as_json: bool) -> None:
        _print_model(_admin_call(load(config), port, "POST", f"/admin/models/{model}/{action}", ModelStatus), as_json)

    command.__doc__ = MODEL_ACTION_HELP[action]
    return main.command(name=action.value)(command)


for _action in ModelAction:
    _model_action(_action)


@main.command()
@click.option("--config", "config", metavar="FILE", help=CONFIG_HELP)
@click.option("--port", type=int, help="Port of the running daemon (overrides server.port).")
@click.option("--no-wait", is_flag=True, help="Return once the new config is live, before changed models roll.")
@click.option("--json", "as_json", is_flag=True, help="Print what changed as JSON (what POST /admin/reload answers).")
def reload(config: str | None, port: int | None, no_wait: bool, as_json: bool) -> None:
    """Make the running daemon read its config file again (the one it was started with;
    --config only finds the daemon) and apply what changed, without a restart (as
    systemctl reload does). An invalid file, or a change only a restart may make, changes
    nothing: the error names the file and the field, and the exit status is 1."""
    cfg = load(config)
    # A roll waits for new replicas to start: as long as an engine's startup may take.
    timeout = cfg.supervisor.startup_timeout_s * 2 + 30 if not no_wait else 30.0
    report = _admin_call(cfg, port, "POST", "/admin/reload", ReloadReport, ReloadBody(wait=not no_wait), timeout)
    if as_json:
        click.echo(msgspec.json.encode(report).decode())
        return
    click.echo(f"reloaded {report.config} in {report.seconds:.1f}s: {report.summary()}")
    for name in report.added:
        click.echo(f"  model {name}: added")
    for name in report.removed:
        click.echo(f"  model {name}: removed (drained, then stopped)")
    for name, fields in report.changed.items():
        how = report.rolled.get(name) or ("rolling" if name in report.rolling else "changed live")
        click.echo(f"  model {name}: {', '.join(fields)} ({how})")
    for line in report.policy:
        click.echo(f"  {line}")
    failed = [f"{name}: {how}" for name, how in report.rolled.items() if not how.startswith("rolled")]
    failed += [f"{name}: {why}" for name, why in report.failed.items()]
    if failed:
        raise click.ClickException("not all applied: " + "; ".join(failed))


@main.command()
@click.option("--config", "config", metavar="FILE", help=CONFIG_HELP)
@click.option("--socket", metavar="PATH", help="The daemon's admin socket (default: server.admin_socket).")
@click.option(
    "--url", metavar="URL", help="Reach the daemon over TCP instead (http://HOST:PORT), with the admin token."
)
@click.option("--token-file", metavar="FILE", help="The admin token for --url (default: server.admin_token_file).")
def tui(config: str | None, socket: str | None, url: str | None, token_file: str | None) -> None:
    """The operator's terminal UI: GPUs, models, routes, logs, usage; scale, load, pin, restart."""
    from tui.app import ApplianceTUI
    from tui.client import AdminClient, target_from_config

    cfg = load(config)
    try:
        target = target_from_config(cfg, socket=socket, url=url, token_file=token_file)
    except (ConfigError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    ApplianceTUI(AdminClient.to(target)).run()


@main.command()
@click.option("--config", "config", metavar="FILE", help=CONFIG_HELP)
@click.option(
    "--replica",
    "replicas",
    multiple=True,
    metavar="MODEL#N",
    help="Show this replica's engine log instead of the daemon's; MODEL: all its "
    "replicas, all: every replica. Repeatable.",
)
@click.option("-n", "--lines", default=50, show_default=True, help="Lines of history to show first.")
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


@main.group()
def models() -> None:
    """Model deployments."""


@models.command("ls")
@click.option("--config", "config", metavar="FILE", help=CONFIG_HELP)
@click.option("--port", type=int, help="Port of the running daemon (overrides server.port).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def models_ls(config: str | None, port: int | None, as_json: bool) -> None:
    """List configured models, with their live state when the daemon runs, then the store's models."""
    from appliance.cli.store import store_rows
    from appliance.daemon.admin_client import AdminError, DaemonDown, call, target_from_config
    from appliance.store.store import model_path

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


def _register_store_commands() -> None:
    from appliance.cli.store import register

    register(main, models)
    from appliance.cli.keys import register as register_keys

    register_keys(main, load)
    from appliance.cli.export import export

    main.add_command(export)
    from appliance.cli.audit import audit

    main.add_command(audit)


_register_store_commands()


if __name__ == "__main__":
    main()
