"""The supervisor: every model deployment's replicas, started and stopped together."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable
from pathlib import Path

import aiohttp

from engines import adapter_for

from .config import Config, ModelConfig
from .errors import ModelNotFound, NoCapacity
from .process import ProcessRunner, SubprocessRunner
from .replica import Clock, Listener, Replica, State, free_port

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


class Supervisor:
    def __init__(self, cfg: Config, session: aiohttp.ClientSession, *,
                 runner: ProcessRunner | None = None, clock: Clock | None = None,
                 port_allocator: Callable[[], int] = free_port,
                 listener: Listener | None = None) -> None:
        self.cfg = cfg
        self.session = session
        self.runner = runner or SubprocessRunner(cfg.supervisor.log_max_bytes)
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

    def replicas(self) -> list[Replica]:
        return [r for d in self.deployments.values() for r in d.replicas]

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for replica in self.replicas():
            replica.start()

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
