"""What every `appliance` subcommand shares: the --config option, loading the config it
names (an error is one line, no traceback), and reading the GPUs."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from appliance.config import Config, ConfigError, load_config

if TYPE_CHECKING:
    from appliance.gpu.probe import Inventory

CONFIG_HELP = "Config file (default: $APPLIANCE_CONFIG or /etc/appliance/appliance.toml)."


def load(config: str | None) -> Config:
    try:
        return load_config(config)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


def read_inventory(cfg: Config, inventory: str | None) -> Inventory:
    """The GPUs: a simulated inventory file (--inventory, else gpu.inventory), else NVML's."""
    from appliance.gpu.probe import NvmlProbe, SimulatedProbe

    source = inventory or cfg.gpu.inventory
    try:
        return SimulatedProbe(source).read() if source else NvmlProbe().read()
    except (OSError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
