"""Making room for replicas (issue 17): where a new replica goes (the placer, one replica
or a set at once), what is evicted for it when there is no room (appliance/fleet/eviction.py
decides who may go; here it is carried out: stopped, or put to sleep in host RAM), and the
look for room that requests held for it wait on, taken again whenever room may have come (a
replica left, a request ended, a residency lapsed, a reload changed [capacity]).

The supervisor owns one (``Supervisor.room``) and keeps the replicas' lifecycles; the budgets
are capacity.py's, the record of what was evicted market.py's."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from typing import TYPE_CHECKING

from appliance.config import min_residency_s, uses_gpus
from appliance.errors import NoCapacity
from appliance.fleet import eviction
from appliance.fleet.capacity import Scarce, next_indices
from appliance.fleet.deployment import Deployment
from appliance.fleet.fairness import FAIRNESS
from appliance.fleet.market import Eviction, now
from appliance.fleet.replica import Replica
from appliance.fleet.replica_state import State
from appliance.gpu.planning import PlanRow

if TYPE_CHECKING:
    from appliance.fleet.supervisor import Supervisor

log = logging.getLogger("appliance.supervisor")

CANNOT_PLACE = "cannot place on GPUs: "
WAITING_FOR_ROOM = "waiting for room held by other models: "
_DIGITS = re.compile(r"\d+")


class Room:
    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self._look: asyncio.Handle | None = None  # a look for room, due (``may_have_come``)
        # Models whose requests just arrived to find no READY replica, and the look for room
        # that starts theirs once every request arriving with them is held (``want_replica``).
        self._wanting: dict[str, Deployment] = {}
        self._wanted: asyncio.Future | None = None
        self._timers: dict[str, asyncio.TimerHandle] = {}  # model -> its residency lapse

    def close(self) -> None:
        """The daemon stops: no look for room is due any more."""
        for timer in [self._look, *self._timers.values()]:
            if timer is not None:
                timer.cancel()

    def place_together(self, wanted: list[tuple[Deployment, int]]) -> dict[str, PlanRow]:
        """Placements for the GPU replicas add_replica will create for ``wanted``, by name."""
        replicas = [
            (dep.model, f"{dep.model.name}#{i}")
            for dep, count in wanted
            if uses_gpus(dep.model) and not dep.blocked
            for i in next_indices({r.index for r in dep.replicas}, count)
        ]
        return self.sup.capacity.place_together(replicas)

    def wait_for_room(self, dep: Deployment, error: str | None) -> None:
        """No room for a replica that nothing asked to evict for (boot, a floor): status shows
        the model waiting for room (``no_room``), each autoscaler pass tries again, and a
        request for it may evict idle replicas of other models."""
        why = f"{WAITING_FOR_ROOM}{error}"
        if _DIGITS.sub("#", why) != _DIGITS.sub("#", dep.no_room or ""):
            log.info("%s: %s", dep.model.name, why)
        dep.no_room, dep.room_in = why, None

    def place(
        self, replica: Replica, ignoring: frozenset[str] = frozenset(), planned: PlanRow | None = None
    ) -> tuple[PlanRow, tuple[str, ...]]:
        """Where the replica goes (the replicas in ``ignoring`` are being evicted for it; or
        where the set it starts with placed it), and the UUIDs of those GPUs."""
        if planned is not None:
            row, inventory = planned, self.sup.probe.read()
        else:
            row, inventory = self.sup.capacity.place(replica.model, replica.name, ignoring)
        last = next((p for p in self.sup.placements if p.replica == replica.name), None)
        self.sup.placements = [p for p in self.sup.placements if p.replica != replica.name] + [row]
        # A model waiting for room is placed again at each autoscaler pass: its refusal is said once.
        said = bool(row.error and last and last.error and _DIGITS.sub("#", last.error) == _DIGITS.sub("#", row.error))
        log.log(logging.DEBUG if said else logging.INFO, "placement %s", row.describe())
        uuid = {g.index: g.uuid for g in inventory.gpus}
        uuids = tuple(uuid[i] for i in row.assignment.gpus) if row.assignment else ()
        return row, uuids

    def make_room(self, dep: Deployment, trigger: str, waking: Replica | None = None) -> list[Replica] | None:
        """Room for one more replica of dep (or for its sleeping replica ``waking`` on its
        own GPUs): [] when there is room already, the replicas stopped or put to sleep for
        it when idle replicas of other models had to go, or None (dep.no_room says who
        holds the room and why they stay)."""
        scarce: Scarce | None
        if waking is not None:
            scarce = self.sup.capacity.scarce_for_wake(waking)
        else:
            scarce = self.sup.capacity.scarce_for(dep.model, f"{dep.model.name}#new")
        if scarce is None:
            return []  # nothing to size it by: the placer will say why
        now = self.sup.clock.monotonic()
        holders = [(r, self.holder(r, now, **holds)) for r, holds in scarce.holds]
        by_name = {r.name: r for r, _ in holders}
        decided = eviction.plan(
            dep.model.name, dep.model.priority, [h for _, h in holders], scarce.fits, now, preempt=trigger == FAIRNESS
        )
        if decided.never:
            if waking is not None:  # not even with every other replica gone: it starts afresh
                dep.no_room, dep.room_in = None, None
                return None
            return []  # too big whatever goes: the placer says what is missing
        if not decided.fits:
            why = f"no room: {decided.explain(scarce.what)}"
            # Once per change of who holds it and why, not once per look or per second it ages.
            if _DIGITS.sub("#", why) != _DIGITS.sub("#", dep.no_room or ""):
                log.info("cannot start %s: %s", dep.model.name, why)
            dep.no_room, dep.room_in = why, decided.room_in
            if decided.room_in:  # a residency lapses then: look again at that moment
                self._look_for_room_in(dep, decided.room_in)
            return None
        return self.evict_all(decided, by_name, scarce.what == "GPU memory", dep.model.name, trigger)

    def evict_all(
        self, decided: eviction.Plan, by_name: dict[str, Replica], gpu: bool, for_model: str, trigger: str
    ) -> list[Replica]:
        """Carry out an eviction plan; the replicas evicted."""
        victims = [by_name[h.replica] for h in decided.victims]
        ram_left = self.sup.capacity.host_ram() - self.sup.capacity.host_used()
        for h, victim in zip(decided.victims, victims, strict=True):
            if h.leaving:
                continue  # already on its way out: only waited for
            # Cheapest first: a vLLM replica with sleep mode whose weights fit in host RAM
            # sleeps (its GPU memory freed, woken in seconds) instead of stopping.
            asleep = gpu and self.may_sleep(victim, ram_left)
            ram_left -= self.sup.capacity.host_need(victim.model, sleeping=True) if asleep else 0
            self.evict(victim, h, for_model, trigger, asleep)
        return victims

    def holder(self, r: Replica, now: float, **holds) -> eviction.Holder:
        d = self.sup.deployments[r.model.name]
        keep = (
            d.control.override
            if d.control.override is not None
            else (d.model.autoscaling.min_replicas if d.control.pinned else 0)
        )
        # A replica still starting (or waking) is inside its residency window from now on.
        loaded_at = now if r.state in (State.STARTING, State.STOPPED) or r.waking else r.ready_since
        return eviction.Holder(
            replica=r.name,
            model=r.model.name,
            priority=r.model.priority,
            last_used=d.rate.last_event,
            loaded_at=loaded_at,
            min_residency_s=min_residency_s(self.sup.cfg, r.model),
            inflight=r.inflight,
            held=len(d.waiters),  # (one released for a READY replica, until it has taken it)
            keep=keep,
            serving=r.state is State.READY and not r.retiring,
            leaving=r.retiring or r.evicted,
            **holds,
        )

    def may_sleep(self, r: Replica, ram_left: int) -> bool:
        need = self.sup.capacity.host_need(r.model, sleeping=True)
        return bool(r.model.sleep_mode and getattr(r.adapter, "can_sleep", False) and need and need <= ram_left)

    def evict(self, victim: Replica, h: eviction.Holder, for_model: str, trigger: str, asleep: bool) -> None:
        """Stop (or put to sleep) one replica for for_model (a model, or several placed as one
        set: "a+b"); the preflight of the new replica waits for it (``after_stopped``)."""
        if victim.retiring:
            return  # already on its way out (scaled down, unloaded): only waited for
        idle = self.sup.clock.monotonic() - h.last_used
        why = f"idle {idle:.0f}s, least recently used" + (f", priority {h.priority}" if h.priority else "")
        why = self.sup.fairness.why(h, for_model) if trigger == FAIRNESS else why
        to = "sleep" if asleep else "stop"
        log.info("evicting %s for %s (%s): %s%s", victim.name, for_model, trigger, why, "; to sleep" * asleep)
        self.sup.market.evicted(Eviction(victim.name, victim.model.name, to, for_model, trigger, why, now()))
        if asleep:
            victim.evicted = True  # no new request delays the sleep that frees the memory

            async def sleep() -> None:
                try:
                    await victim.sleep()
                except Exception as exc:  # its state says the rest (a crash restarts it)
                    log.warning("evicting %s to sleep failed: %s", victim.name, exc)
                finally:
                    victim.evicted = False  # (still READY if it did not sleep: it serves again)

            self.sup._freeing(victim, sleep(), f"evict-sleep-{victim.name}")
            return
        self.sup.retire(victim, f"evicted for {for_model} ({trigger}; {why})")
        owner = self.sup.deployments[victim.model.name]
        if not owner.kept():
            owner.unloaded = True  # back on its next request, not by its min_replicas floor

    def after_stopped(self, victims: list[Replica], then):
        """A preflight that waits for the evicted replicas' engines to have stopped or slept
        (their memory freed) before the engine starts, then runs ``then`` (the store check)."""
        drains = [self.sup._drains[v.name] for v in victims if v.name in self.sup._drains]

        async def preflight() -> str | None:
            pending = [t for t in drains if not t.done()]
            if pending:
                await asyncio.wait(pending)  # never cancels them, even if this start is
            return await then() if then is not None else None

        return preflight

    def forget_unplaced(self, dep: Deployment) -> None:
        """A FATAL replica that only said the model could not be placed (at boot) holds
        nothing: a request that may evict tries again instead."""
        dep.replicas = [
            r
            for r in dep.replicas
            if not (r.state is State.FATAL and r.slot is None and (r.cannot_start or "").startswith(CANNOT_PLACE))
        ]

    def may_have_come(self) -> None:
        """A replica changed state or finished its last request, or a residency lapsed: models
        whose held requests wait for room (dep.no_room) look for it again, once, soon (after
        the requests a READY replica just released have taken it)."""
        if self._look is None and any(d.no_room and d.waiters for d in self.sup.deployments.values()):
            with contextlib.suppress(RuntimeError):  # no loop running: nobody is held
                self._look = asyncio.get_running_loop().call_soon(self.look_for_room)

    def capacity_changed(self) -> None:
        """A reload changed [capacity]: requests held for room look again under the new
        settings (a shorter max_wait_before_preempt_s may have passed already)."""
        self.sup.fairness.close()  # (a look due under the old bound)
        self.may_have_come()

    def want_replica(self, dep: Deployment) -> asyncio.Future:
        """A request for dep found no READY replica: start or wake one for it once the requests
        that arrived with it (this turn of the event loop) have asked too, so that several
        models at zero asked for at once are placed as one set. Done when that look has run."""
        self._wanting[dep.model.name] = dep
        if self._wanted is None:
            loop = asyncio.get_running_loop()
            self._wanted = loop.create_future()
            loop.call_soon(self._start_wanted)
        return self._wanted

    def _start_wanted(self) -> None:
        done, self._wanted = self._wanted, None
        wanting, self._wanting = list(self._wanting.values()), {}
        try:
            self.look_for_room(wanting)
        finally:
            if done is not None and not done.done():
                done.set_result(None)

    def look_for_room(self, wanting: list[Deployment] | None = None) -> None:
        """Models whose held requests wait for room (and those in ``wanting``, just asked
        for) start what they can now: as one set where several wait (``_start_together``),
        else each on its own (``on_demand``)."""
        if self._look is not None:
            self._look.cancel()
        self._look = None
        if self.sup._stopping:
            return
        wanting = wanting or []
        waiting = wanting + [d for d in self.sup.deployments.values() if d.no_room and d.waiters and d not in wanting]
        # Room that comes goes to the longest wait first, not the model listed first: with many
        # models on little room, the last listed waited out every other's turn.
        now = self.sup.clock.monotonic()
        waiting.sort(key=lambda d: d.held.waited(now), reverse=True)
        started = self._start_together(waiting)
        for dep in waiting:
            if dep not in started:
                self.sup.on_demand(dep)
        self.sup.fairness.look(waiting)
        for dep in waiting:
            if dep.waiters and not dep.can_become_ready():  # waiting cannot help any more: say why now
                dep.fail_waiters(NoCapacity(dep._why_unavailable(), retry_after=dep._retry_after()))

    def _start_together(self, waiting: list[Deployment]) -> list[Deployment]:
        """Several models at zero whose held requests wait for GPU room at once: their first
        replicas placed as one set (planning.plan: a set that fits in some order is never
        refused for the order it waits in), evicting for the set what the rules allow
        (appliance/fleet/eviction.py, for the lowest priority among them). Those started;
        none when the set does not fit even so (each then looks for room on its own)."""
        deps = [d for d in waiting if uses_gpus(d.model) and not d.blocked and not d.live()]
        if len(deps) < 2:
            return []
        for dep in deps:
            self.forget_unplaced(dep)
        names = [(d.model, f"{d.model.name}#{next_indices({r.index for r in d.replicas}, 1)[0]}") for d in deps]
        scarce = self.sup.capacity.scarce_for_set(names)
        if scarce is None:
            return []
        now = self.sup.clock.monotonic()
        holders = [(r, self.holder(r, now, **holds)) for r, holds in scarce.holds]
        for_set = "+".join(d.model.name for d in deps)
        priority = min(d.model.priority for d in deps)
        decided = eviction.plan(for_set, priority, [h for _, h in holders], scarce.fits, now)
        if not decided.fits:
            return []
        planned = self.sup.capacity.place_together(names, frozenset(h.replica for h in decided.victims))
        if any(planned[name].assignment is None for _, name in names):
            return []  # (the plan said the set fits once the victims are gone)
        victims = self.evict_all(decided, {r.name: r for r, _ in holders}, True, for_set, "request")
        for dep in deps:
            dep.unloaded = False
            self.sup.add_replica(dep, reason=f"held requests, placed with {for_set}", planned=planned, freed_by=victims)
        return deps

    def _look_for_room_in(self, dep: Deployment, seconds: float) -> None:
        """Look for room for dep again in ``seconds`` (when a residency lapses)."""
        name = dep.model.name
        if name in self._timers:
            self._timers.pop(name).cancel()
        with contextlib.suppress(RuntimeError):  # no loop running: nobody is held
            loop = asyncio.get_running_loop()
            self._timers[name] = loop.call_later(seconds + 0.001, self.may_have_come)
