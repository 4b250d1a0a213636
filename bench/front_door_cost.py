"""The front door's own cost per proxied chat request, in process: this tree against another.

    python bench/front_door_cost.py --base /path/to/other/tree [--requests 2000] [--rounds 3]

No server and no load generator: the app's ASGI front door (appliance/api/app.py) is
called directly, in one process pinned to one core, and forwards to ``tests/fake_engine.py``
(a real aiohttp server, on another core when there is one). For each tree and each
concurrency (1 and 16) it measures the process's CPU time per request and, with cProfile,
the Python function calls per request; then 64 streams of 100 chunks, one every 20 ms
(row "s64": CPU time and calls per relayed chunk). The calls are the steadiest figure on a shared
machine: they count work, not time, so other processes' load barely moves them (aiohttp's
timing-dependent paths do, a little). The trees run alternately, each round in a fresh
process; the table shows each side's medians and this tree against the base.

bench/gateway_overhead.py measures the whole stack (Granian, sockets, a load generator); this
one isolates what the appliance's own code costs, to compare two versions of it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BODY = b'{"model":"fake","messages":[{"role":"user","content":"hi"}],"max_tokens":4}'
LEVELS = (1, 16)
STREAMS, STREAM_CHUNKS = 64, 100  # the engine paces a stream's chunks 20 ms apart
STREAM_BODY = (b'{"model":"fake","messages":[{"role":"user","content":"hi"}],"max_tokens":%d,"stream":true}'
               % STREAM_CHUNKS)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(tree: str, port: int, requests: int) -> dict:
    """Runs in a child process with tree first on sys.path: {concurrency: (cpu_us, calls)}."""
    import cProfile
    import pstats

    sys.path.insert(0, tree)
    try:
        from appliance.api.app import create_app, front_door
    except ImportError:  # before the regroup into subpackages
        from appliance.app import create_app, front_door
    from appliance.config import parse_config

    tmp = tempfile.mkdtemp(prefix="front-door-")
    cfg = parse_config(
        f'[server]\nhost = "127.0.0.1"\nport = 1\nlog_level = "warning"\n'
        f'[paths]\nstate_dir = "{tmp}/state"\ncache_dir = "{tmp}/cache"\nlog_dir = "{tmp}/log"\n'
        f'[[models]]\nname = "fake"\nserver = "openai"\nurl = "http://127.0.0.1:{port}"\n'
    )
    headers = [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"),
               (b"content-length", str(len(BODY)).encode())]
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
             "query_string": b"", "http_version": "1.1", "scheme": "http", "root_path": "",
             "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 1)}

    async def run() -> dict:
        app = create_app(cfg)
        front = front_door(app)
        events: asyncio.Queue = asyncio.Queue()
        started, stopped = asyncio.Event(), asyncio.Event()
        await events.put({"type": "lifespan.startup"})

        async def lifespan_send(message: dict) -> None:
            if message["type"] == "lifespan.startup.failed":
                raise SystemExit(message.get("message"))
            (started if message["type"] == "lifespan.startup.complete" else stopped).set()

        life = asyncio.create_task(app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}},
                                       events.get, lifespan_send))
        await started.wait()
        statuses: set[int] = set()

        relayed = [0]  # streamed events sent to the client

        async def one(body: bytes = BODY) -> None:
            messages = [{"type": "http.request", "body": body, "more_body": False}]

            async def receive() -> dict:
                if messages:
                    return messages.pop()
                await asyncio.sleep(3600)  # the client stays until its answer ends
                return {"type": "http.disconnect"}

            async def send(message: dict) -> None:
                if message["type"] == "http.response.start":
                    statuses.add(message["status"])
                elif body is not BODY:
                    relayed[0] += message["body"].count(b"data: {")

            hs = headers if body is BODY else [*headers[:2], (b"content-length", str(len(body)).encode())]
            await front(dict(scope, headers=list(hs)), receive, send)

        async def batch(count: int, concurrency: int) -> None:
            for _ in range(count // concurrency):
                await asyncio.gather(*(one() for _ in range(concurrency)))

        await batch(500, 1)  # warm-up: connections, caches, the first request's imports
        out = {}
        for concurrency in LEVELS:
            cpu = time.process_time()
            await batch(requests, concurrency)
            cpu_us = (time.process_time() - cpu) / requests * 1e6
            profile = cProfile.Profile()
            profile.enable()
            await batch(400, concurrency)
            profile.disable()
            out[concurrency] = (cpu_us, pstats.Stats(profile).total_calls / 400)
        await asyncio.gather(*(one(STREAM_BODY) for _ in range(STREAMS)))  # warm-up
        relayed[0], cpu = 0, time.process_time()
        await asyncio.gather(*(one(STREAM_BODY) for _ in range(STREAMS)))
        cpu_us = (time.process_time() - cpu) / relayed[0] * 1e6
        relayed[0], profile = 0, cProfile.Profile()
        profile.enable()
        await asyncio.gather(*(one(STREAM_BODY) for _ in range(STREAMS)))
        profile.disable()
        out[f"s{STREAMS}"] = (cpu_us, pstats.Stats(profile).total_calls / relayed[0])
        if statuses != {200}:
            raise SystemExit(f"answers other than 200: {sorted(statuses)}")
        await events.put({"type": "lifespan.shutdown"})
        await stopped.wait()
        await life
        return out

    return asyncio.run(run())


def main(argv: list[str]) -> int:
    if argv[:1] == ["--_measure"]:
        tree, port, requests = argv[1], int(argv[2]), int(argv[3])
        print(json.dumps(measure(tree, port, requests)))
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="the other tree (e.g. a `git archive` of an older commit)")
    p.add_argument("--requests", type=int, default=2000, help="measured requests per concurrency (default 2000)")
    p.add_argument("--rounds", type=int, default=3, help="runs of each tree, alternating (default 3)")
    args = p.parse_args(argv)
    cpus = sorted(os.sched_getaffinity(0))
    app_cpu, engine_cpu = cpus[0], cpus[-1]
    port = _free_port()
    engine = subprocess.Popen(["taskset", "-c", str(engine_cpu), sys.executable, str(ROOT / "tests" / "fake_engine.py"),
                               "--port", str(port), "--chunks", str(STREAM_CHUNKS),
                               "--chunk-delay", "0.02"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results: dict[str, list[dict]] = {"base": [], "this": []}
    try:
        time.sleep(1.5)
        for r in range(args.rounds):
            order = [("base", args.base), ("this", str(ROOT))]
            for side, tree in order if r % 2 == 0 else reversed(order):
                env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
                out = subprocess.run(
                    ["taskset", "-c", str(app_cpu), sys.executable, __file__, "--_measure", tree, str(port),
                     str(args.requests)], capture_output=True, text=True, timeout=600, env=env, check=True)
                results[side].append(json.loads(out.stdout.splitlines()[-1]))
                print(f"round {r + 1} {side}: done", file=sys.stderr)
    finally:
        engine.terminate()
        engine.wait(timeout=10)
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; {args.rounds} rounds; base: {args.base}")
    print(f"{'conc':>4} | {'side':<4} | {'CPU us/req':>10} | {'calls/req':>9} | {'CPU ratio':>9} | {'calls ratio':>11}")
    print("(s64: per relayed chunk of 64 paced streams)")
    for level in [*map(str, LEVELS), f"s{STREAMS}"]:
        med = {
            side: tuple(statistics.median(run[level][i] for run in runs) for i in (0, 1))
            for side, runs in results.items()
        }
        for side in ("base", "this"):
            cpu, calls = med[side]
            ratios = (f"{cpu / med['base'][0]:>9.3f} | {calls / med['base'][1]:>11.3f}" if side == "this"
                      else f"{'':>9} | {'':>11}")
            print(f"{level:>4} | {side:<4} | {cpu:>10.0f} | {calls:>9.1f} | {ratios}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
