"""Store models in the fleet: checked before each start of a replica that loads one, a
model blocked when its store entry fails a check (quarantined: its replicas drain, its
requests get 503 with the reason), and served again once the entry passes admission
(``recheck_blocked``). Called through the supervisor (``Supervisor.block_store_model``,
``Supervisor.recheck_blocked``, a replica's preflight).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from appliance.errors import NoCapacity
from appliance.fleet.replica_state import State
from appliance.store.guard import store_name
from appliance.store.store import Store

if TYPE_CHECKING:
    from appliance.fleet.deployment import Deployment
    from appliance.fleet.supervisor import Supervisor

log = logging.getLogger("appliance.supervisor")


async def store_preflight(sup: Supervisor, dep: Deployment) -> str | None:
    """Before a replica loads a store model (each start and restart): its files as
    verified, a changed one rehashed first (appliance/store/guard.py)."""
    if dep.blocked:
        return dep.blocked
    name = store_name(dep.model)
    assert sup.store_checks is not None and name is not None, "add_replica sets it only for a store model"
    reason = await sup.store_checks.check(name)
    if sup._stopping and not reason:
        # An interrupted check found nothing, which is no verdict: start nothing; the
        # replica's stop (Supervisor.stop stops every replica) ends this wait.
        await asyncio.Event().wait()
    return reason


def block_store_model(sup: Supervisor, name: str, reason: str) -> None:
    """Store model NAME failed a check (quarantined): block every model serving it,
    and refuse every LoRA adapter loaded from it."""
    for dep in sup.deployments.values():
        if store_name(dep.model) == name:
            block(sup, dep, reason)
        if dep.lora is not None:
            dep.lora.block_store(name, reason)


def block(sup: Supervisor, dep: Deployment, reason: str) -> None:
    """Stop serving a model (as admission does at boot): no replica of it starts again,
    the running ones drain and stop, held and new requests get 503 with the reason,
    and a FATAL replica in its place says why in `appliance status`. Until its store
    entry passes admission again (``recheck_blocked``)."""
    if dep.blocked or sup._stopping:
        return
    dep.blocked = reason
    log.error("not serving %s: %s", dep.model.name, reason)
    had_replicas = bool(dep.kept())
    for r in dep.kept():
        sup.retire(r, "not served any more: its store files failed verification")
    dep.fail_waiters(NoCapacity(dep._why_unavailable(), retry_after=30))
    if had_replicas:
        sup.add_replica(dep, reason="blocked")


async def recheck_blocked(sup: Supervisor) -> list[str]:
    """Check the admission of every blocked store model again (the StoreChecks worker:
    a manifest read and a stat per file; a quarantined model is not rehashed: `models
    verify` decides). Those that pass are served again (``unblock_store_model``).
    Returns the store names lifted."""
    if sup.store_checks is None or sup._stopping:
        return []
    names = sorted({name for d in sup.deployments.values() if d.blocked and (name := store_name(d.model))})
    lifted = []
    for name in names:
        reason = await sup.store_checks.check(name)
        if sup._stopping:
            # An interrupted check found nothing, which is no verdict. (mypy keeps the guard's
            # `not sup._stopping` across the await, which can change it.)
            break  # type: ignore[unreachable]
        if reason is None:
            unblock_store_model(sup, name)
            lifted.append(name)
        else:  # still blocked, maybe for another reason now (verified, license not accepted)
            for dep in sup.deployments.values():
                if store_name(dep.model) == name and dep.blocked:
                    _reword_block(dep, reason)
    return lifted


def _reword_block(dep: Deployment, reason: str) -> None:
    """A blocked model's reason changed: the block and its FATAL replica say the new one."""
    dep.blocked = reason
    for r in dep.kept():
        if r.state is State.FATAL and r.cannot_start:
            r.cannot_start = r.last_error = reason


def unblock_store_model(sup: Supervisor, name: str) -> None:
    """Store model NAME passed admission again: serve every model blocked on it."""
    if name not in sup.store_leases:
        try:
            store = Store.from_config(sup.cfg)
            try:
                sup.store_leases[name] = store.lease(name)
                store.touch(name)
            finally:
                store.close()
        except Exception as exc:  # a lock or manifest we cannot write: serve it anyway
            log.warning("cannot lease store model %s: %s", name, exc)
    for dep in sup.deployments.values():
        if store_name(dep.model) == name and dep.blocked:
            unblock(sup, dep)
            log.info("store model %s verified again: serving %s", name, dep.model.name)


def unblock(sup: Supervisor, dep: Deployment) -> None:
    """Serve a blocked model again: its FATAL replica goes, and it gets its count back
    (the operator's, else min_replicas; none if unloaded: a request starts one)."""
    if not dep.blocked or sup._stopping:
        return
    dep.blocked = None
    for r in dep.kept():
        if r.state is State.FATAL:
            sup.retire(r, "its store model is served again")
    while len(dep.kept()) < dep.standing_count():
        if sup.add_replica(dep, reason="its store model is served again") is None:
            break
