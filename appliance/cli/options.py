"""What every `appliance` subcommand shares: the --config option, loading the config it
names (an error is one line, no traceback), reading the GPUs, and calling the running
daemon's admin API."""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

import click
import msgspec

from appliance.config import Config, ConfigError, load_config

if TYPE_CHECKING:
    from appliance.gpu.probe import Inventory

T = TypeVar("T")

CONFIG_HELP = "Config file (default: $APPLIANCE_CONFIG or /etc/appliance/appliance.toml)."
# A --port flag: a usage error out of range (0 or 70000 read as "the daemon is not
# running", or as a refusal for want of the admin token, naming no flag).
PORT = click.IntRange(1, 65535)


def load(config: str | None) -> Config:
    if config == "":
        # `--config "$CFG"` with CFG unset: the built-in defaults served in its place, silently.
        raise click.BadParameter("an empty path (unset variable?); name the config file", param_hint="'--config'")
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


def admin_call(
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
        raise click.ClickException(f"{exc}{_socket_not_ours(cfg, port)}") from None


def _socket_not_ours(cfg: Config, port: int | None) -> str:
    """Why the CLI went over TCP, when it did because this user may not open the admin
    socket: the daemon's refusal names the socket, not that it was never tried."""
    import grp
    import os

    socket = cfg.server.admin_socket
    if port is not None or not socket or not os.path.exists(socket) or os.access(socket, os.R_OK | os.W_OK):
        return ""
    try:
        group = grp.getgrgid(os.stat(socket).st_gid).gr_name
    except (OSError, KeyError):
        group = "the daemon's group"
    return (
        f" (this user, uid {os.getuid()}, may not open the admin socket {socket}: run as root or the "
        f"daemon's user, or add yourself to group {group} and log in again)"
    )
