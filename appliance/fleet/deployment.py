"""A model's deployment: its replicas, its request signals (rate, in flight, held) and
the request path's choice of a replica (``acquire``: a READY one, else held in the
model's queue, appliance/fleet/hold.py, while one is started). How many replicas it
has is decided by the supervisor (appliance/fleet/supervisor.py), which owns it."""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from appliance.config import Config, ModelConfig, idle_ttl_s, kv_tokens
from appliance.fleet.autoscaler import Inputs, Policy
from appliance.fleet.hold import Exclude, HoldQueue
from appliance.fleet.prefix import PrefixRouter
from appliance.fleet.rates import RateWindow
from appliance.fleet.replica import Replica
from appliance.fleet.replica_state import State
from appliance.state.decisions import ModelControl

if TYPE_CHECKING:
    from appliance.fleet.lora import LoraServing
    from appliance.fleet.supervisor import Supervisor

# States from which a replica may still serve without the operator's help.
LIVE = (State.STARTING, State.READY, State.BACKOFF, State.SLEEPING)


class Deployment:
    """A model's replicas, its request signals and its queue of held requests."""

    def __init__(self, model: ModelConfig, supervisor: Supervisor) -> None:
        self.model = model
        self.supervisor = supervisor
        self.replicas: list[Replica] = []
        self.rate = RateWindow(60, clock=supervisor.clock.monotonic)
        self.rate.last_event = supervisor.clock.monotonic()  # idle timers start at boot
        self.held = HoldQueue(self)
        self.control = ModelControl()
        self.last_cold_start_s: float | None = None
        # Why this model must not be served (store admission), if it must not.
        self.blocked: str | None = None
        # The operator unloaded it (or it was evicted for another model): it stays at
        # zero until a request or a load.
        self.unloaded = False
        # Why the last start for a request found no room (GPU memory or CPU cores held by
        # replicas that may not be evicted), for the 503; None once one starts.
        self.no_room: str | None = None
        # ... and when room may come (replicas that are busy or inside their residency may
        # go by then; appliance/fleet/eviction.Plan.room_in): None, waiting does not help.
        self.room_in: float | None = None
        # What the replica being brought up for held requests costs: evict, wake or cold
        # (appliance/fleet/market.py); what their waits are counted under.
        self.loading_cause = "cold"
        self._rr = itertools.count()
        # llama.cpp's context is shared by its slots; GPU engines have a KV budget.
        cache = model.context_length if model.server == "llamacpp" else kv_tokens(model)
        self.prefix = PrefixRouter(supervisor.cfg.routing, cache)
        # Its LoRA adapters, each a model name it serves (resolved at start: fleet/lora.py).
        self.lora: LoraServing | None = None

    # --- the request path ---------------------------------------------------------

    def pick_ready(self, exclude: Exclude | None = None, prefix: list[int] | None = None) -> Replica | None:
        """The READY replica with the longest cached prefix of the request (its
        block hashes, appliance/fleet/prefix.py) within the load margin, else the one
        with the fewest requests in flight (round-robin on ties), skipping one
        that just failed a request until it has restarted or the exclusion
        lapsed (a dropped keep-alive connection is no crash)."""
        if exclude is not None and not exclude.active(self.supervisor.clock.monotonic()):
            exclude = None
        ready = [
            r
            for r in self.replicas
            if r.state is State.READY
            and not r.retiring
            and not r.evicted
            and (exclude is None or not exclude.matches(r))
        ]
        if len(ready) <= 1:
            return ready[0] if ready else None
        if prefix:
            return self.prefix.choose(ready, prefix)
        start = next(self._rr) % len(ready)
        rotated = ready[start:] + ready[:start]
        return min(rotated, key=lambda r: r.inflight)

    async def acquire(
        self,
        disconnected: Callable[[], Awaitable] | None = None,
        exclude: Exclude | None = None,
        prefix: list[int] | None = None,
    ) -> Replica:
        """A READY replica for one request; if there is none, start or wake one and
        wait for it in arrival order (bounded queue, bounded wait). disconnected()
        completes when the client goes away; it is only called if the request waits.
        A retry (exclude set) is the same request: it is not counted again."""
        replica = self.take_ready(exclude, prefix)
        if replica is not None:
            return replica
        return await self.held.hold(disconnected, exclude, prefix)

    def take_ready(self, exclude: Exclude | None = None, prefix: list[int] | None = None) -> Replica | None:
        """acquire's first step, without a coroutine (the request path's usual case: a
        replica is READY): the request counted, and the replica it goes to, else None,
        and then it waits for one (``hold``)."""
        if exclude is None:
            self.rate.record()
        return self.pick_ready(exclude, prefix)

    def hold(
        self,
        disconnected: Callable[[], Awaitable] | None = None,
        exclude: Exclude | None = None,
        prefix: list[int] | None = None,
    ) -> Awaitable[Replica]:
        """acquire's second step: no replica was READY (``take_ready``), so wait for one."""
        return self.held.hold(disconnected, exclude, prefix)

    def wake_waiters(self) -> None:
        """A replica became READY: release the held requests, oldest first."""
        self.held.release()

    def fail_waiters(self, error: Exception) -> None:
        self.held.fail(error)

    def can_become_ready(self) -> bool:
        """Some replica is or may become READY, or a new one may be started, now or once
        replicas of other models that are busy or just loaded may be evicted (never for a
        blocked model)."""
        if self.blocked:
            return False
        if any(r.state in LIVE or not r.history for r in self.kept()):  # (no history: just added)
            return True
        if self.no_room:  # the last start found no room: worth waiting if it comes in time
            return self.room_in is not None and self.room_in < self.supervisor.cfg.queue.timeout_s
        return self.supervisor.room_for(self) > 0

    def _why_unavailable(self) -> str:
        states = sorted({r.state.value for r in self.replicas}) or ["no replicas"]
        errors = sorted({r.last_error for r in self.replicas if r.state is State.FATAL and r.last_error})
        why = f"; {self.blocked}" if self.blocked else (f"; {errors[0]}" if errors else "")
        if self.no_room and not self.blocked:
            why += f"; {self.no_room}"
        return f"Model '{self.model.name}' has no ready replica ({', '.join(states)}){why}"

    def _retry_after(self) -> int:
        if any(r.state in (State.STARTING, State.BACKOFF, State.SLEEPING) for r in self.replicas):
            return 5
        return 30

    # --- signals ----------------------------------------------------------------------

    @property
    def waiters(self) -> deque[asyncio.Future]:
        """The requests held for a READY replica, oldest first."""
        return self.held.waiters

    @property
    def ready(self) -> bool:
        return any(r.state is State.READY for r in self.replicas)

    @property
    def inflight(self) -> int:
        return sum(r.inflight for r in self.replicas)

    def standing_count(self) -> int:
        """Replicas the model keeps with no traffic: the operator's count, else
        min_replicas (none once unloaded: a request starts one), at most max_replicas."""
        wanted = self.control.override
        if wanted is None:
            wanted = 0 if self.unloaded else self.model.autoscaling.min_replicas
        return min(wanted, self.model.autoscaling.max_replicas)

    def live(self) -> list[Replica]:
        # A replica draining for an operator's restart comes back: it still counts
        # (else the autoscaler would start a second one to cover the gap).
        return [r for r in self.replicas if r.state in LIVE or (r.state is State.DRAINING and not r.retiring)]

    def kept(self) -> list[Replica]:
        """Replicas not being taken out of service, FATAL ones included: a FATAL
        replica holds its place (and its reason) until the operator acts."""
        return [r for r in self.replicas if not r.retiring]

    def policy(self, cfg: Config) -> Policy:
        a = self.model.autoscaling
        return Policy(
            min_replicas=a.min_replicas,
            max_replicas=a.max_replicas,
            target_rps_per_replica=a.target_rps_per_replica,
            idle_ttl_s=idle_ttl_s(cfg, self.model),
            sleep_after_s=a.sleep_after.seconds,
            stabilization_s=cfg.autoscaling.stabilization_s,
            cooldown_s=cfg.autoscaling.cooldown_s,
        )

    def inputs(self, now: float, room: int) -> Inputs:
        live = self.live()
        waiting = sum((r.load.waiting or 0) for r in live if r.load is not None)
        return Inputs(
            now=now,
            current=len(live),
            ready=sum(r.state is State.READY for r in live),
            sleeping=sum(r.state is State.SLEEPING for r in live),
            rps_10s=self.rate.rate(10),
            rps_60s=self.rate.rate(60),
            rps_2s=self.rate.rate(2),
            inflight=self.inflight,
            queued=len(self.waiters),
            engine_waiting=waiting,
            idle_s=self.rate.idle_for(),
            pinned=self.control.pinned,
            unloaded=self.unloaded,
            override=self.control.override,
            capacity=len(live) + room,
        )
