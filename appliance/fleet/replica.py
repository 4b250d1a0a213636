"""One engine replica, owned by one asyncio task: what callers may ask of it.

The owner task (appliance/fleet/replica_owner.py) is the only code that changes the
replica's state, through ``_transition`` (appliance/fleet/replica_state.py: the states,
their transitions), which logs and publishes every change. Callers ask (``wait_ready``,
``stop``); they never check-then-act on the state.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import signal

from appliance.fleet.process import resident_bytes
from appliance.fleet.replica_owner import OwnerTask
from appliance.fleet.replica_state import ReplicaUnavailable, State
from appliance.status import ReplicaLoad, ReplicaStatus
from engines import EngineLoad


def _load_status(load: EngineLoad | None) -> ReplicaLoad | None:
    if load is None:
        return None
    return ReplicaLoad(
        running=load.running,
        waiting=load.waiting,
        kv_cache_usage=load.kv_cache_usage,
        prefix_cache_hit_rate=load.prefix_cache_hit_rate,
    )


class Replica(OwnerTask):
    """One engine replica (its fields: ReplicaState; its owner task: OwnerTask)."""

    # --- what callers may ask ---------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            # A fresh context: the replica outlives the request that may have started
            # it, and must not log under that request's id.
            self._task = asyncio.create_task(self._own(), name=f"replica-{self.name}", context=contextvars.Context())

    async def wait_ready(self, timeout: float) -> None:
        deadline = self.clock.monotonic() + timeout
        while self.state is not State.READY:
            if self.state is State.FATAL:
                raise ReplicaUnavailable(f"{self.name} is FATAL: {self.last_error}")
            if self._stop.is_set() or self._task is None:
                raise ReplicaUnavailable(f"{self.name} is stopped")
            if self._task.done():
                raise ReplicaUnavailable(f"{self.name}'s owner task ended: {self._task_error()}")
            remaining = deadline - self.clock.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{self.name} not ready after {timeout:.0f}s ({self.state.value})")
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=min(remaining, 1.0))

    def _task_error(self) -> str:
        exc = self._task.exception() if self._task and not self._task.cancelled() else None
        return repr(exc) if exc else "no error"

    async def stop(self, drain_timeout: float = 0.0) -> None:
        """Drain in-flight requests (bounded), stop the engine, end the owner task."""
        self._drain_timeout = drain_timeout
        self._stop.set()
        if self._task is not None:
            await self._task

    def stop_now_if_idle(self) -> bool:
        """Begin the stop now, in the caller's step, when the engine has nothing to finish:
        READY or asleep, no request in flight. Its process group gets SIGTERM here instead
        of a loop turn or more later from the owner task (under load, tens of milliseconds
        on the path of the request the room is freed for); the owner task then sees the
        exit as the stop it asked for (``_stop`` is set first) and finishes it as ``stop``
        does. Only for a replica that takes no new request (retiring), whose callers lease
        it in the step they pick it (appliance/gateway/proxy.py), so none can be lost in
        between. Whether it did."""
        if self.inflight or self.state not in (State.READY, State.SLEEPING) or self._proc is None:
            return False
        self._stop.set()
        self._signalled = self.told_to_stop = True
        self._proc.signal_group(signal.SIGTERM)
        return True

    async def sleep(self, timeout: float = 120.0) -> None:
        """Put a READY replica to sleep (vLLM level 1): GPU memory freed, weights in host RAM."""
        if not getattr(self.adapter, "can_sleep", False) or not self.model.sleep_mode:
            raise ReplicaUnavailable(f"{self.name}: sleep needs vllm with sleep_mode = true")
        self._want_sleep = True
        self._poke.set()
        await self._until(lambda: self.state in (State.SLEEPING, State.FATAL, State.STOPPED), timeout)

    def restart(self) -> None:
        """Stop the engine and start it again (an operator's action, not a crash).
        A FATAL replica gets a fresh start with its crash history cleared."""
        if self.state is State.FATAL and self._task is not None and self._task.done():
            self._crash_times.clear()
            self.cannot_start = None
            self._task = None
            self._transition(State.STOPPED, "restart requested by the operator")
            self.start()
            return
        self._want_restart = True
        self._poke.set()

    async def wake(self, timeout: float = 300.0) -> None:
        self._want_sleep = False
        self._poke.set()
        await self.wait_ready(timeout)

    async def _until(self, done, timeout: float) -> None:
        deadline = self.clock.monotonic() + timeout
        while not done():
            remaining = deadline - self.clock.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{self.name} still {self.state.value} after {timeout:.0f}s")
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=min(remaining, 1.0))

    def lease(self) -> Lease:
        """Count a request against this replica while it runs (drain waits for it)."""
        return Lease(self)

    def snapshot(self) -> ReplicaStatus:
        return ReplicaStatus(
            replica=self.name,
            index=self.index,
            state=self.state.value,
            engine=self.model.server,
            pid=self.pid or None,
            port=self.port or None,
            url=self.address or None,
            supervised=self.supervised,
            inflight=self.inflight,
            retiring=self.retiring,
            restarts=self.restarts,
            gpus=list(self.slot.gpus) if self.slot else None,
            memory_fraction=self.slot.memory_fraction if self.slot else None,
            cpus=sorted(self.cpus),
            rss_bytes=resident_bytes(self.pid) if self.pid else None,
            uptime_s=round(self.clock.monotonic() - self.ready_since, 1) if self.state is State.READY else None,
            image=self.image or None,
            load=_load_status(self.load),
            last_error=self.last_error or None,
            log_file=str(self.log_path) if self.supervised else None,
            log_tail=list(self.fatal_log_tail) if self.state is State.FATAL else [],
        )


class Lease:
    """A request counted against its replica, from __enter__ to __exit__ (Replica.lease).
    A class, not a contextlib generator: it is entered and left on every proxied
    request, and the generator's machinery cost ~1.5 us of it."""

    __slots__ = ("replica",)

    def __init__(self, replica: Replica) -> None:
        self.replica = replica

    def __enter__(self) -> Replica:
        replica = self.replica
        replica.inflight += 1
        replica._idle.clear()
        return replica

    def __exit__(self, *exc: object) -> None:
        replica = self.replica
        replica.inflight -= 1
        if replica.inflight == 0:
            replica._idle.set()
            if replica.on_idle is not None:
                replica.on_idle()
