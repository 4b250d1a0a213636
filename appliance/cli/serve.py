"""`appliance serve` and `appliance check`: the daemon started in the foreground, and the
checks made before it starts (the policy, the engine and model files, the databases),
which `check` runs alone, writing nothing."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from appliance.cli.options import CONFIG_HELP, load
from appliance.config import (
    BUILTIN_PREFIX,
    EMBEDDED_MODEL_SHA256,
    STORE_PREFIX,
    Config,
    ConfigError,
    uses_gpus,
)


@click.command()
@click.option("--config", "config", metavar="FILE", help=CONFIG_HELP)
@click.option("--host", help="Address to bind (overrides server.host).")
@click.option("--port", type=click.IntRange(1, 65535), help="Port to bind (overrides server.port).")
def serve(config: str | None, host: str | None, port: int | None) -> None:
    """Run the daemon in the foreground until SIGTERM or Ctrl-C."""
    import logging

    import msgspec

    from appliance.config import ConfigError, check_dirs_are_dirs, check_writable_dirs
    from appliance.daemon.port_claim import PortBusy, claim_port
    from appliance.daemon.server import run
    from appliance.fleet.capabilities import warn_of_held_capabilities
    from appliance.logs import setup_logging
    from appliance.state.lock import StateDirBusy, hold_state_dir
    from appliance.undumpable import make_undumpable

    # First, before the config, keys or tokens are read: no other process of this user
    # (an engine among them) may ptrace the daemon, read its memory or take its fds.
    make_undumpable()
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
        # The directories first, so an unwritable one is named with its field and fix (a
        # file in a directory's place said as such, not as strerror's "File exists").
        check_dirs_are_dirs(cfg)
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
    warn_of_held_capabilities()  # once it will start: a refused start says only why
    code = run(cfg, reread=read)
    claim.close()
    lock.close()
    sys.exit(code)


@click.command()
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
    from appliance.config import check_dirs_are_dirs, read_admin_token

    cfg = load(config)
    for warning in cfg.deprecations:
        click.echo(f"warning: {warning}", err=True)
    try:
        check_dirs_are_dirs(cfg)
        read_admin_token(cfg)  # serve reads it at start: said here, not after the engines started
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
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
    from appliance.store.manifest import MIGRATIONS as STORE_MIGRATIONS
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
    """Fail at start, with the fix, when the CPU engine, a model file or the simulated GPU
    inventory is missing."""
    import os

    from appliance.dist.images import llamacpp_binary
    from appliance.gpu.probe import load_inventory
    from appliance.store.weights import model_path, unusable_weights

    if cfg.gpu.inventory:
        try:
            load_inventory(Path(cfg.gpu.inventory))
        except ValueError as exc:
            raise click.ClickException(f"{cfg.origin}: field 'gpu.inventory': {exc}") from None
    for i, m in enumerate(cfg.models):
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
        if m.source.startswith(BUILTIN_PREFIX) and path is not None and path.is_file():
            digest = _sha256(path)
            if digest != EMBEDDED_MODEL_SHA256:
                raise click.ClickException(
                    f"{cfg.origin}: field 'models[{i}].source': model '{m.name}': {path} has sha256 {digest}, "
                    f"expected {EMBEDDED_MODEL_SHA256}; the file is damaged: run ./install.sh to restore it"
                )
        if problem := unusable_weights(cfg, m):
            fix = (
                "; run ./install.sh for the bundled model"
                if m.source.startswith(BUILTIN_PREFIX)
                else f"; correct models[{i}].source, or import the model (`appliance models import PATH "
                f'--name NAME`) and set source = "store:NAME"'
            )
            raise click.ClickException(f"{cfg.origin}: field 'models[{i}].source': model '{m.name}': {problem}{fix}")


def _sha256(path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
