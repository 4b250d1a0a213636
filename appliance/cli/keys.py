"""`appliance keys create|ls|set|revoke`: API keys in the state database.

A key is printed once, at creation; only its hash is stored. The running daemon
picks up new, changed and revoked keys within a second.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import click

from appliance.access.retention import iso
from appliance.cli.options import CONFIG_HELP


def _iso(ts: float | None) -> str | None:
    """A unix time as JSON gives times: ISO 8601, UTC (the audit export's format)."""
    return None if ts is None else iso(ts)


def _with_iso_times(key: dict) -> dict:
    return {**key, "created_at": _iso(key["created_at"]), "revoked_at": _iso(key["revoked_at"])}


def register(main: click.Group, load) -> None:
    from appliance.access.keys import PERIODS, KeyStore, period_bounds

    def store(config: str | None) -> KeyStore:
        from appliance.state.migrations import SchemaError

        cfg = load(config)
        try:
            return KeyStore(Path(cfg.paths.state_dir) / "appliance.db")
        except SchemaError as exc:
            raise click.ClickException(str(exc)) from None
        except (OSError, sqlite3.Error) as exc:  # a file where the folder goes, no permission
            raise click.ClickException(
                f"{cfg.origin}: field 'paths.state_dir': cannot open the state database in "
                f"{cfg.paths.state_dir}: {getattr(exc, 'strerror', None) or exc}"
            ) from None

    def check_binding(config: str | None, routes: tuple[str, ...], tag: str) -> None:
        """A key's routes and tag bind it: each must exist in the config it is served by."""
        cfg = load(config)
        names = [r.name for r in cfg.routes]
        tags = sorted({r.tag for r in cfg.routes if r.tag})
        for route in routes:
            if route not in names:
                raise click.ClickException(
                    f"no route {route!r} in {cfg.origin}; its routes: {', '.join(names) or '(none)'}"
                )
        if tag and tag not in tags:
            raise click.ClickException(
                f"no route has tag {tag!r} in {cfg.origin}; its routes' tags: {', '.join(tags) or '(none)'}"
            )

    @main.group()
    def keys() -> None:
        """API keys: create (shown once), list (never the secret), change limits, revoke."""

    @keys.command("create")
    @click.option("--config", "config", metavar="FILE", help=CONFIG_HELP)
    @click.option("--name", required=True, help="Who or what the key is for.")
    @click.option(
        "--route",
        "routes",
        multiple=True,
        metavar="ROUTE",
        help="A route the key may use (repeat; none: every route and model).",
    )
    @click.option(
        "--tag",
        default="",
        help="The tag the key's requests match routes with (binding: a request's tag header may not change it).",
    )
    @click.option("--rpm", type=click.IntRange(min=0), default=0, help="Requests per minute (0: no limit).")
    @click.option(
        "--budget-tokens", type=click.IntRange(min=0), default=0, help="Tokens per budget period (0: no budget)."
    )
    @click.option("--budget-period", type=click.Choice(PERIODS), default="day", show_default=True)
    @click.option("--json", "as_json", is_flag=True, help="Print JSON: the key's record, the key in 'key'.")
    def create(config, name, routes, tag, rpm, budget_tokens, budget_period, as_json) -> None:
        """Create a key and print it once."""
        check_binding(config, routes, tag)
        s = store(config)
        try:
            key, token = s.create(name, list(routes), tag, rpm, budget_tokens, budget_period)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="'--name'") from None
        finally:
            s.close()
        click.echo(json.dumps({**_with_iso_times(key.public()), "key": token}, indent=2) if as_json else token)
        click.echo(f"key {key.id} ({name}) created; the key is shown only this once", err=True)

    @keys.command("ls")
    @click.option("--config", "config", metavar="FILE", help=CONFIG_HELP)
    @click.option("--json", "as_json", is_flag=True, help="Print JSON: each key's record, with 'budget_used_tokens'.")
    def ls(config, as_json) -> None:
        """List keys (never their secrets): requests a minute, the token budget and the
        tokens used of it in the current period (UTC)."""
        s = store(config)
        try:
            keys = s.all()
            used = s.used({k.id: period_bounds(k.budget_period, time.time())[0] for k in keys if k.budget_tokens})
        finally:
            s.close()
        rows = [{**k.public(), "budget_used_tokens": used.get(k.id) if k.budget_tokens else None} for k in keys]
        if as_json:
            click.echo(json.dumps([_with_iso_times(k) for k in rows], indent=2))
            return
        click.echo(f"{'ID':<12}  {'NAME':<20}  {'STATE':<8}  {'RPM':>5}  {'BUDGET':<24}  {'USED':<16}  ROUTES")
        for k in rows:
            state = "revoked" if k["revoked_at"] else "active"
            click.echo(
                f"{k['id']:<12}  {k['name']:<20}  {state:<8}  {k['rpm'] or '-':>5}  {_budget(k):<24}  "
                f"{_used(k):<16}  {','.join(k['routes']) or '*'}"
            )

    @keys.command("set")
    @click.option("--config", "config", metavar="FILE", help=CONFIG_HELP)
    @click.argument("key_id")
    @click.option("--rpm", type=click.IntRange(min=0), default=None, help="Requests per minute (0: no limit).")
    @click.option(
        "--budget-tokens", type=click.IntRange(min=0), default=None, help="Tokens per budget period (0: no budget)."
    )
    @click.option("--budget-period", type=click.Choice(PERIODS), default=None)
    @click.option("--json", "as_json", is_flag=True, help="Print JSON: the key's record as it is now.")
    def set_limits(config, key_id, rpm, budget_tokens, budget_period, as_json) -> None:
        """Change a key's limits, keeping the key itself (its clients change nothing): the
        running daemon applies them within a second, and the tokens used this period stay
        counted. Give at least one of --rpm, --budget-tokens, --budget-period."""
        if rpm is None and budget_tokens is None and budget_period is None:
            raise click.UsageError("nothing to change: give --rpm, --budget-tokens or --budget-period")
        wanted = key_id.removeprefix("ak-").split("-")[0]
        s = store(config)
        try:
            changed = s.set_limits(wanted, rpm, budget_tokens, budget_period)
        finally:
            s.close()
        if changed is None:
            raise click.ClickException(f"no active key with id {wanted!r}; `appliance keys ls` lists them")
        before, after = changed
        if as_json:
            click.echo(json.dumps(_with_iso_times(after.public()), indent=2))
            return
        was = f"rpm {before.rpm or '-'}, budget {_budget(before.public())}"
        now = f"rpm {after.rpm or '-'}, budget {_budget(after.public())}"
        click.echo(f"key {after.id} ({after.name}): {now}" + (f" (was {was})" if was != now else " (unchanged)"))

    @keys.command("revoke")
    @click.option("--config", "config", metavar="FILE", help=CONFIG_HELP)
    @click.argument("key_id")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    def revoke(config, key_id, as_json) -> None:
        """Revoke a key by its id (the running daemon refuses it within a second). A key
        revoked already stays so (exit 0, saying since when); an unknown id is an error."""
        # An id, ak-<id>, or a whole key pasted: only the id is named back (the secret is
        # not echoed to the terminal, or to a log of it).
        wanted = key_id.removeprefix("ak-").split("-")[0]
        s = store(config)
        try:
            outcome = s.revoke(wanted)
            named = [k.id for k in s.all() if k.name == key_id and not k.revoked_at] if outcome is None else []
        finally:
            s.close()
        if outcome is None:
            # Names need not be unique: say which ids carry it rather than pick one.
            hint = f"; keys named {key_id!r}: {', '.join(named)}" if named else "; `appliance keys ls` lists them"
            shown = wanted if key_id.startswith("ak-") else key_id
            raise click.ClickException(f"no key with id {shown!r}{hint}")
        when, now = outcome
        if as_json:
            document = {"id": wanted, "revoked": True, "revoked_at": _iso(when), "already_revoked": not now}
            click.echo(json.dumps(document, indent=2))
        elif now:
            click.echo(f"key {wanted} revoked at {_local(when)}")
        else:
            click.echo(f"key {wanted} was already revoked at {_local(when)}; nothing changed")


def _budget(key: dict) -> str:
    """A budget as an operator reads it: '2,000,000 tokens/month', '-' for none."""
    return f"{key['budget_tokens']:,} tokens/{key['budget_period']}" if key["budget_tokens"] else "-"


def _used(key: dict) -> str:
    """Tokens used of the budget this period, with the share: '1,234 (6%)'."""
    if not key["budget_tokens"]:
        return "-"
    used = key["budget_used_tokens"] or 0
    return f"{used:,} ({100 * used // key['budget_tokens']}%)"


def _local(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))
