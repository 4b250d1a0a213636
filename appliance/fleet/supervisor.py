"""The supervisor: every model deployment's replicas, how many there are, and
which one takes a request.

A request for a model with no ready replica does not fail: ``Deployment.acquire``
starts one (or wakes a sleeping one) and holds the request in a bounded FIFO
queue until a replica is READY. The autoscaler's decisions (``tick``) and the
operator's commands (``scale``, ``load``, ``unload``, ``pin``) change the count;
a replica taken out of service is drained before it stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import logging
import math
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp

from appliance.config import Config, ModelConfig, idle_ttl_s, kv_tokens, min_residency_s, uses_gpus
from appliance.errors import ModelNotFound, NoCapacity, QueueFull, QueueTimeout
from appliance.fleet import eviction, lora
from appliance.fleet.autoscaler import Autoscaler, Decision, Inputs, Policy
from appliance.fleet.capacity import Capacity, next_indices, on_cpu
from appliance.fleet.lora import LoraServing
from appliance.fleet.market import Eviction, Market, now
from appliance.fleet.prefix import PrefixRouter
from appliance.fleet.process import ProcessRunner, SubprocessRunner, descendants
from appliance.fleet.rates import RateWindow
from appliance.fleet.replica import Clock, Listener, RealClock, Replica, State, Transition, free_port
from appliance.gpu.memory import MeasuredMemory
from appliance.gpu.planning import PlanRow
from appliance.gpu.probe import GpuProbe, Inventory, NvmlProbe, SimulatedProbe
from appliance.state.decisions import ModelControl, StateStore
from appliance.status import CpuBudget, ModelStatus, PlacedReplica, at_wall_clock
from appliance.status import Decision as DecisionStatus
from appliance.store.guard import StoreChecks, admit_store_models, store_name
from appliance.store.store import Store
from engines import GpuSlot, adapter_for

log = logging.getLogger("appliance.supervisor")

# A request held for room that replicas of other models still hold (busy, or inside their
# residency) looks for it again this often.
ROOM_POLL_S = 0.25
# States from which a replica may still serve without the operator's help.
LIVE = (State.STARTING, State.READY, State.BACKOFF, State.SLEEPING)
CANNOT_PLACE = "cannot place on GPUs: "
_DIGITS = re.compile(r"\d+")


class Deployment:
    """A model's replicas, its request signals and its queue of held requests."""

    def __init__(self, model: ModelConfig, supervisor: Supervisor) -> None:
        self.model = model
        self.supervisor = supervisor
        self.replicas: list[Replica] = []
        self.rate = RateWindow(60, clock=supervisor.clock.monotonic)
        self.rate.last_event = supervisor.clock.monotonic()  # idle timers start at boot
        self.waiters: deque[asyncio.Future] = deque()
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
        self._room_polled = 0.0
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
            if r.state is State.READY and not r.retiring and (exclude is None or not exclude.matches(r))
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
        if exclude is None:
            self.rate.record()
        replica = self.pick_ready(exclude, prefix)
        if replica is not None:
            return replica
        return await self._hold(disconnected, exclude, prefix)

    async def _hold(
        self, disconnected: Callable[[], Awaitable] | None, exclude: Exclude | None, prefix: list[int] | None = None
    ) -> Replica:
        queue = self.supervisor.cfg.queue
        if self.blocked:
            raise NoCapacity(self._why_unavailable(), retry_after=self._retry_after())
        if len(self.waiters) >= queue.max_held:
            raise QueueFull(
                f"Model '{self.model.name}' is starting and {len(self.waiters)} requests "
                "already wait for it; retry shortly",
                retry_after=self._retry_after(),
            )
        # Start (or wake) a replica, evicting idle replicas of other models for it if it must.
        self.supervisor.on_demand(self)
        if not self.can_become_ready():
            raise NoCapacity(self._why_unavailable(), retry_after=self._retry_after())
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
                    # waiting for room, look for it again shortly.
                    step = min(remaining, Exclude.SECONDS) if exclude is not None else remaining
                    step = min(step, ROOM_POLL_S) if self.no_room else step
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
                    raise waiter.exception()
                replica = self.pick_ready(exclude, prefix)
                if replica is not None:
                    self.supervisor.market.waits.observe(self.model.name, self.loading_cause, loop.time() - held_at)
                    return replica
                if self.no_room:
                    self._look_for_room()
        except TimeoutError:
            waited_for = f"; {self.no_room}" if self.no_room else ""
            raise QueueTimeout(
                f"Model '{self.model.name}' did not become ready within {queue.timeout_s:.0f}s{waited_for}",
                retry_after=self._retry_after(),
            ) from None
        finally:
            if gone is not None and not gone.done():
                gone.cancel()

    def _look_for_room(self) -> None:
        """Held for room that others held: try to start again (at most every ROOM_POLL_S,
        whatever the number held); NoCapacity once waiting cannot help any more."""
        now = self.supervisor.clock.monotonic()
        if now - self._room_polled >= ROOM_POLL_S:
            self._room_polled = now
            self.supervisor.on_demand(self)
        if not self.can_become_ready():
            raise NoCapacity(self._why_unavailable(), retry_after=self._retry_after())

    def wake_waiters(self) -> None:
        """A replica became READY: release the held requests, oldest first."""
        for waiter in list(self.waiters):
            if not waiter.done():
                waiter.set_result(None)

    def fail_waiters(self, error: Exception) -> None:
        for waiter in list(self.waiters):
            if not waiter.done():
                waiter.set_exception(error)

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


def default_probe(cfg: Config) -> GpuProbe:
    return SimulatedProbe(cfg.gpu.inventory) if cfg.gpu.inventory else NvmlProbe()


class Supervisor:
    def __init__(
        self,
        cfg: Config,
        session: aiohttp.ClientSession,
        *,
        runner: ProcessRunner | None = None,
        clock: Clock | None = None,
        port_allocator: Callable[[], int] = free_port,
        listener: Listener | None = None,
        probe: GpuProbe | None = None,
        state: StateStore | None = None,
    ) -> None:
        self.cfg = cfg
        self.session = session
        self.runner = runner or SubprocessRunner(cfg.supervisor.log_max_bytes)
        self.clock = clock or RealClock()
        self.port_allocator = port_allocator
        self.probe = probe or default_probe(cfg)
        self.state = state
        self.measured = MeasuredMemory()
        self.capacity = Capacity(cfg, self.probe, self.replicas, self.measured)
        self.autoscaler = Autoscaler()
        self.placements: list[PlanRow] = []
        self._listeners: list[Listener] = [listener] if listener is not None else []
        self.log_dir = Path(cfg.paths.log_dir) / "replicas"
        self._retiring: set[asyncio.Task] = set()
        self._drains: dict[str, asyncio.Task] = {}  # replica name -> the task stopping it
        self._waking: set[str] = set()  # sleeping replicas a wake is on its way to
        # Evictions (what, for whom, why) and how long requests waited for a load.
        self.market = Market()
        self._stopping = False
        self.deployments: dict[str, Deployment] = {m.name: Deployment(m, self) for m in cfg.models}
        # LoRA adapter name -> the deployment of its base model (appliance/fleet/lora.py).
        self.adapters: dict[str, Deployment] = {
            a.name: self.deployments[m.name] for m in cfg.models for a in m.adapters
        }
        self.store_checks: StoreChecks | None = None
        self.store_leases: dict = {}  # store name -> its lease (a shared lock), see Store.lease
        if state is not None:
            for name, control in state.all().items():
                if name in self.deployments:
                    self.deployments[name].control = control

    # --- lifecycle ------------------------------------------------------------------------

    def add_listener(self, listener: Listener) -> None:
        """Also call listener(replica, transition) on every replica state change."""
        self._listeners.append(listener)

    def replicas(self) -> list[Replica]:
        return [r for d in self.deployments.values() for r in d.replicas]

    def start(self) -> None:
        """Start each model at its operator-set count, else its min_replicas. Store models
        are admitted first, and their files' fingerprints checked (in a worker thread) for
        every admitted one, with or without replicas: each replica waits for that check."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.store_leases = admit_store_models(self.cfg, self.deployments)
        self._resolve_adapters()
        if any(store_name(d.model) for d in self.deployments.values()):
            self.store_checks = StoreChecks(lambda: Store.from_config(self.cfg), self.block_store_model)
            for name in sorted(
                {store_name(d.model) for d in self.deployments.values() if store_name(d.model) and not d.blocked}
            ):
                self._background(self.store_checks.check(name), f"store-check-{name}")
        self.add_together([(dep, dep.standing_count()) for dep in self.deployments.values()], reason="boot")

    async def stop(self, drain_timeout: float = 0.0) -> None:
        self._stopping = True
        for dep in self.deployments.values():
            dep.fail_waiters(NoCapacity("The appliance is shutting down", retry_after=5))
        if self.store_checks is not None:
            self.store_checks.interrupt()
        await asyncio.gather(*(r.stop(drain_timeout) for r in self.replicas()), *self._retiring, return_exceptions=True)
        if self.store_checks is not None:
            await self.store_checks.close()

    def deployment(self, model: str) -> Deployment:
        """The deployment serving a model name: its own, or its base's for a LoRA adapter
        (NoCapacity with the reason for an adapter that failed its checks)."""
        try:
            return self.deployments[model]
        except KeyError:
            dep = self.adapters.get(model)
            if dep is None:
                raise ModelNotFound(model) from None
            if dep.lora is not None and model in dep.lora.refused:
                raise NoCapacity(dep.lora.refused[model], retry_after=30) from None
            return dep

    def find(self, model: str) -> Deployment | None:
        """The deployment serving a model name (a LoRA adapter's: its base's), or None."""
        return self.deployments.get(model) or self.adapters.get(model)

    def model_names(self) -> list[str]:
        """Every model name served here: the models', then their adapters'."""
        return [*self.deployments, *self.adapters]

    def _resolve_adapters(self) -> None:
        """Which LoRA adapters each base's replicas load (checked, store ones leased)."""
        for dep in self.deployments.values():
            if dep.model.adapters:
                dep.lora = lora.resolve(self.cfg, dep.model, lambda: Store.from_config(self.cfg))
                self.store_leases.update(dep.lora.leases)

    @property
    def ready(self) -> bool:
        """Ready to serve: no model that should be running lacks a READY replica
        (a model scaled to zero is ready: its next request starts it)."""
        return all(d.ready or not d.kept() for d in self.deployments.values()) and not self._stopping

    # --- replicas in and out ---------------------------------------------------------------

    def room_for(self, dep: Deployment, ignoring: frozenset[str] = frozenset()) -> int:
        """How many more replicas this model may get: max_replicas, and for CPU engines
        the core and host RAM budgets (less what the replicas named in ``ignoring`` hold:
        they are being evicted for this one). GPU engines ask the placer when they start."""
        room = dep.model.autoscaling.max_replicas - len(dep.kept())
        if room <= 0:
            return 0
        if on_cpu(dep.model):
            room = min(room, self.capacity.cpu_room(dep.model, ignoring))
        return max(room, 0)

    def cpu_budget(self) -> CpuBudget:
        """The CPU engines' cores and host RAM, and the replicas that hold them (status)."""
        return self.capacity.cpu_budget()

    def add_together(self, wanted: list[tuple[Deployment, int]], reason: str) -> None:
        """Start several replicas at once (boot, an operator's count, a scale-up by more than
        one) without evicting: the GPU ones are placed as one set (planning.plan packs them
        largest first), so a set that fits is never refused for the order it is listed in."""
        planned = self._place_together(wanted)
        for dep, count in wanted:
            for _ in range(count):
                if self.add_replica(dep, reason=reason, planned=planned) is None:
                    break

    def _place_together(self, wanted: list[tuple[Deployment, int]]) -> dict[str, PlanRow]:
        """Placements for the GPU replicas add_replica will create for ``wanted``, by name."""
        replicas = [
            (dep.model, f"{dep.model.name}#{i}")
            for dep, count in wanted
            if uses_gpus(dep.model) and not dep.blocked
            for i in next_indices({r.index for r in dep.replicas}, count)
        ]
        return self.capacity.place_together(replicas)

    def add_replica(
        self, dep: Deployment, reason: str, evict: str | None = None, planned: dict[str, PlanRow] | None = None
    ) -> Replica | None:
        """Start one more replica of dep if max_replicas, the core budget or the GPUs allow.
        evict (what asks: request, load, scale_up): make room by stopping idle replicas of
        other models (appliance/fleet/eviction.py) when there is none, or else say why in
        dep.no_room; without it (boot, a floor restored with no traffic) nothing is evicted.
        planned: placements made for a set of replicas together (add_together)."""
        if evict and not dep.blocked:
            self._forget_unplaced(dep)
        if self._stopping or dep.model.autoscaling.max_replicas <= len(dep.kept()):
            return None
        if dep.blocked and dep.kept():
            return None  # one FATAL replica says why; more would say it again
        victims: list[Replica] = []
        if evict and not dep.blocked:
            found = self._make_room(dep, evict)
            if found is None:
                return None
            victims = found
        ignoring = frozenset(v.name for v in victims)
        if self.room_for(dep, ignoring) <= 0:
            return None
        [index] = next_indices({r.index for r in dep.replicas}, 1)
        replica = Replica(
            cfg=self.cfg,
            model=dep.model,
            index=index,
            adapter=adapter_for(dep.model.server),
            runner=self.runner,
            session=self.session,
            log_dir=self.log_dir,
            clock=self.clock,
            port_allocator=self.port_allocator,
            listener=self._on_change,
        )
        if dep.lora is not None:
            replica.loras = dep.lora.loras
        if store_name(dep.model) and self.store_checks is not None:
            replica.preflight = lambda: self._store_preflight(dep)
        if dep.blocked:
            replica.cannot_start = dep.blocked  # e.g. quarantined in the store: FATAL with the reason
        elif uses_gpus(dep.model):
            row, uuids = self._place(replica, ignoring, None if victims else (planned or {}).get(replica.name))
            if row.assignment is None:
                if evict:  # at run time a lack of room is no fault of the replica's: say it, keep none
                    dep.no_room, dep.room_in = f"{CANNOT_PLACE}{row.error}", None
                    return None
                if not dep.live():
                    # Nothing else can serve it: say why, as a FATAL replica in status.
                    replica.cannot_start = f"{CANNOT_PLACE}{row.error}"
                    dep.replicas.append(replica)
                    replica.start()
                else:
                    log.warning("cannot add a replica of %s: %s", dep.model.name, row.error)
                return None
            replica.slot = GpuSlot(
                row.assignment.gpus, row.assignment.memory_fraction, uuids, row.assignment.bytes_per_gpu
            )
        elif on_cpu(dep.model):
            replica.cpus = self.capacity.cpu_set(dep.model, ignoring)
        if victims:
            replica.preflight = self._after_stopped(victims, replica.preflight)
        dep.loading_cause = "evict" if victims else "cold"
        dep.no_room, dep.room_in = None, None
        dep.replicas.append(replica)
        log.info("adding replica %s (%s)", replica.name, reason)
        replica.start()
        return replica

    def _place(
        self, replica: Replica, ignoring: frozenset[str] = frozenset(), planned: PlanRow | None = None
    ) -> tuple[PlanRow, tuple[str, ...]]:
        """Where the replica goes (the replicas in ``ignoring`` are being evicted for it; or
        where the set it starts with placed it), and the UUIDs of those GPUs."""
        if planned is not None:
            row, inventory = planned, self.probe.read()
        else:
            row, inventory = self.capacity.place(replica.model, replica.name, ignoring)
        self.placements = [p for p in self.placements if p.replica != replica.name] + [row]
        log.info("placement %s", row.describe())
        uuid = {g.index: g.uuid for g in inventory.gpus}
        uuids = tuple(uuid[i] for i in row.assignment.gpus) if row.assignment else ()
        return row, uuids

    # --- making room: demand-driven eviction ------------------------------------------------

    def _make_room(self, dep: Deployment, trigger: str, waking: Replica | None = None) -> list[Replica] | None:
        """Room for one more replica of dep (or for its sleeping replica ``waking`` on its
        own GPUs): [] when there is room already, the replicas stopped or put to sleep for
        it when idle replicas of other models had to go, or None (dep.no_room says who
        holds the room and why they stay)."""
        if waking is not None:
            scarce = self.capacity.scarce_for_wake(waking)
        else:
            scarce = self.capacity.scarce_for(dep.model, f"{dep.model.name}#new")
        if scarce is None:
            return []  # nothing to size it by: the placer will say why
        now = self.clock.monotonic()
        holders = [(r, self._holder(r, now, **holds)) for r, holds in scarce.holds]
        by_name = {r.name: r for r, _ in holders}
        decided = eviction.plan(dep.model.name, dep.model.priority, [h for _, h in holders], scarce.fits, now)
        if decided.never:
            if waking is not None:  # not even with every other replica gone: it starts afresh
                dep.no_room, dep.room_in = None, None
                return None
            return []  # too big whatever goes: the placer says what is missing
        if not decided.fits:
            why = f"no room: {decided.explain(scarce.what)}"
            # Once per change of who holds it and why, not once per look or per second it ages.
            if _DIGITS.sub("#", why) != _DIGITS.sub("#", dep.no_room or ""):
                log.warning("cannot start %s: %s", dep.model.name, why)
            dep.no_room, dep.room_in = why, decided.room_in
            return None
        victims = [by_name[h.replica] for h in decided.victims]
        ram_left = self.capacity.host_ram() - self.capacity.host_used()
        for h, victim in zip(decided.victims, victims, strict=True):
            # Cheapest first: a vLLM replica with sleep mode whose weights fit in host RAM
            # sleeps (its GPU memory freed, woken in seconds) instead of stopping.
            asleep = scarce.what == "GPU memory" and self._may_sleep(victim, ram_left)
            ram_left -= self.capacity.host_need(victim.model, sleeping=True) if asleep else 0
            self._evict(victim, h, dep, trigger, asleep)
        return victims

    def _holder(self, r: Replica, now: float, **holds) -> eviction.Holder:
        d = self.deployments[r.model.name]
        keep = (
            d.control.override
            if d.control.override is not None
            else (d.model.autoscaling.min_replicas if d.control.pinned else 0)
        )
        # A replica still starting is inside its residency window from now on.
        loaded_at = now if r.state in (State.STARTING, State.STOPPED) else r.ready_since
        return eviction.Holder(
            replica=r.name,
            model=r.model.name,
            priority=r.model.priority,
            last_used=d.rate.last_event,
            loaded_at=loaded_at,
            min_residency_s=min_residency_s(self.cfg, r.model),
            inflight=r.inflight,
            held=len(d.waiters),
            keep=keep,
            serving=r.state is State.READY and not r.retiring,
            **holds,
        )

    def _may_sleep(self, r: Replica, ram_left: int) -> bool:
        need = self.capacity.host_need(r.model, sleeping=True)
        return bool(r.model.sleep_mode and getattr(r.adapter, "can_sleep", False) and need and need <= ram_left)

    def _evict(self, victim: Replica, h: eviction.Holder, dep: Deployment, trigger: str, asleep: bool) -> None:
        """Stop (or put to sleep) one replica for dep; the preflight of dep's new replica
        waits for it (``_after_stopped``)."""
        if victim.retiring:
            return  # already on its way out (scaled down, unloaded): only waited for
        idle = self.clock.monotonic() - h.last_used
        why = f"idle {idle:.0f}s, least recently used" + (f", priority {h.priority}" if h.priority else "")
        to = "sleep" if asleep else "stop"
        log.info("evicting %s for %s (%s): %s%s", victim.name, dep.model.name, trigger, why, "; to sleep" * asleep)
        self.market.evicted(Eviction(victim.name, victim.model.name, to, dep.model.name, trigger, why, now()))
        if asleep:

            async def sleep() -> None:
                try:
                    await victim.sleep()
                except Exception as exc:  # its state says the rest (a crash restarts it)
                    log.warning("evicting %s to sleep failed: %s", victim.name, exc)

            self._freeing(victim, sleep(), f"evict-sleep-{victim.name}")
            return
        self.retire(victim, f"evicted for {dep.model.name} ({trigger}; {why})")
        owner = self.deployments[victim.model.name]
        if not owner.kept():
            owner.unloaded = True  # back on its next request, not by its min_replicas floor

    def _after_stopped(self, victims: list[Replica], then):
        """A preflight that waits for the evicted replicas' engines to have stopped or slept
        (their memory freed) before the engine starts, then runs ``then`` (the store check)."""
        drains = [self._drains[v.name] for v in victims if v.name in self._drains]

        async def preflight() -> str | None:
            pending = [t for t in drains if not t.done()]
            if pending:
                await asyncio.wait(pending)  # never cancels them, even if this start is
            return await then() if then is not None else None

        return preflight

    def _forget_unplaced(self, dep: Deployment) -> None:
        """A FATAL replica that only said the model could not be placed (at boot) holds
        nothing: a request that may evict tries again instead."""
        dep.replicas = [
            r
            for r in dep.replicas
            if not (r.state is State.FATAL and r.slot is None and (r.cannot_start or "").startswith(CANNOT_PLACE))
        ]

    async def _store_preflight(self, dep: Deployment) -> str | None:
        """Before a replica loads a store model (each start and restart): its files as
        verified, a changed one rehashed first (appliance/store/guard.py)."""
        if dep.blocked:
            return dep.blocked
        reason = await self.store_checks.check(store_name(dep.model))
        if self._stopping and not reason:
            # An interrupted check found nothing, which is no verdict: start nothing; the
            # replica's stop (Supervisor.stop stops every replica) ends this wait.
            await asyncio.Event().wait()
        return reason

    def block_store_model(self, name: str, reason: str) -> None:
        """Store model NAME failed a check (quarantined): block every model serving it,
        and refuse every LoRA adapter loaded from it."""
        for dep in self.deployments.values():
            if store_name(dep.model) == name:
                self.block(dep, reason)
            if dep.lora is not None:
                dep.lora.block_store(name, reason)

    def block(self, dep: Deployment, reason: str) -> None:
        """Stop serving a model (as admission does at boot): no replica of it starts again,
        the running ones drain and stop, held and new requests get 503 with the reason,
        and a FATAL replica in its place says why in `appliance status`. Until its store
        entry passes admission again (``recheck_blocked``)."""
        if dep.blocked or self._stopping:
            return
        dep.blocked = reason
        log.error("not serving %s: %s", dep.model.name, reason)
        had_replicas = bool(dep.kept())
        for r in dep.kept():
            self.retire(r, "not served any more: its store files failed verification")
        dep.fail_waiters(NoCapacity(dep._why_unavailable(), retry_after=30))
        if had_replicas:
            self.add_replica(dep, reason="blocked")

    async def recheck_blocked(self) -> list[str]:
        """Check the admission of every blocked store model again (the StoreChecks worker:
        a manifest read and a stat per file; a quarantined model is not rehashed: `models
        verify` decides). Those that pass are served again (``unblock_store_model``).
        Returns the store names lifted."""
        if self.store_checks is None or self._stopping:
            return []
        names = sorted({store_name(d.model) for d in self.deployments.values() if d.blocked and store_name(d.model)})
        lifted = []
        for name in names:
            reason = await self.store_checks.check(name)
            if self._stopping:
                break  # an interrupted check found nothing, which is no verdict
            if reason is None:
                self.unblock_store_model(name)
                lifted.append(name)
            else:  # still blocked, maybe for another reason now (verified, license not accepted)
                for dep in self.deployments.values():
                    if store_name(dep.model) == name and dep.blocked:
                        self._reword_block(dep, reason)
        return lifted

    @staticmethod
    def _reword_block(dep: Deployment, reason: str) -> None:
        """A blocked model's reason changed: the block and its FATAL replica say the new one."""
        dep.blocked = reason
        for r in dep.kept():
            if r.state is State.FATAL and r.cannot_start:
                r.cannot_start = r.last_error = reason

    def unblock_store_model(self, name: str) -> None:
        """Store model NAME passed admission again: serve every model blocked on it."""
        if name not in self.store_leases:
            try:
                store = Store.from_config(self.cfg)
                try:
                    self.store_leases[name] = store.lease(name)
                    store.touch(name)
                finally:
                    store.close()
            except Exception as exc:  # a lock or manifest we cannot write: serve it anyway
                log.warning("cannot lease store model %s: %s", name, exc)
        for dep in self.deployments.values():
            if store_name(dep.model) == name and dep.blocked:
                self.unblock(dep)
                log.info("store model %s verified again: serving %s", name, dep.model.name)

    def unblock(self, dep: Deployment) -> None:
        """Serve a blocked model again: its FATAL replica goes, and it gets its count back
        (the operator's, else min_replicas; none if unloaded: a request starts one)."""
        if not dep.blocked or self._stopping:
            return
        dep.blocked = None
        for r in dep.kept():
            if r.state is State.FATAL:
                self.retire(r, "its store model is served again")
        while len(dep.kept()) < dep.standing_count():
            if self.add_replica(dep, reason="its store model is served again") is None:
                break

    def retire(self, replica: Replica, reason: str) -> None:
        """Take a replica out of service: no new requests; in-flight ones finish
        (bounded by server.drain_timeout_s), then it stops and leaves the list."""
        dep = self.deployments[replica.model.name]

        async def drain() -> None:
            try:
                await replica.stop(self.cfg.server.drain_timeout_s)
            finally:
                with contextlib.suppress(ValueError):
                    dep.replicas.remove(replica)

        log.info("retiring replica %s (%s)", replica.name, reason)
        replica.retiring = True
        self._freeing(replica, drain(), f"retire-{replica.name}")

    def _freeing(self, replica: Replica, coro, name: str) -> None:
        """Run the task that frees replica's capacity (a drain and stop, or a sleep): awaited
        at shutdown, and by a replica that starts in its room (``_after_stopped``)."""
        task = asyncio.create_task(coro, name=name, context=contextvars.Context())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        self._drains[replica.name] = task
        task.add_done_callback(lambda t: self._drains.get(replica.name) is t and self._drains.pop(replica.name))

    def _victim(self, dep: Deployment) -> Replica | None:
        """The replica whose removal costs least: not serving first, then least busy, newest."""
        kept = dep.kept()
        if not kept:
            return None
        return min(kept, key=lambda r: (r.state is State.READY, r.inflight, -r.index))

    def _on_change(self, replica: Replica, event: Transition) -> None:
        dep = self.deployments.get(replica.model.name)
        if dep is not None and event.new is not State.READY:
            dep.prefix.forget(replica.name)  # its engine's cache is gone
        if event.new is State.READY:
            if replica.slot is not None:
                self._measure(replica)
            if dep is not None:
                if event.old is State.STARTING and replica.loading_since:
                    # the engine's own start: from its spawn, not from a wait for room before it
                    dep.last_cold_start_s = round(event.at - replica.loading_since, 3)
                dep.wake_waiters()
        elif event.new is State.FATAL and dep is not None and not dep.can_become_ready():
            dep.fail_waiters(NoCapacity(dep._why_unavailable(), retry_after=30))
        for fn in self._listeners:
            fn(replica, event)

    def _measure(self, replica: Replica) -> None:
        """NVML's per-process memory of a ready replica (its whole process tree:
        engines run workers per GPU) corrects the estimate for later placements."""
        inventory = self.probe.read()
        pids = descendants(replica.pid)
        per_gpu = [g.used_by(pids) for g in inventory.gpus if g.index in replica.slot.gpus]
        if per_gpu and max(per_gpu) > 0:
            self.measured.observe(replica.model.name, replica.slot.tp, max(per_gpu))
            log.info("replica %s uses %.1f GiB per GPU (NVML)", replica.name, max(per_gpu) / 1024**3)

    # --- demand, decisions, operator commands --------------------------------------------------

    def on_demand(self, dep: Deployment, trigger: str = "request") -> None:
        """A request is waiting and nothing is READY: start or wake a replica now,
        without waiting for the autoscaler's next tick, evicting idle replicas of other
        models for it if there is no room."""
        dep.unloaded = False
        live = dep.live()
        if any(r.state in (State.STARTING, State.BACKOFF) for r in live):
            return
        sleeping = [r for r in live if r.state is State.SLEEPING]
        if any(r.name in self._waking for r in sleeping):
            return  # a wake is on its way
        if sleeping:
            # A wake is cheaper than any cold start: on its own GPUs, evicting for it if
            # another model took its memory meanwhile.
            victims = self._make_room(dep, trigger, waking=sleeping[0])
            if victims is not None:
                dep.loading_cause = "evict" if victims else "wake"
                dep.no_room, dep.room_in = None, None
                self._waking.add(sleeping[0].name)
                self._background(self._wake(sleeping[0], victims), f"wake-{sleeping[0].name}")
                return
            if dep.no_room and dep.room_in is not None and dep.room_in < self.cfg.queue.timeout_s:
                return  # its GPUs free up once a request ends or a residency lapses: wait to wake
            for r in sleeping:  # its GPUs are held by replicas that stay: start afresh elsewhere
                self.retire(r, "asleep, and its GPU memory is held by another model: started again instead")
        if not live or sleeping:
            why = "a request arrived for a model at zero" if trigger == "request" else "operator load"
            self.add_replica(dep, reason=why, evict=trigger)

    async def _wake(self, r: Replica, victims: list[Replica]) -> None:
        """Wake a sleeping replica once the replicas evicted for it have freed its GPUs."""
        try:
            await self._after_stopped(victims, None)()
            await r.wake()
        finally:
            self._waking.discard(r.name)

    def tick(self) -> list[Decision]:
        """One autoscaler pass over every model; carry out what it decides."""
        now = self.clock.monotonic()
        decisions = []
        for dep in self.deployments.values():
            if dep.blocked:
                continue  # nothing of it may start until the block lifts (unblock restores its count)
            room = self.room_for(dep)
            if not room and self._busy(dep) and len(dep.kept()) < dep.model.autoscaling.max_replicas:
                room = 1  # in use: a scale-up may evict idle replicas of other models for one more
            decision = self.autoscaler.decide(dep.model.name, dep.inputs(now, room), dep.policy(self.cfg))
            self._apply(dep, decision)
            decisions.append(decision)
        return decisions

    def _apply(self, dep: Deployment, d: Decision) -> None:
        if self._stopping:
            return
        if d.action == "up":
            # Requests held for a model at zero are what asks for its first replica, whoever
            # (this tick or the held requests' own look for room) gets there first.
            trigger = "request" if dep.waiters and not dep.live() else "scale_up"
            for _ in range(d.desired - d.current):
                if self.add_replica(dep, reason=d.reason, evict=trigger if self._busy(dep) else None) is None:
                    break
        elif d.action == "down":
            victim = self._victim(dep)
            if victim is not None:
                self.retire(victim, d.reason)
        elif d.action == "sleep":
            for r in dep.replicas:
                if r.state is State.READY and self.capacity.may_sleep(r):  # its weights fit in host RAM
                    self._background(r.sleep(), f"sleep-{r.name}")
        elif d.action == "wake":
            self.on_demand(dep)

    @staticmethod
    def _busy(dep: Deployment) -> bool:
        """Requests in flight or held: a scale-up is demand (one to restore a floor is not)."""
        return bool(dep.waiters) or dep.inflight > 0

    def _background(self, coro, name: str) -> None:
        async def run() -> None:
            try:
                await coro
            except Exception as exc:  # logged, the replica's state tells the rest
                log.warning("%s failed: %s", name, exc)

        task = asyncio.create_task(run(), name=name, context=contextvars.Context())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    def scale(self, model: str, replicas: int | None) -> str:
        """The operator's count for a model (None: back to autoscaling); persisted. Returns
        what the daemon does, and why, in words (logged, and the action's answer)."""
        dep = self.deployment(model)
        asked, ceiling = replicas, dep.model.autoscaling.max_replicas
        if replicas is not None:
            replicas = max(0, min(replicas, ceiling))
        self._set_control(dep, override=replicas)
        if replicas is None:
            return self._said(model, "scale auto", "the autoscaler decides its replicas again")
        while len(dep.kept()) > replicas:
            self.retire(self._victim(dep), f"operator scaled to {replicas}")
        self.add_together([(dep, replicas - len(dep.kept()))], reason=f"operator scaled to {replicas}")
        said = f"clamped to {replicas} because max_replicas = {ceiling}; " if asked != replicas else ""
        have = len(dep.kept())
        if have < replicas:
            said += f"{have} of {replicas} replicas placed: {dep._why_unavailable()}"
        else:
            said += f"{replicas} replica{'s' if replicas != 1 else ''}, kept across restarts"
        return self._said(model, f"scale {asked}", said)

    @staticmethod
    def _said(model: str, action: str, what: str) -> str:
        """An operator action's outcome: logged at INFO (a refusal too, with its reason)."""
        log.info("operator %s %s: %s", action, model, what)
        return what

    def load(self, model: str) -> str:
        """Pre-warm: as if a request had arrived (evicting for it if it must); NoCapacity,
        saying why, when no replica can start now (a load, unlike a request, is not held
        for room that replicas of other models hold for now: Retry-After says when)."""
        dep = self.deployment(model)
        dep.rate.last_event = self.clock.monotonic()
        dep.unloaded = False
        if dep.ready:
            return self._said(model, "load", "already ready")
        self.on_demand(dep, trigger="load")
        if dep.no_room or not dep.can_become_ready():
            later = math.ceil(dep.room_in) if dep.no_room and dep.room_in is not None else None
            why = dep._why_unavailable()
            self._said(model, "load", f"refused: {why}")
            raise NoCapacity(why, retry_after=max(1, later or dep._retry_after()))
        return self._said(model, "load", "starting a replica; requests are held until it is ready")

    def unload(self, model: str) -> str:
        """Down to zero now (drained); the next request starts it again."""
        dep = self.deployment(model)
        if dep.control.override:
            self._set_control(dep, override=None)
        # Forget the recent rate: the traffic before the unload must not bring the
        # model straight back; its next request will.
        dep.rate = RateWindow(60, clock=self.clock.monotonic)
        dep.rate.last_event = self.clock.monotonic()
        dep.unloaded = True
        kept = dep.kept()
        for r in kept:
            self.retire(r, "operator unloaded the model")
        what = f"stopping {len(kept)} replica{'s' if len(kept) != 1 else ''}, each once its requests finish"
        return self._said(model, "unload", f"{what}; the next request starts one" if kept else "no replica to stop")

    def pin(self, model: str, pinned: bool) -> str:
        dep = self.deployment(model)
        self._set_control(dep, pinned=pinned)
        floor = dep.model.autoscaling.min_replicas
        if not pinned:
            return self._said(model, "unpin", "idle replicas may be unloaded again (autoscaling.idle_ttl)")
        if len(dep.kept()) < floor:
            for _ in range(floor - len(dep.kept())):
                self.add_replica(dep, reason="pinned at min_replicas")
        said = f"kept at min_replicas = {floor} however idle, across restarts"
        if len(dep.kept()) < floor:
            said += f"; {len(dep.kept())} placed now: {dep._why_unavailable()}"
        return self._said(model, "pin", said)

    def _set_control(self, dep: Deployment, **change) -> None:
        current = {"override": dep.control.override, "pinned": dep.control.pinned, **change}
        # Saved first: a write the state disk refuses (StateWriteFailed) changes nothing.
        if self.state is not None:
            if "override" in change:
                self.state.set_override(dep.model.name, change["override"])
            if "pinned" in change:
                self.state.set_pinned(dep.model.name, change["pinned"])
        dep.control = ModelControl(**current)

    def replica(self, model: str, index: int) -> Replica:
        dep = self.deployment(model)
        for r in dep.replicas:
            if r.index == index:
                return r
        raise ModelNotFound(f"{model}#{index}")

    # --- status -------------------------------------------------------------------------------

    def status(self) -> list[ModelStatus]:
        """Every deployment as the admin API shows it (appliance/status.py)."""
        now = self.clock.monotonic()
        wall = time.time()
        return [
            ModelStatus(
                name=d.model.name,
                server=d.model.server,
                source=d.model.source or d.model.url or None,
                ready=d.ready,
                pinned=d.control.pinned,
                override=d.control.override,
                rps_10s=round(d.rate.rate(10), 3),
                rps_60s=round(d.rate.rate(60), 3),
                inflight=d.inflight,
                queued=len(d.waiters),
                idle_s=round(now - d.rate.last_event, 1),
                idle_ttl_s=idle_ttl_s(self.cfg, d.model),
                last_cold_start_s=d.last_cold_start_s,
                min_replicas=d.model.autoscaling.min_replicas,
                max_replicas=d.model.autoscaling.max_replicas,
                blocked=d.blocked,
                replicas=[r.snapshot() for r in d.replicas],
                decisions=[_decision(x, now, wall) for x in self.autoscaler.recent(d.model.name, 5)],
                prefix_routing=dict(d.prefix.outcomes),
                adapters={a.name: d.lora.refused.get(a.name, "") for a in d.model.adapters} if d.lora else {},
            )
            for d in self.deployments.values()
        ]

    def gpu_holdings(self, inventory: Inventory) -> dict[int, list[PlacedReplica]]:
        """Per GPU index, what each replica placed on it holds: reserved by the placer, and
        used as NVML measures it once its engine runs (its whole process tree)."""
        on_gpu: dict[int, list[PlacedReplica]] = {}
        by_index = {g.index: g for g in inventory.gpus}
        for r in self.replicas():
            if r.slot is None:
                continue
            pids = descendants(r.pid) if r.pid else set()
            for i in r.slot.gpus:
                gpu = by_index.get(i)
                on_gpu.setdefault(i, []).append(
                    PlacedReplica(
                        replica=r.name,
                        state=r.state.value,
                        memory_fraction=r.slot.memory_fraction,
                        reserved_bytes=r.slot.bytes_per_gpu or None,
                        used_bytes=(gpu.used_by(pids) or None) if gpu is not None and pids else None,
                    )
                )
        return on_gpu


def _decision(d: Decision, now: float, wall: float) -> DecisionStatus:
    """An autoscaler decision with its monotonic time as a wall-clock timestamp."""
    inputs = {k: v for k, v in d.inputs.items() if k != "now"}
    return DecisionStatus(
        model=d.model,
        at=at_wall_clock(d.at, now, wall),
        current=d.current,
        desired=d.desired,
        action=d.action,
        reason=d.reason,
        inputs=inputs,
    )
