"""What the per-replica engine key costs the proxy: CPU per request of the client
side of the hop, the shared session with no key (before) against the replica's
own session that sends its key as a default header (appliance/fleet/engine_access.py).

    PYTHONPATH=. python bench/engine_key.py [--requests 20000] [--concurrency 16] [--rounds 3]

One fake engine (tests/fake_engine.py, with a key) on its own core where there are
two or more; the client runs in this process, and its CPU time (utime+stime) per
request is what the table shows, best of --rounds for each side, alternating.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from appliance.fleet.engine_access import engine_session, http_session, open_access, tcp_connector  # noqa: E402
from appliance.fleet.replica_state import free_port  # noqa: E402

BODY = b'{"model":"fake","messages":[{"role":"user","content":"hi"}],"max_tokens":4}'
HEADERS = {"Content-Type": "application/json", "X-Request-Id": "0" * 32}


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def run(session: aiohttp.ClientSession, url: str, requests: int, concurrency: int) -> float:
    """CPU seconds per request of this process for `requests` POSTs."""
    left = requests

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            async with session.post(url, data=BODY, headers=HEADERS) as resp:
                await resp.read()
                assert resp.status == 200, resp.status

    start = cpu()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return (cpu() - start) / requests


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    access = open_access()
    port = free_port()
    pin = ["taskset", "-c", str(os.cpu_count() - 1)] if (os.cpu_count() or 1) >= 2 else []
    engines = []
    for key in ("", access.secret):  # the same engine twice: without a key, and with it
        env = {**os.environ, "ENGINE_API_KEY": key}
        engines.append(subprocess.Popen([*pin, sys.executable, str(ROOT / "tests" / "fake_engine.py"),
                                         "--port", str(port + 1 if key else port)], env=env,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    try:
        for p_ in (port, port + 1):
            for _ in range(200):
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{p_}/health", timeout=1)
                    break
                except OSError:
                    time.sleep(0.05)
        shared = http_session(tcp_connector(64))
        own = engine_session(64, access, unix_socket=False)
        sides = {"shared session, no key (before)": (shared, f"http://127.0.0.1:{port}/v1/chat/completions"),
                 "replica session, key header (after)": (own, f"http://127.0.0.1:{port + 1}/v1/chat/completions")}
        best = {name: float("inf") for name in sides}
        for _ in range(args.rounds):
            for name, (session, url) in sides.items():
                await run(session, url, 500, args.concurrency)  # warm the pool
                best[name] = min(best[name], await run(session, url, args.requests, args.concurrency))
        await shared.close()
        await own.close()
    finally:
        for e in engines:
            e.kill()
        access.close()
    base = best["shared session, no key (before)"]
    print(f"{args.requests} requests x {args.rounds} rounds, concurrency {args.concurrency}\n")
    print("| side | client CPU per request | vs before |")
    print("|---|---|---|")
    for name, value in best.items():
        print(f"| {name} | {value * 1e6:.1f} us | {value / base:.3f}x |")


if __name__ == "__main__":
    asyncio.run(main())
