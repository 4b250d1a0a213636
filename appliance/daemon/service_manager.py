"""What the daemon tells its service manager, and when.

    start ──▶ WATCHDOG=1 every WatchdogSec/2, from a task on the event loop
          ──▶ READY=1 once the app's lifespan started and the API answers
          ──▶ STATUS=1/2 replicas ready; llama#1 starting   (on every replica transition)
    reload ──▶ RELOADING=1 + MONOTONIC_USEC, then READY=1 with what the reload did
              (SIGHUP, POST /admin/reload: `appliance reload`, the TUI)
    SIGTERM ▶ STOPPING=1, STATUS=draining N in-flight requests, EXTEND_TIMEOUT_USEC

Without systemd (no NOTIFY_SOCKET) every call here is a no-op.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from appliance.daemon.sdnotify import Notifier
from appliance.fleet.replica_state import State

log = logging.getLogger("appliance.service")

_SHOWN = 6  # replicas named in STATUS before "and N more"


def replica_summary(replicas) -> str:
    """One line: how many replicas are ready, and what the others are doing."""
    replicas = list(replicas)
    ready = sum(r.state is State.READY for r in replicas)
    busy = [f"{r.name} {r.state.value.lower()}" for r in replicas if r.state is not State.READY]
    text = f"{ready}/{len(replicas)} replicas ready"
    if busy:
        more = f" and {len(busy) - _SHOWN} more" if len(busy) > _SHOWN else ""
        text += "; " + ", ".join(busy[:_SHOWN]) + more
    return text


class ServiceNotifier:
    def __init__(self, notifier: Notifier | None = None) -> None:
        self.notifier = notifier or Notifier.from_environ()
        self._tasks: list[asyncio.Task[None]] = []
        self._supervisor = None
        self._started = asyncio.Event()

    @property
    def enabled(self) -> bool:
        return self.notifier.enabled

    def start(self, host: str, port: int, admin_socket: Callable[[], str | None] = lambda: None) -> None:
        """Start pinging the watchdog, and announce READY once the API answers, and
        the admin socket too when it was opened (admin_socket: its path, asked once the
        lifespan started; None when it is off), so a script that runs `systemctl start`
        then the CLI finds the socket listening."""
        if not self.enabled or self._tasks:
            return
        self._tasks = [
            asyncio.create_task(self.notifier.watchdog(), name="sd-watchdog"),
            asyncio.create_task(self._ready_when_answering(host, port, admin_socket), name="sd-ready"),
        ]

    def on_startup(self, app) -> None:
        """A Litestar on_startup hook: the lifespan has opened the supervisor."""
        runtime = getattr(app.state, "runtime", None)
        if self.enabled and runtime is not None:
            self._supervisor = runtime.supervisor
            runtime.supervisor.add_listener(self._on_transition)
            if runtime.reloader is not None:  # every reload, not only SIGHUP's
                runtime.reloader.notices = self
        self._started.set()

    def _on_transition(self, replica, event) -> None:
        with contextlib.suppress(Exception):  # a listener must never break a replica's owner task
            self.notifier.status(self._summary())

    def _summary(self) -> str:
        return replica_summary(self._supervisor.replicas()) if self._supervisor else "starting"

    async def _ready_when_answering(
        self, host: str, port: int, admin_socket: Callable[[], str | None], timeout: float = 10.0
    ) -> None:
        """READY=1 once the lifespan started and the API (and the admin socket, if
        open) answers an HTTP request."""
        await self._started.wait()
        target = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
        if not await _answers(lambda: asyncio.open_connection(target, port), timeout):
            log.warning(
                "the API did not answer on %s:%d within %.0fs; telling systemd it is ready anyway", host, port, timeout
            )
        path = admin_socket()
        if path and not await _answers(lambda: asyncio.open_unix_connection(path), timeout):
            log.warning(
                "the admin socket %s did not answer within %.0fs; telling systemd it is ready anyway", path, timeout
            )
        self.notifier.ready(self._summary())

    def stopping(self, runtime, cfg) -> None:
        """STOPPING=1 as the drain starts, asking systemd for the time it may take:
        drained twice at worst (the server, then each replica), then the engines'
        stop grace, whatever the unit's TimeoutStopSec says."""
        if not self.enabled:
            return
        inflight = runtime.inflight if runtime else 0  # what the drain waits for (server._drained)
        extend = 2 * cfg.server.drain_timeout_s + cfg.supervisor.stop_grace_s + 10
        self.notifier.stopping(f"draining {inflight} in-flight requests", extend_s=extend)

    def status(self, text: str) -> None:
        self.notifier.status(text)

    def reloading(self) -> None:
        self.notifier.reloading("reloading the config")

    def reloaded(self, text: str) -> None:
        """READY=1 again: the reload is over, applied or refused (STATUS= says which)."""
        self.notifier.ready(text)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        self.notifier.close()


async def _answers(
    connect: Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]], timeout: float
) -> bool:
    """True once a server answers GET /healthz on what connect opens."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        try:
            reader, writer = await asyncio.wait_for(connect(), 2)
            try:
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                line = await asyncio.wait_for(reader.readline(), 2)
            finally:
                writer.close()
            if line.startswith(b"HTTP/"):
                return True
        except (TimeoutError, OSError):
            pass
        await asyncio.sleep(0.02)
    return False
