"""Fairness between models on too little room (issue 17): no model waits for ever behind
another that is never idle.

Eviction (appliance/fleet/eviction.py) takes only idle replicas, so a model whose replica
always has a request in flight keeps its room, and a model waiting for that room would
wait until its queue timed out. As llama-swap's swap and a scheduler's preemption do: once
the oldest request held for a model has waited ``[capacity] max_wait_before_preempt_s``
for room, its start may take the room of busy replicas of other models
(``eviction.plan(preempt=True)``). They are evicted by draining: they take no new request
(those are held for their model as for a cold one, or go to its other replicas), the
ones in flight finish (``[server] drain_timeout_s``), then they stop or sleep and the
waiting model starts in their room. Every other rule holds: never below a pinned floor
or the operator's count, never a replica inside its ``min_residency`` (so two busy models
on room for one swap no faster than that), never a higher priority for a lower one. The
drained model's requests then wait their turn and take the room back the same way.
Evictions it makes are counted with reason ``fairness``.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from appliance.fleet.deployment import Deployment
    from appliance.fleet.eviction import Holder
    from appliance.fleet.supervisor import Supervisor

FAIRNESS = "fairness"  # the eviction's trigger (appliance_evictions_total's reason)


class Fairness:
    """The supervisor's: which models held for room have waited past the bound."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self._timer: asyncio.TimerHandle | None = None

    def look(self, waiting: list[Deployment]) -> None:
        """Models in ``waiting`` whose held requests found no room: those whose oldest request
        waited past the bound take busy replicas' room, longest wait first; the others are
        looked at again when their bound lapses."""
        bound = self.sup.cfg.capacity.max_wait_before_preempt_s
        if not bound:
            return
        now = self.sup.clock.monotonic()
        starved = [d for d in waiting if d.no_room and d.waiters and not d.blocked]
        for dep in sorted(starved, key=lambda d: d.held.waited(now), reverse=True):
            left = bound - dep.held.waited(now)
            if left > 0:
                self._look_in(left)
            elif dep.no_room:  # (still: an earlier one's start may have changed nothing for it)
                self.sup.on_demand(dep, trigger=FAIRNESS)

    def why(self, victim: Holder, for_model: str) -> str:
        """The eviction's reason, in words."""
        dep = self.sup.deployments.get(for_model)
        waited = dep.held.waited(self.sup.clock.monotonic()) if dep is not None else 0.0
        bound = self.sup.cfg.capacity.max_wait_before_preempt_s
        busy = f"{victim.inflight} in flight finish first" if victim.inflight else "nothing in flight"
        return f"{for_model}'s requests waited {waited:.0f}s (max_wait_before_preempt_s {bound:g}); drained: {busy}"

    def _look_in(self, seconds: float) -> None:
        with contextlib.suppress(RuntimeError):  # no loop running: nobody is held
            loop = asyncio.get_running_loop()
            if self._timer is not None and self._timer.when() <= loop.time() + seconds:
                return  # one due sooner looks at every model
            self.close()
            self._timer = loop.call_later(seconds + 0.001, self._due)

    def _due(self) -> None:
        self._timer = None
        self.sup.room.may_have_come()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
