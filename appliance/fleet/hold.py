"""The hold queue: requests for a model with no READY replica wait here, in arrival
order, while one is started or woken for them (``Deployment.acquire``).

Bounded twice: at most ``[queue] max_held`` requests per model (429 beyond), each for
at most ``[queue] timeout_s`` (503 after). A held request leaves early when its client
goes away (``ClientGone``), when the model can no longer become ready (503 naming why),
or when a replica it may use becomes READY (``release``). One held for room that
replicas of other models still hold (busy, or inside their residency) asks for room
again while it waits.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from appliance.errors import NoCapacity, QueueFull, QueueTimeout

if TYPE_CHECKING:
    from appliance.fleet.deployment import Deployment
    from appliance.fleet.replica import Replica

# A request held for room that replicas of other models still hold (busy, or inside their
# residency) is told when room may have come (the supervisor looks again on every change of
# a replica's state, a request's end and a residency's lapse); it also looks again this
# often, in case something else freed it.
ROOM_POLL_S = 1.0


class Exclude:
    """A replica that just failed a request, as it was then (its pid)."""

    SECONDS = 2.0

    def __init__(self, replica: Replica, now: float) -> None:
        self.replica, self.pid, self.until = replica, replica.pid, now + self.SECONDS

    def active(self, now: float) -> bool:
        return now < self.until

    def matches(self, replica: Replica) -> bool:
        return replica is self.replica and replica.pid == self.pid


class ClientGone(Exception):
    """The client disconnected while its request was held; nothing to answer."""


class HoldQueue:
    """One model's held requests (``waiters``: a future per request, oldest first)."""

    def __init__(self, dep: Deployment) -> None:
        self.dep = dep
        self.waiters: deque[asyncio.Future] = deque()
        self._room_polled = 0.0
        self._arrived: list[float] = []  # when each held request arrived (the supervisor's clock)

    def __len__(self) -> int:
        return len(self.waiters)

    def waited(self, now: float) -> float:
        """How long the oldest request held now has waited (0: none held)."""
        return now - min(self._arrived) if self._arrived else 0.0

    async def hold(
        self, disconnected: Callable[[], Awaitable] | None, exclude: Exclude | None, prefix: list[int] | None = None
    ) -> Replica:
        arrived = self.dep.supervisor.clock.monotonic()
        self._arrived.append(arrived)
        try:
            return await self._hold(disconnected, exclude, prefix)
        finally:
            self._arrived.remove(arrived)

    async def _hold(
        self, disconnected: Callable[[], Awaitable] | None, exclude: Exclude | None, prefix: list[int] | None
    ) -> Replica:
        dep = self.dep
        queue = dep.supervisor.cfg.queue
        if dep.blocked:
            raise NoCapacity(dep._why_unavailable(), retry_after=dep._retry_after())
        if len(self.waiters) >= queue.max_held:
            raise QueueFull(
                f"Model '{dep.model.name}' is starting and {len(self.waiters)} requests "
                "already wait for it; retry shortly",
                retry_after=dep._retry_after(),
            )
        # Start (or wake) a replica, evicting idle replicas of other models for it if it must
        # (with the models asked for at the same moment, as one set).
        await asyncio.shield(dep.supervisor.room.want_replica(dep))  # shared: one going away cancels no other
        if not dep.can_become_ready():
            raise NoCapacity(dep._why_unavailable(), retry_after=dep._retry_after())
        loop = asyncio.get_running_loop()
        held_at = loop.time()
        deadline = held_at + queue.timeout_s
        gone = asyncio.ensure_future(disconnected()) if disconnected is not None else None
        try:
            while True:
                waiter = loop.create_future()
                self.waiters.append(waiter)
                try:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        raise TimeoutError
                    # With an exclusion, look again when it lapses even if no READY comes;
                    # and look for room again now and then (room found wanting since).
                    step = min(remaining, Exclude.SECONDS) if exclude is not None else remaining
                    step = min(step, ROOM_POLL_S)
                    done, _ = await asyncio.wait(
                        [w for w in (waiter, gone) if w is not None], timeout=step, return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    with contextlib.suppress(ValueError):
                        self.waiters.remove(waiter)
                if gone is not None and gone in done:
                    raise ClientGone
                if not done and loop.time() >= deadline:
                    raise TimeoutError
                if waiter.done() and waiter.exception() is not None:
                    raise waiter.exception()  # type: ignore[misc]
                replica = dep.pick_ready(exclude, prefix)
                if replica is not None:
                    dep.supervisor.market.waits.observe(dep.model.name, dep.loading_cause, loop.time() - held_at)
                    return replica
                if dep.no_room or not dep.kept():  # (its replica went before this request took it)
                    self._look_for_room()
        except TimeoutError:
            waited_for = f"; {dep.no_room}" if dep.no_room else ""
            raise QueueTimeout(
                f"Model '{dep.model.name}' did not become ready within {queue.timeout_s:.0f}s{waited_for}",
                retry_after=dep._retry_after(),
            ) from None
        finally:
            if gone is not None and not gone.done():
                gone.cancel()

    def _look_for_room(self) -> None:
        """Held for room that others held: try to start again (at most every ROOM_POLL_S,
        whatever the number held; with the other models held for room, as one set);
        NoCapacity once waiting cannot help any more."""
        dep = self.dep
        now = dep.supervisor.clock.monotonic()
        if now - self._room_polled >= ROOM_POLL_S:
            self._room_polled = now
            dep.supervisor.room.look_for_room([dep])
        if not dep.can_become_ready():
            raise NoCapacity(dep._why_unavailable(), retry_after=dep._retry_after())

    def release(self) -> None:
        """A replica became READY: release the held requests, oldest first."""
        for waiter in list(self.waiters):
            if not waiter.done():
                waiter.set_result(None)

    def fail(self, error: Exception) -> None:
        for waiter in list(self.waiters):
            if not waiter.done():
                waiter.set_exception(error)
