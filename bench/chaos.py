"""Chaos bench: steady load on the appliance while a fault schedule breaks things.

    python bench/chaos.py [--rate 20] [--phase-s 10] [--max-requests 20000] [--no-llama]

Starts ``appliance serve`` on 127.0.0.1 with two fake-engine replicas (model
"fake", tests/fake_engine.py) and the real CPU engine (llama-server with the
bundled SmolLM2-135M, model "smollm2"), sends a steady mix of unary and streamed
chat requests (tests/chaos_load.py judges every answer) and runs one fault per
phase:

  baseline         nothing broken
  replica-sigkill  SIGKILL a fake replica and the llama-server replica
  replica-sigstop  SIGSTOP a fake replica (a hang): health checks must replace it
  replica-slow     one fake replica answers 2 s late
  state-disk-full  the state dir (a 1 MiB tmpfs) filled; admin writes during it
  daemon-sigterm   SIGTERM the daemon (drain), start it again
  daemon-sigkill   SIGKILL the daemon, start it again
  after            nothing broken, to compare with the baseline

Per phase it prints requests sent, answered ok, answered with a well-formed
error, refused (connection refused: no daemon listening, during a restart),
lost, leaked engine processes and daemon file descriptors, and the daemon's RSS
before and after. As root it re-runs itself in a private mount namespace
(unshare -m) for the tmpfs; otherwise the disk phase is skipped.

Bounded: every phase lasts --phase-s seconds of load plus the time the fault
needs to heal (bounded waits), requests per phase at most --max-requests, and
every request times out after 30 s. All traffic goes to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.chaos_load import Load, chat  # noqa: E402
from tests.conftest import engine_client  # noqa: E402

PY = sys.executable
FAKE = ROOT / "tests" / "fake_engine.py"
SETTLE_S = 60.0


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config(tmp: Path, port: int, llama: bool) -> str:
    fake = (f'[[models]]\nname = "fake"\nserver = "openai"\n'
            f'command = ["{PY}", "{FAKE}", "--port", "{{port}}", "--model", "fake", "--chunks", "4", '
            f'"--latency", "0.05", "--latency-from", "2"]\n'
            f'env = {{ CHAOS_RUN = "{tmp}" }}\n'
            "[models.autoscaling]\nmin_replicas = 2\nmax_replicas = 2\n")
    smol = ('[[models]]\nname = "smollm2"\nserver = "llamacpp"\nsource = "builtin:smollm2-135m-instruct"\n'
            f'parallel = 2\ncontext_length = 2048\nthreads = 1\nenv = {{ CHAOS_RUN = "{tmp}" }}\n'
            "[models.autoscaling]\nmin_replicas = 1\nmax_replicas = 1\n") if llama else ""
    return (f'[server]\nport = {port}\ndrain_timeout_s = 10\n'
            f'[paths]\nstate_dir = "{tmp}/state"\ncache_dir = "{tmp}/cache"\nlog_dir = "{tmp}/log"\n'
            "[supervisor]\nstop_grace_s = 2\nhealth_interval_s = 1\nhealth_failures_before_restart = 2\n"
            "backoff_initial_s = 0.2\nbackoff_max_s = 1\nstartup_timeout_s = 60\n"
            "[upstream]\nread_timeout_s = 20\n"
            "[autoscaling]\nstabilization_s = 600\n[queue]\ntimeout_s = 30\nkeepalive_s = 0\n"
            f"{fake}{smol}")


class Daemon:
    def __init__(self, tmp: Path, port: int, cfg: Path) -> None:
        self.tmp, self.port, self.cfg = tmp, port, cfg
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        log = (self.tmp / "daemon.log").open("ab")
        self.proc = subprocess.Popen([PY, "-m", "appliance.cli", "serve", "--config", str(self.cfg)],
                                     stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT)
        self.wait_ready()

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"daemon exited with {self.proc.returncode}; see {self.tmp}/daemon.log")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise SystemExit("daemon not ready in time")

    def status(self) -> dict:
        return httpx.get(self.url + "/admin/status", timeout=10).json()

    def replicas(self, model: str | None = None) -> list[dict]:
        return [r for m in self.status()["models"] if model in (None, m["name"]) for r in m["replicas"]]

    def all_ready(self) -> bool:
        rs = self.replicas()
        return bool(rs) and all(r["state"] == "READY" for r in rs)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=60)

    # --- what is measured --------------------------------------------------------

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def fds(self) -> tuple[int, int]:
        """(non-socket fds, sockets) of the daemon."""
        files = sockets = 0
        for fd in os.listdir(f"/proc/{self.proc.pid}/fd"):
            try:
                target = os.readlink(f"/proc/{self.proc.pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:"):
                sockets += 1
            else:
                files += 1
        return files, sockets


def engines_alive(tmp: Path) -> set[int]:
    needle = f"CHAOS_RUN={tmp}".encode()
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    found.add(int(entry))
        except OSError:
            continue
    return found


def wait(predicate, timeout: float = SETTLE_S) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    return False


# --- the faults -----------------------------------------------------------------------


def fault_replica_sigkill(d: Daemon, note: list[str]) -> None:
    victims = [d.replicas("fake")[0]["pid"]] + [r["pid"] for r in d.replicas("smollm2")]
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    wait(lambda: d.all_ready() and not {r["pid"] for r in d.replicas()} & set(victims))
    note.append(f"killed {len(victims)}; all READY again")


def fault_replica_sigstop(d: Daemon, note: list[str]) -> None:
    pid = d.replicas("fake")[0]["pid"]
    os.kill(pid, signal.SIGSTOP)
    started = time.monotonic()
    replaced = wait(lambda: pid not in {r["pid"] for r in d.replicas("fake")} and d.all_ready())
    if not replaced:
        os.kill(pid, signal.SIGCONT)
    note.append(f"hang replaced in {time.monotonic() - started:.1f}s" if replaced else "hang NOT replaced")


def fault_replica_slow(d: Daemon, note: list[str]) -> None:
    with engine_client(d.replicas("fake")[0]) as engine:
        engine.post("/fake/latency?seconds=2")
    note.append("one replica 2 s late")


def heal_replica_slow(d: Daemon) -> None:
    for r in d.replicas("fake"):
        with engine_client(r) as engine:
            engine.post("/fake/latency?seconds=0.05")


def fault_disk_full(d: Daemon, note: list[str]) -> None:
    filler = d.tmp / "state" / "filler"
    try:
        with filler.open("wb") as f:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
    except OSError:
        pass
    answers = []
    for action in ("pin", "unpin"):
        resp = httpx.post(f"{d.url}/admin/models/fake/{action}", json={}, timeout=10)
        answers.append(f"{action}: {resp.status_code} {resp.json()['error']['code'] if resp.status_code >= 400 else ''}")
    note.append("admin writes on the full disk: " + "; ".join(answers))


def heal_disk_full(d: Daemon) -> None:
    (d.tmp / "state" / "filler").unlink(missing_ok=True)


def fault_daemon(sig: int):
    def fault(d: Daemon, note: list[str]) -> None:
        started = time.monotonic()
        d.stop(sig)
        d.start()
        wait(d.all_ready)
        note.append(f"{signal.Signals(sig).name}: back and READY in {time.monotonic() - started:.1f}s")
    return fault


def run(args: argparse.Namespace) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="appliance-chaos-"))
    disk = os.environ.get("CHAOS_TMPFS") == "1"
    (tmp / "state").mkdir()
    if disk:
        subprocess.run(["mount", "--make-rprivate", "/"], check=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(tmp / "state")], check=True)
    port = free_port()
    cfg = tmp / "appliance.toml"
    cfg.write_text(config(tmp, port, args.llama))
    d = Daemon(tmp, port, cfg)
    d.start()
    wait(d.all_ready)
    bodies = [chat("fake"), chat("fake", stream=True), chat("fake")]
    if args.llama:
        bodies += [chat("smollm2", max_tokens=8), chat("smollm2", stream=True, max_tokens=8)]

    phases = [("baseline", None, None), ("replica-sigkill", fault_replica_sigkill, None),
              ("replica-sigstop", fault_replica_sigstop, None),
              ("replica-slow", fault_replica_slow, heal_replica_slow)]
    if disk:
        phases.append(("state-disk-full", fault_disk_full, heal_disk_full))
    phases += [("daemon-sigterm", fault_daemon(signal.SIGTERM), None),
               ("daemon-sigkill", fault_daemon(signal.SIGKILL), None), ("after", None, None)]

    rows = []
    first_rss = first_end = None
    first_alive = True
    for name, fault, heal in phases:
        pid_before = d.proc.pid
        rss_before, (files_before, socks_before) = d.rss_kib(), d.fds()
        first_rss = first_rss or rss_before
        note: list[str] = []
        with Load(d.url, bodies, rate=args.rate, max_requests=args.max_requests) as load:
            time.sleep(args.phase_s / 2)
            if fault is not None:
                fault(d, note)
            time.sleep(args.phase_s / 2)
        if heal is not None:
            heal(d)
        wait(d.all_ready)
        time.sleep(1)  # let closed connections and exited engines be reaped
        current = {r["pid"] for r in d.replicas() if r["pid"]}
        leaked_procs = engines_alive(tmp) - current
        rss_after, (files_after, socks_after) = d.rss_kib(), d.fds()
        same = d.proc.pid == pid_before
        first_alive = first_alive and same
        if first_alive:
            first_end = rss_after
        t = load.tally
        cut = sum(n for k, n in t.details.items() if k.startswith("lost: cut"))
        rows.append({
            "phase": name, "sent": t.sent, "ok": t["ok"], "error": t["error"], "refused": t["refused"],
            "lost": t["lost"] - (cut if name == "daemon-sigkill" else 0),
            "cut_by_kill": cut if name == "daemon-sigkill" else 0,
            "leaked_procs": len(leaked_procs),
            "leaked_fds": max(0, files_after - files_before) if same else 0,
            "sockets": f"{socks_before}->{socks_after}" if same else f"new daemon: {socks_after}",
            "rss_mib": f"{rss_before / 1024:.1f}->{rss_after / 1024:.1f}",
            "errors": ", ".join(sorted(f"{k.split(': ', 1)[1]} x{n}" for k, n in t.details.items()
                                       if k.startswith("error"))),
            "note": "; ".join(note),
            "lost_examples": t.lost_examples,
        })
        print(f"{name}: {t.summary()}", file=sys.stderr, flush=True)
    final_rss = d.rss_kib()
    d.stop()
    leftovers = engines_alive(tmp)

    cols = ["phase", "sent", "ok", "error", "refused", "lost", "cut_by_kill", "leaked_procs", "leaked_fds",
            "sockets", "rss_mib"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    print()
    for r in rows:
        print(f"- {r['phase']}: {r['note'] or 'no fault'}; errors: {r['errors'] or 'none'}"
              + (f"; LOST: {r['lost_examples']}" if r["lost"] else ""))
    # RSS growth: the last daemon from its first phase to the end (earlier daemons were restarted).
    after = next(r for r in rows if r["phase"] == "after")
    start_rss = float(after["rss_mib"].split("->")[0]) * 1024
    print(f"\nRSS: first daemon {first_rss / 1024:.1f} -> {first_end / 1024:.1f} MiB over its phases"
          f" ({(first_end - first_rss) / first_rss * 100:+.1f}%); last daemon "
          f"{start_rss / 1024:.1f} -> {final_rss / 1024:.1f} MiB ({(final_rss - start_rss) / start_rss * 100:+.1f}%)")
    print(f"engine processes left after the daemon stopped: {len(leftovers)}")
    lost = sum(r["lost"] for r in rows)
    leaked = sum(r["leaked_procs"] + r["leaked_fds"] for r in rows) + len(leftovers)
    if disk:
        subprocess.run(["umount", str(tmp / "state")], check=False)
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"TOTAL lost={lost} leaked={leaked}")
    return 0 if lost == 0 and leaked == 0 else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=float, default=20.0, help="requests per second")
    p.add_argument("--phase-s", type=float, default=10.0, help="seconds of load per phase")
    p.add_argument("--max-requests", type=int, default=20_000, help="at most this many requests per phase")
    p.add_argument("--no-llama", dest="llama", action="store_false", help="fake engines only")
    p.add_argument("--no-disk", dest="disk", action="store_false", help="skip the full-disk phase")
    args = p.parse_args()
    if (args.disk and os.geteuid() == 0 and os.environ.get("CHAOS_TMPFS") is None
            and shutil.which("unshare")):
        env = {**os.environ, "CHAOS_TMPFS": "1"}
        return subprocess.run(["unshare", "-m", PY, __file__, *sys.argv[1:]], env=env).returncode
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
