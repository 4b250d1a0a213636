"""The admin API the TUI uses: the unix socket (trusted by its file mode), GPUs
and CPU budget, a replica's log tail, TTFT p50 in the status."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import httpx
import pytest

from .conftest import fake_model, wait_until
from .conftest import over_admin_socket as over_socket

CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}


def tokenless(path: Path) -> httpx.Client:
    """A client that opens the admin socket and sends no token: what an engine can do."""
    return httpx.Client(transport=httpx.HTTPTransport(uds=str(path)), base_url="http://appliance", timeout=10)


@pytest.fixture(scope="module")
def token_daemon(tmp_path_factory):
    from .conftest import DaemonFactory

    tmp = tmp_path_factory.mktemp("adm")
    token = tmp / "token"
    token.write_text("s3cret-admin-token-0123456789\n")
    factory = DaemonFactory(tmp)
    daemon = factory.start(fake_model("fake", "--chunks", "3"), server=f'admin_token_file = "{token}"',
                           wait=False)
    wait_until(lambda: _ready(daemon), 30, what="daemon ready")
    daemon.socket = tmp / "state" / "admin.sock"
    daemon.token = token.read_text().strip()
    yield daemon
    factory.cleanup()


def _ready(daemon) -> bool:
    try:
        return httpx.get(f"{daemon.url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_the_admin_socket_is_mode_0660_and_wants_its_token(token_daemon):
    mode = os.stat(token_daemon.socket).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o660
    token_file = os.stat(f"{token_daemon.socket}.token", follow_symlinks=False)
    assert stat.S_ISREG(token_file.st_mode) and stat.S_IMODE(token_file.st_mode) == 0o640
    assert token_file.st_gid == os.stat(token_daemon.socket).st_gid  # who may open the socket may read it
    with over_socket(token_daemon.socket) as c:
        status = c.get("/admin/status")
        assert status.status_code == 200
        assert [m["name"] for m in status.json()["models"]] == ["fake"]
        assert c.post("/admin/models/fake/pin", json={}).json()["pinned"] is True
    # Over TCP the same daemon wants its token.
    assert httpx.get(f"{token_daemon.url}/admin/status").status_code == 401
    auth = {"Authorization": f"Bearer {token_daemon.token}"}
    assert httpx.get(f"{token_daemon.url}/admin/status", headers=auth).json()["models"][0]["pinned"] is True


def test_a_request_on_the_admin_socket_without_its_token_is_refused(token_daemon):
    """Whoever opens the socket (an engine runs as the daemon's user: Landlock does not
    mediate connecting to it) administers nothing without the token next to it."""
    with tokenless(token_daemon.socket) as c:
        for sent in (None, "wrong", "s3cret"):
            headers = {"Authorization": f"Bearer {sent}"} if sent else {}
            refused = c.get("/admin/status", headers=headers)
            assert refused.status_code == 401, sent
            assert refused.json()["error"]["code"] == "invalid_admin_token"
            assert f"{token_daemon.socket}.token" in refused.json()["error"]["message"]
            assert c.post("/admin/models/fake/unpin", json={}, headers=headers).status_code == 401
        # The admin token is a credential on the socket too.
        auth = {"Authorization": f"Bearer {token_daemon.token}"}
        assert c.get("/admin/status", headers=auth).status_code == 200
    with over_socket(token_daemon.socket) as c:
        assert c.get("/admin/status").json()["models"][0]["pinned"] is True  # the unpins changed nothing


def test_a_link_planted_at_the_socket_token_path_is_refused(daemons, tmp_path):
    (tmp_path / "state").mkdir()
    victim = tmp_path / "victim"
    victim.write_text("untouched\n")
    planted = tmp_path / "state" / "admin.sock.token"
    planted.symlink_to(victim)
    d = daemons.start(fake_model("fake"))  # TCP admin answers this loopback box without keys
    assert victim.read_text() == "untouched\n" and planted.is_symlink()
    assert not (tmp_path / "state" / "admin.sock").exists()  # no socket without its token
    assert "admin socket off" in d.log_text() and "is a symbolic link" in d.log_text()


def test_the_socket_token_is_new_at_each_start_and_gone_at_exit(daemons, tmp_path):
    import asyncio
    import signal

    from appliance.socket_token import read_token
    from tui.client import AdminClient

    sock = tmp_path / "state" / "admin.sock"
    first = daemons.start(fake_model("fake"))
    before = read_token(sock)
    client = AdminClient(socket=str(sock))  # the TUI, running across the restart below
    first.terminate(signal.SIGKILL)
    assert read_token(sock) == before  # a killed daemon cannot clean up: a stale token
    second = daemons.start(fake_model("fake"))
    after = read_token(sock)
    assert after and after != before

    async def status():
        try:
            return await client.status()
        finally:
            await client.close()

    assert asyncio.run(status()).listen.endswith(str(second.port))  # the TUI read the new token
    assert second.terminate() == 0
    assert not Path(f"{sock}.token").exists()


def test_the_admin_socket_serves_admin_paths_only(token_daemon):
    with over_socket(token_daemon.socket) as c:
        resp = c.post("/v1/chat/completions", json=CHAT)
    assert resp.status_code == 404
    assert resp.json()["error"]["message"] == "The admin socket serves /admin/ only"


def test_gpus_shows_the_cpu_budget_on_a_machine_without_gpus(token_daemon):
    with over_socket(token_daemon.socket) as c:
        body = c.get("/admin/gpus").json()
    assert body["cpu"]["cores"] >= 1
    assert isinstance(body["gpus"], list)


def test_gpus_shows_each_gpu_with_the_replicas_placed_on_it(daemons, tmp_path):
    from .conftest import FAKE_ENGINE, PY
    from .test_gpu_supervision import DATA, make_model

    small = make_model(tmp_path, "small", 14)
    extra = (f'[gpu]\ninventory = "{DATA / "inventory-8xh100.toml"}"\n'
             f'[engines.vllm]\ncommand = ["{PY}", "{FAKE_ENGINE}", "--as-engine", "vllm"]\n'
             "overhead_gib = 2\n")
    daemons.start(f'[[models]]\nname = "small"\nserver = "vllm"\nsource = "{small}"\n'
                  "kv_cache_tokens = 32768\n", extra=extra)
    with over_socket(tmp_path / "state" / "admin.sock") as c:
        body = c.get("/admin/gpus").json()
    assert len(body["gpus"]) == 8
    placed = {g["index"]: [r["replica"] for r in g["replicas"]] for g in body["gpus"] if g["replicas"]}
    assert list(placed.values()) == [["small#0"]]
    gpu = body["gpus"][0]
    assert gpu["name"].startswith("NVIDIA H100") and gpu["total_bytes"] > 0


def test_a_replicas_log_tail(token_daemon):
    with over_socket(token_daemon.socket) as c:
        body = c.get("/admin/models/fake/replicas/0/log", params={"lines": 5}).json()
        assert body["replica"] == "fake#0"
        assert 0 < len(body["lines"]) <= 5
        assert c.get("/admin/models/fake/replicas/7/log").status_code == 404
        assert c.get("/admin/models/fake/replicas/0/log", params={"lines": 0}).status_code == 400


def test_the_daemons_own_log_refuses_a_bad_line_count_and_says_where_no_log_is(token_daemon):
    """GET /admin/log: 400 naming `lines` for a count out of 1-5000 or not a number; 404
    saying what to do when the daemon logs to stderr only (no server.log_file, no systemd);
    the admin credential like every /admin path."""
    from appliance.logview import journal_command

    with over_socket(token_daemon.socket) as c:
        for bad in ("0", "-1", "abc", "5001", "1.5"):
            resp = c.get("/admin/log", params={"lines": bad})
            assert resp.status_code == 400, bad
            assert resp.json()["error"]["param"] == "lines"
        if journal_command(1, follow=False) is None:  # not under systemd: nothing to read
            resp = c.get("/admin/log")
            assert resp.status_code == 404
            assert "server.log_file" in resp.json()["error"]["message"]
    assert httpx.get(f"{token_daemon.url}/admin/log").status_code == 401


def test_status_has_the_ttft_p50_of_answered_requests(token_daemon):
    def ttft() -> float | None:
        with over_socket(token_daemon.socket) as c:
            return c.get("/admin/status").json()["models"][0]["ttft_p50_ms"]

    assert ttft() is None
    with token_daemon.client() as c:
        assert c.post("/v1/chat/completions", json=CHAT).status_code == 200
        with c.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as resp:
            assert resp.status_code == 200
            resp.read()
    assert ttft() > 0


def test_a_stale_socket_from_a_killed_daemon_is_replaced(daemons, tmp_path):
    import signal

    first = daemons.start(fake_model("fake"))
    sock = tmp_path / "state" / "admin.sock"
    first.terminate(signal.SIGKILL)
    assert sock.exists()  # a killed daemon cannot clean up
    second = daemons.start(fake_model("fake"))
    with over_socket(sock) as c:
        assert c.get("/admin/status").json()["listen"].endswith(str(second.port))


def test_an_empty_admin_socket_turns_it_off(daemons, tmp_path):
    daemons.start(fake_model("fake"), server='admin_socket = ""')
    assert not (tmp_path / "state" / "admin.sock").exists()


def _fields(struct) -> set[str]:
    return set(struct.__struct_fields__)


def test_every_admin_answer_is_its_status_struct_field_for_field(token_daemon):
    from appliance.status import DaemonStatus, GpusStatus, ModelStatus, ReplicaLog, ReplicaStatus

    with over_socket(token_daemon.socket) as c:
        status = c.get("/admin/status").json()
        gpus = c.get("/admin/gpus").json()
        log = c.get("/admin/models/fake/replicas/0/log", params={"lines": 1}).json()
        pinned = c.post("/admin/models/fake/pin", json={}).json()
        unpinned = c.post("/admin/models/fake/unpin", json={}).json()
        restarted = c.post("/admin/models/fake/replicas/0/restart", json={}).json()
    assert set(status) == _fields(DaemonStatus)
    assert all(set(m) == _fields(ModelStatus) for m in status["models"] + [pinned, unpinned])
    assert all(set(r) == _fields(ReplicaStatus) for m in status["models"] for r in m["replicas"])
    assert set(restarted) == _fields(ReplicaStatus) and set(log) == _fields(ReplicaLog)
    assert set(gpus) == _fields(GpusStatus)
    assert pinned["pinned"] is True and unpinned["pinned"] is False and restarted["replica"] == "fake#0"
    wait_until(lambda: _ready(token_daemon), 30, what="the restarted replica ready")


def test_status_times_are_iso_timestamps_and_durations_seconds(token_daemon):
    from datetime import datetime, timedelta

    def models() -> list[dict]:
        with over_socket(token_daemon.socket) as c:
            return c.get("/admin/status").json()["models"]

    wait_until(lambda: models()[0]["decisions"], 30, what="an autoscaler decision")
    with over_socket(token_daemon.socket) as c:
        status = c.get("/admin/status").json()
    assert "monotonic" not in status
    started, now = datetime.fromisoformat(status["started"]), datetime.fromisoformat(status["now"])
    assert started.utcoffset() == timedelta(0) and started <= now
    assert abs((now - started).total_seconds() - status["uptime_s"]) < 1
    for decision in status["models"][0]["decisions"]:
        at = datetime.fromisoformat(decision["at"])
        assert started - timedelta(seconds=1) <= at <= now
        assert "now" not in decision["inputs"]  # the monotonic clock stays inside the daemon


def test_an_unknown_admin_action_is_a_404_that_lists_the_actions(token_daemon):
    from appliance.status import ModelAction, ReplicaAction

    with over_socket(token_daemon.socket) as c:
        model = c.post("/admin/models/fake/explode", json={})
        replica = c.post("/admin/models/fake/replicas/0/explode", json={})
    assert model.status_code == 404 and replica.status_code == 404
    assert all(a in model.json()["error"]["message"] for a in [*ModelAction, "scale"])
    assert all(a in replica.json()["error"]["message"] for a in ReplicaAction)


def test_the_openapi_document_describes_the_admin_answers_from_their_structs(token_daemon):
    from appliance.status import DaemonStatus, ModelAction, ReplicaAction, ReplicaStatus

    auth = {"Authorization": f"Bearer {token_daemon.token}"}
    doc = httpx.get(f"{token_daemon.url}/openapi.json", headers=auth, timeout=10).json()
    schemas, paths = doc["components"]["schemas"], doc["paths"]

    def answer(path: str, method: str = "get") -> str:
        return paths[path][method]["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]

    assert answer("/admin/status").endswith("/DaemonStatus")
    assert set(schemas["DaemonStatus"]["properties"]) == _fields(DaemonStatus)
    assert set(schemas["ReplicaStatus"]["properties"]) == _fields(ReplicaStatus)
    assert schemas["DaemonStatus"]["properties"]["now"] == {"type": "string", "format": "date-time"}
    assert answer("/admin/gpus").endswith("/GpusStatus")
    assert answer("/admin/models/{model}/{action}", "post").endswith("/ModelStatus")
    assert answer("/admin/models/{model}/replicas/{index}/{action}", "post").endswith("/ReplicaStatus")
    actions = {p["name"]: p["schema"].get("enum") for p in paths["/admin/models/{model}/{action}"]["post"]["parameters"]}
    assert actions["action"] == list(ModelAction)
    replica = paths["/admin/models/{model}/replicas/{index}/{action}"]["post"]["parameters"]
    assert next(p for p in replica if p["name"] == "action")["schema"]["enum"] == list(ReplicaAction)
    scale = paths["/admin/models/{model}/scale"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert schemas[scale["$ref"].rsplit("/", 1)[1]]["properties"]["replicas"]["anyOf"][0]["minimum"] == 0
    assert answer("/readyz").endswith("/Readiness") and "503" in paths["/readyz"]["get"]["responses"]


def test_metrics_labels_are_the_status_names_and_states(token_daemon):
    wait_until(lambda: _ready(token_daemon), 30, what="daemon ready")
    with over_socket(token_daemon.socket) as c:
        status = c.get("/admin/status").json()
    text = httpx.get(f"{token_daemon.url}/metrics", timeout=10).text
    for m in status["models"]:
        assert f'appliance_model_ready{{model="{m["name"]}"}} {1.0 if m["ready"] else 0.0}' in text
        for r in m["replicas"]:
            labels = f'model="{m["name"]}",replica="{r["index"]}",state="{r["state"]}"'
            assert f"appliance_replica_state{{{labels}}} 1.0" in text


def test_an_org_slash_name_model_is_administered_by_the_cli_and_over_both_doors(daemons):
    """A model named ORG/NAME (the hub's grammar, which the config allows) could not be
    scaled, loaded, pinned or restarted: its "/" split the admin path and no route matched."""
    import subprocess
    import sys

    from appliance.status import model_path

    daemon = daemons.start(fake_model("org/m", "--chunks", "2"))
    cli = [sys.executable, "-m", "appliance.cli"]
    pinned = subprocess.run([*cli, "pin", "org/m", "--config", str(daemon.config)], capture_output=True,
                            text=True, timeout=60)
    assert pinned.returncode == 0, pinned.stderr
    assert next(m for m in daemon.status()["models"] if m["name"] == "org/m")["pinned"] is True
    with over_socket(daemons.tmp / "state" / "admin.sock") as c:
        scaled = c.post(model_path("org/m", "scale"), json={"replicas": 1})
        assert scaled.status_code == 200 and scaled.json()["name"] == "org/m"
        wait_until(lambda: c.get("/admin/status").json()["models"][0]["ready"], 30, what="org/m ready")
        log = c.get(model_path("org/m", "replicas", 0, "log"))
        assert log.status_code == 200, log.text
        restarted = c.post(model_path("org/m", "replicas", 0, "restart"), json={})
        assert restarted.status_code == 200, restarted.text
        # A name that is not a model is still a 404 naming it, not a route miss.
        missing = c.post(model_path("org/other", "pin"), json={})
        assert missing.status_code == 404 and "org/other" in missing.text


def test_the_admin_token_beside_a_second_different_authorization_header_is_refused(token_daemon):
    """Which of two Authorization headers a proxy in front checked is unknowable: with
    the admin token in one and anything else in the other, neither is taken."""
    url = f"{token_daemon.url}/admin/status"
    token = f"Bearer {token_daemon.token}"
    for headers in ([("Authorization", token), ("Authorization", "Bearer other")],
                    [("Authorization", "Bearer other"), ("Authorization", token)]):
        refused = httpx.get(url, headers=headers)
        assert refused.status_code == 401, headers
        assert refused.json()["error"]["code"] == "invalid_admin_token"
    # The token sent twice is the token.
    assert httpx.get(url, headers=[("Authorization", token), ("Authorization", token)]).status_code == 200
