"""A request to an engine leaves in the step that sends it, on Python 3.11 too.

aiohttp buffers a request's head and writes it, with the body, from a task of its
own (ClientRequest.write_bytes). On Python 3.12+ it starts that task eagerly, so
the bytes reach the socket at once; on 3.11 the task waits behind every callback
already ready on the loop. When 64 streams arrive together, those are the other
63 requests' handlers: each request then went out only after the whole burst had
been decided, and the engine got all 64 in one lump, the median one ~3 ms after it
was ready and the engine's first chunk later still (docs/architecture.md, "Time to
first chunk"). install() gives 3.11 what aiohttp does on 3.12+: the write runs at
once up to its first real wait, and only what is left of it becomes a task.
"""

from __future__ import annotations

import asyncio
import sys
import types
from collections.abc import Coroutine, Generator
from typing import Any

from aiohttp import client_reqrep


@types.coroutine
def _resume(coro: Coroutine[Any, Any, Any], waiting: Any) -> Generator[Any, Any, Any]:
    """The rest of a coroutine already run up to its first wait (what `yield from`
    does after its first step): every value and exception passes through."""
    value = waiting
    while True:
        try:
            sent = yield value
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:  # cancellation included: the coroutine decides
            try:
                value = coro.throw(exc)
            except StopIteration as done:
                return done.value
        else:
            try:
                value = coro.send(sent)
            except StopIteration as done:
                return done.value


async def _rest(coro: Coroutine[Any, Any, Any], waiting: Any) -> Any:
    return await _resume(coro, waiting)


def eager_task(coro: Coroutine[Any, Any, Any], **_: Any) -> asyncio.Future[Any]:
    """Run coro now, up to its first wait; a task only for the rest (3.12's eager_start)."""
    loop = asyncio.get_running_loop()
    try:
        waiting = coro.send(None)
    except StopIteration as done:
        finished = loop.create_future()
        finished.set_result(done.value)
        return finished
    except BaseException as exc:
        failed = loop.create_future()
        failed.set_exception(exc)
        return failed
    return loop.create_task(_rest(coro, waiting))


class _AsyncioWithEagerTasks(types.ModuleType):
    """asyncio as client_reqrep sees it: the same module, but create_task starts eagerly."""

    def __init__(self) -> None:
        super().__init__("asyncio")

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio, name)

    create_task = staticmethod(eager_task)


def install() -> None:
    """Once per process, on Python < 3.12 only (3.12+ aiohttp starts the write eagerly itself)."""
    if sys.version_info < (3, 12) and not isinstance(client_reqrep.asyncio, _AsyncioWithEagerTasks):
        client_reqrep.asyncio = _AsyncioWithEagerTasks()
