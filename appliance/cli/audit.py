"""`appliance audit export`: the audit log between two times, as JSON lines or CSV, for
compliance. Streamed from the state database (read-only, beside a running daemon)."""

from __future__ import annotations

import datetime as dt
import os
import sqlite3
import sys
from pathlib import Path

import click

from appliance.cli.options import CONFIG_HELP, load


def _when(text: str | None) -> float | None:
    """An ISO date or date-time (UTC unless it says otherwise) as unix time."""
    if text is None:
        return None
    try:
        moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is not an ISO date or time (e.g. 2026-11-01 or 2026-11-01T08:00Z)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.timestamp()


@click.group()
def audit() -> None:
    """The audit log: one row per request (retention: [audit] retention_days, max_rows)."""


@audit.command("export")
@click.option("--since", metavar="WHEN", help="From this ISO date/time, included (UTC unless given).")
@click.option("--until", metavar="WHEN", help="To this ISO date/time, excluded.")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl", show_default=True)
@click.option("-o", "--output", metavar="FILE", help="Write here (default: stdout).")
@click.option("--config", "config", metavar="FILE", help=CONFIG_HELP)
def export(since, until, fmt, output, config) -> None:
    """Stream audit rows (oldest first) with each request's key id, never its key."""
    from appliance.access.retention import rows_between, write_csv, write_jsonl
    from appliance.safe_paths import written_aside
    from appliance.state.db import path_in

    start, end = _when(since), _when(until)
    path = path_in(load(config).paths.state_dir)
    if not path.exists():
        raise click.ClickException(f"no state database at {path}: nothing audited yet")
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    write = write_csv if fmt == "csv" else write_jsonl
    try:
        if output:
            with written_aside(Path(output), newline="") as out:  # never half-written, never through a link
                n = write(rows_between(db, start, end), out)
        else:
            n = write(rows_between(db, start, end), sys.stdout)
    except sqlite3.Error as exc:
        raise click.ClickException(f"cannot read {path}: {exc}") from None
    except BrokenPipeError:  # `| head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
        sys.exit(1)
    except OSError as exc:  # -o: a folder that is not there, not ours to write, or a folder itself
        raise click.ClickException(f"cannot write {output or 'stdout'}: {exc.strerror}") from None
    finally:
        db.close()
    click.echo(f"exported {n} rows", err=True)
