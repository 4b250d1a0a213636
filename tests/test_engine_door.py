"""Engines are reachable only through the appliance (issue 13, point 3): every
replica's port, found the way a local user would find it (the process table,
not /admin/status), refuses a request without the replica's key; engines get a
minimal environment and no secret on their command line."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import httpx

from appliance.fleet.process import descendants
from engines.vllm import GUARD_DIR

from .conftest import FAKE_ENGINE, PY, engine_key, fake_model, wait_until
from .test_gpu_supervision import DATA, make_model

# What a local user would try on an engine's port: a completion, and the
# llama-server endpoints that leak prompts, settings and load.
ANONYMOUS = [("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/slots"),
             ("GET", "/props"), ("GET", "/metrics"), ("GET", "/v1/models")]
COMPLETION = {"model": "fake", "prompt": "hi", "max_tokens": 1,
              "messages": [{"role": "user", "content": "hi"}]}


def listening_tcp_ports(pids: set[int]) -> dict[int, int]:
    """port -> pid for every TCP socket those processes listen on (/proc/net/tcp{,6}
    rows in state 0A, matched to the socket inodes in each process's fd table)."""
    inodes: dict[str, int] = {}
    for name in ("tcp", "tcp6"):
        for row in Path(f"/proc/net/{name}").read_text().splitlines()[1:]:
            fields = row.split()
            if fields[3] == "0A":
                inodes[fields[9]] = int(fields[1].rsplit(":", 1)[1], 16)
    found: dict[int, int] = {}
    for pid in pids:
        try:
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            continue  # gone, or not ours
        for link in links:
            inode = link.removeprefix("socket:[").removesuffix("]")
            if link.startswith("socket:[") and inode in inodes:
                found[inodes[inode]] = pid
    return found


def engine_processes(daemon) -> set[int]:
    return descendants(daemon.proc.pid) - {daemon.proc.pid}


def assert_every_engine_port_refuses_strangers(daemon, expected_ports: int) -> None:
    ports = listening_tcp_ports(engine_processes(daemon))
    assert len(ports) >= expected_ports, f"found {ports} in the process table"
    assert daemon.port not in ports  # the appliance's own port is the daemon's, not an engine's
    for port in ports:
        for method, path in ANONYMOUS:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-Api-Key": "wrong"}):
                resp = httpx.request(method, f"http://127.0.0.1:{port}{path}", json=COMPLETION,
                                     headers=headers, timeout=10)
                assert resp.status_code in (401, 403), (port, method, path, headers, resp.status_code)


def gpu_models(tmp_path: Path) -> tuple[str, str]:
    """A vllm and an sglang model on the simulated GPUs, both the fake engine speaking as them."""
    small = make_model(tmp_path, "small", 14)
    extra = (f'[gpu]\ninventory = "{DATA / "inventory-8xh100.toml"}"\n'
             f'[engines.vllm]\ncommand = ["{PY}", "{FAKE_ENGINE}", "--as-engine", "vllm"]\n'
             f'[engines.sglang]\ncommand = ["{PY}", "{FAKE_ENGINE}", "--as-engine", "sglang"]\n')
    models = "".join(f'[[models]]\nname = "{name}"\nserver = "{server}"\nsource = "{small}"\n'
                     "kv_cache_tokens = 32768\n" for name, server in (("v", "vllm"), ("s", "sglang")))
    return models, extra


def test_no_replica_port_answers_a_request_without_the_replica_key(daemons, tmp_path):
    models, extra = gpu_models(tmp_path)
    d = daemons.start(fake_model("a") + fake_model("b") + models, extra=extra)
    # Two openai-command replicas and the sglang one listen on TCP; vLLM on its socket only.
    assert_every_engine_port_refuses_strangers(d, expected_ports=3)
    with d.client() as c:  # the appliance itself still gets answers from all of them
        for model in ("a", "b", "v", "s"):
            assert c.post("/v1/completions", json={**COMPLETION, "model": model}).status_code == 200


def test_vllm_listens_on_a_unix_socket_only_its_user_can_reach(daemons, tmp_path):
    models, extra = gpu_models(tmp_path)
    d = daemons.start(models, extra=extra)
    [replica] = d.replicas("v")
    assert replica["url"].startswith("unix:") and replica["port"] is None
    socket = Path(replica["url"].removeprefix("unix:"))
    assert stat.S_ISSOCK(socket.stat().st_mode)
    assert stat.S_IMODE(socket.parent.stat().st_mode) == 0o700
    assert not listening_tcp_ports(descendants(replica["pid"]))


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_text()
    return dict(e.split("=", 1) for e in raw.split("\0") if "=" in e)


def test_engines_get_a_minimal_environment_and_no_secret_on_their_command_line(daemons, tmp_path):
    creds = tmp_path / "creds"
    creds.mkdir()
    daemon_env = {"OPENAI_API_KEY": "sk-test-openai-canary", "CLOUD_PROVIDER_KEY": "sk-test-provider-canary",
                  "CREDENTIALS_DIRECTORY": str(creds), "APPLIANCE_ADMIN_TOKEN": "admin-canary",
                  "HF_TOKEN": "hf-canary", "AWS_SECRET_ACCESS_KEY": "aws-canary", "LANG": "C.UTF-8"}
    provider = ('[[providers]]\nname = "cloud"\nbase_url = "https://api.example.com/v1"\n'
                'api_key_env = "CLOUD_PROVIDER_KEY"\n')
    models, extra = gpu_models(tmp_path)
    d = daemons.start(fake_model("a") + models, extra=extra + provider, env=daemon_env)
    engines = engine_processes(d)
    assert engines
    keys = {engine_key(r["pid"]) for m in ("a", "v", "s") for r in d.replicas(m)}
    assert len(keys) == 3  # one secret per replica
    for pid in engines:
        environ = _environ(pid)
        for name, value in daemon_env.items():
            if name != "LANG":
                assert name not in environ and value not in "\0".join(environ.values()), (pid, name)
        assert "NOTIFY_SOCKET" not in environ
        # Not the daemon's PYTHONPATH: none, or (vLLM) the directory of its key guard alone.
        assert environ.get("PYTHONPATH") in (None, str(GUARD_DIR))
        assert environ["LANG"] == "C.UTF-8"  # the allow-list keeps the locale
        assert Path(environ["HOME"]).is_relative_to(tmp_path / "cache")
        assert stat.S_IMODE(Path(environ["TMPDIR"]).stat().st_mode) == 0o700
        cmdline = Path(f"/proc/{pid}/cmdline").read_text()
        assert not any(key in cmdline for key in keys), cmdline
    # SGLang prints its key at start (the fake does too): the replica log has it redacted.
    log = (tmp_path / "log" / "replicas" / "s-0.log").read_text()
    assert "api_key='<redacted>'" in log and not any(key in log for key in keys)
    # The files that carry a secret are the daemon user's alone.
    a = d.replicas("a")[0]
    key_dir = Path(_environ(a["pid"])["TMPDIR"]).parent
    assert stat.S_IMODE(key_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((key_dir / "api-key").stat().st_mode) == 0o600


def test_an_engine_that_ignores_its_key_is_not_served(daemons):
    # `env -u` strips the key the appliance gives: the server answers anyone.
    open_door = (f'[[models]]\nname = "open"\nserver = "openai"\n'
                 f'command = ["env", "-u", "ENGINE_API_KEY", "{PY}", "{FAKE_ENGINE}", "--port", "{{port}}"]\n')
    d = daemons.start(open_door, wait=False)

    def fatal():
        try:
            [replica] = d.replicas("open")
        except (httpx.HTTPError, ValueError):
            return None  # not listening yet
        return replica if replica["state"] == "FATAL" else None

    replica = wait_until(fatal, 60, what="the open engine to go FATAL")
    assert "answered a request to /v1/completions sent without its key" in replica["last_error"]
    assert "ENGINE_API_KEY" in replica["last_error"]
    assert not listening_tcp_ports(engine_processes(d))  # it was stopped, not left running
