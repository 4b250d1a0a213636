"""The alternating loop the in-process front-door benches share (front_door_python.py,
trusted_proxies.py): a fake engine on a free port, each side measured in a fresh
process per round, the sides' order rotating each round (two sides: alternating), and
each side's figures as medians over its rounds."""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alternate(sides: Sequence[tuple[str, list[str]]], rounds: int, port: int) -> dict[str, dict[str, float]]:
    """Each side's command (its last stdout line a JSON object of figures) run once a round
    with the fake engine on ``port`` up, the order rotating; each figure's median by side."""
    engine = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fake_engine.py"), "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results: dict[str, list[dict]] = {side: [] for side, _ in sides}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    try:
        time.sleep(1.5)
        for r in range(rounds):
            for side, command in [*sides[r % len(sides):], *sides[:r % len(sides)]]:
                out = subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=600,
                                     env=env, check=True)
                results[side].append(json.loads(out.stdout.splitlines()[-1]))
                print(f"round {r + 1} {side}: {results[side][-1]['min']:.1f} us/req (min)", file=sys.stderr)
    finally:
        engine.terminate()
        engine.wait(timeout=10)
    return {side: {f: statistics.median(run[f] for run in runs) for f in runs[0]} for side, runs in results.items()}


def load_line(rounds: int, batches: int, requests: int, baseline: str) -> str:
    return (f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; {rounds} rounds of "
            f"{batches} batches of {requests}; baseline: {baseline}")
