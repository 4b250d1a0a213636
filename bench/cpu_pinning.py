"""Two CPU replicas on two cores: each bound to its own core (this tree) against today's
unbound replicas (a checkout of main), under the same load.

    PYTHONPATH=. python bench/cpu_pinning.py --baseline /tmp/main-bench [--requests 48]
        [--concurrency 4] [--rounds 2] [--timeout 900]

Two replicas of the bundled SmolLM2-135M (llama-server, one thread each, a CPU budget of
two cores: ``[autoscaling] cpu_cores = 2``, the key both versions read), --parallel 2
slots each, the same seeded sequence of non-streamed chat requests (a ~300-word prompt of
its own each, max_tokens 32), --concurrency at a time, after a warm-up. The daemon of
each side runs from its own checkout (--baseline: main's); the sides alternate for
--rounds rounds and the table prints each round and the medians: req/s, latency p50/p90,
and this tree against the baseline. Bounded: every request has a timeout, the whole run
--timeout seconds. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prefix_routing import MODEL, WORDS, free_port, wait_ready  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def config(tmp: Path, port: int) -> Path:
    path = tmp / "bench-cpu.toml"
    path.write_text(f"""
[server]
port = {port}
[paths]
state_dir = "{tmp}/state"
cache_dir = "{tmp}/cache"
log_dir = "{tmp}/log"
[autoscaling]
cpu_cores = 2
[audit]
enabled = false
[[models]]
name = "{MODEL}"
source = "builtin:{MODEL}"
threads = 1
parallel = 2
context_length = 4096
[models.autoscaling]
min_replicas = 2
max_replicas = 2
""")
    return path


def prompts(n: int, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    return [f"Request {i}. Summarise: " + " ".join(rng.choice(WORDS) for _ in range(300)) for i in range(n)]


async def one(session: aiohttp.ClientSession, url: str, prompt: str) -> float:
    body = {"model": MODEL, "max_tokens": 32, "temperature": 0, "messages": [{"role": "user", "content": prompt}]}
    started = time.perf_counter()
    async with session.post(url + "/v1/chat/completions", json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"status {r.status}: {await r.text()}")
        await r.read()
    return time.perf_counter() - started


async def load(url: str, texts: list[str], concurrency: int) -> dict:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        await asyncio.gather(*(one(session, url, t) for t in texts[:concurrency]))  # warm-up
        queue, seconds = list(texts), []

        async def worker() -> None:
            while queue:
                seconds.append(await one(session, url, queue.pop(0)))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return {"rps": len(seconds) / elapsed, "p50": statistics.median(seconds),
            "p90": statistics.quantiles(seconds, n=10)[8]}


async def measure(checkout: Path, texts: list[str], concurrency: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-cpu-") as d:
        tmp, port = Path(d), free_port()
        cfg = config(tmp, port)
        env = {**os.environ, "PYTHONPATH": str(checkout)}
        with (tmp / "daemon.log").open("wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "appliance.cli", "serve", "--config", str(cfg)],
                                    stdout=log, stderr=subprocess.STDOUT, cwd=checkout, env=env,
                                    start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            await wait_ready(url, proc, 120)
            return await load(url, texts, concurrency)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


async def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", type=Path, required=True, help="a checkout of main (today's code)")
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--timeout", type=float, default=900)
    args = p.parse_args(argv)
    texts = prompts(args.requests)
    sides = {"today (unbound)": args.baseline.resolve(), "pinned (this tree)": ROOT}
    results: dict[str, list[dict]] = {name: [] for name in sides}

    async def run() -> None:
        for _ in range(args.rounds):
            for name, checkout in sides.items():
                results[name].append(await measure(checkout, texts, args.concurrency))

    await asyncio.wait_for(run(), args.timeout)
    print(f"two CPU replicas, threads = 1, cpu_cores = 2; {args.requests} requests, concurrency "
          f"{args.concurrency}, {args.rounds} rounds (median)\n")
    print("| side | req/s | p50 s | p90 s | rounds' req/s |")
    print("|---|---|---|---|---|")
    med = {}
    for name, runs in results.items():
        med[name] = {k: statistics.median(r[k] for r in runs) for k in ("rps", "p50", "p90")}
        m = med[name]
        rounds = ", ".join(f"{r['rps']:.2f}" for r in runs)
        print(f"| {name} | {m['rps']:.2f} | {m['p50']:.3f} | {m['p90']:.3f} | {rounds} |")
    base, ours = med["today (unbound)"], med["pinned (this tree)"]
    print(f"\npinned / today: req/s {ours['rps'] / base['rps']:.2f}x, p50 {ours['p50'] / base['p50']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
