"""What the operator's read calls cost the daemon: GET /admin/status (what `appliance
status` and the TUI poll), GET /admin/gpus and GET /metrics (a Prometheus scrape), for
this tree and a baseline tree, measured in the same run. Loopback only.

    .venv/bin/python bench/admin_status.py --baseline /path/to/other/checkout [--models 6] [--rounds 5]

Each tree runs its own daemon (PYTHONPATH=<tree>) with the same config: --models fake
models of one replica each (tests/fake_engine.py). Rounds alternate between the two
daemons; each round sends --requests sequential GETs per path on one keep-alive
connection. Per request: the daemon's CPU (utime + stime from /proc) and the client's
wall time (p50). The table is each path's median over rounds, and this tree / baseline.
"""

from __future__ import annotations

import argparse
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
PY = sys.executable
FAKE = ROOT / "tests" / "fake_engine.py"
PATHS = ("/admin/status", "/admin/gpus", "/metrics")
TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config(folder: Path, port: int, models: int) -> Path:
    entries = []
    for i in range(models):
        argv = ", ".join(f'"{a}"' for a in (PY, str(FAKE), "--port", "{port}", "--model", f"m{i}"))
        entries.append(
            f'[[models]]\nname = "m{i}"\nserver = "openai"\ncommand = [{argv}]\n'
            "[models.autoscaling]\nmin_replicas = 1\nmax_replicas = 1\n"
        )
    path = folder / "appliance.toml"
    path.write_text(
        f'[server]\nport = {port}\nadmin_socket = ""\n[paths]\nstate_dir = "{folder}/state"\n'
        f'cache_dir = "{folder}/cache"\nlog_dir = "{folder}/log"\n\n' + "\n".join(entries)
    )
    return path


class Daemon:
    def __init__(self, tree: Path, folder: Path, models: int) -> None:
        self.port = free_port()
        cfg = config(folder, self.port, models)
        env = {**os.environ, "PYTHONPATH": str(tree)}
        self.proc = subprocess.Popen(
            [PY, "-m", "appliance.cli", "serve", "--config", str(cfg)],
            cwd=tree,
            env=env,
            stdout=(folder / "daemon.log").open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=10)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if self.client.get("/readyz").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise SystemExit(f"daemon for {tree} not ready: {(folder / 'daemon.log').read_text()[-2000:]}")

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK

    def round(self, path: str, requests: int) -> tuple[float, float]:
        """CPU µs per request, p50 wall ms."""
        walls = []
        cpu = self.cpu_s()
        for _ in range(requests):
            started = time.perf_counter()
            resp = self.client.get(path)
            walls.append(time.perf_counter() - started)
            assert resp.status_code == 200, (path, resp.status_code, resp.text[:200])
        return (self.cpu_s() - cpu) / requests * 1e6, statistics.median(walls) * 1e3

    def stop(self) -> None:
        self.client.close()
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True, type=Path, help="another checkout of the appliance")
    parser.add_argument("--models", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"this": ROOT, "baseline": args.baseline.resolve()}
        daemons = {}
        for name, tree in trees.items():
            (Path(tmp) / name).mkdir()
            daemons[name] = Daemon(tree, Path(tmp) / name, args.models)
        try:
            results: dict[tuple[str, str], list[tuple[float, float]]] = {}
            for _ in range(args.rounds):
                for path in PATHS:
                    for name, daemon in daemons.items():
                        results.setdefault((name, path), []).append(daemon.round(path, args.requests))
        finally:
            for daemon in daemons.values():
                daemon.stop()
    print(f"{args.models} models, {args.rounds} rounds x {args.requests} requests; load {os.getloadavg()[0]:.2f}")
    print("| path | baseline CPU µs/req (p50 ms) | this CPU µs/req (p50 ms) | this / baseline CPU |")
    print("|---|---|---|---|")
    for path in PATHS:
        row = {}
        for name in daemons:
            rounds = results[(name, path)]
            row[name] = (statistics.median(c for c, _ in rounds), statistics.median(w for _, w in rounds))
        (bc, bw), (tc, tw) = row["baseline"], row["this"]
        print(f"| {path} | {bc:.0f} ({bw:.2f}) | {tc:.0f} ({tw:.2f}) | {tc / bc:.2f} |")


if __name__ == "__main__":
    main()
