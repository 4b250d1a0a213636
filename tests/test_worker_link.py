"""The link between a worker and the daemon (appliance/dataplane/protocol.py): the
daemon's end takes each frame as its bytes arrive (FrameReader.dispatch), on the
daemon's loop (uvloop) and on asyncio's own, over a real socketpair."""

from __future__ import annotations

import asyncio
import socket
import struct

import msgspec
import pytest
import uvloop

from appliance.dataplane.protocol import Body, FrameReader, FrameWriter, Gone, Start, ToDaemon

LOOPS = {"uvloop": uvloop.new_event_loop, "asyncio": asyncio.new_event_loop}


def _run(loop: str, main) -> object:
    runner = asyncio.Runner(loop_factory=LOOPS[loop])
    try:
        return runner.run(asyncio.wait_for(main(), 10))
    finally:
        runner.close()


async def _pair() -> tuple[FrameReader, FrameWriter, FrameWriter, asyncio.StreamReader]:
    """(the daemon's reader and writer, the worker's writer and reader), connected."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    reader, writer = await asyncio.open_unix_connection(sock=ours)
    worker_reader, worker_writer = await asyncio.open_unix_connection(sock=theirs)
    return FrameReader(reader, ToDaemon), FrameWriter(writer), FrameWriter(worker_writer), worker_reader


@pytest.mark.parametrize("loop", LOOPS)
def test_the_daemons_end_takes_every_frame_in_order_those_sent_before_it_read_included(loop):
    async def main() -> tuple[list, type]:
        frames, out, worker, _ = await _pair()
        worker.write(Body(1, b"early", True))  # before the daemon's end reads: in its stream's buffer
        await worker.drain()
        await asyncio.sleep(0.05)
        taken: list = []
        link = asyncio.ensure_future(frames.dispatch(taken.append, out.writer.transport))
        await asyncio.sleep(0.05)
        for i in range(2, 200):  # many frames, some split across reads
            worker.write(Body(i, b"x" * (i * 97), False))
            if i % 7 == 0:
                await worker.drain()
        worker.write(Gone(200))
        await worker.drain()
        await asyncio.sleep(0.2)
        worker.writer.close()
        with pytest.raises(asyncio.IncompleteReadError):
            await link
        return taken, Gone

    taken, gone = _run(loop, main)
    assert [f.rid for f in taken] == list(range(1, 201))
    assert taken[0] == Body(1, b"early", True) and taken[5] == Body(6, b"x" * 582, False)
    assert isinstance(taken[-1], gone)


@pytest.mark.parametrize("loop", LOOPS)
def test_the_daemons_end_still_writes_and_drains_once_it_takes_frames_inline(loop):
    # The reading side's protocol changed: the writing side's flow control must not.
    async def main() -> list:
        frames, out, worker, worker_reader = await _pair()
        taken: list = []
        link = asyncio.ensure_future(frames.dispatch(taken.append, out.writer.transport))
        answers = FrameReader(worker_reader, Start)
        got: list = []

        async def read_answers() -> None:
            await asyncio.sleep(0.2)  # the daemon's writes wait for this reader meanwhile
            while len(got) < 4:
                got.extend(await answers.read())

        reading = asyncio.ensure_future(read_answers())
        big = b"y" * (4 * 1024 * 1024)  # more than the socket's buffer: drain must wait for the reader
        for i in range(4):
            out.write(Start(i, 200, [], big, False))
            await out.drain()  # returns only as the worker's side reads
            assert not reading.done()
        await reading
        worker.writer.close()
        with pytest.raises(asyncio.IncompleteReadError):
            await link
        return got

    got = _run(loop, main)
    assert [(s.rid, len(s.body)) for s in got] == [(i, 4 * 1024 * 1024) for i in range(4)]


@pytest.mark.parametrize("loop", LOOPS)
def test_a_frame_that_does_not_decode_ends_the_link_with_its_error(loop):
    async def main() -> list:
        frames, out, worker, _ = await _pair()
        taken: list = []
        link = asyncio.ensure_future(frames.dispatch(taken.append, out.writer.transport))
        worker.write(Gone(1))
        await worker.drain()
        await asyncio.sleep(0.05)
        junk = msgspec.msgpack.encode([99, "no such frame"])
        worker.writer.write(struct.pack("!I", len(junk)) + junk)
        worker.write(Gone(2))  # after the bad frame: not taken
        await worker.drain()
        with pytest.raises(msgspec.ValidationError):
            await link
        return taken

    assert _run(loop, main) == [Gone(1)]
