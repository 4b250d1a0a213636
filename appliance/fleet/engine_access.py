"""What an engine replica gets from the appliance, and nothing more.

Each replica start gets a fresh random secret that only the appliance and that
engine know, and a private directory (mode 0700) for the files that carry it:
the engine refuses every request without ``Authorization: Bearer <secret>``,
so the proxy (the only holder of the secret) is the one door to it. The secret
reaches the engine by a file or an environment variable, never on its command
line (``ps``, /proc/PID/cmdline are readable by every local user); how each
engine takes it is its adapter's business (engines/). vLLM, whose key guards
only /v1, listens on a unix socket in that private directory instead of a TCP port.

The engine's environment is an allow-list: the daemon's own variables (provider
keys, $CREDENTIALS_DIRECTORY, $NOTIFY_SOCKET...) never reach it; HOME and TMPDIR
point at directories of the appliance's.
"""

from __future__ import annotations

import atexit
import itertools
import os
import re
import secrets
import shutil
import stat
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from appliance.config import UNIX_PATH_MAX
from appliance.fleet import eager_writes

# The daemon's variables an engine may see: the program search path, the locale,
# and what the GPU stack reads (library paths, CUDA/NCCL/NVIDIA settings).
PASSED = frozenset({"PATH", "LANG", "LANGUAGE", "TZ", "LD_LIBRARY_PATH"})
PASSED_PREFIXES = ("LC_", "CUDA_", "NCCL_", "NVIDIA_")

_root: Path | None = None
_serial = itertools.count()
# The daemon's private root: appliance-engines-<its pid>-<random> (tempfile.mkdtemp).
_ROOT_NAME = re.compile(r"appliance-engines-(\d+)-[A-Za-z0-9_]+")


@dataclass(frozen=True)
class EngineAccess:
    """One replica start's secret and private directory."""

    secret: str
    dir: Path

    @property
    def key_file(self) -> Path:
        """The secret alone in a 0600 file (llama-server's --api-key-file, {api_key_file})."""
        return self.dir / "api-key"

    @property
    def socket(self) -> Path:
        """Where an engine that listens on a unix socket listens."""
        return self.dir / "engine.sock"

    @property
    def tmp(self) -> Path:
        return self.dir / "tmp"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.secret}"}

    def private_file(self, name: str, text: str) -> Path:
        """A file only the daemon's user may read, in the private directory."""
        path = self.dir / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return path

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def open_access() -> EngineAccess:
    """A fresh secret and an empty private directory for one replica start."""
    access = EngineAccess(secrets.token_hex(32), private_root() / f"r{next(_serial)}")
    if len(os.fsencode(access.socket)) >= UNIX_PATH_MAX:
        raise OSError(
            f"engine socket path {access.socket} is too long for a unix socket: "
            "run the daemon with a shorter $TMPDIR (or under systemd, $RUNTIME_DIRECTORY)"
        )
    access.dir.mkdir(mode=0o700)
    access.tmp.mkdir(mode=0o700)
    access.private_file("api-key", access.secret + "\n")
    return access


def private_root() -> Path:
    """The daemon's one directory (0700) of engine secrets and sockets: under
    $RUNTIME_DIRECTORY when systemd gives one, else the temp dir; removed at exit."""
    global _root
    if _root is None or not _root.is_dir():
        base = os.environ.get("RUNTIME_DIRECTORY") or tempfile.gettempdir()
        remove_abandoned_roots(Path(base))
        _root = Path(tempfile.mkdtemp(prefix=f"appliance-engines-{os.getpid()}-", dir=base))  # mode 0700
        atexit.register(shutil.rmtree, _root, True)
    return _root


def remove_abandoned_roots(base: Path) -> list[Path]:
    """The private roots a daemon of this user left behind (SIGKILL runs no atexit; their
    engine secrets stayed on disk): removed, and only those: a directory itself (not a
    link), owned by this uid, named for a daemon's pid that no longer runs as this user.
    In a world-writable /tmp another user's entry is theirs (a link, or not our uid),
    and rmtree does not follow links within the tree."""
    removed: list[Path] = []
    try:
        names = os.listdir(base)
    except OSError:
        return removed
    uid = os.getuid()
    for name in names:
        match = _ROOT_NAME.fullmatch(name)
        if match is None:
            continue
        path = base / name
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode) and st.st_uid == uid and not _runs_as_us(int(match[1])):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _runs_as_us(pid: int) -> bool:
    """Whether the process pid is alive and ours to signal (root: any live process), so
    possibly the daemon that made the directory; a pid another user now has is not."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    except (OSError, OverflowError):
        return True  # cannot tell: keep it
    return True


def engine_environment(
    engine_env: Mapping[str, str], home: Path, access: EngineAccess, environ: Mapping[str, str] = os.environ
) -> dict[str, str]:
    """The whole environment of an engine process: the allow-listed variables of
    the daemon's, HOME and TMPDIR of the appliance's, then the adapter's and the
    model's own (engine_env)."""
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    env = {k: v for k, v in environ.items() if k in PASSED or k.startswith(PASSED_PREFIXES)}
    env.setdefault("PATH", os.defpath)
    env.update(HOME=str(home), TMPDIR=str(access.tmp))
    env.update(engine_env)
    return env


def engine_session(max_connections: int, access: EngineAccess, unix_socket: bool) -> aiohttp.ClientSession:
    """The one HTTP session to a replica (the proxy's and the probes'): it sends the
    replica's secret with every request, over TCP or the replica's unix socket."""
    if unix_socket:
        connector: aiohttp.BaseConnector = aiohttp.UnixConnector(
            path=str(access.socket), limit=max_connections, keepalive_timeout=60
        )
    else:
        connector = tcp_connector(max_connections)
    return http_session(connector, access.headers)


def tcp_connector(max_connections_per_host: int) -> aiohttp.TCPConnector:
    return aiohttp.TCPConnector(
        limit=0, limit_per_host=max_connections_per_host, keepalive_timeout=60, enable_cleanup_closed=True
    )


def http_session(connector: aiohttp.BaseConnector, headers: Mapping[str, str] | None = None) -> aiohttp.ClientSession:
    # The session never decodes, follows redirects or keeps cookies for engines.
    eager_writes.install()  # a request leaves when it is sent, not after the rest of a burst
    return aiohttp.ClientSession(
        connector=connector,
        headers=headers,
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=("User-Agent",),
    )
