"""A request to an engine leaves in the step that sends it (appliance/fleet/eager_writes.py):
not after every other callback ready on the loop (on Python 3.11, aiohttp's write task waited
behind the rest of a burst of requests)."""

from __future__ import annotations

import asyncio
import socket

import aiohttp

from appliance.fleet.engine_access import http_session

ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


async def _request_head_and_body(loop: asyncio.AbstractEventLoop, conn: socket.socket, body: bytes) -> bytes:
    got = b""
    while not got.endswith(body):
        got += await loop.sock_recv(conn, 65536)
    return got


async def _what_the_engine_had_when_the_next_callback_ran() -> bytes:
    loop = asyncio.get_running_loop()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/v1/chat/completions"
    session = http_session(aiohttp.TCPConnector(limit=0, limit_per_host=4, keepalive_timeout=60))
    try:
        # A first request opens the connection that the measured one reuses (as a burst's do).
        first = asyncio.create_task(session.post(url, data=b'{"warm": 1}'))
        conn, _ = await loop.sock_accept(listener)
        conn.setblocking(False)
        await _request_head_and_body(loop, conn, b'{"warm": 1}')
        await loop.sock_sendall(conn, ANSWER)
        async with await first as resp:
            await resp.read()

        had: list[bytes] = []

        def next_callback() -> None:  # what was ready on the loop after the sender's step
            try:
                had.append(conn.recv(65536))
            except BlockingIOError:
                had.append(b"")

        sending = asyncio.create_task(session.post(url, data=b'{"measured": 1}'))
        loop.call_soon(next_callback)
        while not had:
            await asyncio.sleep(0)
        rest = b"" if had[0].endswith(b'{"measured": 1}') else await _request_head_and_body(loop, conn, b'{"measured": 1}')
        await loop.sock_sendall(conn, ANSWER)
        async with await sending as resp:
            await resp.read()
        conn.close()
        return had[0] + b"|" + rest
    finally:
        await session.close()
        listener.close()


def test_a_request_to_an_engine_is_written_before_the_next_ready_callback_runs():
    had = asyncio.run(_what_the_engine_had_when_the_next_callback_ran())
    before_next_callback = had.split(b"|")[0]
    assert before_next_callback.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    assert before_next_callback.endswith(b'{"measured": 1}')
