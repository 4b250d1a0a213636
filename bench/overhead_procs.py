"""The processes of bench/gateway_overhead.py: starting each side, waiting for it, and
reading what CPU it spent.

A side is a server the load goes through (the fake engine itself for "direct", a
proxy for the others), started pinned to its cores, with its log in the run's temp
dir, and known by its port and its process id. Its CPU is read from /proc: the
utime+stime of its process and of every process below it (an appliance's workers,
a peer's worker processes), so a side that spreads its work over processes is
charged for all of it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:  # noqa: S310 - loopback
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise SystemExit(f"{what} not ready at {url} after {timeout:.0f}s")


def _stat(pid: int) -> list[str]:
    """/proc/PID/stat's fields after the command name (field 3 on)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> float:
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def tree_pids(root: int) -> list[int]:
    """root and every live process below it."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                children.setdefault(int(_stat(int(entry.name))[1]), []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def tree_cpu_seconds(root: int, exclude: tuple[int, ...] = ()) -> dict[int, float]:
    """CPU seconds of root and each process below it, but those in exclude (an engine), by pid.
    Per pid, so that a process that exits between two readings is not charged negative time."""
    out: dict[int, float] = {}
    for pid in tree_pids(root):
        if pid not in exclude:
            with contextlib.suppress(OSError):
                out[pid] = cpu_seconds(pid)
    return out


def cpu_spent(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds spent between two tree readings (processes born since count whole)."""
    return sum(v - before.get(pid, 0.0) for pid, v in after.items())


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread: "main" (the event loop) and the others by name, summed."""
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            name = "main" if task.name == str(pid) else (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


def machine_cpu() -> tuple[float, float]:
    """The whole machine's (busy, total) CPU seconds so far, over all its cores (/proc/stat)."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = ticks[3] + ticks[4]  # idle, iowait
    return (sum(ticks) - idle) / CLK_TCK, sum(ticks) / CLK_TCK


def taskset(cpus: str | None) -> list[str]:
    return ["taskset", "-c", cpus] if cpus else []


LABELS = {"direct": "direct (fake engine)", "raw": "floor (bare ASGI)", "rsgi": "floor (bare RSGI)",
          "naive": "naive proxy", "appliance": "appliance, workers=1", "litellm": "LiteLLM, workers=1"}


def side_label(side: str) -> str:
    """What a side is, in the tables."""
    for kind, name in (("appliance", "appliance"), ("litellm", "LiteLLM")):
        if side.startswith(f"{kind}-w"):
            return f"{name}, workers={side[len(kind) + 2:]}"
    return LABELS.get(side, side)


def appliance_config(tmp: Path, name: str, port: int, engine_port: int, extra: str = "",
                     server_extra: str = "") -> Path:
    """An appliance config serving the fake engine as an external openai engine, with its own state.
    server_extra: more [server] settings (--workers)."""
    cfg = tmp / f"{name}.toml"
    cfg.write_text(f"""
[server]
host = "127.0.0.1"
port = {port}
log_level = "warning"
{server_extra}
[paths]
state_dir = "{tmp}/state-{name}"
cache_dir = "{tmp}/cache"
log_dir = "{tmp}/log-{name}"
{extra}
[[models]]
name = "fake"
server = "openai"
url = "http://127.0.0.1:{engine_port}"
""")
    return cfg


class Sides:
    """The run's servers: each side's port and process, stopped together at the end."""

    def __init__(self, tmp: Path, cpus: str | None) -> None:
        self.tmp = tmp
        self.cpus = cpus  # where the proxies run (beside the load generator)
        # The appliance measured: the tree first on PYTHONPATH (a baseline checkout), else this one.
        given = os.environ.get("PYTHONPATH")
        self.env = {**os.environ, "PYTHONPATH": f"{given}{os.pathsep}{ROOT}" if given else str(ROOT)}
        self.procs: list[subprocess.Popen] = []
        self.ports: dict[str, int] = {}
        self.pids: dict[str, int] = {}
        self.named: dict[str, subprocess.Popen] = {}
        self.skipped: dict[str, str] = {}  # side -> why it is not measured

    def start(self, name: str, cmd: list[str], health: str, *, port: int, cpus: str | None = None,
              env: dict | None = None, cwd: Path | None = None, timeout: float = 60) -> subprocess.Popen:
        """Start one side's server, pinned, its log in the temp dir, and wait until its health
        path answers 200 (health is the path, on port)."""
        with open(self.tmp / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(taskset(self.cpus if cpus is None else cpus) + cmd, env=env or self.env,
                                    cwd=cwd or self.tmp, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        self.procs.append(proc)
        try:
            wait_http(f"http://127.0.0.1:{port}{health}", proc, timeout, name)
        except SystemExit as exc:
            self._end(proc)  # not left running (and taking CPU) beside the sides measured
            raise SystemExit(f"{exc}: {self.log_tail(name)}") from None
        self.ports[name], self.pids[name], self.named[name] = port, proc.pid, proc
        return proc

    def measured_tree(self) -> str:
        """Where the appliance package that the appliance sides run comes from."""
        # From the sides' working directory, as they start (python -c puts its directory first).
        out = subprocess.run([sys.executable, "-c", "import appliance; print(appliance.__file__)"], env=self.env,
                             cwd=self.tmp, capture_output=True, text=True, check=False)
        return str(Path(out.stdout.strip()).parent.parent) if out.returncode == 0 else f"? ({out.stderr[-200:]})"

    def log_tail(self, name: str) -> str:
        lines = (self.tmp / f"{name}.log").read_text(errors="replace").strip().splitlines()
        return lines[-1][:300] if lines else "(its log is empty)"

    def optional(self, name: str, start) -> None:
        """Start a side that may not run on this tree or machine (start() raising SystemExit):
        the reason is kept for the table and the other sides are measured."""
        try:
            start()
        except SystemExit as exc:
            self.skipped[name] = str(exc)
            print(f"warning: {name} not measured: {exc}", file=sys.stderr)

    def exited(self) -> list[str]:
        """The sides whose server is no longer running."""
        return [name for name, proc in self.named.items() if proc.poll() is not None]

    def appliance(self, name: str, engine_port: int, extra: str = "", server_extra: str = "",
                  key: bool = False) -> str:
        """An appliance side serving the fake engine; with key, an API key with a budget
        (every request reserved and settled) is made first and returned."""
        port = free_port()
        cfg = appliance_config(self.tmp, name, port, engine_port, extra, server_extra)
        token = ""
        if key:
            token = subprocess.run(
                [sys.executable, "-m", "appliance.cli", "keys", "create", "--config", str(cfg),
                 "--name", "bench", "--budget-tokens", str(10**15)],
                env=self.env, cwd=self.tmp, capture_output=True, text=True, check=True).stdout.strip()
        self.start(name, [sys.executable, "-m", "appliance.cli", "serve", "--config", str(cfg)], "/readyz",
                   port=port)
        return token

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            self._end(proc)

    @staticmethod
    def _end(proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
