"""The files and directories the config names or implies: the default directories (systemd's,
FHS for root, XDG for a user), the install prefix and the bundled model, and the checks made
before the daemon uses them (writable directories, the admin token file and its mode)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.config.errors import ConfigError
from appliance.config.models import EMBEDDED_MODEL_FILE, EMBEDDED_MODEL_NAME
from appliance.config.sections import PathsConfig

if TYPE_CHECKING:
    from appliance.config.schema import Config

log = logging.getLogger("appliance.config")

UNIX_PATH_MAX = 108  # sun_path, the terminating NUL included


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def default_paths() -> PathsConfig:
    """The directories systemd made for the service (appliance.service's
    StateDirectory=, CacheDirectory=, LogsDirectory=), else FHS locations for
    root, XDG locations for a user."""
    fallback = _user_paths()
    return PathsConfig(
        state_dir=_systemd_dir("STATE_DIRECTORY") or fallback.state_dir,
        cache_dir=_systemd_dir("CACHE_DIRECTORY") or fallback.cache_dir,
        log_dir=_systemd_dir("LOGS_DIRECTORY") or fallback.log_dir,
    )


def _systemd_dir(variable: str) -> str:
    # A colon-separated list when a unit names several; the first is ours.
    return os.environ.get(variable, "").split(":")[0]


def _user_paths() -> PathsConfig:
    if _is_root():
        return PathsConfig(
            state_dir="/var/lib/appliance",
            cache_dir="/var/cache/appliance",
            log_dir="/var/log/appliance",
        )
    home = Path.home()
    state = Path(os.environ.get("XDG_STATE_HOME") or home / ".local/state") / "appliance"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or home / ".cache") / "appliance"
    return PathsConfig(state_dir=str(state), cache_dir=str(cache), log_dir=str(state / "log"))


def install_prefix() -> Path:
    """The virtual environment this program runs from; install.sh puts the
    CPU engine in its bin/ and the bundled model in its share/appliance/."""
    return Path(sys.prefix)


def builtin_model_path(name: str) -> Path:
    if name != EMBEDDED_MODEL_NAME:
        raise KeyError(name)
    return install_prefix() / "share" / "appliance" / "models" / EMBEDDED_MODEL_FILE


def read_admin_token(cfg: Config) -> str:
    if not cfg.server.admin_token_file:
        return ""
    path = Path(cfg.server.admin_token_file)
    try:
        token = read_secret_file(path)
    except OSError as exc:
        raise ConfigError(
            f"{cfg.origin}: field 'server.admin_token_file': cannot read {path}: "
            f"{exc.strerror}; create it (one line of 16 or more characters, mode 0600, "
            "readable by the daemon's user) or remove the setting"
        ) from None
    if len(token) < 16:
        raise ConfigError(
            f"{cfg.origin}: field 'server.admin_token_file': the token in {path} is shorter than 16 characters"
        )
    if problem := exposed_secret(path):
        log.warning("field 'server.admin_token_file': %s", problem)
    return token


SECRET_FILE_LIMIT = 4096


def read_secret_file(path: Path, limit: int = SECRET_FILE_LIMIT) -> str:
    """A secret's file (the admin token, a provider's key), stripped: a regular file only, of
    at most limit bytes, else OSError. A FIFO there blocked `check` and `serve` for good
    (SIGTERM could not end them), /dev/zero read until memory ran out. Links are followed, as
    systemd credentials and mounted secrets are often links; the file must be regular."""
    import stat

    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(0, "not a regular file")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise OSError(0, f"larger than {limit} bytes, not a key")
    return data.decode(errors="replace").strip()


def exposed_secret(path: Path) -> str | None:
    """Why a file holding a secret is open to more than its owner, if it is."""
    mode = path.stat().st_mode & 0o777
    if mode & 0o044:
        return (
            f"{path} is readable by its group or others (mode {mode:04o}): run chmod 600 {path} "
            "(and chown it to the daemon's user)"
        )
    return None


def _written_dirs(cfg: Config) -> tuple[tuple[str, str, int], ...]:
    """(field, path, the mode it is made with) of each directory the daemon writes. State and
    logs are made for the daemon's user and group only (audit rows, key hashes, logs that may
    hold prompts), as the service's StateDirectoryMode; an existing one is kept."""
    return (
        ("paths.state_dir", cfg.paths.state_dir, 0o750),
        ("paths.cache_dir", cfg.paths.cache_dir, 0o777),
        ("paths.log_dir", cfg.paths.log_dir, 0o750),
    )


def check_dirs_are_dirs(cfg: Config) -> None:
    """What `check` can tell of the directories without writing: each is a directory, or
    can become one (no file where it or a folder above it would be). Whether this user may
    write there is serve's to try (check_writable_dirs): check often runs as another user."""
    for field, path, _ in _written_dirs(cfg):
        there = Path(path).absolute()
        try:
            while not there.exists():
                there = there.parent
            ok = there.is_dir()
        except OSError:  # a folder on the way this user may not enter: not for check to judge
            continue
        if not ok:
            raise ConfigError(
                f"{cfg.origin}: field '{field}': {path} cannot be a directory: {there} is a file; "
                f"point {field} elsewhere"
            )


def check_writable_dirs(cfg: Config) -> None:
    """The directories the daemon writes, made if missing and tried with a real file:
    a ConfigError naming the field, the path and the fix, before anything opens there."""
    import tempfile

    for field, path, mode in _written_dirs(cfg):
        try:
            Path(path).mkdir(mode=mode, parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=path):
                pass
        except OSError as exc:
            raise ConfigError(
                f"{cfg.origin}: field '{field}': {path} is not writable by this user "
                f"(uid {os.getuid()}): {exc.strerror}; give the daemon's user write access "
                f"(chown/chmod) or point {field} elsewhere"
            ) from None
    if cfg.server.log_file:
        _check_log_file(cfg, cfg.server.log_file)


def _check_log_file(cfg: Config, path: str) -> None:
    """server.log_file opened for append as the daemon will (made if missing): one line
    naming the field, not a traceback from the logging setup."""
    try:
        Path(path).parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640))
    except OSError as exc:
        raise ConfigError(
            f"{cfg.origin}: field 'server.log_file': cannot append to {path} as this user "
            f"(uid {os.getuid()}): {exc.strerror}; give the daemon's user write access there, "
            "point server.log_file elsewhere, or leave it empty (stderr, the journal under systemd)"
        ) from None
