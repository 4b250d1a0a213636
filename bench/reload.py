"""Benchmark of applying a config change while serving: a reload (SIGHUP) against a
restart (SIGTERM, then `appliance serve` again: the only way before live reload), on
the same daemon setup, in the same run.

The change: a model's engine arguments (its replicas roll), a model added, a route
made regulated. Meanwhile a steady open-loop load of 20 requests a second (half to the
rolled model) runs; every answer that is not a 200, or a connection that fails,
counts as failed. "Live" is when the admin status shows the new config served: the
added model READY and the rolled model on one READY replica of its new engine.

Run from the repository root (fake engines, no GPU; `--start-s` is each fake engine's
load time):

    .venv/bin/python bench/reload.py [--rounds 3] [--rps 20] [--start-s 1.0]

With PYTHONPATH=/path/to/an/older/tree the same command measures that tree; one
without live reload dies on SIGHUP, and its reload row says so.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
FAKE_ENGINE = ROOT / "tests" / "fake_engine.py"
PY = sys.executable
# The tree measured: `python -m` puts its working directory first on sys.path.
TREE = os.environ.get("PYTHONPATH", "").split(":")[0] or str(ROOT)
CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model(name: str, *flags: str) -> str:
    argv = ", ".join(f'"{a}"' for a in [PY, str(FAKE_ENGINE), "--port", "{port}", "--model", name, *flags])
    return f'[[models]]\nname = "{name}"\nserver = "openai"\ncommand = [{argv}]\n\n'


def config(tmp: Path, port: int, start_s: float, changed: bool) -> str:
    slow = ("--slow-start", str(start_s))
    models = model("steady", "--latency", "0.01", *slow)
    models += model("changing", "--latency", "0.02" if changed else "0.01", *slow)
    if changed:
        models += model("arriving", "--latency", "0.01", *slow)
    route = (
        '[[routes]]\nname = "general"\nmodel = "general"\ntarget = "steady"\n'
        f"regulated = {'true' if changed else 'false'}\n\n"
    )
    return (
        f'[server]\nport = {port}\ndrain_timeout_s = 10\n\n[paths]\nstate_dir = "{tmp}/state"\n'
        f'cache_dir = "{tmp}/cache"\nlog_dir = "{tmp}/log"\n\n[supervisor]\nstop_grace_s = 2\n'
        f"health_interval_s = 0.5\n\n{route}{models}"
    )


class Daemon:
    def __init__(self, tmp: Path, port: int) -> None:
        self.tmp, self.port, self.cfg = tmp, port, tmp / "appliance.toml"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        log = (self.tmp / "daemon.log").open("ab")
        self.proc = subprocess.Popen(
            [PY, "-m", "appliance.cli", "serve", "--config", str(self.cfg)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=TREE,
            start_new_session=True,
        )

    def status(self) -> dict | None:
        sock = self.tmp / "state" / "admin.sock"
        token = Path(f"{sock}.token")  # the socket's token (a baseline before it has none)
        headers = {"Authorization": f"Bearer {token.read_text().strip()}"} if token.exists() else {}
        try:
            with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), timeout=2, headers=headers) as c:
                return c.get("http://appliance/admin/status").json()
        except (httpx.HTTPError, ValueError):
            return None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def live(status: dict | None, old_pid: int) -> bool:
    """The new config is served: "arriving" READY, "changing" on one READY replica not old_pid."""
    if status is None:
        return False
    models = {m["name"]: m for m in status["models"]}
    if "arriving" not in models or not models["arriving"]["ready"]:
        return False
    reps = models["changing"]["replicas"]
    return len(reps) == 1 and reps[0]["state"] == "READY" and reps[0]["pid"] != old_pid


def ready(status: dict | None) -> bool:
    return status is not None and all(m["ready"] for m in status["models"])


async def load(url: str, rps: float, stop: asyncio.Event, answers: list[int]) -> None:
    """Open loop: one request every 1/rps s, whatever the answers take (0: a failed connection)."""

    async def one(c: httpx.AsyncClient, name: str) -> None:
        try:
            r = await c.post("/v1/chat/completions", json={**CHAT, "model": name})
            answers.append(r.status_code)
        except httpx.HTTPError:
            answers.append(0)

    tasks = []
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        i = 0
        while not stop.is_set():
            tasks.append(asyncio.create_task(one(c, ("changing", "steady", "general")[i % 3])))
            i += 1
            await asyncio.sleep(1 / rps)
        await asyncio.gather(*tasks)


async def until(predicate, timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if await asyncio.to_thread(predicate):
            return time.monotonic() - start
        await asyncio.sleep(0.05)
    raise TimeoutError


async def one_round(how: str, rps: float, start_s: float) -> tuple[float | None, int, int, str]:
    """(seconds to the new config live or None, requests, failed, note) for a reload or a restart."""
    with tempfile.TemporaryDirectory(prefix="bench-reload-") as d:
        tmp, port = Path(d), free_port()
        daemon = Daemon(tmp, port)
        daemon.cfg.write_text(config(tmp, port, start_s, changed=False))
        daemon.start()
        try:
            await until(lambda: ready(daemon.status()), 60)
            old_pid = next(m for m in daemon.status()["models"] if m["name"] == "changing")["replicas"][0]["pid"]
            stop, answers = asyncio.Event(), []
            loader = asyncio.create_task(load(f"http://127.0.0.1:{port}", rps, stop, answers))
            await asyncio.sleep(2)
            daemon.cfg.write_text(config(tmp, port, start_s, changed=True))
            t0 = time.monotonic()
            if how == "reload":
                daemon.proc.send_signal(signal.SIGHUP)
            else:
                daemon.stop()
                daemon.start()
            note, took = "", None
            try:
                await until(lambda: live(daemon.status(), old_pid), 60)
                took = time.monotonic() - t0
            except TimeoutError:
                note = "daemon died" if daemon.proc.poll() is not None else "not live within 60 s"
            await asyncio.sleep(2)
            stop.set()
            await loader
            return took, len(answers), sum(a != 200 for a in answers), note
        finally:
            daemon.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rps", type=float, default=20.0)
    ap.add_argument("--start-s", type=float, default=1.0, help="each fake engine's load time")
    args = ap.parse_args()
    rows: dict[str, list[tuple[float | None, int, int, str]]] = {"restart": [], "reload": []}
    for _ in range(args.rounds):
        for how in ("restart", "reload"):  # alternating, so drift hits both alike
            rows[how].append(asyncio.run(one_round(how, args.rps, args.start_s)))
    print(f"tree: {TREE}")
    print(f"load: {args.rps:g} req/s open loop; fake engines load in {args.start_s:g} s; {args.rounds} rounds")
    print(f"machine: {os.getloadavg()[0]:.2f} load average (1 min)\n")
    print("| applying the change | to new config live, median s (each) | requests | failed | failed % |")
    print("|---|---|---|---|---|")
    medians = {}
    for how, results in rows.items():
        times = [t for t, *_ in results if t is not None]
        medians[how] = statistics.median(times) if times else None
        each = ", ".join(f"{t:.2f}" if t is not None else n for t, _, _, n in results)
        total, failed = sum(r[1] for r in results), sum(r[2] for r in results)
        median = f"{medians[how]:.2f}" if medians[how] is not None else "-"
        print(f"| {how} | {median} ({each}) | {total} | {failed} | {100 * failed / max(total, 1):.1f} |")
    if medians["reload"] and medians["restart"]:
        print(f"\nreload / restart, time to live: {medians['reload'] / medians['restart']:.2f}")


if __name__ == "__main__":
    main()
