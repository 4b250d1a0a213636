"""Process spawning behind a seam, so the supervisor is tested without engines.

The real runner starts each engine replica in its own process group, tied to
the daemon's life with PR_SET_PDEATHSIG, under its seccomp sandbox (sandbox.py) and
its Landlock ruleset (landlock.py), holding no capability whatever the daemon holds
(capabilities.py), its output drained into a capped log.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import io
import os
import shutil
import signal
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from appliance.fleet.capabilities import EngineCapabilities, HeldCapabilities, engine_capabilities, held_capabilities
from appliance.fleet.landlock import EngineLandlock, engine_landlock
from appliance.fleet.sandbox import EngineSandbox, engine_sandbox

PR_SET_PDEATHSIG = 1


class ProcessHandle(Protocol):
    pid: int
    # Set whenever the process writes output (whoever waits on it clears it first): an
    # engine logs as it becomes ready, so its readiness is probed then, not at a poll.
    wrote: asyncio.Event

    async def wait(self) -> int:
        """Wait for exit; the exit code (negative: killed by that signal)."""

    def signal_group(self, sig: int) -> None:
        """Send sig to the process's whole group; no error if it is gone."""

    def tail(self, lines: int) -> list[str]:
        """The last lines the process wrote."""


class ProcessRunner(Protocol):
    async def spawn(
        self,
        argv: list[str],
        env: dict[str, str],
        log_path: Path,
        redact: str = "",
        cpus: frozenset[int] = frozenset(),
        own_dirs: tuple[Path, ...] = (),
        own_reads: tuple[str, ...] = (),
    ) -> ProcessHandle:
        """Start argv with exactly env as its environment (nothing of the daemon's
        is added: appliance/fleet/engine_access.py decides), its output logged with redact
        (the replica's key, which some engines print) replaced, on the CPUs in cpus only
        (empty: wherever the daemon may run), free to use own_dirs (its private directory,
        its HOME) even where the daemon's secrets are kept from it, and to read own_reads
        (its model's files in the store, landlock.store_reads) where every other model's
        are kept from it; raise OSError (with a clear message) if it cannot start."""


class CappedLog:
    """An engine's output: a file capped at max_bytes (one rotated copy kept),
    plus the last lines in memory for status and FATAL reports; a secret in it
    (redact) is written as <redacted>."""

    def __init__(self, path: Path, max_bytes: int, keep_lines: int = 50, redact: str = "") -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.lines: deque[str] = deque(maxlen=keep_lines)
        self._redact = redact.encode()
        self._held = b""  # the end of the output so far that may be the start of the secret
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = _open_log(path)
        self._size = self._file.tell()

    def write(self, chunk: bytes) -> None:
        if self._redact:
            chunk = (self._held + chunk).replace(self._redact, b"<redacted>")
            held = next(
                (n for n in range(min(len(chunk), len(self._redact) - 1), 0, -1) if chunk.endswith(self._redact[:n])), 0
            )  # what the next write may complete
            chunk, self._held = chunk[: len(chunk) - held], chunk[len(chunk) - held :]
        self._append(chunk)

    def _append(self, chunk: bytes) -> None:
        if self._size + len(chunk) > self.max_bytes:
            self._rotate()
        self._file.write(chunk)
        self._size += len(chunk)
        for line in chunk.decode("utf-8", "replace").splitlines():
            if line.strip():
                self.lines.append(line)

    def _rotate(self) -> None:
        self._file.close()
        os.replace(self.path, self.path.with_name(self.path.name + ".1"))
        self._file = _open_log(self.path)
        self._size = 0

    def close(self) -> None:
        self._append(self._held)
        self._file.close()


def _open_log(path: Path) -> io.FileIO:
    """A replica's log opened for appending, never through a link: one planted at its
    name (a log_dir others may write to) would have the daemon write where it points."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
    except OSError as exc:
        raise OSError(
            f"cannot open the replica log {path}: {exc.strerror or exc} (a link there is never followed)"
        ) from exc
    return io.FileIO(fd, "a", closefd=True)


def _pdeathsig_preexec() -> Callable[[], None] | None:
    """A preexec hook that kills the child when the daemon dies, even by SIGKILL."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return None

    def preexec() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

    return preexec


def _engine_preexec(
    pdeathsig: Callable[[], None] | None,
    cpus: frozenset[int],
    caps: tuple[EngineCapabilities, HeldCapabilities],
    sandbox: EngineSandbox,
    landlock: EngineLandlock,
    ruleset: int | None,
) -> Callable[[], None]:
    """What the child does before it runs the engine: die with the daemon, then keep (with
    every thread it starts) to cpus, so two replicas never share a core, then give up every
    capability the daemon holds (caps: the calls and the daemon's sets, read before the
    fork), then its seccomp sandbox and its Landlock ruleset (built by the daemon before
    the fork), last: nothing the daemon does in the child runs under them."""
    capabilities, held = caps

    def preexec() -> None:
        if pdeathsig is not None:
            pdeathsig()
        if cpus:
            os.sched_setaffinity(0, cpus)
        capabilities.drop(held)
        sandbox.apply()
        if ruleset is not None:
            landlock.restrict(ruleset)

    return preexec


class _RealProcess:
    def __init__(self, proc: asyncio.subprocess.Process, log: CappedLog) -> None:
        self._proc = proc
        self.pid = proc.pid
        self._log = log
        self.wrote = asyncio.Event()
        self._drain = asyncio.create_task(self._pump(), name=f"log-pump-{proc.pid}")

    async def _pump(self) -> None:
        assert self._proc.stdout is not None
        try:
            while chunk := await self._proc.stdout.read(65536):
                self._log.write(chunk)
                self.wrote.set()
        finally:
            self._log.close()

    async def wait(self) -> int:
        code = await self._proc.wait()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(self._drain), timeout=2)
        return code

    def signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def tail(self, lines: int) -> list[str]:
        return list(self._log.lines)[-lines:]


class SubprocessRunner:
    """keep_out: what no engine may open (landlock.engine_keep_out), asked at each spawn;
    None: no Landlock ruleset (nothing to keep from the engines). read_only: where an
    engine may only read (landlock.engine_read_only: the model store)."""

    def __init__(
        self,
        log_max_bytes: int,
        sandbox: EngineSandbox | None = None,
        keep_out: Callable[[], list[Path]] | None = None,
        read_only: Callable[[], list[Path]] = list,
    ) -> None:
        self.log_max_bytes = log_max_bytes
        self._preexec = _pdeathsig_preexec()
        self._sandbox = sandbox or engine_sandbox()
        self._keep_out = keep_out
        self._read_only = read_only
        self._landlock = engine_landlock()
        self._capabilities = engine_capabilities()

    async def spawn(
        self,
        argv: list[str],
        env: dict[str, str],
        log_path: Path,
        redact: str = "",
        cpus: frozenset[int] = frozenset(),
        own_dirs: tuple[Path, ...] = (),
        own_reads: tuple[str, ...] = (),
    ) -> ProcessHandle:
        exe = argv[0]
        if not (os.sep in exe and os.access(exe, os.X_OK)) and shutil.which(exe, path=env.get("PATH")) is None:
            raise OSError(f"engine program not found or not executable: {exe}")
        ruleset = self._ruleset(own_dirs, own_reads)
        try:
            return await self._start(argv, env, log_path, redact, cpus, ruleset)
        finally:
            if ruleset is not None:
                os.close(ruleset)  # the child holds its domain; the daemon needs no copy

    def _ruleset(self, own_dirs: tuple[Path, ...], own_reads: tuple[str, ...]) -> int | None:
        if self._keep_out is None:
            return None
        try:
            return self._landlock.ruleset(self._keep_out(), own_dirs, self._read_only(), own_reads)
        except OSError as exc:
            raise OSError(f"cannot build the engine's Landlock ruleset: {exc.strerror or exc}") from exc

    async def _start(
        self,
        argv: list[str],
        env: dict[str, str],
        log_path: Path,
        redact: str,
        cpus: frozenset[int],
        ruleset: int | None,
    ) -> ProcessHandle:
        exe = argv[0]
        log = CappedLog(log_path, self.log_max_bytes, redact=redact)
        log.write(f"--- appliance: starting {' '.join(argv)}\n".encode())
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,  # own process group: stop it whole
                preexec_fn=_engine_preexec(
                    self._preexec,
                    cpus,
                    (self._capabilities, held_capabilities()),
                    self._sandbox,
                    self._landlock,
                    ruleset,
                ),
            )
        except OSError as exc:
            log.close()
            raise OSError(f"cannot start {exe}: {exc.strerror or exc}") from exc
        return _RealProcess(proc, log)


def descendants(pid: int) -> set[int]:
    """pid and every process below it (engines fork a worker per GPU)."""
    return process_trees([pid])


def process_trees(pids: list[int]) -> set[int]:
    """Each of pids and every process below them: one read of /proc for all (it is read on
    the event loop, for every placement and look for room)."""
    if not pids:
        return set()
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = set(pids), list(pids)
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def resident_bytes(pid: int) -> int | None:
    """Host memory the process holds (its resident set), None once it is gone."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return None
