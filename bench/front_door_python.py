"""The appliance's own Python per unary request, the engine's answer canned: this tree against a baseline.

    python bench/front_door_python.py --baseline /work/base-37781ce [--requests 3000] [--batches 7] [--rounds 3]

The front door (appliance/api/app.py) is called in process, under uvloop, with the engine
call (``EngineProxy.unary``) replaced by one that takes the replica's lease and returns a
canned answer: what is left is the appliance's Python between the ASGI server and the
engine hop (key, body, route, ledger, relay), with no socket and no engine in it.
tests/fake_engine.py runs only so that the model's replica becomes ready.

Each round runs each tree in a fresh process (alternating which goes first) and reports the
min and the median of --batches batches of --requests requests (process CPU time per request),
the Python function calls per request (cProfile's count: work, not time, so the machine's
load barely moves it) and the floor's equivalent (one receive, two sends). The table shows
each side's medians over the rounds and this tree against the baseline.
bench/front_door_cost.py measures the same front door with the real engine hop.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from alternate import alternate, free_port, load_line  # noqa: E402

BODY = b'{"model":"fake","messages":[{"role":"user","content":"hello there"}],"max_tokens":16}'
ANSWER = (b'{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"fake","choices":[{"index":0,'
          b'"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],'
          b'"usage":{"prompt_tokens":5,"completion_tokens":1,"total_tokens":6}}')
# What the OpenAI Python SDK sends (keyless: no Authorization), in its order.
HEADERS = [(b"host", b"127.0.0.1:8000"), (b"accept-encoding", b"gzip, deflate"), (b"connection", b"keep-alive"),
           (b"accept", b"application/json"), (b"content-type", b"application/json"),
           (b"user-agent", b"OpenAI/Python 1.54.0"), (b"x-stainless-lang", b"python"),
           (b"x-stainless-package-version", b"1.54.0"), (b"x-stainless-os", b"Linux"),
           (b"x-stainless-arch", b"x64"), (b"x-stainless-runtime", b"CPython"),
           (b"x-stainless-runtime-version", b"3.11.7"), (b"x-stainless-async", b"false"),
           (b"x-stainless-retry-count", b"0"), (b"x-stainless-read-timeout", b"600"),
           (b"content-length", str(len(BODY)).encode())]
PROFILED = 2000  # requests under cProfile, for the calls per request


def measure(tree: str, port: int, requests: int, batches: int) -> dict:
    """In a child process with tree first on sys.path: the figures of one round."""
    import cProfile
    import pstats

    import uvloop

    sys.path.insert(0, tree)
    from appliance.api.app import create_app, front_door
    from appliance.config import parse_config

    tmp = tempfile.mkdtemp(prefix="front-door-python-")
    cfg = parse_config(
        f'[server]\nhost = "127.0.0.1"\nport = 1\nlog_level = "warning"\n'
        f'[paths]\nstate_dir = "{tmp}/state"\ncache_dir = "{tmp}/cache"\nlog_dir = "{tmp}/log"\n'
        f'[[models]]\nname = "fake"\nserver = "openai"\nurl = "http://127.0.0.1:{port}"\n'
    )
    statuses: list[int] = []

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    async def unary(replica, path, body, headers, method="POST"):  # the engine's answer, canned
        with replica.lease():
            return 200, ANSWER, "application/json"

    async def run() -> dict:
        app = create_app(cfg)
        front = front_door(app)
        async with app.lifespan():
            app.state.runtime.proxy.unary = unary

            async def one() -> None:
                messages = [{"type": "http.request", "body": BODY, "more_body": False}]

                async def receive() -> dict:
                    if messages:
                        return messages.pop()
                    await asyncio.sleep(3600)
                    return {"type": "http.disconnect"}

                scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": HEADERS,
                         "client": ("127.0.0.1", 5555), "query_string": b"", "scheme": "http",
                         "http_version": "1.1"}
                await front(scope, receive, send)

            async def floor_one() -> None:  # what a bare ASGI app does per request
                messages = [{"type": "http.request", "body": BODY, "more_body": False}]

                async def receive() -> dict:
                    return messages.pop()

                await receive()
                await send({"type": "http.response.start", "status": 200,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(ANSWER)).encode())]})
                await send({"type": "http.response.body", "body": ANSWER, "more_body": False})

            for _ in range(500):  # warm-up: the replica becomes ready (the requests wait for it)
                await one()
            if set(statuses) != {200}:
                raise SystemExit(f"answers other than 200: {sorted(set(statuses))}")
            gc.freeze()  # as the daemon does after startup (appliance/api/lifespan.py)
            per_batch = []
            for _ in range(batches):
                cpu = time.process_time()
                for _ in range(requests):
                    await one()
                per_batch.append((time.process_time() - cpu) / requests * 1e6)
            profile = cProfile.Profile()
            profile.enable()
            for _ in range(PROFILED):
                await one()
            profile.disable()
            cpu = time.process_time()
            for _ in range(requests):
                await floor_one()
            floor = (time.process_time() - cpu) / requests * 1e6
        if set(statuses) != {200}:
            raise SystemExit(f"answers other than 200: {sorted(set(statuses))}")
        return {"min": min(per_batch), "median": statistics.median(per_batch),
                "calls": pstats.Stats(profile).total_calls / PROFILED, "floor": floor}

    return uvloop.run(run())


def main(argv: list[str]) -> int:
    if argv[:1] == ["--_measure"]:
        tree, port, requests, batches = argv[1], int(argv[2]), int(argv[3]), int(argv[4])
        print(json.dumps(measure(tree, port, requests, batches)))
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", required=True, help="the other tree (e.g. /work/base-37781ce)")
    p.add_argument("--requests", type=int, default=3000, help="requests per batch (default 3000)")
    p.add_argument("--batches", type=int, default=7, help="batches per round (default 7)")
    p.add_argument("--rounds", type=int, default=3, help="runs of each tree, alternating (default 3)")
    args = p.parse_args(argv)
    port = free_port()
    here = str(Path(__file__).resolve())
    measured = [str(port), str(args.requests), str(args.batches)]
    sides = [("base", [here, "--_measure", args.baseline, *measured]),
             ("tree", [here, "--_measure", str(ROOT), *measured])]
    med = alternate(sides, args.rounds, port)
    print(load_line(args.rounds, args.batches, args.requests, args.baseline))
    print(f"{'side':<4} | {'us/req min':>10} | {'us/req med':>10} | {'calls/req':>9} | {'floor us':>8}")
    for side in ("base", "tree"):
        m = med[side]
        print(f"{side:<4} | {m['min']:>10.1f} | {m['median']:>10.1f} | {m['calls']:>9.1f} | {m['floor']:>8.1f}")
    b, t = med["base"], med["tree"]
    print(f"tree/base: us/req min {t['min'] / b['min']:.3f}, median {t['median'] / b['median']:.3f}, "
          f"calls {t['calls'] / b['calls']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
