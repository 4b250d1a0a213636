"""The daemon's side of the store: models configured as ``store:NAME`` are served only
when they are in the store, not quarantined, their license is allowed or accepted, and
their files are what was imported; otherwise their replicas are FATAL with the reason
(`appliance status` shows it).

Three checks, cheapest first:

* at boot (``admit_store_models``): in the store, not quarantined, license, sizes;
* before any replica loads a model (``StoreChecks.check``, the replica's preflight, and
  once per model at boot): each file's stat fingerprint against the one recorded when
  it was last hashed; a changed file is rehashed first, in a worker thread (a multi-GB
  rehash must not stall the event loop and its systemd watchdog pings);
* in the background (``Scrubber``): files whose last verification is older than
  ``store.scrub_interval_h`` are rehashed one at a time at ``store.scrub_mb_per_s``, for
  the corruption no stat shows (bit rot).

A mismatch quarantines the model in the store and blocks its deployments
(``Supervisor.block_store_model``): its replicas drain and stop, requests get 503 with
the reason. While a model is blocked, its admission is checked again every
``RECHECK_S`` seconds (``Supervisor.recheck_blocked``: a manifest read and a stat per
file); once it passes (re-imported, `models verify` found it right again, its license
accepted) the block is lifted and the model is served again, no restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO

from appliance.config import STORE_PREFIX, Config
from appliance.store.hashing import Interrupted, PerChunk, Throttle
from appliance.store.records import quarantine_reason
from appliance.store.store import Store

log = logging.getLogger("appliance.store")

# How often the daemon checks blocked store models' admission again, in seconds.
RECHECK_S = 5.0


def store_name(model) -> str | None:
    """NAME of a model served from ``store:NAME``, else None."""
    return model.source[len(STORE_PREFIX) :] if model.source.startswith(STORE_PREFIX) else None


def admit_store_models(cfg: Config, deployments: dict) -> dict[str, BinaryIO]:
    """Check each store model (no hashing: fingerprints are StoreChecks' work); lease the
    admitted ones (eviction and rm leave a leased model alone) and return the leases by
    store name, held for the daemon's life."""
    leases: dict[str, BinaryIO] = {}
    store: Store | None = None
    for deployment in deployments.values():
        name = store_name(deployment.model)
        if name is None:
            continue
        store = store or Store.from_config(cfg)
        reason = store.admission(name, hash_changed=False)
        if reason:
            log.error("not serving %s: %s", deployment.model.name, reason)
            deployment.blocked = reason
            continue
        if name not in leases:
            leases[name] = store.lease(name)
        store.touch(name)
    if store is not None:
        store.close()
    return leases


class StoreChecks:
    """Store models' files checked before they are served: a file whose fingerprint
    changed is rehashed (unthrottled: a cold start waits for it). One worker thread; one
    check per model at a time, which every caller meanwhile shares."""

    def __init__(self, open_store: Callable[[], Store], on_blocked: Callable[[str, str], None]) -> None:
        self.open_store = open_store
        self.on_blocked = on_blocked
        self._stop = threading.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-check")
        self._running: dict[str, asyncio.Future] = {}

    async def check(self, name: str) -> str | None:
        """Why store model NAME must not be served now, or None."""
        if self._stop.is_set():
            return None
        running = self._running.get(name)
        if running is None:
            running = asyncio.ensure_future(self._check(name))
            self._running[name] = running
            running.add_done_callback(lambda _: self._running.pop(name, None))
        return await asyncio.shield(running)

    async def _check(self, name: str) -> str | None:
        loop = asyncio.get_running_loop()
        try:
            reason = await loop.run_in_executor(self._executor, self._check_sync, name)
        except Interrupted:
            return None
        if reason:
            self.on_blocked(name, reason)
        return reason

    def _check_sync(self, name: str) -> str | None:
        store = self.open_store()
        try:
            return store.admission(name, throttle=Throttle(0, self._stop))
        finally:
            store.close()

    def interrupt(self) -> None:
        """Stop hashing (the daemon is stopping): checks in progress end soon, finding nothing."""
        self._stop.set()

    async def close(self) -> None:
        self._stop.set()
        for running in list(self._running.values()):
            with contextlib.suppress(Exception):
                await running
        self._executor.shutdown(wait=False)


@dataclass
class ScrubStep:
    """What one scrub step did: a file scrubbed (model, path, problem '' when none), or
    nothing due (wait_s until something may be)."""

    model: str = ""
    path: str = ""
    problem: str = ""
    reason: str = ""
    wait_s: float = 0.0


class Scrubber:
    """Rehashes, one file at a time in a worker thread and at a bounded read rate, the
    store's files whose last verification is older than the interval: bit rot changes no
    stat, so fingerprints cannot see it. A mismatch quarantines the model and calls
    on_quarantine(name, reason) on the event loop."""

    IDLE_MAX_S = 300.0  # look again at least this often (imports, `models verify`, clock changes)
    progress_every_s = 60.0  # a file being scrubbed logs how far it is this often

    def __init__(
        self,
        open_store: Callable[[], Store],
        interval_s: float,
        bytes_per_s: float,
        on_quarantine: Callable[[str, str], None],
    ) -> None:
        self.open_store = open_store
        self.interval_s = interval_s
        self.bytes_per_s = bytes_per_s
        self.on_quarantine = on_quarantine
        self._stop = threading.Event()
        self._wake: asyncio.Event | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-scrub")
        self._task: asyncio.Task | None = None

    @classmethod
    def from_config(cls, cfg: Config, on_quarantine: Callable[[str, str], None]) -> Scrubber | None:
        """None when the scrub is off (store.scrub_interval_h = 0)."""
        if not cfg.store.scrub_interval_h:
            return None
        return cls(
            lambda: Store.from_config(cfg),
            cfg.store.scrub_interval_h * 3600,
            cfg.store.scrub_mb_per_s * 1_000_000,
            on_quarantine,
        )

    def step(self) -> ScrubStep:
        """Scrub the most overdue file if one is due (blocking: run it in a thread)."""
        store = self.open_store()
        try:
            if not store.exists():
                return ScrubStep(wait_s=self.IDLE_MAX_S)
            due = store.next_scrub(self.interval_s)
            if due is None:
                return ScrubStep(wait_s=self.IDLE_MAX_S)
            at, name, path = due
            wait = at - store.clock()
            if wait > 0:
                return ScrubStep(wait_s=min(wait, self.IDLE_MAX_S))
            size = next((f["size"] for f in store.need(name).files if f["path"] == path), 0)
            progress = ScrubProgress(f"store scrub: {name} file {path}", size, self.progress_every_s)
            problem = store.scrub_file(name, path, progress.paced(Throttle(self.bytes_per_s, self._stop)))
            if not problem:
                progress.verified()
                return ScrubStep(name, path)
            return ScrubStep(name, path, problem, quarantine_reason(store.need(name)))
        finally:
            store.close()

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="store-scrub")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        wake = self._wake
        assert wake is not None, "start() sets the wake event before the task runs"
        while not self._stop.is_set():
            try:
                step = await loop.run_in_executor(self._executor, self.step)
            except Interrupted:
                return
            except Exception:  # a broken manifest or disk: say so, try again later
                log.exception("store scrub failed; trying again in %.0fs", self.IDLE_MAX_S)
                step = ScrubStep(wait_s=self.IDLE_MAX_S)
            if step.problem:
                self.on_quarantine(step.model, step.reason)
            if step.wait_s > 0:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(wake.wait(), timeout=step.wait_s)

    async def close(self) -> None:
        self._stop.set()
        if self._wake is not None:
            self._wake.set()
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task
        self._executor.shutdown(wait=False)


class ScrubProgress:
    """A scrubbed file's progress in the daemon's log: bytes, share and rate every every_s
    (a multi-GB file at store.scrub_mb_per_s takes minutes), and what the whole took."""

    def __init__(self, label: str, total: int, every_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.label, self.total, self.every_s, self.clock = label, total, every_s, clock
        self.done = 0
        self.started = self.said = clock()

    def paced(self, throttle: PerChunk) -> PerChunk:
        def chunk(n: int) -> None:
            throttle(n)
            self.done += n
            if self.clock() - self.said >= self.every_s:
                self.said = self.clock()
                share = f" ({100 * self.done // self.total}%)" if self.total else ""
                log.info("%s: %s of %s%s, %s", self.label, _mib(self.done), _mib(self.total), share, self._rate())

        return chunk

    def verified(self) -> None:
        log.info("%s verified: %s in %.0fs, %s", self.label, _mib(self.done), self.clock() - self.started, self._rate())

    def _rate(self) -> str:
        return f"{_mib(self.done / max(self.clock() - self.started, 1e-9))}/s"


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"
