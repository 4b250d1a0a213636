"""Autoscaling benchmark: scale from zero, an RPS step, a full ramp, and the real
CPU engine's first token from zero. Loopback only, bounded in time and requests.

    .venv/bin/python bench/autoscale.py [--quick]

1. Scale from zero (fake engine): time to first token through the appliance for a
   model at zero replicas, minus the engine's own cold start (measured directly:
   spawn, poll every 10 ms until it answers, then the same streamed request; spawn
   to its first token). Goal <= 50 ms.
2. RPS step 2 -> 40 (fake engine, 10 rps per replica): time from the step until a
   replica added for it serves a request, minus the engine's start time. Goal <= 2 s.
3. A full ramp up and down: failed requests. Goal 0.
4. The real CPU engine (llama-server + SmolLM2): time to first token from zero,
   and its own start time measured the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
FAKE = ROOT / "tests" / "fake_engine.py"
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def engine_auth(pid: int) -> dict[str, str]:
    """A replica's key (only the daemon's user may read its environment)."""
    environ = dict(e.split("=", 1) for e in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in e)
    return {"Authorization": f"Bearer {environ['ENGINE_API_KEY']}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def first_token(session: aiohttp.ClientSession, url: str, model: str) -> float:
    """Seconds from sending a streamed request to its first content chunk."""
    t0 = time.perf_counter()
    async with session.post(f"{url}/v1/chat/completions", json={**CHAT, "model": model, "stream": True},
                            timeout=aiohttp.ClientTimeout(total=300)) as resp:
        assert resp.status == 200, await resp.text()
        async for line in resp.content:
            if line.startswith(b"data: {"):
                return time.perf_counter() - t0
    raise RuntimeError("stream ended without a chunk")


async def engine_start_time(argv: list[str], port: int, model: str) -> float:
    """The engine on its own, cold: spawn, poll every 10 ms until it answers, then the
    same streamed request the appliance is timed with; spawn to its first token."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        async with aiohttp.ClientSession() as s:
            while True:
                try:
                    async with s.post(f"http://127.0.0.1:{port}/v1/completions",
                                      json={"model": model, "prompt": "ok", "max_tokens": 1}) as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.01)
            await first_token(s, f"http://127.0.0.1:{port}", model)
            return time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(10)


class Daemon:
    def __init__(self, models: str, extra: str = "") -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-autoscale-"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = self.tmp / "appliance.toml"
        cfg.write_text(f"[server]\nport = {self.port}\n[paths]\nstate_dir = \"{self.tmp}/s\"\n"
                       f"cache_dir = \"{self.tmp}/c\"\nlog_dir = \"{self.tmp}/l\"\n"
                       "[autoscaling]\ninterval_s = 0.25\nstabilization_s = 3\ncooldown_s = 1\n"
                       f"[queue]\nkeepalive_s = 0\n{extra}\n{models}")
        self.proc = subprocess.Popen([PY, "-m", "appliance.cli", "serve", "--config", str(cfg)],
                                     stdout=(self.tmp / "log").open("wb"), stderr=subprocess.STDOUT,
                                     cwd=ROOT, start_new_session=True)

    async def ready(self) -> None:
        async with aiohttp.ClientSession() as s:
            for _ in range(600):
                try:
                    async with s.get(f"{self.url}/readyz") as r:
                        if r.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
        raise RuntimeError(f"daemon not ready; log in {self.tmp}/log")

    async def status(self, session, model: str) -> dict:
        async with session.get(f"{self.url}/admin/status") as r:
            return next(m for m in (await r.json())["models"] if m["name"] == model)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)


def fake_model(name: str, *flags: str, autoscaling: str) -> str:
    argv = [PY, str(FAKE), "--port", "{port}", "--model", name, *flags]
    return (f'[[models]]\nname = "{name}"\nserver = "openai"\ncommand = {json.dumps(argv)}\n'
            f"[models.autoscaling]\n{autoscaling}\n")


async def scale_from_zero(runs: int) -> tuple[float, float, list[float]]:
    starts = [await engine_start_time([PY, str(FAKE), "--port", str(p := free_port()), "--model", "f"],
                                      p, "f") for _ in range(runs)]
    ttfts = await ttfts_from_zero(Daemon(fake_model("f", autoscaling="min_replicas = 0\nmax_replicas = 1")),
                                  "f", runs)
    return statistics.median(ttfts), statistics.median(starts), ttfts


async def ttfts_from_zero(d: Daemon, model: str, runs: int) -> list[float]:
    """Time to first token for a model at zero replicas, unloading it between runs."""
    ttfts = []
    try:
        await d.ready()
        async with aiohttp.ClientSession() as s:
            for _ in range(runs):
                ttfts.append(await first_token(s, d.url, model))
                async with s.post(f"{d.url}/admin/models/{model}/unload", json={}) as r:
                    assert r.status == 200
                while (await d.status(s, model))["replicas"]:
                    await asyncio.sleep(0.05)
    finally:
        d.stop()
    return ttfts


async def load(session, url: str, model: str, rate: float, seconds: float, results: list) -> None:
    """Open-loop load at a steady rate; every answer's status recorded."""
    tasks = []

    async def one() -> None:
        try:
            async with session.post(f"{url}/v1/chat/completions", json={**CHAT, "model": model},
                                    timeout=aiohttp.ClientTimeout(total=60)) as r:
                await r.read()
                results.append(r.status)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            results.append(type(exc).__name__)

    t0 = time.perf_counter()
    n = 0
    while time.perf_counter() - t0 < seconds:
        tasks.append(asyncio.create_task(one()))
        n += 1
        await asyncio.sleep(max(0.0, t0 + n / rate - time.perf_counter()))
    await asyncio.gather(*tasks)


def scaling_daemon() -> Daemon:
    """A fake engine answering in 50 ms, 1 to 4 replicas at 10 requests/s each."""
    return Daemon(fake_model("f", "--latency", "0.05", "--latency-from", "2",
                             autoscaling="min_replicas = 1\nmax_replicas = 4\ntarget_rps_per_replica = 10"))


async def rps_step(fake_start: float) -> tuple[float, list]:
    d = scaling_daemon()
    results: list = []
    try:
        await d.ready()
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
            await load(s, d.url, "f", 2, 3, results)
            step = time.perf_counter()
            loader = asyncio.create_task(load(s, d.url, "f", 40, 8, results))
            served_at = None
            while served_at is None and time.perf_counter() - step < 8:
                for r in (await d.status(s, "f"))["replicas"]:
                    if r["index"] > 0 and r["state"] == "READY" and r.get("url"):
                        async with s.get(f"{r['url']}/fake/stats", headers=engine_auth(r["pid"])) as st:
                            if (await st.json())["requests"] > 1:  # more than its readiness probe
                                served_at = time.perf_counter()
                await asyncio.sleep(0.02)
            await loader
    finally:
        d.stop()
    return (served_at - step - fake_start) if served_at else float("nan"), results


async def full_ramp() -> list:
    d = scaling_daemon()
    results: list = []
    try:
        await d.ready()
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
            for rate, seconds in ((5, 2), (20, 3), (40, 4), (20, 3), (5, 5), (1, 4)):
                await load(s, d.url, "f", rate, seconds, results)
            shrunk = len((await d.status(s, "f"))["replicas"])
    finally:
        d.stop()
    print(f"(full ramp ended with {shrunk} replicas)")
    return results


async def cpu_engine(runs: int) -> tuple[float, float]:
    binary = Path(sys.prefix) / "bin" / "llama-server"
    gguf = Path(sys.prefix) / "share/appliance/models/SmolLM2-135M-Instruct.Q4_1.gguf"
    starts = []
    for _ in range(runs):
        port = free_port()
        starts.append(await engine_start_time(
            [str(binary), "--model", str(gguf), "--port", str(port), "--host", "127.0.0.1",
             "--alias", "m", "--ctx-size", "8192", "--parallel", "4", "--no-webui"], port, "m"))
    d = Daemon('[[models]]\nname = "m"\nserver = "llamacpp"\nsource = "builtin:smollm2-135m-instruct"\n'
               "[models.autoscaling]\nmin_replicas = 0\n")
    ttfts = await ttfts_from_zero(d, "m", runs)
    return statistics.median(ttfts), statistics.median(starts)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    ttft0, fake_start, _ = await scale_from_zero(args.runs)
    step_s, step_results = await rps_step(fake_start)
    ramp = await full_ramp()
    cpu_ttft, cpu_start = await cpu_engine(min(args.runs, 3))
    failed_step = sum(1 for r in step_results if r != 200)
    failed_ramp = sum(1 for r in ramp if r != 200)
    rows = [
        ("scale from zero: TTFT - engine start (fake)", f"{(ttft0 - fake_start) * 1000:.0f} ms",
         f"TTFT {ttft0 * 1000:.0f} ms, engine alone, cold: {fake_start * 1000:.0f} ms", "<= 50 ms"),
        ("RPS 2 -> 40: added replica serves, minus start", f"{step_s:.2f} s",
         f"{failed_step} failed of {len(step_results)}", "<= 2 s"),
        ("full ramp 5 -> 40 -> 1 rps: failed requests", f"{failed_ramp}", f"of {len(ramp)}", "0"),
        ("CPU engine from zero: TTFT", f"{cpu_ttft * 1000:.0f} ms",
         f"llama-server alone, cold: {cpu_start * 1000:.0f} ms; overhead {(cpu_ttft - cpu_start) * 1000:.0f} ms",
         "-"),
    ]
    print(f"\nautoscale benchmark (median of {args.runs} runs where repeated), {os.cpu_count()} cores\n")
    print("| measure | value | detail | goal |")
    print("| --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    asyncio.run(main())
