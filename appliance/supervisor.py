"""The supervisor: every model deployment's replicas, started and stopped together."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable
from pathlib import Path

import aiohttp

from engines import GpuSlot, adapter_for

from .config import Config, ModelConfig
from .errors import ModelNotFound, NoCapacity
from .gpu import GpuProbe, NvmlProbe, SimulatedProbe
from .memory import MeasuredMemory
from .planning import PlanRow, plan
from .process import ProcessRunner, SubprocessRunner, descendants
from .replica import Clock, Listener, Replica, State, Transition, free_port

log = logging.getLogger("appliance.supervisor")


class Deployment:
    """A model's replicas and how requests are spread over them."""

    def __init__(self, model: ModelConfig, replicas: list[Replica]) -> None:
        self.model = model
        self.replicas = replicas
        self._rr = itertools.count()

    def pick(self) -> Replica:
        """The READY replica with the fewest requests in flight (round-robin on ties)."""
        ready = [r for r in self.replicas if r.state is State.READY]
        if not ready:
            raise NoCapacity(self._why_unavailable(), retry_after=self._retry_after())
        if len(ready) == 1:
            return ready[0]
        start = next(self._rr) % len(ready)
        rotated = ready[start:] + ready[:start]
        return min(rotated, key=lambda r: r.inflight)

    def _why_unavailable(self) -> str:
        states = sorted({r.state.value for r in self.replicas}) or ["no replicas"]
        return f"Model '{self.model.name}' has no ready replica ({', '.join(states)}); retry shortly"

    def _retry_after(self) -> int:
        if any(r.state in (State.STARTING, State.BACKOFF) for r in self.replicas):
            return 5
        return 30

    @property
    def ready(self) -> bool:
        return any(r.state is State.READY for r in self.replicas)


def default_probe(cfg: Config) -> GpuProbe:
    return SimulatedProbe(cfg.gpu.inventory) if cfg.gpu.inventory else NvmlProbe()


class Supervisor:
    def __init__(self, cfg: Config, session: aiohttp.ClientSession, *,
                 runner: ProcessRunner | None = None, clock: Clock | None = None,
                 port_allocator: Callable[[], int] = free_port,
                 listener: Listener | None = None, probe: GpuProbe | None = None) -> None:
        self.cfg = cfg
        self.session = session
        self.runner = runner or SubprocessRunner(cfg.supervisor.log_max_bytes)
        self.probe = probe or default_probe(cfg)
        self.measured = MeasuredMemory()
        self.placements: list[PlanRow] = []
        self._listeners: list[Listener] = [listener] if listener is not None else []

        def on_change(replica: Replica, event: Transition) -> None:
            if event.new is State.READY and replica.slot is not None:
                self._measure(replica)
            for fn in self._listeners:
                fn(replica, event)

        listener = on_change
        self.log_dir = Path(cfg.paths.log_dir) / "replicas"
        self.deployments: dict[str, Deployment] = {}
        for model in cfg.models:
            adapter = adapter_for(model.server)
            count = max(model.autoscaling.min_replicas, 1)
            replicas = [
                Replica(cfg=cfg, model=model, index=i, adapter=adapter, runner=self.runner,
                        session=session, log_dir=self.log_dir, clock=clock,
                        port_allocator=port_allocator, listener=listener)
                for i in range(count)
            ]
            self.deployments[model.name] = Deployment(model, replicas)

    def add_listener(self, listener: Listener) -> None:
        """Also call listener(replica, transition) on every replica state change."""
        self._listeners.append(listener)

    def replicas(self) -> list[Replica]:
        return [r for d in self.deployments.values() for r in d.replicas]

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._place_gpu_replicas()
        for replica in self.replicas():
            replica.start()

    def _place_gpu_replicas(self) -> None:
        """Give each GPU replica its GPUs before it starts; one that cannot fit is
        FATAL with the placer's reason (what is missing, where)."""
        wanted = [r for r in self.replicas() if r.adapter.gpu]
        if not wanted:
            return
        inventory = self.probe.read()
        self.placements = plan(self.cfg, inventory, [(r.model, r.name) for r in wanted],
                               measured=self.measured)
        for replica, row in zip(wanted, self.placements, strict=True):
            if row.assignment is None:
                replica.cannot_start = f"cannot place on GPUs: {row.error}"
            else:
                replica.slot = GpuSlot(row.assignment.gpus, row.assignment.memory_fraction)
            log.info("placement %s", row.describe())

    def _measure(self, replica: Replica) -> None:
        """NVML's per-process memory of a ready replica (its whole process tree:
        engines run workers per GPU) corrects the estimate for later placements."""
        inventory = self.probe.read()
        pids = descendants(replica.pid)
        per_gpu = [g.used_by(pids) for g in inventory.gpus if g.index in replica.slot.gpus]
        if per_gpu and max(per_gpu) > 0:
            self.measured.observe(replica.model.name, replica.slot.tp, max(per_gpu))
            log.info("replica %s uses %.1f GiB per GPU (NVML)", replica.name, max(per_gpu) / 1024**3)

    async def stop(self, drain_timeout: float = 0.0) -> None:
        await asyncio.gather(*(r.stop(drain_timeout) for r in self.replicas()),
                             return_exceptions=True)

    def deployment(self, model: str) -> Deployment:
        try:
            return self.deployments[model]
        except KeyError:
            raise ModelNotFound(model) from None

    @property
    def ready(self) -> bool:
        """Ready to serve: every model has at least one READY replica."""
        return all(d.ready for d in self.deployments.values())

    def status(self) -> dict:
        return {
            "models": [
                {
                    "name": d.model.name,
                    "server": d.model.server,
                    "source": d.model.source or d.model.url or None,
                    "ready": d.ready,
                    "replicas": [r.snapshot() for r in d.replicas],
                }
                for d in self.deployments.values()
            ]
        }
