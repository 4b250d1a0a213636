"""A config reload's changes to the fleet (appliance/api/reload.py decides them): a model
added (admitted and started like one at boot), removed (no new request finds it; held and
in-flight requests finish; then its replicas stop) or rolled (each replica replaced by one
of the new config, the new one READY before the old one drains where there is room).

Called through the supervisor's methods of the same names (Supervisor.add_deployment, ...)."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace
from typing import TYPE_CHECKING

import msgspec

from appliance.config import ModelConfig
from appliance.fleet import lora
from appliance.fleet.deployment import Deployment
from appliance.fleet.hold import ROOM_POLL_S
from appliance.fleet.replica import Replica
from appliance.fleet.replica_state import ReplicaUnavailable, State, Transition
from appliance.state.decisions import ModelControl
from appliance.store.guard import StoreChecks, admit_store_models, store_name
from appliance.store.store import Store

if TYPE_CHECKING:
    from appliance.fleet.supervisor import Supervisor

log = logging.getLogger("appliance.supervisor")


def add_deployment(sup: Supervisor, model: ModelConfig) -> Deployment:
    """A model new in a reloaded config: admitted like one at boot (store admission,
    the operator's saved count), started at its standing count."""
    dep = Deployment(model, sup)
    if sup.state is not None and (control := sup.state.all().get(model.name)) is not None:
        dep.control = control
    _admit_store_model(sup, dep)
    sup.deployments[model.name] = dep
    sup.serve_adapters(dep)
    sup.add_together([(dep, dep.standing_count())], reason="added by a config reload")
    return dep


def _admit_store_model(sup: Supervisor, dep: Deployment | SimpleNamespace) -> None:
    """A store model configured while serving: admitted (or dep.blocked says why),
    leased and its files checked, as start() does at boot."""
    for leased, lease in admit_store_models(sup.cfg, {dep.model.name: dep}).items():
        if leased in sup.store_leases:
            lease.close()  # already held for another model of the same store entry
        else:
            sup.store_leases[leased] = lease
    if (name := store_name(dep.model)) and not dep.blocked:
        if sup.store_checks is None:
            sup.store_checks = StoreChecks(lambda: Store.from_config(sup.cfg), sup.block_store_model)
        sup._background(sup.store_checks.check(name), f"store-check-{name}")


def remove_deployment(sup: Supervisor, name: str) -> None:
    """A model gone from a reloaded config: no new request finds it from now on;
    the requests held for it still get a replica, those in flight finish, then
    its replicas stop (each bounded by server.drain_timeout_s)."""
    dep = sup.deployments.pop(name)
    for adapter in [n for n, d in sup.adapters.items() if d is dep]:
        del sup.adapters[adapter]  # its LoRA adapters' names go with it
    sup.leaving.append(dep)

    def wake(replica: Replica, event: Transition) -> None:
        if event.new is State.READY and replica in dep.replicas:
            dep.wake_waiters()  # _on_change no longer finds it by name

    sup.add_listener(wake)

    async def leave() -> None:
        try:
            while dep.waiters and not sup._stopping:
                await asyncio.sleep(ROOM_POLL_S)
            log.info("stopping the replicas of %s (removed from the config)", name)
            for r in dep.replicas:
                r.retiring = True
            await asyncio.gather(*(r.stop(sup.cfg.server.drain_timeout_s) for r in dep.replicas))
            release_store_leases(sup, dep)
        finally:
            sup._listeners.remove(wake)
            sup.leaving.remove(dep)

    sup._background(leave(), f"remove-{name}")


async def roll(sup: Supervisor, name: str, model: ModelConfig) -> str:
    """New engine arguments for a model: each replica of the old config is replaced
    by one of the new, one at a time: the new one READY before the old one drains
    when there is room beside it (one above max_replicas, for the roll), else the
    old one drains first (requests are held meanwhile). A new replica that does not
    become READY stops the roll, and what is left of the old config keeps serving.
    Returns what happened, in words."""
    dep = sup.deployments[name]
    entry = store_name(dep.model)
    if store_name(model) != entry:  # a new store entry passes admission first
        admitted = SimpleNamespace(model=model, blocked=None)
        _admit_store_model(sup, admitted)
        if admitted.blocked:
            return f"refused: {admitted.blocked}; the replicas of the previous config keep serving"
    old = dep.kept()
    surge = msgspec.structs.replace(model.autoscaling, max_replicas=model.autoscaling.max_replicas + 1)
    adapters_changed = model.adapters != dep.model.adapters
    dep.model = msgspec.structs.replace(model, autoscaling=surge)
    if adapters_changed:  # the new replicas load the new set (the old ones serve theirs until they drain)
        sup.serve_adapters(dep)
    saved = frozen = dep.control
    try:
        for r in old:
            # The autoscaler holds the count still while the roll adds and retires.
            dep.control = ModelControl(override=len(dep.kept()) + 1, pinned=saved.pinned)
            frozen = dep.control
            new = sup.add_replica(dep, reason=f"config reload: replaces {r.name}")
            if new is None:  # no room beside it: the old one goes first
                await _retired(sup, r, "config reload: replaced by the new config (no room beside it)")
                new = sup.add_replica(dep, reason=f"config reload: replaces {r.name}")
                if new is None:
                    return f"stopped: no room for a replica of the new config ({dep._why_unavailable()})"
            if not await _until_ready(sup, new):
                why = new.last_error or f"not ready within {sup.cfg.supervisor.startup_timeout_s:.0f}s"
                sup.retire(new, "config reload: the new config's replica did not become ready")
                return f"stopped at {new.name}: {why}; the replicas of the previous config keep serving"
            if not r.retiring:
                sup.retire(r, f"config reload: replaced by {new.name}")
            saved = _operators(saved, frozen, dep.control)
    finally:
        dep.model = model
        dep.control = _operators(saved, frozen, dep.control)
        if entry is not None and store_name(model) != entry:
            sup._background(_release_after(sup, old, entry), f"release-{entry}")
    return f"rolled {len(old)} replica{'s' if len(old) != 1 else ''}"


async def _release_after(sup: Supervisor, old: list[Replica], entry: str) -> None:
    """A roll to another store entry: the previous entry's lease, once the replicas of the
    previous config that were retired have stopped (release_store_entry says when it stays)."""
    drains = [sup._drains[r.name] for r in old if r.name in sup._drains]
    if drains:
        await asyncio.wait(drains)
    release_store_entry(sup, entry)


async def _retired(sup: Supervisor, replica: Replica, reason: str) -> None:
    sup.retire(replica, reason)
    task = sup._drains.get(replica.name)
    if task is not None:
        await asyncio.wait([task])


async def _until_ready(sup: Supervisor, replica: Replica) -> bool:
    """True once the replica is READY; False once it is FATAL, stopped, or not ready
    within the startup timeout (its own restarts included)."""
    try:
        await replica.wait_ready(sup.cfg.supervisor.startup_timeout_s)
    except (ReplicaUnavailable, TimeoutError):
        return False
    return True


def _operators(saved: ModelControl, frozen: ModelControl, now: ModelControl) -> ModelControl:
    """The operator's control once a roll ends: what they set during it (now differs from
    the roll's frozen count), else what they had before (saved)."""
    if now is frozen:
        return saved
    return ModelControl(override=saved.override if now.override == frozen.override else now.override, pinned=now.pinned)


def swap_adapters(sup: Supervisor, dep: Deployment) -> None:
    """A reload changed a model's LoRA adapters, and its engine loads and unloads them at
    run time (fleet/lora.adapters_changed said "live"): the names switch now, and each of
    its replicas takes the new set in place; one whose engine refuses (an adapter of a
    rank above its --max-lora-rank) restarts with the new set instead."""
    sup.serve_adapters(dep)
    new = dep.lora.loras if dep.lora is not None else ()

    async def swap(replica: Replica) -> None:
        try:
            await lora.apply_live(replica, new)
        except Exception as exc:  # the engine refused or failed: its next start loads the new set
            log.info("reload: %s restarts to load its new LoRA adapters (%s)", replica.name, exc)
            replica.restart()

    for replica in dep.kept():
        sup._background(swap(replica), f"lora-{replica.name}")


def release_store_leases(sup: Supervisor, dep: Deployment) -> None:
    """A removed model's store leases, once its replicas have stopped: eviction and `models
    rm` may take its entry again, unless another model (configured, or still leaving) is
    served from it. Its adapters' leases are its own (lora.resolve took them): all released."""
    name = store_name(dep.model)
    if name is not None:
        release_store_entry(sup, name, leaving=dep)
    for adapter, lease in (dep.lora.leases if dep.lora is not None else {}).items():
        if sup.store_leases.get(adapter) is lease:
            del sup.store_leases[adapter]
        lease.close()


def release_store_entry(sup: Supervisor, name: str, leaving: Deployment | None = None) -> None:
    """Release store entry name's lease, unless a model other than ``leaving`` (configured,
    or still leaving) is served from it, or a replica served from it still runs (a roll
    that stopped half way keeps the previous config's)."""
    others = [d for d in (*sup.deployments.values(), *sup.leaving) if d is not leaving]
    running = [r for r in sup.replicas() if r.state not in (State.STOPPED, State.FATAL)]
    if any(store_name(d.model) == name for d in others) or any(store_name(r.model) == name for r in running):
        return
    lease = sup.store_leases.pop(name, None)
    if lease is not None:
        lease.close()
