"""The daemon's side of the store: models configured as ``store:NAME`` are served only
when they are in the store, not quarantined, and their license is allowed or accepted;
otherwise their replicas are FATAL with the reason (`appliance status` shows it)."""

from __future__ import annotations

import logging
from typing import BinaryIO

from .config import STORE_PREFIX, Config
from .store import Store

log = logging.getLogger("appliance.store")


def admit_store_models(cfg: Config, deployments: dict) -> list[BinaryIO]:
    """Check each store model; lease the admitted ones (eviction and rm leave a leased
    model alone) and return the leases, held for the daemon's life."""
    leases: list[BinaryIO] = []
    store: Store | None = None
    for deployment in deployments.values():
        model = deployment.model
        if not model.source.startswith(STORE_PREFIX):
            continue
        store = store or Store.from_config(cfg)
        name = model.source[len(STORE_PREFIX):]
        reason = store.admission(name)
        if reason:
            log.error("not serving %s: %s", model.name, reason)
            deployment.blocked = reason
            continue
        leases.append(store.lease(name))
        store.touch(name)
    if store is not None:
        store.close()
    return leases
