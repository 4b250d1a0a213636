"""Loading: the file found, read and decoded into Config, renamed keys moved (with a
warning), machine-dependent defaults filled, then validated (validation.py)."""

from __future__ import annotations

import os
from pathlib import Path

import msgspec

from appliance.config.durations import _decode_duration
from appliance.config.errors import NOT_KEYS, ConfigError, decode_error_message
from appliance.config.models import ModelConfig, embedded_default_model
from appliance.config.paths import default_paths
from appliance.config.schema import Config
from appliance.config.sections import PathsConfig
from appliance.config.validation import _validate

DEFAULT_CONFIG_PATH = Path("/etc/appliance/appliance.toml")


def resolve_config_path(cli_path: str | None) -> tuple[Path, bool]:
    """The config file to read and whether the operator asked for it explicitly
    (an explicit file that is missing is an error; the default may be absent)."""
    if cli_path:
        return Path(cli_path), True
    env = os.environ.get("APPLIANCE_CONFIG")
    if env:
        return Path(env), True
    return DEFAULT_CONFIG_PATH, False


def load_config(cli_path: str | None = None) -> Config:
    path, explicit = resolve_config_path(cli_path)
    try:
        raw = path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        if explicit:
            # A path from the environment is one the operator may not have typed: say where it came from.
            named = " (named by $APPLIANCE_CONFIG)" if not cli_path else ""
            raise ConfigError(f"{path}: config file not found{named}") from None
        return finalize(Config(), origin="<built-in defaults>")
    except OSError as exc:  # a folder on its way this user may not enter, a name too long...: said, not skipped
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from None
    return parse_config(raw, origin=str(path))


def parse_config(raw: bytes | str, origin: str = "<string>") -> Config:
    try:
        table = msgspec.toml.decode(raw)
    except msgspec.DecodeError as exc:
        raise ConfigError(f"{origin}: not valid TOML: {exc}") from None
    except RecursionError:  # the TOML parser recurses once per level of [ or {
        raise ConfigError(f"{origin}: not valid TOML: arrays or tables nested too deeply") from None
    if not isinstance(table, dict):
        raise ConfigError(f"{origin}: not a TOML table")
    deprecations = _rename_keys(table, origin)
    for internal in sorted(NOT_KEYS & table.keys()):  # the loader fills them: no file may
        raise ConfigError(f"{origin}: field '{internal}' is unknown (appliance.example.toml lists every key)")
    try:
        cfg = msgspec.convert(table, type=Config, dec_hook=_decode_duration)
    except msgspec.ValidationError as exc:
        text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
        raise ConfigError(f"{origin}: {decode_error_message(exc, Config, text)}") from None
    return finalize(msgspec.structs.replace(cfg, deprecations=tuple(deprecations)), origin=origin)


# Keys renamed in a release: (old, new, the release that renamed it). The old name is read
# as the new one, with a warning, for one release; then the entry goes and the old name is
# an unknown field. "models[].x" is key x of every [[models]] table.
RENAMED_KEYS: list[tuple[str, str, str]] = [
    # [autoscaling] keeps only autoscaling: the cold-start queue and the CPU budget have their own.
    ("autoscaling.max_queue", "queue.max_held", "0.2.0"),
    ("autoscaling.queue_timeout_s", "queue.timeout_s", "0.2.0"),
    ("autoscaling.keepalive_s", "queue.keepalive_s", "0.2.0"),
    ("autoscaling.cpu_cores", "cpu.cores", "0.2.0"),
]


def _rename_keys(table: dict, origin: str) -> list[str]:
    """Move each renamed key the file uses to its new name; a warning for each."""
    warnings = []
    for old, new, release in RENAMED_KEYS:
        for where, parent, new_parent in _key_places(table, old, new):
            old_key, new_key = old.rsplit(".", 1)[-1], new.rsplit(".", 1)[-1]
            if new_key in new_parent:
                raise ConfigError(
                    f"{origin}: field '{where}{old_key}' is the old name of '{new}' (renamed in "
                    f"{release}) and both are set; keep only '{new}'"
                )
            new_parent[new_key] = parent.pop(old_key)
            warnings.append(
                f"{origin}: field '{where}{old_key}' is deprecated: it was renamed '{new}' in "
                f"{release} and is read as that for now; rename it before the next release"
            )
    return warnings


def _key_places(table: dict, old: str, new: str) -> list[tuple[str, dict, dict]]:
    """(path shown, the table holding the old key, the table the new key goes in) for each
    place the file sets old."""
    *old_path, old_key = old.split(".")
    new_path = new.split(".")[:-1]
    places = [("", table)]
    for part in old_path:
        many = part.endswith("[]")
        name = part.removesuffix("[]")
        found = []
        for shown, t in places:
            value = t.get(name)
            items = value if many and isinstance(value, list) else [value] if not many else []
            for i, item in enumerate(items):
                if isinstance(item, dict):
                    found.append((f"{shown}{name}[{i}]." if many else f"{shown}{name}.", item))
        places = found
    out = []
    for shown, parent in places:
        if old_key not in parent:
            continue
        target = parent if new_path == old_path else _subtable(table, new_path)
        out.append((shown, parent, target))
    return out


def _subtable(table: dict, path: list[str]) -> dict:
    for part in path:
        table = table.setdefault(part, {})
    return table


def finalize(cfg: Config, origin: str) -> Config:
    """Fill defaults that depend on the machine, then check cross-field rules."""
    defaults = default_paths()
    paths = PathsConfig(
        state_dir=cfg.paths.state_dir or defaults.state_dir,
        cache_dir=cfg.paths.cache_dir or defaults.cache_dir,
        log_dir=cfg.paths.log_dir or defaults.log_dir,
    )
    models = [_with_request_context(m) for m in cfg.models or [embedded_default_model()]]
    server = cfg.server
    if server.log_file:
        server = msgspec.structs.replace(server, log_file=str(Path(paths.log_dir) / server.log_file))
    if server.admin_socket:
        server = msgspec.structs.replace(server, admin_socket=str(Path(paths.state_dir) / server.admin_socket))
    cfg = msgspec.structs.replace(cfg, server=server, paths=paths, models=models, origin=origin)
    _validate(cfg)
    return cfg


def _with_request_context(m: ModelConfig) -> ModelConfig:
    """llama.cpp's slots share its context: context_per_request set, the total is that x parallel."""
    if m.context_per_request <= 0 or m.server != "llamacpp":
        return m
    return msgspec.structs.replace(m, context_length=m.context_per_request * m.parallel)
