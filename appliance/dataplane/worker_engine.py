"""A worker's engine side: the engine calls the daemon asks it for (protocol.Call: the
requests the daemon answers itself, whose replica is on TCP), made on the worker's
connection pool and relayed back over the link, byte for byte (Whole, or Head, Chunks
and End); a Cancel (the request's client left) drops the call's connection."""

from __future__ import annotations

import asyncio

import aiohttp

from appliance.dataplane.protocol import TOO_LARGE, Call, Chunk, End, FrameWriter, Head, Whole
from appliance.gateway.proxy import engine_error_body, read_at_most


class EngineCalls:
    """The daemon's engine calls in flight through this worker, by call id."""

    def __init__(self, writer: FrameWriter, session: aiohttp.ClientSession, max_answer_bytes: int) -> None:
        self.out, self.session = writer, session
        self.calls: dict[int, asyncio.Task[None]] = {}
        self.max_answer_bytes = max_answer_bytes  # upstream.max_answer_bytes; a reload's Limits sets it anew

    def call(self, call: Call) -> None:
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
        if call.stream and resp.status < 400:
            await self._relay_stream(uid, resp)
            return
        try:
            # An error's body is kept to its first bytes (proxy.MAX_ERROR_BYTES), an answer's to the cap.
            cap = self.max_answer_bytes
            data = await engine_error_body(resp) if resp.status >= 400 else await read_at_most(resp, cap)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            self.out.write(_broken_off(uid, exc))
        else:
            if data is None:
                self.out.write(End(uid, TOO_LARGE, str(cap)))
            else:
                self.out.write(Whole(uid, resp.status, resp.headers.get("Content-Type", "application/json"), data))
        finally:
            resp.release()  # one cut short is closed, not pooled

    async def _relay_stream(self, uid: int, resp: aiohttp.ClientResponse) -> None:
        finished = False
        try:
            self.out.write(Head(uid, resp.status, resp.headers.get("Content-Type", "application/json")))
            try:
                async for chunk in resp.content.iter_any():
                    self.out.write(Chunk(uid, chunk))
                    await self.out.drain()
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                self.out.write(_broken_off(uid, exc))
                return
            finished = True
            self.out.write(End(uid, "", ""))
        finally:
            # An unfinished answer (cancelled: the client left) drops the connection: the engine stops.
            if finished:
                resp.release()
            else:
                resp.close()

    def cancel(self, uid: int) -> None:
        if (task := self.calls.get(uid)) is not None:
            task.cancel()


def _broken_off(uid: int, exc: BaseException) -> End:
    """The End of an answer the engine broke off after its head: its read timed out
    (stalled; aiohttp's read timeout is a TimeoutError) or its connection failed (broke)."""
    if isinstance(exc, TimeoutError):
        return End(uid, "stalled", "stalled mid-answer")
    return End(uid, "broke", type(exc).__name__)
