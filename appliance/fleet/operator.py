"""The operator's commands (``appliance scale|load|unload|pin``, a replica's restart and drain):
what each changes, persisted where the operator expects it to last (the state store), and
what the daemon does about it, in words: the answer the operator gets, logged at INFO.

Called through the supervisor's methods of the same names (Supervisor.scale, ...)."""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

from appliance.errors import NoCapacity
from appliance.fleet.rates import RateWindow
from appliance.state.decisions import ModelControl

if TYPE_CHECKING:
    from appliance.fleet.deployment import Deployment
    from appliance.fleet.replica import Replica
    from appliance.fleet.supervisor import Supervisor

log = logging.getLogger("appliance.supervisor")


def scale(sup: Supervisor, model: str, replicas: int | None) -> str:
    """The operator's count for a model (None: back to autoscaling); persisted. Returns
    what the daemon does, and why, in words (logged, and the action's answer)."""
    dep = sup.deployment(model)
    asked, ceiling = replicas, dep.model.autoscaling.max_replicas
    if replicas is not None:
        replicas = max(0, min(replicas, ceiling))
    _set_control(sup, dep, override=replicas)
    if replicas is None:
        return _said(model, "scale auto", "the autoscaler decides its replicas again")
    while len(dep.kept()) > replicas and (victim := sup._victim(dep)) is not None:
        sup.retire(victim, f"operator scaled to {replicas}")
    sup.add_together([(dep, replicas - len(dep.kept()))], reason=f"operator scaled to {replicas}")
    said = f"clamped to {replicas} because max_replicas = {ceiling}; " if asked != replicas else ""
    have = len(dep.kept())
    if have < replicas:
        said += f"{have} of {replicas} replicas placed: {dep._why_unavailable()}"
    else:
        said += f"{replicas} replica{'s' if replicas != 1 else ''}, kept across restarts"
    return _said(model, f"scale {asked}", said)


def _said(model: str, action: str, what: str) -> str:
    """An operator action's outcome: logged at INFO (a refusal too, with its reason)."""
    log.info("operator %s %s: %s", action, model, what)
    return what


def load(sup: Supervisor, model: str) -> str:
    """Pre-warm: as if a request had arrived (evicting for it if it must); NoCapacity,
    saying why, when no replica can start now (a load, unlike a request, is not held
    for room that replicas of other models hold for now: Retry-After says when)."""
    dep = sup.deployment(model)
    dep.rate.last_event = sup.clock.monotonic()
    dep.unloaded = False
    if dep.ready:
        return _said(model, "load", "already ready")
    sup.on_demand(dep, trigger="load")
    if dep.no_room or not dep.can_become_ready():
        later = math.ceil(dep.room_in) if dep.no_room and dep.room_in is not None else None
        why = dep._why_unavailable()
        _said(model, "load", f"refused: {why}")
        raise NoCapacity(why, retry_after=max(1, later or dep._retry_after()))
    return _said(model, "load", "starting a replica; requests are held until it is ready")


def unload(sup: Supervisor, model: str) -> str:
    """Down to zero now (drained); the next request starts it again."""
    dep = sup.deployment(model)
    if dep.control.override:
        _set_control(sup, dep, override=None)
    # Forget the recent rate: the traffic before the unload must not bring the
    # model straight back; its next request will.
    dep.rate = RateWindow(60, clock=sup.clock.monotonic)
    dep.rate.last_event = sup.clock.monotonic()
    dep.unloaded = True
    kept = dep.kept()
    for r in kept:
        sup.retire(r, "operator unloaded the model")
    what = f"stopping {len(kept)} replica{'s' if len(kept) != 1 else ''}, each once its requests finish"
    return _said(model, "unload", f"{what}; the next request starts one" if kept else "no replica to stop")


def pin(sup: Supervisor, model: str, pinned: bool) -> str:
    dep = sup.deployment(model)
    _set_control(sup, dep, pinned=pinned)
    floor = dep.model.autoscaling.min_replicas
    if not pinned:
        return _said(model, "unpin", "idle replicas may be unloaded again (autoscaling.idle_ttl)")
    if len(dep.kept()) < floor:
        for _ in range(floor - len(dep.kept())):
            sup.add_replica(dep, reason="pinned at min_replicas")
    said = f"kept at min_replicas = {floor} however idle, across restarts"
    if len(dep.kept()) < floor:
        said += f"; {len(dep.kept())} placed now: {dep._why_unavailable()}"
    return _said(model, "pin", said)


def restart_replica(sup: Supervisor, replica: Replica) -> str:
    """The operator's restart of one replica: drained (bounded), then started again."""
    inflight = replica.inflight
    replica.restart()
    drain = f"once its {inflight} request{'s' if inflight != 1 else ''} in flight finish, " if inflight else ""
    what = f"restarting {replica.name}: {drain}its engine stops and starts again; it serves once ready"
    return _said(replica.model.name, f"restart #{replica.index}", what)


def drain_replica(sup: Supervisor, replica: Replica) -> str:
    """The operator's drain of one replica: no new requests, then it stops for good."""
    inflight = replica.inflight
    sup.retire(replica, "operator drained the replica")
    finish = f"once its {inflight} request{'s' if inflight != 1 else ''} in flight finish" if inflight else "now"
    what = f"draining {replica.name}: no new requests; it stops {finish}"
    dep = sup.deployments[replica.model.name]
    if dep.control.override is None and dep.model.autoscaling.min_replicas > len(dep.kept()):
        what += f"; the autoscaler starts another to keep min_replicas = {dep.model.autoscaling.min_replicas}"
    return _said(replica.model.name, f"drain #{replica.index}", what)


def _set_control(sup: Supervisor, dep: Deployment, **change) -> None:
    current = {"override": dep.control.override, "pinned": dep.control.pinned, **change}
    # Saved first: a write the state disk refuses (StateWriteFailed) changes nothing.
    if sup.state is not None:
        if "override" in change:
            sup.state.set_override(dep.model.name, change["override"])
        if "pinned" in change:
            sup.state.set_pinned(dep.model.name, change["pinned"])
    dep.control = ModelControl(**current)
