"""What a flood of refused credentials writes to the audit log: a local client sends
requests with a wrong API key as fast as it can, for this tree and a baseline tree,
alternating, each against its own daemon (keys required, one fake model).

    .venv/bin/python bench/refusal_flood.py --baseline /path/to/other/checkout [--seconds 10] [--rounds 2]

Per round: refusals answered per second, audit rows written per second (counted in
the state database once the writer has flushed), the state database's growth (file,
-wal) per second and per row, and what a day of it would take on disk: the number to
set against `[audit] retention_days`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
FAKE = ROOT / "tests" / "fake_engine.py"
BODY = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'
REQUEST = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer ak-000000000000-guess\r\n"
    b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY)
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Daemon:
    def __init__(self, tree: Path, folder: Path, workers: int) -> None:
        self.port, self.folder = free_port(), folder
        argv = ", ".join(f'"{a}"' for a in (PY, str(FAKE), "--port", "{port}", "--model", "m"))
        cfg = folder / "appliance.toml"
        cfg.write_text(
            f'[server]\nport = {self.port}\nadmin_socket = ""\nworkers = {workers}\n'
            f'[paths]\nstate_dir = "{folder}/state"\ncache_dir = "{folder}/cache"\nlog_dir = "{folder}/log"\n'
            "[keys]\nrequired = true\n"
            f'[[models]]\nname = "m"\nserver = "openai"\ncommand = [{argv}]\n'
        )
        self.proc = subprocess.Popen(
            [PY, "-m", "appliance.cli", "serve", "--config", str(cfg)],
            cwd=tree,
            env={**os.environ, "PYTHONPATH": str(tree)},
            stdout=(folder / "daemon.log").open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise SystemExit(f"daemon for {tree} not ready: {(folder / 'daemon.log').read_text()[-2000:]}")

    def rows(self) -> int:
        with sqlite3.connect(self.folder / "state" / "appliance.db", timeout=30) as db:
            return db.execute("SELECT count(*) FROM audit").fetchone()[0]

    def disk(self) -> int:
        state = self.folder / "state"
        return sum((state / n).stat().st_size for n in ("appliance.db", "appliance.db-wal") if (state / n).exists())

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=30)


async def flood(port: int, seconds: float, clients: int) -> int:
    """Refused requests answered in `seconds`, by `clients` connections at a time (each
    refusal closes its connection: a new one per request)."""
    answered = 0
    end = time.monotonic() + seconds

    async def client() -> None:
        nonlocal answered
        while time.monotonic() < end:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(REQUEST)
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.split(b" ", 2)[1] == b"401", head
            answered += 1
            writer.close()

    await asyncio.gather(*(client() for _ in range(clients)))
    return answered


def round_of(daemon: Daemon, seconds: float, clients: int) -> tuple[float, float, float]:
    """(refusals/s, rows/s, bytes/s) of one flood."""
    rows, disk = daemon.rows(), daemon.disk()
    started = time.monotonic()
    answered = asyncio.run(flood(daemon.port, seconds, clients))
    took = time.monotonic() - started
    time.sleep(2.5)  # the writer's flush interval, and a summary row's minute is not waited for
    return answered / took, (daemon.rows() - rows) / took, (daemon.disk() - disk) / took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True, type=Path, help="another checkout of the appliance")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        daemons = {}
        for name, tree in (("baseline", args.baseline.resolve()), ("this", ROOT)):
            (Path(tmp) / name).mkdir()
            daemons[name] = Daemon(tree, Path(tmp) / name, args.workers)
        results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in daemons}
        try:
            for _ in range(args.rounds):
                for name, daemon in daemons.items():
                    results[name].append(round_of(daemon, args.seconds, args.clients))
        finally:
            for daemon in daemons.values():
                daemon.stop()
    print(f"{args.rounds} rounds x {args.seconds:g} s, {args.clients} clients, workers = {args.workers}; "
          f"load {load[0]:.2f} before, {os.getloadavg()[0]:.2f} after")
    print("| tree | refusals/s | audit rows/s | state db growth | bytes/row | a day of it |")
    print("|---|---|---|---|---|---|")
    for name, rounds in results.items():
        refusals = statistics.median(r for r, _, _ in rounds)
        rows = statistics.median(w for _, w, _ in rounds)
        growth = statistics.median(g for _, _, g in rounds)
        per_row = f"{growth / rows:.0f}" if rows else "-"
        print(f"| {name} | {refusals:.0f} | {rows:.1f} | {growth / 1e3:.1f} kB/s | {per_row} | {growth * 86400 / 1e9:.2f} GB |")
    this, base = (statistics.median(w for _, w, _ in results[n]) for n in ("this", "baseline"))
    print(f"audit rows/s, this / baseline: {this / base:.3f}" if base else "baseline wrote no rows")


if __name__ == "__main__":
    main()
