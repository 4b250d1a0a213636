"""What demand does to the fleet: a request for a model with nothing READY starts or wakes
a replica at once (``on_demand``, evicting for it if need be), and each autoscaler pass's
decisions carried out (``tick``). Called through the supervisor's methods of the same names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from appliance.fleet import headroom
from appliance.fleet.autoscaler import Decision
from appliance.fleet.fairness import FAIRNESS
from appliance.fleet.replica_state import State

if TYPE_CHECKING:
    from appliance.fleet.deployment import Deployment
    from appliance.fleet.supervisor import Supervisor


def on_demand(sup: Supervisor, dep: Deployment, trigger: str = "request") -> None:
    """A request is waiting and nothing is READY: start or wake a replica now,
    without waiting for the autoscaler's next tick, evicting idle replicas of other
    models for it if there is no room."""
    dep.unloaded = False
    live = dep.live()
    if any(r.state in (State.STARTING, State.BACKOFF) for r in live):
        return
    sleeping = [r for r in live if r.state is State.SLEEPING]
    if any(r.waking for r in sleeping):
        return  # a wake is on its way
    if sleeping:
        # A wake is cheaper than any cold start: on its own GPUs, evicting for it if
        # another model took its memory meanwhile.
        victims = sup.room.make_room(dep, trigger, waking=sleeping[0])
        if victims is not None:
            dep.loading_cause = "evict" if victims else "wake"
            dep.no_room, dep.room_in = None, None
            sleeping[0].waking = True  # its GPU memory is spoken for from now (capacity.py)
            sup._background(sup._wake(sleeping[0], victims), f"wake-{sleeping[0].name}")
            return
        if dep.no_room and dep.room_in is not None and dep.room_in < sup.cfg.queue.timeout_s:
            return  # its GPUs free up once a request ends or a residency lapses: wait to wake
        for r in sleeping:  # its GPUs are held by replicas that stay: start afresh elsewhere
            sup.retire(r, "asleep, and its GPU memory is held by another model: started again instead")
    if not live or sleeping:
        why = {"request": "a request arrived for a model at zero", FAIRNESS: "its requests waited too long"}
        sup.add_replica(dep, reason=why.get(trigger, "operator load"), evict=trigger)


def tick(sup: Supervisor) -> list[Decision]:
    """One autoscaler pass over every model; carry out what it decides."""
    now = sup.clock.monotonic()
    decisions = []
    for dep in sup.deployments.values():
        if dep.blocked:
            continue  # nothing of it may start until the block lifts (unblock restores its count)
        room = sup.room_for(dep)
        if not room and _busy(dep) and len(dep.kept()) < dep.model.autoscaling.max_replicas:
            room = 1  # in use: a scale-up may evict idle replicas of other models for one more
        decision = sup.autoscaler.decide(dep.model.name, dep.inputs(now, room), dep.policy(sup.cfg))
        _apply(sup, dep, decision)
        decisions.append(decision)
    headroom.make(sup, now)
    return decisions


def _apply(sup: Supervisor, dep: Deployment, d: Decision) -> None:
    if sup._stopping:
        return
    if d.action == "up":
        # Requests held for a model at zero are what asks for its first replica, whoever
        # (this tick or the held requests' own look for room) gets there first.
        trigger = "request" if dep.waiters and not dep.live() else "scale_up"
        for _ in range(d.desired - d.current):
            if sup.add_replica(dep, reason=d.reason, evict=trigger if _busy(dep) else None) is None:
                break
    elif d.action == "down":
        victim = sup._victim(dep)
        if victim is not None:
            sup.retire(victim, d.reason)
    elif d.action == "sleep":
        for r in dep.replicas:
            if r.state is State.READY and sup.capacity.may_sleep(r):  # its weights fit in host RAM
                sup._background(r.sleep(), f"sleep-{r.name}")
    elif d.action == "wake" and (dep.waiters or _wakes_into_free_room(sup, dep)):
        # Held requests may evict for their wake; recent traffic alone only takes free
        # room (evicting for it, two models on room for one woke each other at every pass).
        on_demand(sup, dep)


def _wakes_into_free_room(sup: Supervisor, dep: Deployment) -> bool:
    """A sleeping replica of dep may wake on its own GPUs with nothing evicted for it."""
    sleeping = [r for r in dep.live() if r.state is State.SLEEPING and not r.waking]
    return bool(sleeping) and sup.capacity.fits_on_its_gpus(sleeping[0])


def _busy(dep: Deployment) -> bool:
    """Requests in flight or held: a scale-up is demand (one to restore a floor is not)."""
    return bool(dep.waiters) or dep.inflight > 0
