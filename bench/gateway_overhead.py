"""Gateway overhead: the same chat request sent straight to an engine and through the appliance.

    PYTHONPATH=. python bench/gateway_overhead.py [--duration 8] [--warmup 2]
        [--concurrency 1,16,64] [--engine-latency S] [--client auto|wrk|python] [--no-pin]
        [--no-naive] [--raw] [--rsgi] [--keys] [--endpoint responses|messages] [--rounds N] [--profile DIR]
        [--telemetry] [--workers 1,2] [--stream [--streams 64] [--chunks 200] [--pacing-ms 20]
        [--no-gap]] [--peer litellm]

Starts ``tests/fake_engine.py`` (a real aiohttp server), ``appliance serve``
pointed at it as an external (unsupervised) ``openai`` engine, and the baseline,
``bench/naive_proxy.py`` (a naive aiohttp proxy on Granian: the bar DEVELOPERS.md
sets) and, with --raw, the floor of the stack (a bare ASGI proxy, same server
and client; with --rsgi, the same on Granian's RSGI protocol), all on 127.0.0.1
only. For each concurrency it runs the load generator for
--warmup seconds (discarded) and --duration seconds (measured) against the engine
directly, through the naive proxy and through the appliance, and prints one table:
each side's req/s, p50, p99 and CPU per request, and each proxy against direct.

--keys also measures keyed requests (an API key with a token budget, audit on) on
three more appliance processes, one per ``[audit] durability``: "batch" (rows and
charges written every second, the behaviour before durable accounting), "commit"
(each request's row and charge committed before its answer ends, batched across
concurrent requests) and "fsync" (the same, fsync'd): the cost of durable
accounting, measured in the same run.

--telemetry also measures an appliance with ``[telemetry] otlp_endpoint`` set
("traced": every request a sampled trace, exported to a local OTLP/HTTP sink that
answers 200 and keeps nothing) and prints its CPU per request against the untraced
appliance's in the same run: what tracing costs a request (with --workers N, also
"traced-wN" against "appliance-wN").

--stream also measures streamed answers (bench/overhead_stream.py): --streams
streams started together, each of --chunks chunks, the engine writing one every
--pacing-ms and stamping it with its send time, against direct, the floor of the
stack (``naive_proxy.py --raw`` relaying each read as it comes; with --rsgi, its RSGI
twin too), the naive proxy and each appliance; one table of chunks/s, CPU per relayed chunk, time to first chunk
added to direct's (p50/p99), relay delay (a chunk's transit added to direct's,
p50/p99), and each appliance against the floor. --no-gap adds 16 streams with no time
between chunks. --concurrency none measures streams only.

The appliance measured is the tree first on PYTHONPATH (a baseline checkout: the
same bench against two versions), else this one; the run names it.

--workers 1,2 runs one appliance per value with ``[server] workers = N`` (1 leaves
the setting out, so a tree without it runs); a tree that refuses the setting gets
"not measured" and the reason. CPU per request and per chunk is summed over each
side's processes (the daemon and its children, the engine excepted).

--endpoint responses|messages also sends that API's request (the OpenAI Responses
API, the Anthropic Messages API) straight to the engine ("ep-direct") and through
the appliance ("ep-appl") in the same run, and prints its added p50 and CPU per
request against chat's.

--rounds N measures every side N times per concurrency, interleaved (odd rounds
run the sides in reverse order, so a drift of the machine's load hits both APIs
alike); the table shows each side's median, and the --endpoint line the median of
the N per-round ratios with their range. On a shared machine single runs differ
by 30%: compare ratios of 5 rounds or more, with `uptime` noted.

--engine-latency S makes the fake engine take S seconds per answer. At 0 the
engine answers in ~40 us of CPU, far below any real LLM engine, and the run
measures the proxies' CPU cost per request; with a service time like a real
engine's (a GPU engine takes tens of ms for even a short answer) it measures
whether the proxy keeps up with the engine. Every load run is bounded in time
(--duration plus a hard subprocess timeout) and in count (--max-requests per run).

Load generator. On a small box the client competes for CPU with the server under
test, so it must be as cheap as possible per request: ``wrk`` (C, epoll, one
thread) costs a few microseconds of CPU per request; a Python client costs ~10x
that and would tax the appliance run (3 busy processes) more than the direct run
(2 busy processes). ``--client auto`` uses wrk when installed (``apt-get install
wrk``) and otherwise falls back, with a warning, to the lean asyncio/uvloop
raw-socket client in this file.

CPU pinning (default on when the box has >= 2 cores; --no-pin turns it off).
The engine gets a core of its own (the last one) in BOTH measurements; the load
generator and the appliance share the other core(s). This keeps the engine's
capacity identical between the two runs, so the throughput ratio says whether
the proxy (not the shared CPU) becomes the bottleneck, which is what matters on
the real box, where the engine runs on a GPU and the daemon has CPU of its own.
The table also reports the appliance's own CPU time per request (utime+stime of
its process and the processes below it, all threads, read from /proc), the most
stable measure of its cost. With more than one worker (--workers) the workers
inherit the proxies' cores: --no-pin lets them spread over the box.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead_peer import PEERS, start_peer  # noqa: E402
from overhead_procs import (  # noqa: E402
    ROOT, Sides, cpu_seconds, cpu_spent, free_port, machine_cpu, taskset, thread_cpu, tree_cpu_seconds)
from overhead_summary import print_summary  # noqa: E402
from overhead_stream import median_stream, print_stream_table, run_streams  # noqa: E402

BODY = b'{"model":"fake","messages":[{"role":"user","content":"hi"}],"max_tokens":4}'
PATH = "/v1/chat/completions"
# --endpoint: the same small request in another API (path, body).
REQUESTS = {
    "chat": (PATH, BODY),
    "responses": ("/v1/responses", b'{"model":"fake","input":"hi","max_output_tokens":4}'),
    "messages": ("/v1/messages", b'{"model":"fake","max_tokens":4,"messages":[{"role":"user","content":"hi"}]}'),
}
SIDES = ("direct", "raw", "rsgi", "naive", "appliance", "batch", "commit", "fsync", "ep-direct", "ep-appl", "traced")
# Sides that send the --endpoint request instead of chat's.
ENDPOINT_SIDES = ("ep-direct", "ep-appl")
DURABILITY = ("batch", "commit", "fsync")  # --keys: keyed sides, one per [audit] durability

# --telemetry: an OTLP/HTTP collector that takes every export and keeps nothing.
OTLP_SINK = """
import sys
from aiohttp import web
async def traces(request):
    await request.read()
    return web.Response(body=b"", content_type="application/x-protobuf")
app = web.Application()
app.router.add_post("/v1/traces", traces)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None)
"""

WRK_SCRIPT = r"""
wrk.method = "POST"
wrk.body = '%(body)s'
wrk.headers["Content-Type"] = "application/json"
%(auth)s
local max_requests = %(max_requests)d
local count = 0
function response(status, headers, body)
  count = count + 1
  if count >= max_requests then wrk.thread:stop() end
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'RESULT {"requests":%%d,"duration_us":%%d,"p50_us":%%d,"p99_us":%%d,"mean_us":%%f,' ..
    '"connect":%%d,"read":%%d,"write":%%d,"status":%%d,"timeout":%%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    latency.mean, e.connect, e.read, e.write, e.status, e.timeout))
end
"""


# --- the lean Python client (fallback) ------------------------------------------------


async def _py_worker(host: str, port: int, request: bytes, stop_at: float, budget: list[int],
                     lat: list[float], errors: list[int]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    clock = time.perf_counter
    try:
        while budget[0] > 0 and clock() < stop_at:
            budget[0] -= 1
            t0 = clock()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            lat.append(clock() - t0)
            if head[9:12] != b"200":
                errors[0] += 1
    finally:
        writer.close()


async def _py_load(port: int, concurrency: int, duration: float, max_requests: int, token: str = "",
                   endpoint: str = "chat") -> dict:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    path, body = REQUESTS[endpoint]
    request = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n{auth}"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    lat: list[float] = []
    errors = [0]
    budget = [max_requests]
    t0 = time.perf_counter()
    stop_at = t0 + duration
    await asyncio.wait_for(
        asyncio.gather(*(_py_worker("127.0.0.1", port, request, stop_at, budget, lat, errors)
                         for _ in range(concurrency))),
        timeout=duration + 30)
    elapsed = time.perf_counter() - t0
    lat.sort()
    pick = (lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1e6) if lat else (lambda q: 0.0)
    return {"requests": len(lat), "duration_us": elapsed * 1e6, "p50_us": pick(0.50),
            "p99_us": pick(0.99), "status": errors[0]}


def py_client_main(argv: list[str]) -> None:
    port, concurrency, duration, max_requests = int(argv[0]), int(argv[1]), float(argv[2]), int(argv[3])
    token = argv[4] if len(argv) > 4 else ""
    endpoint = argv[5] if len(argv) > 5 else "chat"
    try:
        import uvloop
        run = uvloop.run
    except ImportError:
        run = asyncio.run
    print("RESULT " + json.dumps(run(_py_load(port, concurrency, duration, max_requests, token, endpoint))),
          flush=True)


# --- running a load -----------------------------------------------------------------


class Load:
    def __init__(self, client: str, cpus: str | None, max_requests: int, tmp: Path) -> None:
        self.client = client
        self.cpus = cpus
        self.max_requests = max_requests
        self.tmp = tmp

    def _script(self, token: str, endpoint: str) -> Path:
        script = self.tmp / f"post-{token[:12] or 'keyless'}-{endpoint}.lua"
        auth = f'wrk.headers["Authorization"] = "Bearer {token}"' if token else ""
        script.write_text(WRK_SCRIPT % {"body": REQUESTS[endpoint][1].decode(), "max_requests": self.max_requests,
                                        "auth": auth})
        return script

    def run(self, port: int, concurrency: int, duration: float, token: str = "", endpoint: str = "chat") -> dict:
        if self.client == "wrk":
            # One wrk thread: the whole load fits one core and leaves the rest to the servers.
            cmd = ["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(duration))}s", "--timeout", "10s",
                   "-s", str(self._script(token, endpoint)), f"http://127.0.0.1:{port}{REQUESTS[endpoint][0]}"]
        else:
            cmd = [sys.executable, __file__, "--_py-client", str(port), str(concurrency), str(duration),
                   str(self.max_requests), token, endpoint]
        out = subprocess.run(taskset(self.cpus) + cmd, capture_output=True, text=True,
                             timeout=duration + 60, check=False)
        for line in out.stdout.splitlines():
            if line.startswith("RESULT "):
                res = json.loads(line[7:])
                res["rps"] = res["requests"] / (res["duration_us"] / 1e6)
                res["errors"] = sum(res.get(k, 0) for k in ("connect", "read", "write", "status", "timeout"))
                return res
        raise SystemExit(f"load generator failed (rc {out.returncode}): {out.stderr.strip()[-800:]}")


# --- main ---------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=8.0, help="measured seconds per run (default 8)")
    p.add_argument("--warmup", type=float, default=2.0, help="discarded seconds before each run (default 2)")
    p.add_argument("--concurrency", default="1,16,64",
                   help="comma-separated (default 1,16,64); none: no unary runs (with --stream)")
    p.add_argument("--client", choices=("auto", "wrk", "python"), default="auto")
    p.add_argument("--max-requests", type=int, default=2_000_000, help="cap per load run")
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    p.add_argument("--engine-latency", type=float, default=0.0, help="fake engine --latency (s)")
    p.add_argument("--only", help="measure this side only (direct, naive, raw, appliance, appliance-w2, ...)")
    p.add_argument("--no-naive", action="store_true", help="skip the naive-proxy baseline")
    p.add_argument("--raw", action="store_true",
                   help="also measure the floor of the stack: a bare ASGI proxy on the same server and client")
    p.add_argument("--rsgi", action="store_true",
                   help="also measure that floor on Granian's RSGI protocol (naive_proxy.py --rsgi; "
                        "with --stream, streamed too)")
    p.add_argument("--keys", action="store_true",
                   help="also measure keyed requests (budgeted key, audit on) with [audit] durability "
                        "batch (before durable accounting), commit and fsync")
    p.add_argument("--profile", metavar="DIR",
                   help="py-spy record the appliance during each measured appliance run into DIR")
    p.add_argument("--endpoint", choices=("responses", "messages"),
                   help="also measure this API's request, direct and through the appliance, against chat's")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure each side this many times, interleaved; report medians (default 1)")
    p.add_argument("--telemetry", action="store_true",
                   help="also measure an appliance exporting a trace of every request ([telemetry])")
    p.add_argument("--workers", default="1",
                   help="comma-separated [server] workers of the appliance sides (default 1): one "
                        "appliance per value; 1 leaves the setting out")
    p.add_argument("--stream", action="store_true",
                   help="also measure streamed answers: --streams streams of --chunks chunks, one every "
                        "--pacing-ms, against direct, the floor, the naive proxy and the appliance")
    p.add_argument("--streams", type=int, default=64, help="--stream: streams started together (default 64)")
    p.add_argument("--chunks", type=int, default=200, help="--stream: chunks per stream (default 200)")
    p.add_argument("--pacing-ms", type=float, default=20.0,
                   help="--stream: the engine's time between chunks, ms (default 20)")
    p.add_argument("--no-gap", action="store_true",
                   help="--stream: also 16 streams with no time between chunks (the relay's CPU bound)")
    p.add_argument("--peer", choices=PEERS,
                   help="also measure a peer proxy, installed on demand into a throwaway venv "
                        "($APPLIANCE_BENCH_PEER_DIR), with each --workers value")
    p.add_argument("--json", action="store_true", help="also print the raw results as JSON")
    args = p.parse_args(argv)
    args.levels = [] if args.concurrency == "none" else [int(c) for c in args.concurrency.split(",") if c.strip()]
    args.worker_counts = [int(n) for n in args.workers.split(",") if n.strip()]
    if any(n < 1 for n in args.worker_counts):
        p.error("--workers: each value must be >= 1")
    if not args.levels and not args.stream:
        p.error("--concurrency none measures nothing without --stream")
    return args


def pick_client(wanted: str) -> str:
    if wanted in ("auto", "wrk") and shutil.which("wrk") is None:
        if wanted == "wrk":
            raise SystemExit("wrk not found: install it with `apt-get install wrk` (Debian/Ubuntu) "
                             "or `brew install wrk`, or use --client python")
        print("warning: wrk not found (`apt-get install wrk`); falling back to the Python client, "
              "which costs the box ~10x more CPU per request and understates the appliance",
              file=sys.stderr)
        return "python"
    return "wrk" if wanted == "auto" else wanted


def appliance_side(workers: int) -> str:
    """The appliance side's name: "appliance" with one worker (today's), else appliance-wN."""
    return "appliance" if workers == 1 else f"appliance-w{workers}"


def start_sides(args, sides: Sides, engine_port: int) -> dict[str, str]:
    """Every side this run measures, but direct (the engine, started first); their tokens by side."""
    tokens: dict[str, str] = {}
    for n in args.worker_counts:
        # One worker is said by leaving the setting out (a tree without [server] workers runs it);
        # more may not start on such a tree, and are then reported as not measured.
        if n == 1:
            sides.appliance(appliance_side(n), engine_port)
        else:
            sides.optional(appliance_side(n), lambda n=n: sides.appliance(appliance_side(n), engine_port,
                                                                        server_extra=f"workers = {n}"))
    for durability in DURABILITY if args.keys else ():
        tokens[durability] = sides.appliance(durability, engine_port, f'[audit]\ndurability = "{durability}"\n',
                                             key=True)
    if args.telemetry:
        sink_port = free_port()
        sides.procs.append(subprocess.Popen([sys.executable, "-c", OTLP_SINK, str(sink_port)], env=sides.env,
                                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL))
        traced = f'[telemetry]\notlp_endpoint = "http://127.0.0.1:{sink_port}"\n'
        sides.appliance("traced", engine_port, traced)
        for n in args.worker_counts:  # and with each --workers value, against that appliance
            if n > 1:
                sides.optional(f"traced-w{n}", lambda n=n: sides.appliance(f"traced-w{n}", engine_port, traced,
                                                                          server_extra=f"workers = {n}"))
    for side, wanted in (("naive", not args.no_naive), ("raw", args.raw or args.stream), ("rsgi", args.rsgi)):
        if wanted:
            port = free_port()
            sides.start(side, [sys.executable, str(ROOT / "bench" / "naive_proxy.py"), str(port),
                               f"http://127.0.0.1:{engine_port}", *([f"--{side}"] if side != "naive" else [])],
                        "/health", port=port)
    if args.peer:
        start_peer(args.peer, sides, engine_port, args.worker_counts)
    if args.endpoint:
        appliance = appliance_side(args.worker_counts[0])
        sides.ports.update({"ep-direct": sides.ports["direct"], "ep-appl": sides.ports[appliance]})
        sides.pids.update({"ep-direct": sides.pids["direct"], "ep-appl": sides.pids[appliance]})
    return tokens


def side_order(names) -> list[str]:
    """The sides in the table's order: direct, the baselines, the appliances by workers, the
    peers, then the appliance's variants (keys, tracing, another API)."""
    names = set(names)
    cut = SIDES.index("appliance") + 1
    first = [s for s in SIDES[:cut] if s in names]
    variants = [s for s in SIDES[cut:] if s in names]
    appliances = sorted((n for n in names if n.startswith("appliance-w")), key=lambda n: int(n[11:]))
    peers = sorted((n for n in names if n not in SIDES and n not in appliances), key=lambda n: (len(n), n))
    return first + appliances + peers + variants


def main(argv: list[str]) -> int:
    if argv[:1] == ["--_py-client"]:
        py_client_main(argv[1:])
        return 0
    args = parse_args(argv)
    client = pick_client(args.client) if args.levels else "python"
    ncpu = len(os.sched_getaffinity(0))
    pin = not args.no_pin and ncpu >= 2 and shutil.which("taskset") is not None
    cpus = sorted(os.sched_getaffinity(0))
    engine_cpus = str(cpus[-1]) if pin else None
    rest_cpus = ",".join(str(c) for c in cpus[:-1]) if pin else None

    tmp = Path(tempfile.mkdtemp(prefix="gw-bench-"))
    sides = Sides(tmp, rest_cpus)
    try:
        engine_port = free_port()
        engine_cmd = [sys.executable, str(ROOT / "tests" / "fake_engine.py"), "--port", str(engine_port)]
        if args.engine_latency:
            engine_cmd += ["--latency", str(args.engine_latency)]
        if args.stream:
            engine_cmd += ["--stamp-chunks", "--chunks", str(max(args.chunks, 3))]
        sides.start("direct", engine_cmd, "/health", port=engine_port, cpus=engine_cpus, timeout=30)
        tokens = start_sides(args, sides, engine_port)

        print(f"client={client if args.levels else 'aiohttp (streams)'} pinning={'engine cpu ' + engine_cpus + ', client+appliance cpu ' + rest_cpus if pin else 'off'} "
              f"duration={args.duration:g}s warmup={args.warmup:g}s cpus={ncpu} appliance={sides.measured_tree()}",
              file=sys.stderr)
        names = [s for s in side_order(sides.ports) if not args.only or s == args.only]
        results = []
        load = Load(client, rest_cpus, args.max_requests, tmp)
        for c in args.levels:
            rounds: list[dict] = []
            for r in range(max(1, args.rounds)):
                rounds.append(measure_round(args, load, sides, tokens, c, names[:: -1 if r % 2 else 1]))
            row = median_row(rounds)
            row["concurrency"] = c
            row["rounds"] = rounds
            results.append(row)
            print(f"  c={c} done", file=sys.stderr)
        if results:
            print_table(results, args.endpoint)
        for side, why in sides.skipped.items():
            print(f"{side}: not measured: {why}")
        scenarios = measure_streams(args, sides, tokens, rest_cpus, names) if args.stream else []
        if scenarios:
            print()
            print_stream_table(scenarios)
        print()
        print_summary(results, scenarios, names)
        if args.json:
            print(json.dumps({"unary": results, "stream": scenarios}, indent=1))
        for side in sides.exited():
            print(f"warning: {side} exited during the run: {sides.log_tail(side)}", file=sys.stderr)
        return 0
    finally:
        sides.stop()
        shutil.rmtree(tmp, ignore_errors=True)


# With the appliances and the peers: the sides a stream is measured on.
STREAM_SIDES = ("direct", "raw", "rsgi", "naive")


def measure_streams(args, sides: Sides, tokens: dict, cpus: str | None, names: list[str]) -> list[dict]:
    """Each stream scenario (--streams x --chunks at --pacing-ms; with --no-gap, 16 streams with no
    time between chunks), every stream side measured --rounds times, interleaved."""
    plan = [(args.streams, args.pacing_ms)] + ([(16, 0.0)] if args.no_gap else [])
    wanted = [s for s in names if s in STREAM_SIDES or s.startswith(("appliance", "litellm"))]
    engine = sides.pids["direct"]
    scenarios = []
    for streams, pacing_ms in plan:
        urllib.request.urlopen(urllib.request.Request(  # noqa: S310 - loopback
            f"http://127.0.0.1:{sides.ports['direct']}/fake/pacing?seconds={pacing_ms / 1e3}", method="POST"),
            timeout=10).close()
        runs: dict[str, list[dict]] = {s: [] for s in wanted}
        for r in range(max(1, args.rounds)):
            for side in wanted[:: -1 if r % 2 else 1]:
                runs[side].append(run_streams(cpus, sides.ports[side], streams, args.chunks, args.duration,
                                              sides.pids[side], engine, tokens.get(side, "")))
        scenarios.append({"streams": streams, "chunks": args.chunks, "pacing_ms": pacing_ms,
                          "sides": {s: median_stream(runs[s]) for s in wanted}})
        print(f"  streams {streams}x{args.chunks} @{pacing_ms:g}ms done", file=sys.stderr)
    return scenarios


def measure_round(args, load, sides: Sides, tokens: dict, c: int, names: list[str]) -> dict:
    """One measured run of each side, in this order: {side: result}."""
    row: dict = {}
    engine = sides.pids["direct"]
    for side in names:
        port = sides.ports[side]
        endpoint = args.endpoint if side in ENDPOINT_SIDES else "chat"
        if args.warmup > 0:
            load.run(port, c, args.warmup, tokens.get(side, ""), endpoint)
        spy = None
        if args.profile and side.startswith("appliance"):  # the daemon and its workers
            Path(args.profile).mkdir(parents=True, exist_ok=True)
            # PYSPY_EXTRA="--native --threads" etc.; --native cannot run non-blocking.
            pyspy_extra = os.environ.get("PYSPY_EXTRA", "").split()
            if "--native" not in pyspy_extra and "-n" not in pyspy_extra:
                pyspy_extra.append("--nonblocking")
            pyspy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
            spy = subprocess.Popen(
                [pyspy, "record", "--pid", str(sides.pids[side]), "--subprocesses", "--rate", "250", *pyspy_extra,
                 "--duration", str(int(args.duration)), "--format", "raw",
                 "-o", str(Path(args.profile) / f"{side}-c{c}.txt")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # CPU per request of the processes that serve this side (the engine itself for
        # "direct"; for the others the proxy and every process below it, the engine excepted).
        pid = sides.pids[side]
        exclude = () if pid == engine else (engine,)
        cpu0, threads0 = tree_cpu_seconds(pid, exclude), thread_cpu(pid)
        engine0, machine0, load0 = cpu_seconds(engine), machine_cpu(), _children_cpu()
        res = load.run(port, c, args.duration, tokens.get(side, ""), endpoint)
        n = max(1, res["requests"])
        cpu1 = tree_cpu_seconds(pid, exclude)
        res["cpu_us_per_req"] = cpu_spent(cpu0, cpu1) * 1e6 / n
        # Whether the machine had CPU to spare: all of it, busy, in % of one core (2 cores: 200%),
        # and what the load generator and the engine took of it, per request.
        machine1 = machine_cpu()
        res["machine_busy_pct"] = round(
            100 * (machine1[0] - machine0[0]) / max(machine1[1] - machine0[1], 1e-9) * len(os.sched_getaffinity(0)), 1)
        res["load_cpu_us_per_req"] = round((_children_cpu() - load0) * 1e6 / n, 1)
        if pid != engine:
            res["engine_cpu_us_per_req"] = round((cpu_seconds(engine) - engine0) * 1e6 / n, 1)
            # Each process below the side's own (a worker), its CPU per request of the side's:
            # how evenly the kernel spread the connections over them.
            res["child_cpu_us_per_req"] = sorted(
                (round((v - cpu0.get(p, 0.0)) * 1e6 / n, 1) for p, v in cpu1.items() if p != pid), reverse=True)
        res["thread_cpu_us_per_req"] = {
            k: round((v - threads0.get(k, 0.0)) * 1e6 / n, 1)
            for k, v in thread_cpu(pid).items() if v - threads0.get(k, 0.0) > 0}
        if spy is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                spy.wait(timeout=args.duration + 30)
            if spy.poll() is None:
                spy.kill()
        row[side] = res
    return row


def _children_cpu() -> float:
    """CPU seconds of this process's waited-for children so far (the load generator's runs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def median_row(rounds: list[dict]) -> dict:
    """Each side's median over the rounds, metric by metric."""
    row: dict = {}
    for side in rounds[0]:
        runs = [r[side] for r in rounds]
        row[side] = {**runs[0], **{k: statistics.median(run[k] for run in runs)
                                   for k in ("rps", "p50_us", "p99_us", "cpu_us_per_req", "machine_busy_pct",
                                             "load_cpu_us_per_req")}}
        row[side]["errors"] = sum(run.get("errors", 0) for run in runs)
    return row


def print_table(results: list[dict], endpoint: str | None = None) -> None:
    """One row per concurrency: each side's req/s, p50, p99 and CPU per request;
    then the appliance against direct (added p50, throughput ratio) and against the
    naive proxy measured in the same run."""
    head = (f"{'conc':>4} | {'side':<12} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'CPU us/req':>10} "
            f"{'errors':>6} | {'added p50 ms':>12} {'vs direct':>9}")
    print(head)
    print("-" * len(head))
    for row in results:
        for side in side_order(k for k, v in row.items() if isinstance(v, dict)):
            r = row[side]
            d = row.get("ep-direct" if side in ENDPOINT_SIDES else "direct")
            cells = (f"{row['concurrency']:>4} | {side:<12} {r['rps']:>8.0f} {r['p50_us'] / 1e3:>7.3f} "
                     f"{r['p99_us'] / 1e3:>7.3f} {r['cpu_us_per_req']:>10.0f} {r.get('errors', 0):>6} |")
            if d is not None and side not in ("direct", "ep-direct"):
                cells += f" {(r['p50_us'] - d['p50_us']) / 1e3:>12.3f} {r['rps'] / d['rps']:>9.2f}"
            print(cells)
        a, n = row.get("appliance"), row.get("naive")
        if a is not None and n is not None:
            print(f"{row['concurrency']:>4} | appliance vs naive proxy: {a['rps'] / n['rps']:.2f}x req/s, "
                  f"{n['cpu_us_per_req'] / max(a['cpu_us_per_req'], 1e-9):.2f}x less CPU per request")
        print_workers(row)
        batch = row.get("batch")
        for durable in ("commit", "fsync"):
            d = row.get(durable)
            if batch is not None and d is not None:
                print(f"{row['concurrency']:>4} | keyed, durability {durable} vs batch: "
                      f"{d['cpu_us_per_req'] - batch['cpu_us_per_req']:+.0f} us CPU per request "
                      f"({d['cpu_us_per_req'] / max(batch['cpu_us_per_req'], 1e-9):.2f}x), "
                      f"{d['rps'] / batch['rps']:.2f}x req/s, {(d['p50_us'] - batch['p50_us']) / 1e3:+.3f} ms p50")
        for side in (k for k in row if k == "traced" or k.startswith("traced-w")):
            traced, plain = row[side], row.get("appliance" + side[6:])
            if plain is None:
                continue
            print(f"{row['concurrency']:>4} | {side} vs {'appliance' + side[6:]}: "
                  f"{traced['cpu_us_per_req'] - plain['cpu_us_per_req']:+.0f} us CPU per request "
                  f"({traced['cpu_us_per_req'] / max(plain['cpu_us_per_req'], 1e-9):.2f}x), "
                  f"{traced['rps'] / plain['rps']:.2f}x req/s, {(traced['p50_us'] - plain['p50_us']) / 1e3:+.3f} ms p50")
        if endpoint:
            print_endpoint(row, endpoint)
    print_goals(results)


def print_workers(row: dict) -> None:
    """Each appliance (by its workers) against the floor of the stack and against one worker:
    req/s and CPU per request, summed over all its processes."""
    floor, one = row.get("raw"), row.get("appliance")
    for side in side_order(k for k in row if k.startswith("appliance")):
        a = row[side]
        if floor is not None:
            print(f"{row['concurrency']:>4} | {side} vs floor: {a['rps'] / floor['rps']:.2f}x req/s, "
                  f"{a['cpu_us_per_req'] / max(floor['cpu_us_per_req'], 1e-9):.2f}x CPU per request")
        if "machine_busy_pct" in a:
            daemon = sum(a.get("thread_cpu_us_per_req", {}).values())
            workers = a.get("child_cpu_us_per_req", [])
            print(f"{row['concurrency']:>4} | {side}: machine busy {a['machine_busy_pct']:.0f}% "
                  f"(of {100 * len(os.sched_getaffinity(0))}%); CPU us/req: load generator "
                  f"{a['load_cpu_us_per_req']:.0f}, engine {a.get('engine_cpu_us_per_req', 0):.0f}, "
                  f"its own process {daemon:.0f}" + (f", workers {' / '.join(f'{w:.0f}' for w in workers)}"
                                                     if workers else ""))
        if one is not None and a is not one:
            print(f"{row['concurrency']:>4} | {side} vs one worker: {a['rps'] / one['rps']:.2f}x req/s, "
                  f"{a['cpu_us_per_req'] / max(one['cpu_us_per_req'], 1e-9):.2f}x CPU per request "
                  "(all its processes)")


def print_endpoint(row: dict, endpoint: str) -> None:
    """The --endpoint API against chat, both through the appliance in this run: added
    p50 (over each one's direct p50) and the appliance's CPU per request; with
    rounds, the median of the per-round ratios and their range."""
    names = ("direct", "appliance", "ep-direct", "ep-appl")
    rounds = [r for r in row.get("rounds", [row]) if all(n in r for n in names)]
    if not rounds:
        return
    added = [_endpoint_ratios(r) for r in rounds]
    p50s, cpus = [a[0] for a in added], [a[1] for a in added]
    direct, chat, ep_direct, ep = (row[n] for n in names)
    added_chat = (chat["p50_us"] - direct["p50_us"]) / 1e3
    added_ep = (ep["p50_us"] - ep_direct["p50_us"]) / 1e3
    more = statistics.median(_added_difference(r) for r in rounds)
    print(f"{row['concurrency']:>4} | {endpoint} vs chat through the appliance ({len(rounds)} rounds, medians): "
          f"added p50 {added_ep:.3f} vs {added_chat:.3f} ms ({_spread(p50s)}; {more:+.3f} ms), "
          f"CPU {ep['cpu_us_per_req']:.0f} vs {chat['cpu_us_per_req']:.0f} us/req ({_spread(cpus)})")


def _added_difference(r: dict) -> float:
    """One round's added p50 of the endpoint minus chat's, in ms (a ratio of two
    near-zero numbers says nothing at concurrency 1)."""
    added_chat = r["appliance"]["p50_us"] - r["direct"]["p50_us"]
    return (r["ep-appl"]["p50_us"] - r["ep-direct"]["p50_us"] - added_chat) / 1e3


def _endpoint_ratios(r: dict) -> tuple[float, float]:
    """One round's (added p50, CPU per request) of the endpoint over chat's."""
    added_chat = r["appliance"]["p50_us"] - r["direct"]["p50_us"]
    added_ep = r["ep-appl"]["p50_us"] - r["ep-direct"]["p50_us"]
    cpu = r["ep-appl"]["cpu_us_per_req"] / max(r["appliance"]["cpu_us_per_req"], 1e-9)
    return (added_ep / added_chat if added_chat > 0 else float("nan")), cpu


def _spread(ratios: list[float]) -> str:
    """The median ratio and the rounds' range (a round whose chat added nothing has none)."""
    ratios = [r for r in ratios if r == r]
    if not ratios:
        return "no ratio: chat added nothing measurable"
    if len(ratios) == 1:
        return f"{ratios[0]:.2f}x"
    return f"{statistics.median(ratios):.2f}x, rounds {min(ratios):.2f}-{max(ratios):.2f}"


def print_goals(results: list[dict]) -> None:
    """The issue's two goals, as this run measured them."""
    rows = {row["concurrency"]: row for row in results if "direct" in row and "appliance" in row}
    if 1 in rows:
        added = (rows[1]["appliance"]["p50_us"] - rows[1]["direct"]["p50_us"]) / 1e3
        print(f"goal: added p50 <= 0.5 ms at concurrency 1: {added:.3f} ms, {'met' if added <= 0.5 else 'NOT met'}")
    if 64 in rows:
        ratio = rows[64]["appliance"]["rps"] / rows[64]["direct"]["rps"]
        print(f"goal: throughput >= 80% of direct at concurrency 64: {ratio:.2f}, "
              f"{'met' if ratio >= 0.8 else 'NOT met'}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
