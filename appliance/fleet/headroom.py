"""Headroom (issue 17): room made before a request asks for it, so that a cold start does
not wait for another engine to stop first.

When a model must free room for a load, the evicted engine's own stop (a vLLM engine
releasing its GPUs: seconds) or sleep lies on the waiting request's path, before its
engine can even start. With ``[capacity] headroom_idle_s`` set, each autoscaler pass
(``Supervisor.tick``) takes the most recently requested model at zero or asleep (asked for
within the last minute, not scaled to 0 by the operator) that has no room now (for a
sleeper: on its own GPUs, to wake there), and evicts for it
in the background, by the eviction rules (floors, residency, priority:
appliance/fleet/eviction.py), replicas of other models unused for at least
``headroom_idle_s``, least recently used first, to sleep where the sleep tier allows.
Room for one model is kept free this way: nothing more goes while there is room for it,
and only models nobody used for that long go, so it does not thrash. Off by default: it
trades the evicted model's next request (a cold start or a wake it would not have paid)
for the next cold start's wait, which only the operator can weigh.
Evictions it makes are counted with reason ``headroom``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from appliance.fleet import eviction
from appliance.fleet.replica_state import State

if TYPE_CHECKING:
    from appliance.fleet.supervisor import Supervisor

HEADROOM = "headroom"  # the eviction's trigger (appliance_evictions_total's reason)
RECENT_S = 60  # "requested recently": within the deployments' rate window


def make(sup: Supervisor, now: float) -> None:
    """One pass: room for the most recently requested model at zero that lacks it."""
    idle_s = sup.cfg.capacity.headroom_idle_s
    if not idle_s or sup._stopping:
        return
    wanted = [
        d
        for d in sup.deployments.values()
        if all(r.state is State.SLEEPING and not r.waking for r in d.live())  # at zero, or asleep
        and not d.blocked
        and not d.waiters
        and d.control.override != 0
        and d.rate.count(RECENT_S)
    ]
    if not wanted:
        return
    dep = max(wanted, key=lambda d: d.rate.last_event)
    sleeping = dep.live()
    scarce = (
        sup.capacity.scarce_for_wake(sleeping[0])  # its wake needs its own GPUs back
        if sleeping
        else sup.capacity.scarce_for(dep.model, f"{dep.model.name}#new")
    )
    if scarce is None:
        return
    holders = [(r, sup.room.holder(r, now, **holds)) for r, holds in scarce.holds]
    decided = eviction.plan(
        dep.model.name, dep.model.priority, [h for _, h in holders], scarce.fits, now, idle_for=idle_s
    )
    if decided.fits and decided.victims:
        by_name = {r.name: r for r, _ in holders}
        sup.room.evict_all(decided, by_name, scarce.what == "GPU memory", dep.model.name, HEADROOM)
