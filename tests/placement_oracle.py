"""Exhaustive placement solver and random small instances, for tests and bench.

Written independently of appliance.placement (only the dataclasses are shared)
so that it cross-checks the placer: same legality rules, no heuristic.
"""

from __future__ import annotations

import itertools
import random

from appliance.gpu.placement import Demand, GiB, Gpu, Placed, PlacementError, gpus_in_use, place

KINDS = {"H100": 80 * GiB, "A100": 40 * GiB, "L40S": 48 * GiB}


def _reserve(need: int, total: int) -> int | None:
    pct = -(-need * 100 // total)
    return None if pct > 100 else -(-pct * total // 100)


def optimum(gpus: list[Gpu], placed: list[Placed], demands: list[Demand]) -> int | None:
    """Fewest GPUs in use over every legal placement of all demands; None if none exists.

    Legal: each demand uses a listed TP size (or its fixed one) on that many
    distinct GPUs of one kind and one total, the requested kind if any, each
    with room for the rounded-up reservation. In use: GPUs with an awake
    placed replica or a new one.
    """
    by_index = {g.index: g for g in gpus}
    free = {g.index: g.total_bytes - g.foreign_bytes for g in gpus}
    for p in placed:
        if not p.sleeping:
            for i in p.gpus:
                free[i] -= p.bytes_per_gpu
    free = {i: max(0, f) for i, f in free.items()}
    base_used = frozenset(i for p in placed if not p.sleeping for i in p.gpus)

    # Every legal (gpus, reserved) option for each demand, ignoring free memory.
    options: list[list[tuple[tuple[int, ...], int]]] = []
    for d in demands:
        opts = []
        sizes = [d.tp] if d.tp is not None else sorted(d.per_gpu_bytes)
        want = None if d.gpu_kind in (None, "any") else d.gpu_kind.casefold()
        for tp in sizes:
            for combo in itertools.combinations(sorted(by_index), tp):
                gs = [by_index[i] for i in combo]
                if len({(g.kind.casefold(), g.total_bytes) for g in gs}) != 1:
                    continue
                if want is not None and gs[0].kind.casefold() != want:
                    continue
                r = _reserve(d.per_gpu_bytes[tp], gs[0].total_bytes)
                if r is not None:
                    opts.append((combo, r))
        if not opts:
            return None
        options.append(opts)
    order = sorted(range(len(demands)), key=lambda k: -max(r * len(c) for c, r in options[k]))

    best = [len(gpus) + 1]

    def dfs(k: int, used: frozenset[int]) -> None:
        if len(used) >= best[0]:
            return
        if k == len(order):
            best[0] = len(used)
            return
        for combo, r in options[order[k]]:
            if all(free[i] >= r for i in combo):
                for i in combo:
                    free[i] -= r
                dfs(k + 1, used.union(combo))
                for i in combo:
                    free[i] += r
                if best[0] == len(base_used):
                    return

    dfs(0, base_used)
    return best[0] if best[0] <= len(gpus) else None


def random_instance(rng: random.Random, max_gpus: int = 4, max_replicas: int = 6):
    """A small random node: GPUs, some placed replicas (some asleep), some demands."""
    n = rng.randint(1, max_gpus)
    kinds = rng.sample(sorted(KINDS), rng.choice([1, 1, 2]))
    gpus = []
    for i in range(n):
        kind = rng.choice(kinds)
        foreign = rng.choice([0, 0, 0, rng.randint(1, 8) * GiB // 2])
        gpus.append(Gpu(i, kind, KINDS[kind], foreign))
    placed = []
    free = {g.index: g.total_bytes - g.foreign_bytes for g in gpus}
    for k in range(rng.choice([0, 0, 1, 2])):
        i = rng.randrange(n)
        size = rng.randint(2, 30) * GiB
        if size <= free[i]:
            sleeping = rng.random() < 0.3
            placed.append(Placed(f"old#{k}", (i,), size, sleeping, size // 2 if sleeping else 0))
            if not sleeping:
                free[i] -= size
    demands = []
    for k in range(rng.randint(1, max_replicas)):
        one = rng.choice([rng.randint(4, 40), rng.randint(4, 80), rng.randint(30, 120)]) * (GiB // 2)
        sizes = rng.choice([(1,), (1,), (1, 2), (1, 2, 4), (2, 4), (2,)])
        per = {tp: one // tp + (GiB if tp > 1 else 0) for tp in sizes}
        kind = rng.choice([None, None, None, rng.choice(kinds)])
        tp = rng.choice(sizes) if rng.random() < 0.15 else None
        demands.append(Demand(f"m{k}#0", per, kind, tp))
    return gpus, placed, demands


def against_optimum(seed: int, n: int, check=None) -> dict:
    """The placer on n feasible random small instances against the exhaustive optimum:
    counts of cases, optimal ones, extra GPUs in all and failures. check(gpus, placed,
    demands, result), when given, vets each placement."""
    rng = random.Random(seed)
    cases = optimal = excess = failed = 0
    while cases < n:
        gpus, placed, demands = random_instance(rng, max_gpus=4, max_replicas=6)
        best = optimum(gpus, placed, demands)
        if best is None:
            continue
        cases += 1
        try:
            result = place(gpus, placed, demands)
        except PlacementError:
            failed += 1
            continue
        if check is not None:
            check(gpus, placed, demands, result)
        got = len(gpus_in_use(placed, result))
        assert got >= best, f"the placer beat the optimum ({got} < {best}): the oracle is wrong"
        optimal += got == best
        excess += got - best
    return {"cases": cases, "optimal": optimal, "excess": excess, "failed": failed}
