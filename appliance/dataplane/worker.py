"""A data-plane worker process: `python -m appliance.dataplane.worker LISTEN_FD LINK_FD SETTINGS`.

It serves HTTP (Granian) on the listening socket the daemon bound and handed
down (its own, in the daemon's reuseport group: listener.py), and passes each
request to the daemon over its link (LINK_FD, one end of a socketpair): the
daemon decides everything and answers; the engine calls it asks for
(protocol.Call) the worker makes and relays, byte for byte. A worker
holds no key, route, budget or ledger: it dies with the daemon (PR_SET_PDEATHSIG,
and the link closing), and the daemon replaces one that dies.

Here: the process and its link (each frame from the daemon to the side that owns
it). Its two sides: worker_client.py (Granian's requests, passed on, answered or
carried on the daemon's grant) and worker_engine.py (the engine calls the daemon
asks for).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import socket
import sys

import msgspec
from granian.constants import HTTPModes, Interfaces
from granian.http import HTTP1Settings

from appliance.dataplane.listener import OnListeningSocket
from appliance.dataplane.protocol import (
    Call,
    Cancel,
    FrameReader,
    FrameWriter,
    Limits,
    Serving,
    ToWorker,
    WorkerSettings,
)
from appliance.dataplane.worker_client import ClientSide
from appliance.dataplane.worker_engine import EngineCalls
from appliance.fleet.engine_access import http_session, tcp_connector
from appliance.undumpable import make_undumpable

log = logging.getLogger("appliance.worker")


class Worker:
    """One worker's link to the daemon: its frames read and given to the side they are for."""

    def __init__(self, settings: WorkerSettings, reader: FrameReader, writer: FrameWriter) -> None:
        self.reader = reader
        self.transport = writer.writer.transport
        self.session = http_session(tcp_connector(settings.max_connections_per_replica))
        self.clients = ClientSide(settings, writer, self.session)
        self.engine = EngineCalls(writer, self.session, settings.max_answer_bytes)

    def _take(self, frame: ToWorker) -> None:
        if isinstance(frame, Call):
            self.engine.call(frame)
        elif isinstance(frame, Cancel):
            self.engine.cancel(frame.uid)
        else:
            if isinstance(frame, Limits):
                self.engine.max_answer_bytes = frame.max_answer_bytes
            self.clients.take(frame)

    async def read_link(self) -> None:
        """Frames from the daemon, until it is gone: each taken where its bytes arrive,
        in the link's transport callback, as the daemon takes a worker's
        (FrameReader.dispatch): no reader task woken for each Grant."""
        try:
            await self.reader.dispatch(self._take, self.transport)
        except (asyncio.IncompleteReadError, ConnectionError, ValueError, msgspec.MsgspecError):
            pass
        finally:
            self.clients.daemon_gone()


async def serve(listen_fd: int, link_fd: int, settings: WorkerSettings) -> int:
    link = socket.socket(fileno=link_fd)
    reader, writer = await asyncio.open_unix_connection(sock=link)
    frames = FrameWriter(writer)
    worker = Worker(settings, FrameReader(reader, ToWorker), frames)
    server = OnListeningSocket(
        socket.socket(fileno=listen_fd),
        worker.clients,
        interface=Interfaces.ASGINL,
        websockets=False,
        log_enabled=False,
        backlog=settings.backlog,
        http1_settings=HTTP1Settings(header_read_timeout=int(settings.header_read_timeout_s * 1000)),
        # HTTP/1.1 only: Granian's default also spoke HTTP/2 (prior knowledge), where the
        # header timeout does not apply (idle ones were still open past it).
        http=HTTPModes.http1,
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.stop)  # the daemon drains first: stop taking connections
    serving = asyncio.create_task(server.serve(), name="granian")
    frames.write(Serving())  # its socket gets new connections from now on (listener.py)
    linked = asyncio.create_task(worker.read_link(), name="link")
    sweeping = asyncio.create_task(worker.clients.sweep_late_bodies(), name="late bodies")
    await asyncio.wait({serving, linked}, return_when=asyncio.FIRST_COMPLETED)
    if not serving.done():  # the daemon is gone: nothing to serve for
        server.stop()
        with contextlib.suppress(Exception):
            await serving
    linked.cancel()
    sweeping.cancel()
    await worker.session.close()
    return 0


def main(argv: list[str]) -> int:
    # First: exec made this process dumpable again, and it carries keys and prompts in flight.
    make_undumpable()
    listen_fd, link_fd = int(argv[1]), int(argv[2])
    settings = msgspec.json.decode(argv[3], type=WorkerSettings)
    logging.basicConfig(level=logging.WARNING, format=f"worker {settings.index}: %(levelname)s %(name)s: %(message)s")
    import uvloop

    # As the daemon does (server._tune_gc): what is imported lives as long as the process,
    # and each request allocates a few hundred containers.
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 10, 10)
    return uvloop.run(serve(listen_fd, link_fd, settings))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
