"""Streamed answers through each side of bench/gateway_overhead.py (--stream).

The fake engine streams M chunks per answer, one every --pacing-ms, each stamped with
its send time (its text says "sent_at=" time.monotonic(), tests/fake_engine.py
--stamp-chunks; in the text, so a proxy that rebuilds every chunk relays it too). The
client, a lean aiohttp one in its own process pinned beside the proxies, starts N
streams together (one event releases them all) and, for each chunk, notes its arrival
on the same clock. Rounds of N streams run back to back for --duration seconds,
after one discarded warm-up round of short streams (connections opened and pools warm:
what a running server has). Per side it reports:

- chunks/s: content chunks received over the measured rounds' wall time;
- CPU per relayed chunk: the side's CPU time (its process and every process below
  it, the engine excepted; for "direct" the engine's own) over those chunks;
- time to first chunk p50/p99, each stream timed from its request, taken per burst (a
  round's N streams) and given as the median over the bursts: the table shows what each
  proxy adds to direct's;
- transit p50/p99: a chunk's arrival minus its stamp. Direct's transit is the
  floor of the measurement (engine write to client read); what a proxy adds to it is
  the time a chunk spends in the proxy (the relay delay).

Under load, direct's own transit p99 (tens of ms on a busy 2-core machine) says nothing
of a proxy's, and a proxy's includes the stack's: N streams paced together put N chunks
on the one loop at once, each sent after those ahead of it. So the appliance's delays
are also given over the floor's (the bare relay on the same stack, same run, same
percentile): the appliance's own share, which cancels what the stack and the machine add.

Why time to first chunk is taken per burst: on a shared machine a whole burst moves
(another process takes the core for tens of ms as the N streams start), and a run of long
streams holds few bursts (64 x 200 chunks at 20 ms: two in 8 s). Pooled over two bursts,
the p50 is the 64th of 128 streams: once the bursts are apart, the better burst's slowest
stream, not its median; with many short bursts (64 x 10) the pooled p50 lands near a
burst's median. A proxy's streams start one after another (spread over ~20 ms in a burst,
direct's over a few), so with long streams its pooled p50 could read later against
direct's than with short ones, whatever the proxy does. Each burst's own p50 and p99 (its
median and slowest stream), their median over the bursts of every run, compare like with
like.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead_procs import cpu_spent, side_label, taskset, tree_cpu_seconds  # noqa: E402
from overhead_summary import over_floor  # noqa: E402

STAMP = b"sent_at="  # in the chunk's text: tests/fake_engine.py --stamp-chunks
CONTENT = b'"tok'  # the fake engine's content is "tok0 ", "tok1 ", ...: a content chunk however re-encoded


def stream_body(chunks: int) -> bytes:
    return json.dumps({"model": "fake", "messages": [{"role": "user", "content": "hi"}],
                       "max_tokens": chunks, "stream": True}).encode()


async def _one_stream(session, url: str, body: bytes, go: asyncio.Event, headers: dict,
                      ttft: list[float], transit: list[float], errors: list[str]) -> int:
    """One streamed answer: its content chunks, counted; arrival minus stamp per chunk.
    Each read is scanned whole (one clock reading for the chunks it holds), not split into
    lines: the client's own cost per chunk is paid by every side alike, and inflates the
    floor of the transit it measures."""
    await go.wait()
    clock = time.monotonic
    t0 = clock()
    got = 0
    rest = b""
    try:
        async with session.post(url, data=body, headers=headers) as resp:
            if resp.status != 200:
                errors.append(f"HTTP {resp.status}: {(await resp.read())[:200]!r}")
                return 0
            async for data in resp.content.iter_any():
                now = clock()
                # Whole events only: a chunk cut by the read waits for its end.
                data = rest + data
                cut = data.rfind(b"\n\n") + 2
                if cut < 2:
                    rest = data
                    continue
                data, rest = data[:cut], data[cut:]
                n = data.count(CONTENT)  # content chunks: not role, usage or keep-alive events
                if not n:
                    continue
                if not got:
                    ttft.append(now - t0)
                got += n
                at = data.find(STAMP)
                while at >= 0:
                    end = data.find(b" ", at)
                    transit.append(now - float(data[at + len(STAMP):end]))
                    at = data.find(STAMP, end)
    except Exception as exc:  # noqa: BLE001 - a broken stream is counted, not fatal
        errors.append(f"{type(exc).__name__}: {exc}"[:200])
    return got


async def _round(session, url: str, streams: int, body: bytes, headers: dict, ttft: list[float],
                 transit: list[float], errors: list[str]) -> int:
    go = asyncio.Event()
    tasks = [asyncio.create_task(_one_stream(session, url, body, go, headers, ttft, transit, errors))
             for _ in range(streams)]
    await asyncio.sleep(0)  # every task waits on the event before it is set
    go.set()
    return sum(await asyncio.gather(*tasks))


def _pick(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


async def _measure(port: int, streams: int, chunks: int, duration: float, token: str, root: int,
                   exclude: tuple[int, ...], path: str) -> dict:
    import aiohttp

    url = f"http://127.0.0.1:{port}{path}"
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    bursts: list[list[float]] = []  # each round's times to first chunk
    transit: list[float] = []
    errors: list[str] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=None, sock_read=120)) as session:
        await _round(session, url, streams, stream_body(2), headers, [], [], errors)  # warm-up, discarded
        body = stream_body(chunks)
        got = rounds = 0
        cpu0 = tree_cpu_seconds(root, exclude)
        t0 = time.monotonic()
        while True:
            bursts.append([])
            got += await _round(session, url, streams, body, headers, bursts[-1], transit, errors)
            rounds += 1
            if time.monotonic() - t0 >= duration:
                break
        elapsed = time.monotonic() - t0
        cpu = cpu_spent(cpu0, tree_cpu_seconds(root, exclude))
    ttft_p50s = [_pick(b, 0.50) * 1e3 for b in bursts if b]
    ttft_p99s = [_pick(b, 0.99) * 1e3 for b in bursts if b]
    return {"streams": streams, "rounds": rounds, "chunks": got, "elapsed_s": elapsed,
            "chunks_per_s": got / elapsed, "cpu_us_per_chunk": cpu * 1e6 / max(got, 1),
            "ttft_p50s_ms": ttft_p50s, "ttft_p99s_ms": ttft_p99s,
            "ttft_p50_ms": _median(ttft_p50s), "ttft_p99_ms": _median(ttft_p99s),
            "transit_p50_ms": _pick(transit, 0.50) * 1e3, "transit_p99_ms": _pick(transit, 0.99) * 1e3,
            "expected": rounds * streams * chunks, "errors": len(errors), "first_error": errors[:1]}


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def client_main(argv: list[str]) -> None:
    """The client process: --_stream-client PORT STREAMS CHUNKS DURATION ROOT_PID EXCLUDE_PID TOKEN PATH."""
    port, streams, chunks = int(argv[0]), int(argv[1]), int(argv[2])
    duration, root, exclude = float(argv[3]), int(argv[4]), int(argv[5])
    token, path = argv[6], argv[7]
    try:
        import uvloop

        run = uvloop.run
    except ImportError:
        run = asyncio.run
    excluded = (exclude,) if exclude and exclude != root else ()
    res = run(_measure(port, streams, chunks, duration, token, root, excluded, path))
    print("RESULT " + json.dumps(res), flush=True)


def run_streams(cpus: str | None, port: int, streams: int, chunks: int, duration: float, root: int,
                exclude: int, token: str = "", path: str = "/v1/chat/completions") -> dict:
    """One side's streams, measured by the client in its own (pinned) process."""
    cmd = [sys.executable, __file__, "--_stream-client", str(port), str(streams), str(chunks), str(duration),
           str(root), str(exclude), token, path]
    out = subprocess.run(taskset(cpus) + cmd, capture_output=True, text=True, timeout=duration + 300, check=False)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise SystemExit(f"stream client failed (rc {out.returncode}): {out.stderr.strip()[-800:]}")


def median_stream(runs: list[dict]) -> dict:
    """Each metric's median over the rounds of one side."""
    keys = ("chunks_per_s", "cpu_us_per_chunk", "transit_p50_ms", "transit_p99_ms")
    # Time to first chunk: the median over every burst of every round, each burst weighed once.
    p50s = [v for r in runs for v in r["ttft_p50s_ms"]]
    p99s = [v for r in runs for v in r["ttft_p99s_ms"]]
    return {**runs[0], **{k: statistics.median(r[k] for r in runs) for k in keys},
            "ttft_p50s_ms": p50s, "ttft_p99s_ms": p99s, "ttft_p50_ms": _median(p50s), "ttft_p99_ms": _median(p99s),
            "rounds": sum(r["rounds"] for r in runs),
            "errors": sum(r["errors"] for r in runs), "chunks": sum(r["chunks"] for r in runs),
            "expected": sum(r["expected"] for r in runs)}


def print_stream_table(scenarios: list[dict]) -> None:
    """One block per scenario (streams x chunks at a pacing), one row per side; what each
    side adds to direct's time to first chunk and transit, and the appliance against the floor."""
    head = (f"{'scenario':<22} | {'side':<22} {'chunks/s':>9} {'CPU us/chunk':>12} {'TTFT p50':>9} "
            f"{'p99 ms':>7} {'+TTFT p50':>9} {'p99 ms':>7} {'relay p50':>9} {'p99 ms':>7} {'missing':>7} {'errors':>6}")
    print(head)
    print("-" * len(head))
    for sc in scenarios:
        what = f"{sc['streams']}x{sc['chunks']} @{sc['pacing_ms']:g}ms"
        d = sc["sides"].get("direct")
        for side, r in sc["sides"].items():
            cells = (f"{what:<22} | {side_label(side):<22} {r['chunks_per_s']:>9.0f} "
                     f"{r['cpu_us_per_chunk']:>12.1f} {r['ttft_p50_ms']:>9.2f} {r['ttft_p99_ms']:>7.2f}")
            if d is not None and side != "direct":
                cells += (f" {r['ttft_p50_ms'] - d['ttft_p50_ms']:>+9.2f} {r['ttft_p99_ms'] - d['ttft_p99_ms']:>+7.2f}"
                          f" {r['transit_p50_ms'] - d['transit_p50_ms']:>+9.3f}"
                          f" {r['transit_p99_ms'] - d['transit_p99_ms']:>+7.3f}")
            else:  # direct: its own transit, the floor of the measurement
                cells += f" {'':>9} {'':>7} {r['transit_p50_ms']:>9.3f} {r['transit_p99_ms']:>7.3f}"
            print(cells + f" {r['expected'] - r['chunks']:>7} {r['errors']:>6}")
            if r["errors"]:
                print(f"{'':<22} |   first error: {r['first_error'][0]}")
        print(f"{what:<22} | bursts of {sc['streams']} streams measured: "
              + ", ".join(f"{side_label(side)} {r['rounds']}" for side, r in sc["sides"].items()))
        floor = sc["sides"].get("raw")
        for side, r in sc["sides"].items():
            if side.startswith("appliance") and floor:
                print(f"{what:<22} | {side_label(side)} vs floor: "
                      f"{r['cpu_us_per_chunk'] / max(floor['cpu_us_per_chunk'], 1e-9):.2f}x CPU per chunk, "
                      f"{r['chunks_per_s'] / max(floor['chunks_per_s'], 1e-9):.2f}x chunks/s, "
                      f"time to first chunk {over_floor(r, floor, 'ttft', 2)}, relay delay "
                      f"{over_floor(r, floor, 'transit', 3)} (p50 / p99 over the floor's)")
    print("(TTFT p50 / p99: a burst's median and slowest stream, the median over the bursts; "
          "+TTFT: time to first chunk added to direct's; relay: chunk transit (arrival minus "
          "the engine's send stamp) added to direct's; direct's row shows its own transit; missing: chunks not "
          "received; errors: failed streams)")


if __name__ == "__main__" and sys.argv[1:2] == ["--_stream-client"]:
    client_main(sys.argv[2:])
