"""Benchmark of appliance.placement: speed at 8 GPUs x 32 replicas, quality vs the optimum.

Run from the repository root:  .venv/bin/python bench/placement.py [--seed N] [--instances N]
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import appliance.gpu.placement as placement  # noqa: E402
from appliance.gpu.placement import Demand, GiB, Gpu, PlacementError, place  # noqa: E402
from tests.placement_oracle import against_optimum  # noqa: E402


def node_8x32(rng: random.Random, scale: float = 1.0):
    """8 H100s (some with foreign memory) and 32 replicas of mixed sizes and TP options."""
    gpus = [Gpu(i, "H100", 80 * GiB, rng.choice([0, 0, GiB // 2, 2 * GiB])) for i in range(8)]
    demands = []
    for k in range(32):
        one = int(rng.choice([3, 5, 8, 12, 18, 24, 40]) * scale * GiB)
        sizes = rng.choice([(1,), (1, 2), (1, 2, 4), (2, 4)])
        per = {tp: one // tp + (GiB if tp > 1 else 0) for tp in sizes}
        tp = rng.choice(sizes) if rng.random() < 0.1 else None
        demands.append(Demand(f"m{k}#0", per, rng.choice([None, None, "H100"]), tp))
    return gpus, [], demands


def timings(instances, runs: int) -> list[float]:
    out = []
    gc.disable()
    try:
        for gpus, placed, demands in instances:
            for _ in range(runs):
                t = time.perf_counter()
                try:
                    place(gpus, placed, demands)
                except PlacementError:
                    pass
                out.append(time.perf_counter() - t)
    finally:
        gc.enable()
    return out


def quality(seed: int, n: int) -> dict:
    q = against_optimum(seed, n)
    return {"n": q["cases"], "optimal": q["optimal"] / q["cases"],
            "excess": q["excess"] / max(1, q["cases"] - q["failed"]), "failed": q["failed"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seed", type=int, default=20240611)
    ap.add_argument("--instances", type=int, default=1000, help="small instances vs the optimum")
    ap.add_argument("--runs", type=int, default=50, help="timed runs per 8x32 instance")
    args = ap.parse_args()

    rng = random.Random(args.seed)
    fits, fails = [], []
    while len(fits) < 40 or len(fails) < 10:
        inst = node_8x32(rng, rng.choice([1.0, 1.6]))
        try:
            place(*inst)
            fits.append(inst)
        except PlacementError:
            fails.append(inst)
    fits, fails = fits[:40], fails[:10]

    print(f"appliance.placement benchmark, seed {args.seed}, Python {sys.version.split()[0]}")
    print()
    print("| case (8 GPUs x 32 replicas) | instances x runs | median ms | p99 ms | max ms |")
    print("| --- | --- | --- | --- | --- |")
    for name, inst, runs in (("random mixes that fit", fits, args.runs),
                             ("mixes that do not fit (error path)", fails, 3)):
        t = sorted(timings(inst, runs))
        p99 = t[min(len(t) - 1, int(0.99 * len(t)))]
        print(f"| {name} | {len(inst)} x {runs} | {statistics.median(t) * 1e3:.2f} | {p99 * 1e3:.2f} "
              f"| {t[-1] * 1e3:.2f} |")

    print()
    print(f"| placer ({args.instances} feasible instances, <=4 GPUs, <=6 replicas) "
          "| optimal | mean excess GPUs | failed though feasible |")
    print("| --- | --- | --- | --- |")
    shipped = (placement._STRATEGIES, placement.SEARCH_STEPS)
    variants = (("best-fit decreasing only", shipped[0][:1], 0),
                ("6-strategy portfolio, no search", shipped[0], 0),
                ("as shipped (portfolio + search on failure)", *shipped))
    for name, strategies, steps in variants:
        placement._STRATEGIES, placement.SEARCH_STEPS = strategies, steps
        try:
            q = quality(args.seed, args.instances)
        finally:
            placement._STRATEGIES, placement.SEARCH_STEPS = shipped
        print(f"| {name} | {q['optimal']:.1%} | {q['excess']:.3f} | {q['failed']} |")


if __name__ == "__main__":
    main()
