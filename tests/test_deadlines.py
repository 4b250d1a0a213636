"""Deadlines on a request's task (appliance/gateway/deadlines.py), as the body's read and
an engine stream's head use them: a deadline that falls due cancels its task and is told
apart from anyone else's cancel; one that ended never fires; deadlines of different
lengths each fall due. And the stream's head: an engine that never answers one still
times out (EngineProxy.open_stream), its lease released, its task not left cancelled."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
import weakref

import aiohttp
import pytest
import uvloop

from appliance.api.body import read_body
from appliance.errors import EngineTimeout, RequestTimeout
from appliance.gateway import deadlines
from appliance.gateway.proxy import EngineProxy


class TimedOut(Exception):
    pass


async def _wait_under(seconds: float, work) -> object:
    deadline = deadlines.start(seconds)
    try:
        return await work
    except asyncio.CancelledError:
        if deadline.passed():
            raise TimedOut from None
        raise
    finally:
        deadline.end()


def _on_both_loops(test):
    """Run the coroutine function under asyncio's loop and under uvloop (the daemon's)."""

    @pytest.mark.parametrize("run", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])
    def wrapped(run):
        run(test())

    wrapped.__name__ = test.__name__
    return wrapped


@_on_both_loops
async def test_a_deadline_that_falls_due_cancels_its_wait_and_is_told_as_a_timeout():
    with pytest.raises(TimedOut):
        await _wait_under(0.05, asyncio.sleep(5))
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0  # its cancel taken back
    await asyncio.sleep(0.01)  # the task goes on uncancelled


@_on_both_loops
async def test_a_deadline_whose_wait_ended_never_cancels_its_task():
    assert await _wait_under(0.05, asyncio.sleep(0, "done")) == "done"
    await asyncio.sleep(0.15)  # well past the deadline: no cancel arrives here
    assert await _wait_under(0.05, asyncio.sleep(0.01, "again")) == "again"


@_on_both_loops
async def test_someone_elses_cancel_under_a_deadline_stays_a_cancel():
    waiting = asyncio.ensure_future(_wait_under(5, asyncio.sleep(5)))
    await asyncio.sleep(0.01)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting


@_on_both_loops
async def test_a_shorter_deadline_set_after_a_longer_one_falls_due_first():
    # A reload may shorten server.body_read_timeout_s: the new length's deadlines are not
    # queued behind the old length's.
    long = asyncio.ensure_future(_wait_under(5, asyncio.sleep(5)))
    await asyncio.sleep(0.01)
    with pytest.raises(TimedOut):
        await _wait_under(0.05, asyncio.sleep(5))
    assert not long.done()
    long.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await long


@_on_both_loops
async def test_each_of_many_deadlines_of_one_length_falls_due_and_the_ended_ones_do_not():
    ended = [await _wait_under(0.1, asyncio.sleep(0, i)) for i in range(50)]
    waits = [asyncio.ensure_future(_wait_under(0.1, asyncio.sleep(5))) for _ in range(50)]
    results = await asyncio.gather(*waits, return_exceptions=True)
    assert ended == list(range(50))
    assert all(isinstance(r, TimedOut) for r in results), results


@_on_both_loops
async def test_a_body_that_never_comes_is_a_408_from_read_body():
    async def receive() -> dict:
        await asyncio.sleep(5)
        return {"type": "http.disconnect"}

    with pytest.raises(RequestTimeout):
        await read_body(receive, None, 1024, timeout=0.05)


class _Upstream:
    """An engine replica as the proxy sees it (gateway/proxy.Upstream), counting its leases."""

    def __init__(self, base_url: str, session: aiohttp.ClientSession, read_timeout_s: float) -> None:
        self.name, self.base_url, self.session = "silent", base_url, session
        self.timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=read_timeout_s)
        self.held = 0

    @contextlib.contextmanager
    def lease(self):
        self.held += 1
        try:
            yield self
        finally:
            self.held -= 1


@_on_both_loops
async def test_a_stream_whose_engine_never_answers_its_head_times_out_and_frees_its_replica():
    loop = asyncio.get_running_loop()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    accepted: list[socket.socket] = []

    async def accept_and_stay_silent() -> None:
        conn, _ = await loop.sock_accept(listener)
        accepted.append(conn)

    silent = asyncio.ensure_future(accept_and_stay_silent())
    async with aiohttp.ClientSession() as session:
        upstream = _Upstream(f"http://127.0.0.1:{listener.getsockname()[1]}", session, read_timeout_s=0.2)
        proxy = EngineProxy.__new__(EngineProxy)
        proxy.session, proxy.timeout = session, upstream.timeout
        try:
            with pytest.raises(EngineTimeout, match="did not answer in time"):
                await proxy.open_stream(upstream, "/v1/chat/completions", b"{}", {}, lambda status: None)
            assert upstream.held == 0
            task = asyncio.current_task()
            assert task is not None and task.cancelling() == 0
            await asyncio.sleep(0.3)  # past another deadline's length: nothing left to fire here
        finally:
            silent.cancel()
            for conn in accepted:
                conn.close()
            listener.close()


@_on_both_loops
async def test_an_ended_deadline_queued_behind_a_waiting_one_keeps_no_task_alive():
    # A client trickling its body holds the queue's head for the whole timeout: the
    # requests that ended behind it stay queued until then, but not their tasks.
    waiting = asyncio.ensure_future(_wait_under(5, asyncio.sleep(5)))
    await asyncio.sleep(0.01)
    ended = asyncio.ensure_future(_wait_under(5, asyncio.sleep(0, "done")))
    assert await ended == "done"
    await asyncio.sleep(0.01)  # the loop's own references to it (the wakeup of who awaited it) gone
    gone = weakref.ref(ended)
    del ended
    gc.collect()
    assert gone() is None
    waiting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await waiting


@_on_both_loops
async def test_the_ended_deadlines_behind_a_waiting_one_stay_bounded_by_those_still_waiting():
    # An engine that never sends a stream's head holds the queue's head for
    # upstream.read_timeout_s (600 s): the ended deadlines of every request served
    # meanwhile were kept until it fell due (hundreds of thousands at a few hundred a
    # second), then dropped in one callback. They are dropped as they pile up instead.
    waiting = asyncio.ensure_future(_wait_under(600, asyncio.sleep(600)))
    await asyncio.sleep(0)
    for _ in range(20_000):
        await _wait_under(600, asyncio.sleep(0))
    [queue] = [q for length, q in deadlines._queues.items() if length == 600]
    assert len(queue.due) <= 2 * deadlines.COMPACT_AT, len(queue.due)
    assert queue.due[0].pending  # the waiting one kept, and still due
    waiting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await waiting
