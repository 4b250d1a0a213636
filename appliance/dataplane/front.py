"""The daemon's front with workers ([server] workers = N > 1): the daemon binds
the public port itself (N sockets in one reuseport group, steered among the
daemon's own: listener.py), runs the app's lifespan, and hands socket i to
worker process i (appliance/dataplane/worker.py), which takes its connections.
Each worker has a private socketpair to the daemon (no path, no secret to
guard); one that dies is replaced on the same socket, its share of new
connections steered to the live workers meanwhile. The daemon's death takes
them along (PR_SET_PDEATHSIG; and their link closes).

It has the embedded Granian server's face (serve() until stop()), so the daemon
(appliance/daemon/server.py) runs either the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
from typing import Any

import msgspec

from appliance.config import Config
from appliance.dataplane.authority import RemoteProxy, WorkerLink, answer
from appliance.dataplane.listener import ReuseportGroup
from appliance.dataplane.protocol import FrameReader, FrameWriter, Limits, ToDaemon, WorkerSettings

log = logging.getLogger("appliance.dataplane")

PR_SET_PDEATHSIG = 1
# What a worker's environment keeps of the daemon's: nothing else (provider keys, credentials...).
PASSED_ENV = ("PATH", "PYTHONPATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ")
RESPAWN_DELAY_S = 0.5
RESPAWN_MAX_S = 30.0
YOUNG_S = 10.0  # a worker that dies younger than this is crashing, not unlucky
STOP_GRACE_S = 5.0
BACKLOG = 1024


class WorkerFront:
    """The listening sockets, the app's lifespan and the workers, from serve() until stop()."""

    def __init__(self, app: Any, asgi: Any, cfg: Config, workers: int) -> None:
        self.app, self.asgi, self.cfg, self.count = app, asgi, cfg, workers
        self.lifespan = Lifespan(asgi)
        self.stopped = asyncio.Event()
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self.links: dict[int, WorkerLink] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.group: ReuseportGroup | None = None
        self.up: set[int] = set()  # the workers (indices from 1) that take connections now

    def stop(self) -> None:
        self.stopped.set()

    async def serve(self) -> None:
        s = self.cfg.server
        self.group = ReuseportGroup(s.host, s.port, self.count, BACKLOG)
        try:
            await self.lifespan.startup()
            runtime = self.app.state.runtime
            # Engine calls of the workers' requests are made by those workers.
            runtime.proxy = RemoteProxy(self.cfg, runtime.proxy.session)
            # A request its worker may carry is decided here and granted to it.
            runtime.answer = answer
            # A reload's body limits reach the running workers (a new one starts with them).
            runtime.adopted.append(self._adopted)
            for index in range(1, self.count + 1):
                self._keep(index)
            log.info("%d data-plane workers on %s:%d", self.count, s.host, s.port)
            await self.stopped.wait()
        finally:
            await self._stop_workers()
            self.group.close()
            await self.lifespan.shutdown()

    def _adopted(self, cfg: Config) -> None:
        self.cfg = cfg
        limits = body_limits(cfg)
        for link in self.links.values():
            if not link.closed:
                link.out.write(limits)

    def _keep(self, index: int) -> None:
        task = asyncio.create_task(self._keep_running(index), name=f"worker-{index}")
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _keep_running(self, index: int) -> None:
        """Worker index, replaced whenever it exits, until the daemon stops; one that
        keeps dying young is replaced less and less often (up to RESPAWN_MAX_S apart)."""
        loop = asyncio.get_running_loop()
        delay = RESPAWN_DELAY_S
        while not self.stopped.is_set():
            started = loop.time()
            try:
                await self._run_once(index)
            except OSError as exc:
                log.error("worker %d could not start: %s", index, exc)
            young = loop.time() - started < YOUNG_S
            delay = min(delay * 2, RESPAWN_MAX_S) if young else RESPAWN_DELAY_S
            with contextlib.suppress(TimeoutError):  # a stop does not wait for the delay
                await asyncio.wait_for(self.stopped.wait(), delay)

    async def _run_once(self, index: int) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        limits = body_limits(self.cfg)
        try:
            proc = await self._spawn(index, theirs)
        finally:
            theirs.close()
        self.procs[index] = proc
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        server = self._socket(index).getsockname()[:2]
        link = WorkerLink(self.asgi, FrameReader(reader, ToDaemon), FrameWriter(writer), server)
        self.links[index] = link
        if body_limits(self.cfg) != limits:  # reloaded as it started
            link.out.write(body_limits(self.cfg))
        linked = asyncio.create_task(link.run(), name=f"worker-{index}-link")
        exited = asyncio.create_task(proc.wait(), name=f"worker-{index}-wait")
        serving = asyncio.create_task(link.serving.wait(), name=f"worker-{index}-serving")
        serving.add_done_callback(lambda task: self._serving(index, task))
        try:
            await asyncio.wait({linked, exited}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            serving.cancel()
            self._steer(index, up=False)  # new connections go to the live workers meanwhile
        if not exited.done():  # its link broke: a worker we cannot talk to is of no use
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await exited
        writer.close()
        await linked
        del self.procs[index], self.links[index]
        if not self.stopped.is_set():
            log.warning("worker %d (pid %d) exited with %s: replacing it", index, proc.pid, proc.returncode)

    def _socket(self, index: int) -> socket.socket:
        assert self.group is not None, "bound by serve"
        return self.group.sockets[index - 1]

    def _serving(self, index: int, said: asyncio.Task[Any]) -> None:
        if not said.cancelled():
            self._steer(index, up=True)

    def _steer(self, index: int, *, up: bool) -> None:
        """Worker index takes new connections (up) or not; the group's program follows."""
        (self.up.add if up else self.up.discard)(index)
        if self.group is not None and not self.stopped.is_set():
            try:
                self.group.steer([i - 1 for i in self.up])
            except OSError as exc:  # the kernel keeps the program it had
                log.error("could not steer connections over workers %s: %s", sorted(self.up), exc)

    async def _spawn(self, index: int, link: socket.socket) -> asyncio.subprocess.Process:
        limits = body_limits(self.cfg)
        settings = WorkerSettings(
            index=index,
            header_read_timeout_s=self.cfg.server.header_read_timeout_s,
            max_body_bytes=limits.max_body_bytes,
            max_connections_per_replica=self.cfg.upstream.max_connections_per_replica,
            backlog=BACKLOG,
            body_read_timeout_s=limits.body_read_timeout_s,
            send_timeout_s=limits.send_timeout_s,
            max_answer_bytes=limits.max_answer_bytes,
        )
        listen_fd, link_fd = self._socket(index).fileno(), link.fileno()
        argv = [sys.executable, "-m", "appliance.dataplane.worker", str(listen_fd), str(link_fd)]
        argv.append(msgspec.json.encode(settings).decode())
        return await asyncio.create_subprocess_exec(
            *argv,
            pass_fds=(listen_fd, link_fd),
            env={k: v for k, v in os.environ.items() if k in PASSED_ENV},
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent(),
        )

    async def _stop_workers(self) -> None:
        """SIGTERM: each stops taking connections and exits; SIGKILL after STOP_GRACE_S."""
        self.stopped.set()
        for proc in list(self.procs.values()):
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        if self.tasks:
            _, late = await asyncio.wait(set(self.tasks), timeout=STOP_GRACE_S)
            for proc in list(self.procs.values()):
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            if late:
                await asyncio.wait(late)


def body_limits(cfg: Config) -> Limits:
    """What a worker reads bodies by (the timeout, and the most bytes of any: an upload's,
    if larger), sends answers by (the send timeout) and reads engines' answers by."""
    s = cfg.server
    most = max(s.max_body_bytes, s.max_upload_bytes)
    return Limits(s.body_read_timeout_s, most, s.send_timeout_s, cfg.upstream.max_answer_bytes)


def _die_with_parent():
    """A preexec hook: the worker gets SIGKILL when the daemon dies, however it dies."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)

    def preexec() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

    return preexec


class Lifespan:
    """The app's ASGI lifespan, run by the daemon itself (with workers, no server of
    the daemon's runs it). startup() raises as Granian's lifespan does when it fails."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.inbox: asyncio.Queue[dict[str, str]] = asyncio.Queue()
        self.replies: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None
        self.started = False

    async def startup(self) -> None:
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.3"}, "state": {}}
        self.task = asyncio.create_task(self.app(scope, self.inbox.get, self.replies.put), name="lifespan")
        self.inbox.put_nowait({"type": "lifespan.startup"})
        reply = await self._reply()
        if reply.get("type") != "lifespan.startup.complete":
            raise RuntimeError("ASGI lifespan startup")
        self.started = True

    async def shutdown(self) -> None:
        if not self.started:
            return
        self.inbox.put_nowait({"type": "lifespan.shutdown"})
        await self._reply()

    async def _reply(self) -> dict[str, Any]:
        assert self.task is not None
        getting = asyncio.ensure_future(self.replies.get())
        await asyncio.wait({getting, self.task}, return_when=asyncio.FIRST_COMPLETED)
        if getting.done():
            return getting.result()
        getting.cancel()
        return {"type": "lifespan.failed"}
