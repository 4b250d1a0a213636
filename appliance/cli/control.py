"""The operator's actions on the running daemon: `appliance scale`, the model actions
(`load`, `unload`, `pin`, ...: one command per ModelAction), the replica actions
(`restart`, `drain` MODEL#N: one per ReplicaAction) and `reload`."""

from __future__ import annotations

import click
import msgspec

from appliance.cli.options import CONFIG_HELP, PORT, admin_call, load
from appliance.status import (
    MODEL_ACTION_HELP,
    SCALE,
    ModelAction,
    ModelStatus,
    ReloadBody,
    ReloadReport,
    ReplicaAction,
    ReplicaStatus,
    ScaleBody,
    model_path,
)


def _model_line(m: ModelStatus) -> str:
    states = ",".join(r.state for r in m.replicas) or "none"
    how = f"operator set {m.override}" if m.override is not None else "autoscaling"
    pin = ", pinned" if m.pinned else ""
    line = f"{m.name}: replicas {len(m.replicas)} [{states}] ({how}{pin})"
    return f"{m.said}\n{line}" if m.said else line


_MODEL_OPTIONS = [
    click.option("--config", "config", metavar="FILE", help=CONFIG_HELP),
    click.option("--port", type=PORT, help="Port of the running daemon."),
    click.option("--json", "as_json", is_flag=True, help="Print the model as it is after the action (JSON)."),
]


def _print_model(m: ModelStatus, as_json: bool) -> None:
    click.echo(msgspec.json.format(msgspec.json.encode(m), indent=2).decode() if as_json else _model_line(m))


def _with_model_options(f):
    for option in reversed(_MODEL_OPTIONS):
        f = option(f)
    return f


@click.command()
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
    path = model_path(model, SCALE)
    _print_model(admin_call(cfg, port, "POST", path, ModelStatus, ScaleBody(replicas=value)), as_json)


def _model_action(action: ModelAction):
    @click.argument("model")
    @_with_model_options
    def command(model: str, config: str | None, port: int | None, as_json: bool) -> None:
        _print_model(admin_call(load(config), port, "POST", model_path(model, action), ModelStatus), as_json)

    command.__doc__ = MODEL_ACTION_HELP[action]
    return click.command(name=action.value)(command)


# `appliance load|unload|pin|unpin MODEL`: one command per ModelAction.
MODEL_ACTIONS = [_model_action(action) for action in ModelAction]

REPLICA_ACTION_HELP = {
    ReplicaAction.RESTART: "Restart replica MODEL#N (as `status` and `ps` name it): its requests in flight "
    "finish, then its engine stops and starts again. A FATAL replica, one the daemon gave up restarting, "
    "starts afresh with its crash count cleared.",
    ReplicaAction.DRAIN: "Take replica MODEL#N out of service: its requests in flight finish, then it stops "
    "(the autoscaler may start another).",
}


def _replica(value: str) -> tuple[str, int]:
    """MODEL#N, as `appliance status`, `ps` and `logs --replica` name a replica."""
    model, sep, index = value.rpartition("#")
    if not sep or not model or not (index.isascii() and index.isdigit()):  # int("²") raises
        raise click.BadParameter(f"{value!r}: expected MODEL#N, a replica as `appliance ps` names it (llama#0)")
    return model, int(index)


def _replica_action(action: ReplicaAction):
    @click.argument("replica", metavar="MODEL#N")
    @_with_model_options
    def command(replica: str, config: str | None, port: int | None, as_json: bool) -> None:
        model, index = _replica(replica)
        answer = admin_call(load(config), port, "POST", model_path(model, "replicas", index, action), ReplicaStatus)
        if as_json:
            click.echo(msgspec.json.format(msgspec.json.encode(answer), indent=2).decode())
        else:
            click.echo(answer.said or f"{answer.replica}: {answer.state}")

    command.__doc__ = REPLICA_ACTION_HELP[action]
    return click.command(name=action.value)(command)


# `appliance restart|drain MODEL#N`: one command per ReplicaAction (the TUI's r and d).
REPLICA_ACTIONS = [_replica_action(action) for action in ReplicaAction]


@click.command()
@click.option("--config", "config", metavar="FILE", help=CONFIG_HELP)
@click.option("--port", type=PORT, help="Port of the running daemon (overrides server.port).")
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
    report = admin_call(cfg, port, "POST", "/admin/reload", ReloadReport, ReloadBody(wait=not no_wait), timeout)
    if as_json:
        click.echo(msgspec.json.encode(report).decode())
        return
    click.echo(f"reloaded {report.config} in {report.seconds:.1f}s: {report.summary()}")
    for name in report.added:
        click.echo(f"  model {name}: added")
    for name in report.removed:
        click.echo(f"  model {name}: {report.removal(name)}")
    for name, fields in report.changed.items():
        how = report.rolled.get(name) or ("rolling" if name in report.rolling else "changed live")
        click.echo(f"  model {name}: {', '.join(fields)} ({how})")
    for line in report.policy:
        click.echo(f"  {line}")
    failed = [f"{name}: {how}" for name, how in report.rolled.items() if not how.startswith("rolled")]
    failed += [f"{name}: {why}" for name, why in report.failed.items()]
    if failed:
        raise click.ClickException("not all applied: " + "; ".join(failed))
