"""The daemon's periodic jobs: one owner, plain asyncio tasks on the daemon's loop.

The app's lifespan opens one ``Periodic`` and registers each job (the autoscaler's
tick, the key refresh, the store recheck); shutdown closes it, which cancels them and
waits until they have stopped. A job runs every ``interval_s`` on a fixed rate, never
twice at once: a run that takes longer than the interval skips the runs it missed
instead of catching up. A job that raises is logged and runs again at its next time.

Workers that own a resource and decide their own pace (a replica's owner task, the
audit writer, the store scrub) are not periodic jobs: each stays the one task that owns
its resource.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
from collections.abc import Awaitable, Callable

log = logging.getLogger("appliance.periodic")

Job = Callable[[], Awaitable[object] | object]


class Periodic:
    def __init__(self) -> None:
        self._tasks: dict[str, asyncio.Task] = {}

    def every(self, interval_s: float, name: str, job: Job) -> None:
        """Run job (a function or a coroutine function) every interval_s, the first
        time interval_s from now."""
        if interval_s <= 0:
            raise ValueError(f"periodic job {name}: interval must be > 0, got {interval_s}")
        if name in self._tasks:
            raise ValueError(f"periodic job {name} is already registered")
        self._tasks[name] = asyncio.create_task(self._run(interval_s, name, job), name=f"periodic-{name}")

    async def close(self) -> None:
        """Cancel every job and wait for each to stop (a run in progress is cancelled)."""
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    @staticmethod
    async def _run(interval_s: float, name: str, job: Job) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time() + interval_s
        while True:
            await asyncio.sleep(max(0.0, due - loop.time()))
            try:
                result = job()
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("periodic job %s failed; it runs again in %gs", name, interval_s)
            due += interval_s
            behind = loop.time() - due
            if behind > 0:  # a run longer than the interval: skip what it missed
                due += math.ceil(behind / interval_s) * interval_s
