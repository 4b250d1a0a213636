"""Where the "freeing" part of a load's wait goes (issue 17): two models on one simulated GPU
with room for one, fake vLLM engines (tests/fake_engine.py, bench/market.py's), each
request evicting the other model's idle replica. Per swap, from the request's arrival
(milliseconds): the eviction decided, the victim signalled (SIGTERM, or its /sleep sent),
its engine gone (process exit seen by the daemon, or asleep), and the new engine spawned.

  ours   decided + (signalled - decided) + (spawned - gone): the supervisor's own part;
  engine gone - signalled: the evicted engine's own stop (or sleep).

    PYTHONPATH=<tree> .venv/bin/python bench/market_freeing.py [--rounds 6] [--to stop|sleep]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

if not os.environ.get("PYTHONPATH"):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import aiohttp  # noqa: E402
import market  # noqa: E402  (bench/market.py: the same engines and config)

from appliance.config import parse_config  # noqa: E402
from appliance.fleet import process  # noqa: E402
try:
    from appliance.fleet.replica_state import State  # noqa: E402
except ImportError:  # a baseline checkout from before replica.py was split
    from appliance.fleet.replica import State  # noqa: E402
from appliance.fleet.supervisor import Supervisor  # noqa: E402

SEEN: dict[str, float] = {}


def observe_processes() -> None:
    """Time each engine's SIGTERM and its exit as the daemon sees it."""
    signal_group, wait = process._RealProcess.signal_group, process._RealProcess.wait

    def signalled(self, sig):
        SEEN.setdefault(f"signal-{self.pid}", time.monotonic())
        return signal_group(self, sig)

    async def exited(self):
        await self._proc.wait()
        SEEN.setdefault(f"exit-{self.pid}", time.monotonic())
        return await wait(self)

    process._RealProcess.signal_group, process._RealProcess.wait = signalled, exited


async def swaps(args) -> list[dict[str, float]]:
    ns = argparse.Namespace(
        models=2,
        gpus=1,
        cold_start=0.0,
        wake=0.0,
        sleep=args.sleep,
        service=0.0,
        residency=0.0,
        host_ram_gib=0.0,
        queue_timeout=60.0,
        preempt_after=None,
        headroom_idle=0.0,
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="market-freeing-") as tmp:
        text = market.config_text(Path(tmp), "market" if args.to == "sleep" else "swap", ns)
        text = text.replace('min_residency = "1000h"', 'min_residency = "0s"')
        session = aiohttp.ClientSession()
        sup = Supervisor(parse_config(text), session)
        sup.start()
        await market.boot(sup)
        try:
            for i in range(args.rounds):
                model, other = ("m1", "m0") if i % 2 == 0 else ("m0", "m1")
                [victim] = [r for r in sup.deployment(other).replicas if r.state is State.READY]
                pid, SEEN["decided"] = victim.pid, 0.0
                evicted = sup.market.evicted
                sup.market.evicted = lambda e, evicted=evicted: (
                    SEEN.__setitem__("decided", time.monotonic()),
                    evicted(e),
                )[1]
                arrived = time.monotonic()
                replica = await sup.deployment(model).acquire()
                sup.market.evicted = evicted
                if args.to == "sleep":
                    went = next(t.at for t in victim.history if t.new is State.SLEEPING and t.at >= arrived)
                    signalled = SEEN["decided"]  # (the /sleep request is sent at once)
                else:
                    went, signalled = SEEN[f"exit-{pid}"], SEEN[f"signal-{pid}"]
                rows.append(
                    {
                        "decided": SEEN["decided"] - arrived,
                        "signalled": signalled - SEEN["decided"],
                        "engine": went - signalled,
                        "spawned": replica.loading_since - went,
                    }
                )
                with replica.lease():
                    pass
                await asyncio.sleep(0.2)
        finally:
            await sup.stop()
            await session.close()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--to", choices=("stop", "sleep"), default="stop")
    p.add_argument("--sleep", type=float, default=0.2, help="the fake engine's /sleep seconds")
    args = p.parse_args()
    observe_processes()
    rows = asyncio.run(swaps(args))
    print(f"{args.rounds} swaps, victims to {args.to}; load average {os.getloadavg()[0]:.2f}; ms, median (max)")
    print("| arrival to decided | decided to signalled | engine's own stop/sleep | gone to new spawn | ours |")
    print("|---|---|---|---|---|")
    ours = [r["decided"] + r["signalled"] + r["spawned"] for r in rows]
    cols = [[r[k] for r in rows] for k in ("decided", "signalled", "engine", "spawned")] + [ours]
    print("| " + " | ".join(f"{statistics.median(c) * 1000:.1f} ({max(c) * 1000:.1f})" for c in cols) + " |")


if __name__ == "__main__":
    main()
