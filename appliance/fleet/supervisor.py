"""The supervisor: every model deployment's replicas, how many there are, and
which one takes a request.

A request for a model with no ready replica does not fail: ``Deployment.acquire``
(appliance/fleet/deployment.py) asks the supervisor to start one (or wake a sleeping
one, ``on_demand``) and holds the request in the model's bounded FIFO queue
(appliance/fleet/hold.py) until a replica is READY. The autoscaler's decisions
(``tick``) and the operator's commands (``scale``, ``load``, ``unload``, ``pin``:
appliance/fleet/operator.py) change the count; a replica taken out of service is
drained before it stops.

Its parts, each called through the supervisor's methods: what demand does (on_demand,
tick: appliance/fleet/demand.py), store models blocked and served again (blocking.py),
what it reports (status, gpu_holdings: report.py), a config reload's changes (rollout.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import Callable
from pathlib import Path

import aiohttp

from appliance.config import Config, ModelConfig, uses_gpus
from appliance.errors import ModelNotFound, NoCapacity
from appliance.fleet import blocking, demand, lora, operator, report, rollout
from appliance.fleet.autoscaler import Autoscaler, Decision
from appliance.fleet.capacity import Capacity, next_indices, on_cpu
from appliance.fleet.deployment import Deployment
from appliance.fleet.fairness import Fairness
from appliance.fleet.landlock import engine_keep_out, engine_read_only
from appliance.fleet.market import Market
from appliance.fleet.process import ProcessRunner, SubprocessRunner, descendants
from appliance.fleet.replica import Replica
from appliance.fleet.replica_state import Clock, Listener, RealClock, State, Transition, free_port
from appliance.fleet.room import CANNOT_PLACE, Room
from appliance.gpu.memory import MeasuredMemory
from appliance.gpu.planning import PlanRow
from appliance.gpu.probe import GpuProbe, Inventory, NvmlProbe, SimulatedProbe
from appliance.state.decisions import StateStore
from appliance.status import CpuBudget, ModelStatus, PlacedReplica
from appliance.store.guard import StoreChecks, admit_store_models, store_name
from appliance.store.store import Store
from engines import GpuSlot, adapter_for

log = logging.getLogger("appliance.supervisor")

# A replica entering these states frees its room (a backing-off one serves nothing: it goes
# first), so requests held for room look again; READY frees nothing (the requests it
# releases free its model's replicas for eviction only once they end: ``on_idle``).
ROOM_FREED = (State.STOPPED, State.SLEEPING, State.BACKOFF, State.FATAL)


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
        self.runner = runner or SubprocessRunner(
            cfg.supervisor.log_max_bytes, keep_out=lambda: engine_keep_out(cfg), read_only=lambda: engine_read_only(cfg)
        )
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
        # Where replicas go, what is evicted for them, and the look for room held requests wait on.
        self.room = Room(self)
        # Evictions (what, for whom, why) and how long requests waited for a load.
        self.market = Market()
        self.fairness = Fairness(self)  # models held for room too long take busy replicas' room
        self._stopping = False
        self.deployments: dict[str, Deployment] = {m.name: Deployment(m, self) for m in cfg.models}
        # Models a config reload removed whose replicas still drain (remove_deployment).
        self.leaving: list[Deployment] = []
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
        return [r for d in [*self.deployments.values(), *self.leaving] for r in d.replicas]

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
                {name for d in self.deployments.values() if (name := store_name(d.model)) and not d.blocked}
            ):
                self._background(self.store_checks.check(name), f"store-check-{name}")
        self.add_together([(dep, dep.standing_count()) for dep in self.deployments.values()], reason="boot")

    async def stop(self, drain_timeout: float = 0.0) -> None:
        self._stopping = True
        self.room.close()
        self.fairness.close()
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
            self.serve_adapters(dep)

    def serve_adapters(self, dep: Deployment) -> None:
        """The model's adapters as its config says now (at boot, and when a reload adds or
        rolls it): checked, store ones leased, each name served by this deployment."""
        for name in [n for n, d in self.adapters.items() if d is dep]:
            del self.adapters[name]
        before = dep.lora.leases if dep.lora is not None else {}
        dep.lora = None
        if dep.model.adapters:
            try:
                dep.lora = lora.resolve(self.cfg, dep.model, lambda: Store.from_config(self.cfg))
            except Exception as exc:  # e.g. the store's database unreadable: refused, the base serves
                log.exception("the LoRA adapters of %s could not be checked", dep.model.name)
                why = f"adapters of model '{dep.model.name}' could not be checked: {exc}"
                dep.lora = lora.LoraServing.of(dep.model, (), {a.name: why for a in dep.model.adapters})
            self.store_leases.update(dep.lora.leases)
            self.adapters.update({a.name: dep for a in dep.model.adapters})
        for name, lease in before.items():  # the previous set's leases (a reload): released
            if self.store_leases.get(name) is lease:
                del self.store_leases[name]
            lease.close()

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
        planned = self.room.place_together(wanted)
        for dep, count in wanted:
            for _ in range(count):
                if self.add_replica(dep, reason=reason, planned=planned) is None:
                    break

    def add_replica(
        self,
        dep: Deployment,
        reason: str,
        evict: str | None = None,
        planned: dict[str, PlanRow] | None = None,
        freed_by: list[Replica] | None = None,
    ) -> Replica | None:
        """Start one more replica of dep if max_replicas, the core budget or the GPUs allow.
        evict (what asks: request, load, scale_up): make room by stopping idle replicas of
        other models (appliance/fleet/eviction.py) when there is none, or else say why in
        dep.no_room; without it (boot, a floor restored with no traffic) nothing is evicted.
        planned: placements made for a set of replicas together (add_together,
        Room._start_together); freed_by: the replicas evicted for that set, waited for."""
        if evict and not dep.blocked:
            self.room.forget_unplaced(dep)
        if self._stopping or dep.model.autoscaling.max_replicas <= len(dep.kept()):
            return None
        if dep.blocked and dep.kept():
            return None  # one FATAL replica says why; more would say it again
        victims: list[Replica] = list(freed_by or [])
        if evict and not dep.blocked:
            found = self.room.make_room(dep, evict)
            if found is None:
                return None
            victims = found
        ignoring = frozenset(v.name for v in victims)
        if self.room_for(dep, ignoring) <= 0:
            if not evict and on_cpu(dep.model) and len(dep.kept()) < dep.model.autoscaling.max_replicas:
                self.room.wait_for_room(dep, self.capacity.cpu_lack(dep.model))
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
        replica.on_idle = self.room.may_have_come
        if dep.lora is not None:
            replica.loras = dep.lora.loras
        if store_name(dep.model) and self.store_checks is not None:
            replica.preflight = lambda: blocking.store_preflight(self, dep)
        if dep.blocked:
            replica.cannot_start = dep.blocked  # e.g. quarantined in the store: FATAL with the reason
        elif uses_gpus(dep.model):
            row, uuids = self.room.place(replica, ignoring, (planned or {}).get(replica.name))
            if row.assignment is None:
                if evict:  # at run time a lack of room is no fault of the replica's: say it, keep none
                    dep.no_room, dep.room_in = f"{CANNOT_PLACE}{row.error}", None
                    return None
                if not dep.live() and not self.capacity.fits_once_others_go(dep.model, replica.name):
                    # Too big for this box whatever else goes: say why, as a FATAL replica in status.
                    replica.cannot_start = f"{CANNOT_PLACE}{row.error}"
                    dep.replicas.append(replica)
                    replica.start()
                else:  # room that other models hold: no fault of its own; it waits for it
                    self.room.wait_for_room(dep, row.error)
                return None
            replica.slot = GpuSlot(
                row.assignment.gpus, row.assignment.memory_fraction, uuids, row.assignment.bytes_per_gpu
            )
        elif on_cpu(dep.model):
            replica.cpus = self.capacity.cpu_set(dep.model, ignoring)
        if victims and not self.capacity.may_start_beside(dep.model, victims):
            replica.preflight = self.room.after_stopped(victims, replica.preflight)
        dep.loading_cause = "evict" if victims else "cold"
        dep.no_room, dep.room_in = None, None
        dep.replicas.append(replica)
        log.info("adding replica %s (%s)", replica.name, reason)
        replica.start()
        return replica

    # --- store models: checked before each start, blocked and served again -------------------
    # (appliance/fleet/blocking.py)

    def block_store_model(self, name: str, reason: str) -> None:
        blocking.block_store_model(self, name, reason)

    async def recheck_blocked(self) -> list[str]:
        return await blocking.recheck_blocked(self)

    # --- replicas out of service, and what their state changes set off -----------------------

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
        replica.stop_now_if_idle()  # nothing to drain: its engine is told now, not a loop turn later
        self._freeing(replica, drain(), f"retire-{replica.name}")

    def _freeing(self, replica: Replica, coro, name: str) -> None:
        """Run the task that frees replica's capacity (a drain and stop, or a sleep): awaited
        at shutdown, and by a replica that starts in its room (``Room.after_stopped``)."""
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
            replica.evicted = False  # asleep (or gone): what it does next is its model's again
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
        elif event.new is State.SLEEPING and dep is not None and dep.waiters:
            self.on_demand(dep)  # requests came while it went to sleep (evicted): wake it again
        if event.new in ROOM_FREED:
            self.room.may_have_come()
        for fn in self._listeners:
            fn(replica, event)

    def _measure(self, replica: Replica) -> None:
        """NVML's per-process memory of a ready replica (its whole process tree:
        engines run workers per GPU) corrects the estimate for later placements."""
        slot = replica.slot
        assert slot is not None, "_on_change measures only a placed replica"
        inventory = self.probe.read()
        pids = descendants(replica.pid)
        per_gpu = [g.used_by(pids) for g in inventory.gpus if g.index in slot.gpus]
        if per_gpu and max(per_gpu) > 0:
            self.measured.observe(replica.model.name, slot.tp, max(per_gpu))
            log.info("replica %s uses %.1f GiB per GPU (NVML)", replica.name, max(per_gpu) / 1024**3)

    # --- demand, decisions, operator commands --------------------------------------------------
    # (appliance/fleet/demand.py)

    def on_demand(self, dep: Deployment, trigger: str = "request") -> None:
        demand.on_demand(self, dep, trigger)

    async def _wake(self, r: Replica, victims: list[Replica]) -> None:
        """Wake a sleeping replica once the replicas evicted for it have freed its GPUs."""
        try:
            await self.room.after_stopped(victims, None)()
            await r.wake()
        finally:
            r.waking = False

    def tick(self) -> list[Decision]:
        return demand.tick(self)

    def _background(self, coro, name: str) -> None:
        async def run() -> None:
            try:
                await coro
            except Exception as exc:  # logged, the replica's state tells the rest
                log.warning("%s failed: %s", name, exc)

        task = asyncio.create_task(run(), name=name, context=contextvars.Context())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    # The operator's commands (appliance/fleet/operator.py).

    def scale(self, model: str, replicas: int | None) -> str:
        return operator.scale(self, model, replicas)

    def load(self, model: str) -> str:
        return operator.load(self, model)

    def unload(self, model: str) -> str:
        return operator.unload(self, model)

    def pin(self, model: str, pinned: bool) -> str:
        return operator.pin(self, model, pinned)

    def restart_replica(self, replica: Replica) -> str:
        return operator.restart_replica(self, replica)

    def drain_replica(self, replica: Replica) -> str:
        return operator.drain_replica(self, replica)

    def replica(self, model: str, index: int) -> Replica:
        dep = self.deployment(model)
        for r in dep.replicas:
            if r.index == index:
                return r
        raise ModelNotFound(f"{model}#{index}")

    # --- status (appliance/fleet/report.py) ----------------------------------------------------

    def status(self) -> list[ModelStatus]:
        return report.status(self)

    def gpu_holdings(self, inventory: Inventory) -> dict[int, list[PlacedReplica]]:
        return report.gpu_holdings(self, inventory)

    def capacity_changed(self) -> None:
        """A reload changed [capacity]: requests held for room look again (Room.capacity_changed)."""
        self.room.capacity_changed()

    # --- config reload: deployments added, removed, rolled (appliance/fleet/rollout.py) ---------

    def add_deployment(self, model: ModelConfig) -> Deployment:
        return rollout.add_deployment(self, model)

    def remove_deployment(self, name: str) -> None:
        rollout.remove_deployment(self, name)

    async def roll(self, name: str, model: ModelConfig) -> str:
        return await rollout.roll(self, name, model)
