"""Prefix-aware routing against round-robin, on two real llama.cpp replicas.

    PYTHONPATH=. python bench/prefix_routing.py [--tenants 10] [--requests 40]
        [--concurrency 2] [--parallel 4] [--prompt-tokens 1500] [--timeout 600]

Two replicas of the bundled SmolLM2-135M (llama-server, one thread each,
``[autoscaling] cpu_cores = 2``), each with --parallel slots and no host prompt
cache (``--cache-ram 0``): a replica keeps at most --parallel prompts' KV, so
with more tenants than one replica's slots it cannot keep every tenant's
~1,500-token system prompt, as in production where KV memory is scarce.

The same daemon config runs twice, ``[routing] prefix_aware = true`` and then
``false`` (least-in-flight, round-robin on ties), each with the same warm-up
(every tenant once) and the same seeded request sequence: many users' questions
across the tenants, --concurrency at a time, streamed, max_tokens 8. Printed:
TTFT p50/p90, throughput, and the ratios; then the router's decision cost
(hashing + choice) for an ~8,000-token request, in this process.
Bounded: every request has a timeout and the whole run --timeout seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m-instruct"
WORDS = ("policy claim customer account invoice refund shipping warranty contract clause "
         "liability premium coverage renewal deductible adjuster escalation ticket priority "
         "region tariff compliance audit retention consent privacy schedule ledger balance").split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def system_prompt(tenant: int, words: int) -> str:
    rng = random.Random(tenant)
    body = " ".join(rng.choice(WORDS) for _ in range(words))
    return f"You are the assistant of tenant {tenant} (Company {tenant * 7919 % 1000}). Rules: {body}"


def config(tmp: Path, port: int, prefix: bool, parallel: int) -> Path:
    path = tmp / f"bench-{'prefix' if prefix else 'rr'}.toml"
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
[routing]
prefix_aware = {'true' if prefix else 'false'}
prefix_load_margin = 1
[[models]]
name = "{MODEL}"
source = "builtin:{MODEL}"
threads = 1
parallel = {parallel}
context_length = {parallel * 2048}
args = ["--cache-ram", "0"]
[models.autoscaling]
min_replicas = 2
max_replicas = 2
""")
    return path


def start(cfg: Path, tmp: Path) -> subprocess.Popen:
    log = (tmp / (cfg.stem + ".log")).open("wb")
    return subprocess.Popen([sys.executable, "-m", "appliance.cli", "serve", "--config", str(cfg)],
                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)


async def wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"the daemon exited with {proc.returncode}")
            try:
                async with s.get(url + "/readyz") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.5)
    raise SystemExit("the daemon did not become ready in time")


async def one(session: aiohttp.ClientSession, url: str, tenant_prompt: str, question: str) -> float:
    body = {"model": MODEL, "stream": True, "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "system", "content": tenant_prompt}, {"role": "user", "content": question}]}
    started = time.perf_counter()
    async with session.post(url + "/v1/chat/completions", json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"status {r.status}: {await r.text()}")
        ttft = None
        async for line in r.content:
            if ttft is None and line.startswith(b"data: {") and b'"content"' in line:
                ttft = time.perf_counter() - started
        return ttft if ttft is not None else time.perf_counter() - started


async def run_mode(url: str, prompts: list[str], sequence: list[tuple[int, str]], concurrency: int
                   ) -> dict:
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for t, p in enumerate(prompts):  # the same warm-up: every tenant once
            await one(session, url, p, "warm-up")
        queue = list(sequence)
        ttfts: list[float] = []

        async def worker() -> None:
            while queue:
                tenant, question = queue.pop(0)
                ttfts.append(await one(session, url, prompts[tenant], question))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    q = statistics.quantiles(ttfts, n=10)
    return {"p50": statistics.median(ttfts), "p90": q[8], "rps": len(ttfts) / elapsed, "n": len(ttfts)}


async def token_count(url: str, text: str) -> int:
    async with aiohttp.ClientSession() as s, s.post(url + "/tokenize", json={"content": text}) as r:
        return len((await r.json())["tokens"])


async def measure(args, tmp: Path, prefix: bool, prompts, sequence) -> tuple[dict, str | None]:
    port = free_port()
    proc = start(config(tmp, port, prefix, args.parallel), tmp)
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_ready(url, proc, 120)
        replica = None
        async with aiohttp.ClientSession() as s, s.get(url + "/admin/status") as r:
            replica = (await r.json())["models"][0]["replicas"][0]["url"]
        result = await run_mode(url, prompts, sequence, args.concurrency)
        async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as r:
            metrics = await r.text()
        result["hits"] = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                             if line.startswith("appliance_prefix_routing_decisions_total")
                             and 'outcome="hit"' in line)
        return result, replica
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def decision_cost(text_words: int) -> tuple[float, int]:
    from appliance.config import RoutingConfig
    from appliance.fleet.prefix import PrefixRouter

    class Rep:
        def __init__(self, name: str) -> None:
            self.name, self.inflight = name, 0

    body = json.dumps({"model": MODEL, "messages": [
        {"role": "system", "content": system_prompt(1, text_words)},
        {"role": "user", "content": "What is my deductible?"}]}).encode()
    router = PrefixRouter(RoutingConfig())
    reps = [Rep(f"{MODEL}#0"), Rep(f"{MODEL}#1")]
    router.choose(reps, router.hashes(body, True))
    n = 2000
    seconds = timeit.timeit(lambda: router.choose(reps, router.hashes(body, True)), number=n) / n
    return seconds * 1e6, len(body)


async def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tenants", type=int, default=8)
    p.add_argument("--requests", type=int, default=40)
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--parallel", type=int, default=4, help="llama.cpp slots per replica")
    p.add_argument("--prompt-tokens", type=int, default=1500)
    p.add_argument("--timeout", type=float, default=600)
    args = p.parse_args(argv)
    words = int(args.prompt_tokens / 1.25)  # calibrated below with the engine's tokenizer
    prompts = [system_prompt(t, words) for t in range(args.tenants)]
    rng = random.Random(42)
    sequence = [(rng.randrange(args.tenants), f"User {i} asks: what applies to case {i}?")
                for i in range(args.requests)]
    with tempfile.TemporaryDirectory(prefix="prefix-bench-") as d:
        tmp = Path(d)
        prefix, replica = await asyncio.wait_for(measure(args, tmp, True, prompts, sequence), args.timeout)
        rr, _ = await asyncio.wait_for(measure(args, tmp, False, prompts, sequence), args.timeout)
    cost_us, body_bytes = decision_cost(int(8000 / 1.25))
    print(f"2 llama.cpp replicas x {args.parallel} slots (1 thread each), {args.tenants} tenants x "
          f"~{args.prompt_tokens}-token system prompts, {args.requests} requests, "
          f"concurrency {args.concurrency}, max_tokens 8, cpus={os.cpu_count()}")
    print(f"{'routing':<14} {'TTFT p50 ms':>12} {'TTFT p90 ms':>12} {'req/s':>8} {'prefix hits':>12}")
    for name, r in (("prefix-aware", prefix), ("round-robin", rr)):
        print(f"{name:<14} {r['p50'] * 1000:>12.1f} {r['p90'] * 1000:>12.1f} {r['rps']:>8.2f} {r['hits']:>12.0f}")
    print(f"{'ratio (rr/pa)':<14} {rr['p50'] / prefix['p50']:>11.2f}x {rr['p90'] / prefix['p90']:>11.2f}x "
          f"{prefix['rps'] / rr['rps']:>7.2f}x (throughput pa/rr)")
    print(f"router decision (hash + choose) for a {body_bytes}-byte (~8,000-token) request: {cost_us:.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
