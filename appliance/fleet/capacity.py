"""Capacity: the one owner of what engine replicas may hold on this box.

Three budgets, one set of rules, asked by the supervisor for every start (boot, a
request for a model at zero, a scale-up, an operator's count or load), by eviction
(what a replica frees when it goes) and by status:

  * CPU cores: the CPU engines' budget, ``[cpu] cores`` (0 = the CPUs this daemon may
    run on, ``os.sched_getaffinity``, not the machine's count). A CPU replica takes its
    ``threads`` cores, or all of the budget, and is bound to cores no other replica holds.
  * Host RAM: ``[capacity] host_ram_gib`` (0 = MemTotal less a reserve). A CPU replica
    holds its weights, KV cache and compute buffers; a sleeping vLLM replica holds its
    weights (level 1 sleep moves them to host RAM).
  * GPU memory: what the placer (appliance/gpu/planning, placement) reserves for each
    replica on its GPUs; a sleeping replica's GPU memory is free.

A replica holds its share from the moment it is added (before its owner task has run)
until its engine has stopped (draining, it still holds it).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from appliance.config import Config, ModelConfig, uses_gpus
from appliance.fleet import eviction
from appliance.fleet.process import process_trees
from appliance.fleet.replica import Replica
from appliance.fleet.replica_state import State
from appliance.gpu.memory import MeasuredMemory, ModelShapeError, estimate_gguf
from appliance.gpu.placement import GiB, Placed, free_bytes
from appliance.gpu.planning import PlanRow, demand_for, estimate_for, gpus_from, plan
from appliance.gpu.probe import GpuProbe, Inventory
from appliance.status import CpuBudget, CpuHolder, SleepingReplica
from appliance.store.weights import model_path

# Host RAM kept for the OS, the daemon and page cache when [capacity] host_ram_gib is 0:
# a tenth of it, at least this much.
HOST_RESERVE_MIN = 2 * GiB


def on_cpu(model: ModelConfig) -> bool:
    """A llama.cpp replica on the CPU: it takes its cores from the CPU engines' budget."""
    return model.server == "llamacpp" and not uses_gpus(model)


def holds_capacity(r: Replica) -> bool:
    """The replica holds its cores, RAM or GPU memory: from the moment it is added until
    its engine has stopped."""
    return r.state is not State.FATAL and not (r.state is State.STOPPED and r.history)


def mem_total(meminfo: Path = Path("/proc/meminfo")) -> int:
    """The machine's RAM in bytes (0 if /proc/meminfo cannot say)."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def default_host_ram(total: int) -> int:
    return max(0, total - max(HOST_RESERVE_MIN, total // 10))


@dataclass(frozen=True)
class Scarce:
    """What a new replica lacks and who holds it, for eviction: (replica, what it holds)
    pairs and whether the new one fits once the named replicas are gone."""

    what: str
    holds: list[tuple[Replica, dict]]
    fits: Callable[[frozenset[str]], bool]


class Capacity:
    def __init__(
        self,
        cfg: Config,
        probe: GpuProbe,
        replicas: Callable[[], list[Replica]],
        measured: MeasuredMemory,
        host_total: Callable[[], int] = mem_total,
    ) -> None:
        self.cfg = cfg
        self.probe = probe
        self.replicas = replicas
        self.measured = measured
        self._host_total = host_total
        self._host_need: dict[tuple[str, bool], int] = {}  # (model, sleeping) -> bytes
        self._trees: tuple[tuple[int, ...], set[int]] | None = None  # this loop turn's (_process_trees)

    # --- CPU cores ----------------------------------------------------------------------------

    def cpu_cores(self) -> int:
        """The CPU engines' budget: [cpu] cores, else every CPU this daemon may run on."""
        return self.cfg.cpu.cores or len(os.sched_getaffinity(0)) or 1

    def cores(self, model: ModelConfig) -> int:
        """The cores one CPU replica of model takes from the budget: its threads, or all of it."""
        budget = self.cpu_cores()
        return min(model.threads or budget, budget)

    def cpu_holders(self) -> list[Replica]:
        return [r for r in self.replicas() if on_cpu(r.model) and holds_capacity(r)]

    def cpu_set(self, model: ModelConfig, ignoring: frozenset[str]) -> frozenset[int]:
        """The CPUs a new CPU replica of model is bound to: cores(model) of the budget's that
        no other replica holds (those in ignoring are being evicted for it), lowest first. The
        budget's cores are the daemon's own CPUs in order; a budget larger than the machine
        wraps around them (and replicas then share cores: the operator asked for more)."""
        mine = sorted(os.sched_getaffinity(0))
        held = {c for r in self.cpu_holders() if r.name not in ignoring for c in r.cpus}
        free = [mine[i % len(mine)] for i in range(self.cpu_cores())]
        for cpu in held:
            if cpu in free:
                free.remove(cpu)
        return frozenset(free[: self.cores(model)])

    # --- host RAM --------------------------------------------------------------------------------

    def host_ram(self) -> int:
        """The host RAM budget for CPU replicas and sleeping ones, in bytes."""
        gib = self.cfg.capacity.host_ram_gib
        return int(gib * GiB) if gib else default_host_ram(self._host_total())

    def host_bytes(self, r: Replica) -> int:
        """What a replica holds in host RAM: a CPU replica its whole footprint, a sleeping
        GPU replica its weights; the others nothing we budget (their memory is on GPUs)."""
        if on_cpu(r.model):
            return self.host_need(r.model)
        if r.state is State.SLEEPING:
            return self.host_need(r.model, sleeping=True)
        return 0

    def host_need(self, model: ModelConfig, sleeping: bool = False) -> int:
        """Host RAM one replica of model needs: on the CPU, its GGUF's weights, KV cache and
        buffers; asleep, its weights. 0 when the model's files cannot tell (nothing is refused
        for a size nobody can know). Read once per model."""
        key = (model.name, sleeping)
        if key not in self._host_need:
            try:
                if sleeping:
                    need = estimate_for(self.cfg, model, 1).weights
                else:
                    path = model_path(self.cfg, model)
                    if path is None:
                        raise OSError("no model file")
                    est = estimate_gguf(path, model.context_length, model.cache_type_k, model.cache_type_v, 0, 1)
                    need = est.per_gpu[1]
            except (ModelShapeError, OSError, ValueError):
                need = 0
            self._host_need[key] = need
        return self._host_need[key]

    def host_used(self, ignoring: frozenset[str] = frozenset()) -> int:
        return sum(self.host_bytes(r) for r in self.replicas() if holds_capacity(r) and r.name not in ignoring)

    def may_sleep(self, r: Replica) -> bool:
        """A GPU replica may go to sleep: its weights fit in the host RAM left."""
        return self.host_used() + self.host_need(r.model, sleeping=True) <= self.host_ram()

    # --- room for a new replica ------------------------------------------------------------------

    def cpu_room(self, model: ModelConfig, ignoring: frozenset[str] = frozenset()) -> int:
        """How many more CPU replicas of model the core and host RAM budgets allow (the
        replicas in ``ignoring`` are being evicted for them)."""
        holders = [r for r in self.cpu_holders() if r.name not in ignoring]
        free_cores = self.cpu_cores() - sum(self.cores(r.model) for r in holders)
        room = free_cores // self.cores(model)
        need = self.host_need(model)
        if need:
            room = min(room, (self.host_ram() - self.host_used(ignoring)) // need)
        return max(room, 0)

    def may_start_beside(self, model: ModelConfig, victims: list[Replica]) -> bool:
        """A new replica of model may start while the replicas evicted for it are still
        exiting (docs/autoscaling.md, "Stopping a victim"): a CPU replica, whose victims are
        all CPU replicas already told to stop (idle, SIGTERM sent), and whose host RAM is
        free with the victims' still counted. Cores are time-shared: the new engine shares
        the victims' cores only for their exit. Host RAM is not, so a start that needs the
        victims' RAM waits for it, as every GPU engine waits for its victims' GPU memory
        (vLLM and SGLang size their KV cache from the memory they find free)."""
        if not on_cpu(model) or not all(on_cpu(v.model) and v.told_to_stop for v in victims):
            return False
        need = self.host_need(model)
        return not need or self.host_used() + need <= self.host_ram()

    def cpu_lack(self, model: ModelConfig) -> str:
        """What one more CPU replica of model lacks, and who holds it, in words."""
        what = f"{model.name} needs {self.cores(model)} of the CPU engines' {self.cpu_cores()} cores"
        if need := self.host_need(model):
            what += f" and {need / GiB:.2f} GiB of their {self.host_ram() / GiB:.2f} GiB of host RAM"
        held = ", ".join(sorted(r.name for r in self.cpu_holders())) or "nobody"
        return f"{what}, held by {held}"

    def scarce_for(self, model: ModelConfig, replica: str) -> Scarce | None:
        """For eviction: what one more replica of model lacks, who holds it and how to tell
        it fits once some of them are gone; None when nothing sizes it (the placer says why)."""
        if uses_gpus(model):
            return self._scarce_gpu(model, replica)
        if not on_cpu(model):
            return None
        holders = self.cpu_holders()
        sleepers = [r for r in self.replicas() if holds_capacity(r) and not on_cpu(r.model) and self.host_bytes(r)]
        cores = {r.name: self.cores(r.model) for r in holders}
        ram = {r.name: self.host_bytes(r) for r in holders + sleepers}
        fits_cores = eviction.core_fits(self.cpu_cores() - sum(cores.values()), cores, self.cores(model))
        ram_free, ram_need = self.host_ram() - sum(ram.values()), self.host_need(model)
        what = f"the CPU engines' budget of {self.cpu_cores()} cores"
        if ram_need:
            what += f" and {self.host_ram() / GiB:.1f} GiB of host RAM"

        def fits(removed: frozenset[str]) -> bool:
            freed = sum(ram.get(name, 0) for name in removed)
            return fits_cores(removed) and (not ram_need or ram_free + freed >= ram_need)

        holds = [(r, {"cores": cores.get(r.name, 0), "host_bytes": ram[r.name]}) for r in holders + sleepers]
        return Scarce(what, holds, fits)

    def fits_once_others_go(self, model: ModelConfig, replica: str) -> bool:
        """Whether one more replica of model would fit once every replica of other models
        is gone: room that others hold now (it waits for it), not a model too big for the box."""
        scarce = self.scarce_for(model, replica)
        if scarce is None:
            return False
        return scarce.fits(frozenset(r.name for r, _ in scarce.holds if r.model.name != model.name))

    def _scarce_gpu(self, model: ModelConfig, replica: str) -> Scarce | None:
        return self.scarce_for_set([(model, replica)])

    def scarce_for_set(self, replicas: list[tuple[ModelConfig, str]]) -> Scarce | None:
        """For eviction: what several new GPU replicas lack together, who holds it, and
        whether the whole set fits (placed as one set) once some holders are gone; None
        when nothing sizes them (the placer says why)."""
        inventory, placed, ours = self.gpu_view()
        if inventory.cpu_only:
            return None
        gpus = gpus_from(inventory, ours)
        try:
            demands = [demand_for(self.cfg, model, name, len(gpus), self.measured)[0] for model, name in replicas]
        except (ModelShapeError, OSError):
            return None
        reserved = {p.replica: p for p in placed}
        holds = [
            (r, {"gpus": reserved[r.name].gpus, "bytes_per_gpu": reserved[r.name].bytes_per_gpu})
            for r in self.replicas()
            if r.name in reserved and not reserved[r.name].sleeping
        ]
        return Scarce("GPU memory", holds, eviction.gpu_fits(gpus, placed, *demands))

    # --- GPU memory ------------------------------------------------------------------------------

    def gpu_view(self, ignoring: frozenset[str] = frozenset()) -> tuple[Inventory, list[Placed], set[int]]:
        """The GPUs as NVML sees them, the placed replicas that hold memory on them (less
        those in ``ignoring``), and our engines' PIDs (whose memory is not foreign)."""
        inventory = self.probe.read()
        holding = [r for r in self.replicas() if r.slot is not None and holds_capacity(r)]
        ours = self._process_trees([r.pid for r in holding if r.pid])
        placed = [
            Placed(
                replica=r.name,
                gpus=r.slot.gpus,
                bytes_per_gpu=reserved(r, inventory),
                sleeping=r.state is State.SLEEPING and not r.waking,
            )
            for r in holding
            if r.slot is not None and r.name not in ignoring
        ]
        return inventory, placed, ours

    def _process_trees(self, pids: list[int]) -> set[int]:
        """process_trees, read from /proc once per turn of the event loop: a load's eviction
        plan and its placement (or a wake's) each ask in the same turn, on the request's path
        (2-6 ms a read on a busy host)."""
        key = tuple(sorted(pids))
        if self._trees is not None and self._trees[0] == key:
            return self._trees[1]
        trees = process_trees(pids)
        with contextlib.suppress(RuntimeError):  # no loop running: nothing to share it with
            asyncio.get_running_loop().call_soon(self._forget_trees)
            self._trees = (key, trees)
        return trees

    def _forget_trees(self) -> None:
        self._trees = None

    def place(
        self, model: ModelConfig, replica: str, ignoring: frozenset[str] = frozenset()
    ) -> tuple[PlanRow, Inventory]:
        """Where one new replica goes (those in ``ignoring`` are being evicted for it)."""
        inventory, placed, ours = self.gpu_view(ignoring)
        [row] = plan(self.cfg, inventory, [(model, replica)], placed=placed, ours=ours, measured=self.measured)
        return row, inventory

    def place_together(
        self, replicas: list[tuple[ModelConfig, str]], ignoring: frozenset[str] = frozenset()
    ) -> dict[str, PlanRow]:
        """Placements for several new GPU replicas as one set (planning.plan), by name (the
        replicas in ``ignoring`` are being evicted for them)."""
        if not replicas:
            return {}
        inventory, placed, ours = self.gpu_view(ignoring)
        rows = plan(self.cfg, inventory, replicas, placed=placed, ours=ours, measured=self.measured)
        return {row.replica: row for row in rows}

    def fits_on_its_gpus(self, r: Replica, removed: frozenset[str] = frozenset()) -> bool:
        """A sleeping replica's memory is free again on its own GPUs (so it may wake there),
        once the replicas named in ``removed`` are gone."""
        return self._wake_fits(r)(removed)

    def _wake_fits(self, r: Replica) -> Callable[[frozenset[str]], bool]:
        """fits_on_its_gpus over one snapshot of the GPUs (NVML and /proc read once, not
        once per set of victims tried)."""
        if r.slot is None:
            return lambda removed: True
        slot = r.slot
        inventory, placed, ours = self.gpu_view(frozenset({r.name}))
        gpus, need = gpus_from(inventory, ours), reserved(r, inventory)

        def fits(removed: frozenset[str]) -> bool:
            free = free_bytes(gpus, [p for p in placed if p.replica not in removed])
            return all(free.get(i, 0) >= need for i in slot.gpus)

        return fits

    def scarce_for_wake(self, r: Replica) -> Scarce:
        """For eviction: the awake replicas on a sleeping replica's GPUs, and whether it may
        wake there once some of them are gone."""
        _, placed, _ = self.gpu_view()
        mine = set(r.slot.gpus) if r.slot else set()
        on_mine = {p.replica: p for p in placed if not p.sleeping and mine & set(p.gpus)}
        holds = [
            (o, {"gpus": on_mine[o.name].gpus, "bytes_per_gpu": on_mine[o.name].bytes_per_gpu})
            for o in self.replicas()
            if o.name in on_mine
        ]
        return Scarce("GPU memory", holds, self._wake_fits(r))

    # --- status --------------------------------------------------------------------------------

    def cpu_budget(self) -> CpuBudget:
        """The CPU engines' core budget and host RAM, and the replicas that hold them."""
        users = [
            CpuHolder(
                replica=r.name,
                cores=self.cores(r.model),
                cpus=sorted(r.cpus),
                host_bytes=self.host_bytes(r),
                state=r.state.value,
            )
            for r in self.cpu_holders()
        ]
        sleeping = [
            SleepingReplica(replica=r.name, host_bytes=self.host_bytes(r), gpus=list(r.slot.gpus) if r.slot else [])
            for r in self.replicas()
            if r.state is State.SLEEPING
        ]
        return CpuBudget(
            cores=self.cpu_cores(),
            used=sum(u.cores for u in users),
            replicas=users,
            host_ram_bytes=self.host_ram(),
            host_ram_used_bytes=self.host_used(),
            sleeping=sleeping,
        )


def reserved(r: Replica, inventory: Inventory) -> int:
    """What a placed replica holds on each of its GPUs: what the placer reserved for it,
    else its fraction of the card."""
    slot = r.slot
    if slot is None:
        return 0
    if slot.bytes_per_gpu:
        return slot.bytes_per_gpu
    total = max((g.total_bytes for g in inventory.gpus if g.index in slot.gpus), default=0)
    return math.ceil(slot.memory_fraction * total)


def next_indices(taken: set[int], count: int) -> list[int]:
    """The ``count`` lowest replica indices not in ``taken``."""
    return list(itertools.islice((i for i in itertools.count() if i not in taken), count))
