"""Running the daemon: the Litestar app on Granian, embedded in our own event loop.

Embedding Granian (rather than letting it fork workers) keeps one process that
owns the engines: its death takes them along (PR_SET_PDEATHSIG), and SIGTERM
runs the drain sequence below. With `[server] workers` > 1 the connections are
taken by worker processes instead (appliance/dataplane/), and this process still
decides every request.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import gc
import logging
import signal
import sys
from collections.abc import Callable

from granian.constants import HTTPModes, Interfaces
from granian.http import HTTP1Settings
from granian.server.embed import Server

from appliance.api.admin_socket import admin_socket_server
from appliance.api.app import create_app, front_door
from appliance.config import Config, worker_count
from appliance.daemon.service_manager import ServiceNotifier
from appliance.dataplane.front import WorkerFront
from appliance.dataplane.listener import OnExclusivePort
from appliance.errors import ApplianceError
from appliance.socket_token import remove_token, write_token

log = logging.getLogger("appliance.server")


def run(cfg: Config, reread: Callable[[], Config] | None = None) -> int:
    # A hung daemon is killed by systemd's watchdog with SIGABRT: print every
    # thread's stack to stderr (the journal) on the way out.
    faulthandler.enable(sys.stderr)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(serve(cfg, reread=reread))
    return uvloop.run(serve(cfg, reread=reread))


async def serve(cfg: Config, app=None, reread: Callable[[], Config] | None = None) -> int:
    """Serve until SIGTERM/SIGINT, then: stop taking requests, let in-flight ones
    finish (bounded by server.drain_timeout_s), stop the engines, return 0. SIGHUP
    reloads the config (appliance/api/reload.py; reread: the config as the command
    line reads it). Under systemd it notifies READY, STATUS, WATCHDOG, RELOADING and
    STOPPING (appliance/daemon/service_manager.py)."""
    service = ServiceNotifier()
    app = app or create_app(cfg, reread)
    admin = AdminSocket(cfg.server.admin_socket, app)
    app.on_startup.append(admin.on_startup)  # first: READY waits for the socket it opened
    app.on_startup.append(service.on_startup)
    _tune_gc()
    workers = worker_count(cfg.server)
    server: Server | WorkerFront
    if workers > 1:  # N processes take the connections; this one decides (appliance/dataplane/)
        server = WorkerFront(app, front_door(app), cfg, workers)
    else:
        server = _granian(cfg, app)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloads = SignalReloads(app)
    loop.add_signal_handler(signal.SIGHUP, reloads.on_signal)

    service.start(cfg.server.host, cfg.server.port, admin_socket=lambda: admin.path if admin.task else None)
    serving = asyncio.create_task(server.serve(), name="granian")
    stopping = asyncio.create_task(stop.wait(), name="signals")
    done, _ = await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if serving in done:
        stopping.cancel()
        await admin.stop()
        await service.close()
        exc = serving.exception()
        if exc is not None:
            # A failed lifespan logged its own error; Granian's says only "ASGI lifespan startup".
            if getattr(app.state, "startup_error", None) is None:
                log.error("server failed: %s", exc)
            return 1
        return 0

    log.info("shutdown requested: draining in-flight requests (up to %.0fs)", cfg.server.drain_timeout_s)
    runtime = getattr(app.state, "runtime", None)
    service.stopping(runtime, cfg)
    if runtime is not None:
        runtime.draining = True
        await _drained(runtime, cfg.server.drain_timeout_s)
    service.status("stopping the engines")
    server.stop()  # first: no new connection is accepted while the admin socket closes
    await admin.stop()
    with contextlib.suppress(Exception):
        await serving
    await service.close()
    return 0


def _granian(cfg: Config, app) -> Server:
    """The daemon alone on the port: Granian in this process, on this event loop, on a
    socket the daemon binds without SO_REUSEPORT (listener.py: no other process joins it)."""
    return OnExclusivePort(
        front_door(app),
        address=cfg.server.host,
        port=cfg.server.port,
        interface=Interfaces.ASGI,
        websockets=False,  # the API has no websocket endpoint
        log_enabled=False,
        backlog=1024,
        # A client trickling its headers (slowloris) is cut after this long.
        http1_settings=HTTP1Settings(header_read_timeout=int(cfg.server.header_read_timeout_s * 1000)),
        # HTTP/1.1 only: Granian's default also spoke HTTP/2 (prior knowledge), where the
        # header timeout does not apply (idle ones were still open past it).
        http=HTTPModes.http1,
    )


class AdminSocket:
    """The admin API's unix socket server (server.admin_socket), started once the
    app's lifespan has opened the supervisor, stopped before the TCP server. Its token
    (AdminAccess.socket_token) is written next to it before it listens, and removed
    after it closed (appliance/socket_token.py)."""

    def __init__(self, path: str, app) -> None:
        self.path, self.app = path, app
        self.server: Server | None = None
        self.task: asyncio.Task | None = None
        self.written: tuple[int, int] | None = None

    def on_startup(self, app) -> None:
        if not self.path:
            return
        try:
            server = admin_socket_server(self.app, self.path)  # refuses a socket another daemon answers on
            self.written = write_token(self.path, app.state.runtime.admin.socket_token)
        except OSError as exc:
            log.error("admin socket off: %s", exc)
            return
        self.server = server
        self.task = asyncio.create_task(self.server.serve(), name="granian-admin-socket")
        log.info("admin API on unix:%s", self.path)

    async def stop(self) -> None:
        if self.task is None:
            return
        if not self.task.done():
            assert self.server is not None, "on_startup set it with the task"
            self.server.stop()
        with contextlib.suppress(Exception):
            await self.task
        if self.written is not None:
            remove_token(self.path, self.written)


class SignalReloads:
    """SIGHUP (systemctl reload): the config reloaded. The reloader tells systemd
    RELOADING=1, then READY=1 once the new config is live or the reload was refused
    (STATUS= says which; the log has the refusal's field), as for any reload."""

    def __init__(self, app) -> None:
        self.app = app
        self.tasks: set[asyncio.Task[None]] = set()

    def on_signal(self) -> None:
        task = asyncio.create_task(self.reload(), name="sighup-reload")
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def reload(self) -> None:
        runtime = getattr(self.app.state, "runtime", None)
        if runtime is None or runtime.reloader is None:
            log.warning("SIGHUP before the daemon started serving: ignored")
            return
        log.info("SIGHUP: reloading the config")
        try:
            await runtime.reloader.reload()
        except ApplianceError:
            pass  # refused (the reloader logged why and told systemd) or shutting down
        except Exception:
            log.exception("reload failed")


def _tune_gc() -> None:
    """Each proxied request allocates a few hundred container objects (aiohttp,
    asyncio, ASGI messages), so CPython's default gen0 threshold (700) collects
    every few requests, and the older generations re-walk everything imported at
    start (Litestar, aiohttp, msgspec...). Freeze what exists at start (it lives
    as long as the process) and collect the young generation less often.
    bench/gateway_overhead.py, c=64: ~140 -> ~105 us CPU per request, p99 ~45 -> ~18 ms."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 10, 10)


async def _drained(runtime, timeout: float) -> None:
    """Wait until no request is on the hot path (held, at an engine or a provider,
    or waiting for its audit row to commit), up to timeout."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    quiet_since = None
    while loop.time() < deadline:
        if runtime.inflight:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = loop.time()
        elif loop.time() - quiet_since >= QUIET_S:
            return
        await asyncio.sleep(0.02)
    log.warning("drain timeout: stopping with requests still in flight")


# Nothing in flight for this long before the listener stops: a connection the server had
# accepted but whose request had not reached the app yet gets its answer (a 503 while
# draining), never a cut connection.
QUIET_S = 0.2
