"""The `appliance` command: the group, and each subcommand from the module that owns it
(serve.py, views.py, plan.py, control.py, store.py, keys.py, export.py, audit.py)."""

from __future__ import annotations

import click

from appliance.cli.control import MODEL_ACTIONS, REPLICA_ACTIONS, reload, scale
from appliance.cli.examples import add_examples
from appliance.cli.options import load
from appliance.cli.plan import plan
from appliance.cli.serve import check, serve
from appliance.cli.views import human_duration, logs, models_ls, ps, status, tui

__all__ = ["human_duration", "main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="appliance")
def main() -> None:
    """Sovereign on-prem LLM serving: an OpenAI-compatible API on localhost."""


@main.group()
def models() -> None:
    """Models: those the config serves (ls) and the store of their weights (import, pull,
    verify, rm, accept-license, protect)."""


for command in (serve, check, ps, status, plan, scale, *MODEL_ACTIONS, *REPLICA_ACTIONS, reload, tui, logs):
    main.add_command(command)
models.add_command(models_ls)


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
add_examples(main)


if __name__ == "__main__":
    main()
