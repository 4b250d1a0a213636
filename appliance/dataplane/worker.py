"""A data-plane worker process: `python -m appliance.dataplane.worker LISTEN_FD LINK_FD SETTINGS`.

It serves HTTP (Granian) on the listening socket the daemon bound and handed
down, and passes each request to the daemon over its link (LINK_FD, one end of
a socketpair): the daemon decides everything and answers; the engine calls it
asks for (protocol.Call) the worker makes and relays, byte for byte. A worker
holds no key, route, budget or ledger: it dies with the daemon (PR_SET_PDEATHSIG,
and the link closing), and the daemon replaces one that dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import logging
import signal
import socket
import sys
from typing import Any

import aiohttp
import msgspec
from granian._granian import SocketHolder
from granian.constants import Interfaces
from granian.http import HTTP1Settings
from granian.server.embed import Server

from appliance.dataplane.protocol import (
    Body,
    Call,
    Cancel,
    Chunk,
    End,
    FrameReader,
    FrameWriter,
    Gone,
    Head,
    Mailbox,
    Request,
    Start,
    ToWorker,
    Whole,
    WorkerSettings,
)
from appliance.fleet.engine_access import http_session, tcp_connector

log = logging.getLogger("appliance.worker")

WORKER_HEADER = b"x-appliance-worker"


class _OnInheritedSocket(Server):
    """Granian's embedded server on a listening socket bound by someone else (its own
    multi-process server does this on Windows); it never binds one itself."""

    def __init__(self, fd: int, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._fd = fd

    def _init_shared_socket(self) -> None:
        self._ssp = None
        # Granian 2.x's SocketHolder(fd, is_uds, backlog); its .pyi lags behind.
        self._shd = SocketHolder(self._fd, False, self.backlog)  # type: ignore[call-arg,assignment]


class Worker:
    def __init__(self, settings: WorkerSettings, reader: FrameReader, writer: FrameWriter) -> None:
        self.settings = settings
        self.reader, self.out = reader, writer
        self.worker_header = (WORKER_HEADER, str(settings.index).encode())
        self.ids = itertools.count(1)
        self.requests: dict[int, Mailbox[Start | Body | None]] = {}
        self.calls: dict[int, asyncio.Task[None]] = {}
        self.session = http_session(tcp_connector(settings.max_connections_per_replica))

    # The client side: one request, passed to the daemon and its answer sent back.

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        first = await receive()
        if first["type"] == "http.disconnect":
            return
        rid = next(self.ids)
        answer: Mailbox[Start | Body | None] = Mailbox()
        self.requests[rid] = answer
        left = self.settings.max_body_bytes + 1
        data, more, left = _piece(first, left)
        try:
            self.out.write(
                Request(
                    rid,
                    scope["method"],
                    scope["path"],
                    scope["query_string"],
                    [(bytes(k), bytes(v)) for k, v in scope["headers"]],
                    (str(client[0]), int(client[1])) if (client := scope.get("client")) else None,
                    scope["http_version"],
                    data,
                    more,
                )
            )
            if more and not await self._pass_body(rid, receive, left):
                return
            watcher = asyncio.ensure_future(self._watch(rid, receive))
            try:
                await self._answer(answer, send)
            finally:
                watcher.cancel()
        finally:
            del self.requests[rid]

    async def _pass_body(self, rid: int, receive: Any, left: int) -> bool:
        """The rest of the request's body to the daemon as it arrives; False: the client left."""
        while True:
            await self.out.drain()
            message = await receive()
            if message["type"] == "http.disconnect":
                self.out.write(Gone(rid))
                return False
            data, more, left = _piece(message, left)
            self.out.write(Body(rid, data, more))
            if not more:
                return True

    async def _watch(self, rid: int, receive: Any) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.out.write(Gone(rid))

    async def _answer(self, answer: Mailbox[Start | Body | None], send: Any) -> None:
        while True:
            frame = await answer.get()
            if frame is None:  # no more answer (the daemon is done with it, or gone): the connection closes
                return
            if isinstance(frame, Start):
                headers = [*frame.headers, self.worker_header]
                await send({"type": "http.response.start", "status": frame.status, "headers": headers})
                await send({"type": "http.response.body", "body": frame.body, "more_body": frame.more})
            else:
                await send({"type": "http.response.body", "body": frame.data, "more_body": frame.more})
            if not frame.more:
                return

    # The engine side: the calls the daemon asks for.

    def _call(self, call: Call) -> None:
        task = asyncio.create_task(self._relay(call))
        self.calls[call.uid] = task
        task.add_done_callback(lambda _: self.calls.pop(call.uid, None))

    async def _relay(self, call: Call) -> None:
        uid = call.uid
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=call.connect_timeout_s, sock_read=call.read_timeout_s)
        try:
            resp = await self.session.request(
                call.method, call.url, data=call.body, headers=call.headers, timeout=timeout
            )
        except TimeoutError:
            self.out.write(End(uid, "timeout", "did not answer in time"))
            return
        except (aiohttp.ClientConnectionError, OSError) as exc:
            self.out.write(End(uid, "connect", type(exc).__name__))
            return
        except aiohttp.ClientError as exc:
            self.out.write(End(uid, "failure", type(exc).__name__))
            return
        if call.stream:
            await self._relay_stream(uid, resp)
            return
        try:
            data = await resp.read()
        except TimeoutError:
            self.out.write(End(uid, "stalled", "stalled mid-answer"))
        except (aiohttp.ClientError, OSError) as exc:
            self.out.write(End(uid, "broke", type(exc).__name__))
        else:
            self.out.write(Whole(uid, resp.status, resp.headers.get("Content-Type", "application/json"), data))
        finally:
            resp.release()

    async def _relay_stream(self, uid: int, resp: aiohttp.ClientResponse) -> None:
        finished = False
        try:
            self.out.write(Head(uid, resp.status, resp.headers.get("Content-Type", "application/json")))
            try:
                async for chunk in resp.content.iter_any():
                    self.out.write(Chunk(uid, chunk))
                    await self.out.drain()
            except TimeoutError:
                self.out.write(End(uid, "stalled", "stalled mid-answer"))
                return
            except (aiohttp.ClientError, OSError) as exc:
                self.out.write(End(uid, "broke", type(exc).__name__))
                return
            finished = True
            self.out.write(End(uid, "", ""))
        finally:
            # An unfinished answer (cancelled: the client left) drops the connection: the engine stops.
            if finished:
                resp.release()
            else:
                resp.close()

    async def read_link(self) -> None:
        """Frames from the daemon, until it is gone."""
        try:
            while True:
                frame = await self.reader.read()
                if isinstance(frame, (Start, Body, Gone)):
                    answer = self.requests.get(frame.rid)
                    if answer is not None:
                        answer.put(None if isinstance(frame, Gone) else frame)
                elif isinstance(frame, Call):
                    self._call(frame)
                elif isinstance(frame, Cancel) and (task := self.calls.get(frame.uid)) is not None:
                    task.cancel()
        except (asyncio.IncompleteReadError, ConnectionError, ValueError, msgspec.MsgspecError):
            pass
        finally:
            for answer in self.requests.values():
                answer.put(None)


def _piece(message: dict[str, Any], left: int) -> tuple[bytes, bool, int]:
    """(data, more, bytes left) of a body message: past the limit the worker stops
    reading, and the daemon, given one byte too many, answers 413."""
    data = message.get("body", b"")[:left]
    left -= len(data)
    return data, message.get("more_body", False) and left > 0, left


async def serve(listen_fd: int, link_fd: int, settings: WorkerSettings) -> int:
    link = socket.socket(fileno=link_fd)
    reader, writer = await asyncio.open_unix_connection(sock=link)
    worker = Worker(settings, FrameReader(reader, ToWorker), FrameWriter(writer))
    server = _OnInheritedSocket(
        listen_fd,
        worker,
        interface=Interfaces.ASGINL,
        websockets=False,
        log_enabled=False,
        backlog=settings.backlog,
        http1_settings=HTTP1Settings(header_read_timeout=int(settings.header_read_timeout_s * 1000)),
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.stop)  # the daemon drains first: stop taking connections
    serving = asyncio.create_task(server.serve(), name="granian")
    linked = asyncio.create_task(worker.read_link(), name="link")
    await asyncio.wait({serving, linked}, return_when=asyncio.FIRST_COMPLETED)
    if not serving.done():  # the daemon is gone: nothing to serve for
        server.stop()
        with contextlib.suppress(Exception):
            await serving
    linked.cancel()
    await worker.session.close()
    return 0


def main(argv: list[str]) -> int:
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
