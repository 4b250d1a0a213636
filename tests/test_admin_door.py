"""The admin API has one credential model (issue 13, point 4): the admin socket
or the admin token; TCP admin without a token only on a developer's loopback box
with keys not required; never to a DNS-rebinding page, a cross-site POST or a
body that is not JSON; and with keys required, the box's models and metrics only
to a caller with a key or the admin credential. The CLI sends the token."""

from __future__ import annotations

import json
import os
import secrets
import subprocess

import httpx
import openai
import pytest

from .conftest import PY, ROOT, fake_model, wait_until
from .test_keys import keys_cli


def state(d) -> list[str]:
    return [r["state"] for r in d.replicas("fake")]


@pytest.fixture(scope="module")
def dev_daemon(tmp_path_factory):
    """The developer's default: loopback, no admin token, keys not required."""
    from .conftest import DaemonFactory

    factory = DaemonFactory(tmp_path_factory.mktemp("dev"))
    yield factory.start(fake_model("fake"))
    factory.cleanup()


@pytest.fixture(scope="module")
def keyed_daemon(tmp_path_factory):
    """Keys required, an admin token."""
    from .conftest import DaemonFactory

    tmp = tmp_path_factory.mktemp("keyed")
    token = "adm-" + secrets.token_hex(16)
    (tmp / "admin.token").write_text(token + "\n")
    (tmp / "admin.token").chmod(0o600)
    factory = DaemonFactory(tmp)
    d = factory.start(fake_model("fake"), server=f'admin_token_file = "{tmp / "admin.token"}"',
                      extra="[keys]\nrequired = true\n", wait=False)
    d.wait_ready(status=False)
    d.token = token
    d.key = keys_cli(d, "create", "--name", "app")
    yield d
    factory.cleanup()


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def test_tcp_admin_without_a_token_is_refused_once_keys_are_required(daemons):
    d = daemons.start(fake_model("fake"), extra="[keys]\nrequired = true\n", wait=False)
    d.wait_ready(status=False)
    for path in ("/admin/status", "/admin/gpus", "/openapi.json", "/admin/models/fake/replicas/0/log"):
        resp = httpx.get(d.url + path, timeout=10)
        assert resp.status_code == 403, path
        message = resp.json()["error"]["message"]
        assert "keys.required" in message and "admin_token_file" in message and "admin socket" in message
    resp = httpx.post(f"{d.url}/admin/models/fake/unload", json={}, timeout=10)
    assert resp.status_code == 403
    assert state(d) == ["READY"]  # (over the admin socket) nothing changed


def test_a_cross_site_post_from_a_web_page_changes_nothing(dev_daemon):
    d = dev_daemon
    url = f"{d.url}/admin/models/fake/unload"
    # What a page on another site can send without a preflight: a "simple" request.
    for headers in ({"Origin": "http://evil.example", "Content-Type": "text/plain"},
                    {"Origin": "http://evil.example", "Content-Type": "application/json"},
                    {"Origin": "null", "Content-Type": "application/x-www-form-urlencoded"},
                    {"Origin": "http://localhost:3000", "Content-Type": "text/plain"},  # another local server
                    {"Sec-Fetch-Site": "cross-site", "Content-Type": "text/plain"}):
        resp = httpx.post(url, content=b'{"replicas": 0}', headers=headers, timeout=10)
        assert resp.status_code == 403, headers
        assert resp.json()["error"]["code"] == "cross_origin"
    # No Origin at all (a no-cors fetch may omit it): a simple content type is still refused.
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data", None):
        headers = {"Content-Type": content_type} if content_type else {}
        resp = httpx.post(url, content=b"{}", headers=headers, timeout=10)
        assert resp.status_code == 415, content_type
        error = resp.json()["error"]
        assert error["code"] == "unsupported_media_type" and "application/json" in error["message"]
    resp = httpx.post(f"{d.url}/admin/models/fake/scale", content=b'{"replicas": 0}',
                      headers={"Content-Type": "text/plain"}, timeout=10)
    assert resp.status_code == 415
    assert state(d) == ["READY"]
    # The daemon's own origin, with JSON, is the operator.
    same = {"Origin": f"http://127.0.0.1:{d.port}"}
    assert httpx.post(f"{d.url}/admin/models/fake/pin", json={}, headers=same, timeout=10).status_code == 200


def test_a_dns_rebinding_page_cannot_read_or_change_anything(dev_daemon):
    d = dev_daemon
    for host in (f"evil.example:{d.port}", "evil.example", f"localhost.evil.example:{d.port}", "10.11.12.13"):
        for path in ("/admin/status", "/admin/gpus", "/openapi.json"):
            resp = httpx.get(d.url + path, headers={"Host": host}, timeout=10)
            assert resp.status_code == 403, (host, path)
            assert resp.json()["error"]["code"] == "untrusted_host"
            assert host in resp.json()["error"]["message"]
        resp = httpx.post(f"{d.url}/admin/models/fake/unload", json={}, headers={"Host": host}, timeout=10)
        assert resp.status_code == 403
    assert state(d) == ["READY"]
    for host in (f"localhost:{d.port}", f"127.0.0.1:{d.port}", "localhost", f"[::1]:{d.port}"):
        assert httpx.get(d.url + "/admin/status", headers={"Host": host}, timeout=10).status_code == 200, host


def test_a_dns_rebinding_page_cannot_read_the_model_list_or_metrics_of_a_keyless_box(dev_daemon):
    # Regression: the model API's GETs did not check Host; keyless, a page that rebound its
    # name to 127.0.0.1 read /v1/models and /metrics (a same-origin GET sends no Origin).
    d = dev_daemon
    for host in (f"evil.example:{d.port}", "evil.example", "10.11.12.13"):
        for path in ("/v1/models", "/v1/models/fake", "/metrics"):
            resp = httpx.get(d.url + path, headers={"Host": host}, timeout=10)
            assert resp.status_code == 403 and resp.json()["error"]["code"] == "untrusted_host", (host, path)
            assert "fake" not in resp.text.replace(host, "")
        ready = httpx.get(d.url + "/readyz", headers={"Host": host}, timeout=10)
        assert ready.status_code == 200 and "models" not in ready.json(), ready.text
    for host in (f"localhost:{d.port}", f"127.0.0.1:{d.port}", f"[::1]:{d.port}"):
        for path in ("/v1/models", "/v1/models/fake", "/metrics"):
            assert httpx.get(d.url + path, headers={"Host": host}, timeout=10).status_code == 200, (host, path)
    for base in (d.url, f"http://localhost:{d.port}"):  # what SDK clients send: the URL's own host
        assert [m.id for m in openai.OpenAI(base_url=base + "/v1", api_key="x").models.list()] == ["fake"]


def test_a_configured_host_name_reaches_the_model_list_and_public_metrics(daemons):
    d = daemons.start(fake_model("fake"), server='admin_hosts = ["ai.example"]\nmetrics_public = true')
    for path in ("/v1/models", "/metrics"):
        assert httpx.get(d.url + path, headers={"Host": f"ai.example:{d.port}"}, timeout=10).status_code == 200
        refused = httpx.get(d.url + path, headers={"Host": f"evil.example:{d.port}"}, timeout=10)
        assert refused.status_code == 403, (path, refused.text)


def test_a_request_with_two_host_headers_is_refused_whichever_comes_first(dev_daemon):
    """One Host was read (the first); a proxy in front, or the framework, may read the
    other: the rebinding check must not depend on which (RFC 9112: two Hosts are a 400)."""
    import socket

    d = dev_daemon
    for first, second in (("localhost", "evil.example"), ("evil.example", "localhost"), ("localhost", "localhost")):
        with socket.create_connection(("127.0.0.1", d.port), timeout=10) as conn:
            conn.sendall(f"GET /admin/status HTTP/1.1\r\nHost: {first}\r\nHost: {second}\r\n"
                         "Connection: close\r\n\r\n".encode())
            answer = b""
            while chunk := conn.recv(65536):
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 403"), (first, second, head)
        assert json.loads(body)["error"]["code"] == "untrusted_host" and b'"models"' not in body

def test_with_keys_required_models_and_metrics_need_a_key_or_the_admin_credential(keyed_daemon):
    d = keyed_daemon
    for path in ("/v1/models", "/v1/models/fake", "/metrics"):
        for headers in ({}, bearer("wrong"), bearer("ak-nope-nope")):
            resp = httpx.get(d.url + path, headers=headers, timeout=10)
            assert resp.status_code == 401, (path, headers)
            assert resp.json()["error"]["type"] == "authentication_error"
            assert "fake" not in resp.text
        for secret in (d.key, d.token):
            assert httpx.get(d.url + path, headers=bearer(secret), timeout=10).status_code == 200, path
    assert [m["id"] for m in httpx.get(f"{d.url}/v1/models", headers=bearer(d.key)).json()["data"]] == ["fake"]
    # /healthz and /readyz stay open for probes; /readyz names no model without a credential.
    assert httpx.get(f"{d.url}/healthz").status_code == 200
    anonymous = httpx.get(f"{d.url}/readyz")
    assert anonymous.status_code == 200 and anonymous.json() == {"status": "ready"}
    assert httpx.get(f"{d.url}/readyz", headers=bearer(d.key)).json()["models"] == {"fake": True}
    # The OpenAPI document is the admin's only.
    assert httpx.get(f"{d.url}/openapi.json", headers=bearer(d.key)).status_code == 401
    assert httpx.get(f"{d.url}/openapi.json", headers=bearer(d.token)).status_code == 200


def test_metrics_public_opens_metrics_alone_for_a_local_prometheus(daemons):
    d = daemons.start(fake_model("fake"), server="metrics_public = true", extra="[keys]\nrequired = true\n",
                      wait=False)
    d.wait_ready(status=False)
    assert httpx.get(f"{d.url}/metrics", timeout=10).status_code == 200
    assert httpx.get(f"{d.url}/v1/models", timeout=10).status_code == 401


def cli(d, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "appliance.cli", *args, "--config", str(d.config)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)


def test_the_cli_sends_the_admin_token_over_tcp(daemons, tmp_path):
    token = "adm-" + secrets.token_hex(16)
    (tmp_path / "admin.token").write_text(token)
    (tmp_path / "admin.token").chmod(0o600)
    # No admin socket: the CLI has only TCP, which wants the token (keys required).
    d = daemons.start(fake_model("fake"), extra="[keys]\nrequired = true\n", wait=False,
                      server=f'admin_token_file = "{tmp_path / "admin.token"}"\nadmin_socket = ""')
    d.wait_ready(status=False)
    status = cli(d, "status")
    assert status.returncode == 0, status.stderr
    assert "None" not in status.stdout and "fake" in status.stdout and "READY" in status.stdout
    listing = cli(d, "models", "ls", "--json")
    assert listing.returncode == 0, listing.stderr
    assert json.loads(listing.stdout)[0]["state"] == "READY"
    assert cli(d, "pin", "fake").returncode == 0
    assert cli(d, "scale", "fake", "1").returncode == 0
    assert cli(d, "unpin", "fake").returncode == 0
    # A wrong token is an error that says so, not a status of Nones.
    (tmp_path / "admin.token").write_text("wrong-" + secrets.token_hex(16))
    refused = cli(d, "status")
    assert refused.returncode == 1 and "admin token" in refused.stderr and "None" not in refused.stdout


def test_the_cli_uses_the_admin_socket_when_tcp_admin_is_closed(daemons):
    d = daemons.start(fake_model("fake"), extra="[keys]\nrequired = true\n", wait=False)
    d.wait_ready(status=False)
    status = cli(d, "status", "--json")
    assert status.returncode == 0, status.stderr
    assert [m["name"] for m in json.loads(status.stdout)["models"]] == ["fake"]
    assert cli(d, "load", "fake").returncode == 0
    assert cli(d, "keys", "ls").returncode == 0  # the state database, not the socket


def test_a_user_who_may_open_the_socket_but_not_read_its_token_is_told_what_to_do(tmp_path, monkeypatch):
    """Root reads any file, so the refusal is the kernel's answer played here; the file
    and its group are real."""
    import grp

    from appliance.config import parse_config
    from appliance.daemon import admin_client

    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "admin.sock.token").write_text("t\n")
    cfg = parse_config(f'[paths]\nstate_dir = "{tmp_path / "state"}"\n')

    def refused(path):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(admin_client, "read_token", refused)
    with pytest.raises(admin_client.DaemonDown) as told:
        admin_client.target_from_config(cfg)
    group = grp.getgrgid(os.getgid()).gr_name
    assert str(told.value).startswith(f"you may open the admin socket {tmp_path / 'state' / 'admin.sock'} but not "
                                      f"read its token {tmp_path / 'state' / 'admin.sock.token'}")
    assert f"add yourself to {group}" in str(told.value)
    # The CLI, with an admin token set, goes over TCP instead (no daemon holds the port here).
    (tmp_path / "admin.token").write_text("a" * 32 + "\n")
    (tmp_path / "admin.token").chmod(0o600)
    cfg = parse_config(f'[server]\nport = 1\nadmin_token_file = "{tmp_path / "admin.token"}"\n'
                       f'[paths]\nstate_dir = "{tmp_path / "state"}"\n')
    (tmp_path / "state" / "admin.sock").touch()  # there and openable: os.access is what the CLI asks
    with pytest.raises(admin_client.DaemonDown, match=r"nothing answers at http://127\.0\.0\.1:1\)"):
        admin_client.target_from_config(cfg, socket_if_usable=True)



def _impostor(port: int, claim: bool, told) -> None:
    """Another program on the daemon's port (forked: as another user it may not run the
    venv's interpreter): it writes what it was sent to ``told``."""
    import os
    import socket

    if claim:
        os.setgid(65534)
        os.setuid(65534)
        held = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        held.bind(f"\0appliance-port:127.0.0.1:{port}")  # the daemon's claim, as port_claim.py names it
        held.listen(8)
    tcp = socket.socket()
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind(("127.0.0.1", port))
    tcp.listen(8)
    told.write(b"listening\n")
    tcp.settimeout(15)
    while True:
        try:
            conn, _ = tcp.accept()
        except OSError:
            break
        conn.settimeout(5)
        told.write(conn.recv(65536))
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}")
        conn.close()


@pytest.mark.parametrize("claim", [False, True])
def test_the_cli_sends_the_admin_token_to_no_other_program_on_the_daemons_port(tmp_path, claim):
    """With the daemon down (no admin socket), the CLI fell back to TCP and sent the admin
    token to whatever listened on server.port: any local user's program. The daemon holds
    the port's claim (appliance/daemon/port_claim.py) as the token file's owner; another
    user holding both the port and a claim of that name is not it either."""
    import os
    import signal
    import socket

    if claim and os.geteuid() != 0:
        pytest.skip("another user's program needs root to run")
    token = "adm-" + secrets.token_hex(16)
    (tmp_path / "admin.token").write_text(token)
    (tmp_path / "admin.token").chmod(0o600)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cfg = tmp_path / "appliance.toml"
    cfg.write_text(f'[server]\nport = {port}\nadmin_token_file = "{tmp_path / "admin.token"}"\n'
                   f'[paths]\nstate_dir = "{tmp_path}/state"\n')
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            _impostor(port, claim, os.fdopen(write_end, "wb", buffering=0))
        finally:
            os._exit(0)
    os.close(write_end)
    heard = os.fdopen(read_end, "rb")
    try:
        assert heard.readline() == b"listening\n"
        for command in (["status"], ["scale", "fake", "2"], ["reload"]):
            out = subprocess.run([PY, "-m", "appliance.cli", *command, "--config", str(cfg)],
                                 capture_output=True, text=True, cwd=ROOT, timeout=30)
            assert out.returncode == 1, (command, out.stdout, out.stderr)
            if claim:
                assert "held by uid 65534, not by the daemon" in out.stderr and "token was not sent" in out.stderr
            else:
                assert f"the daemon is not running (nothing answers at http://127.0.0.1:{port})" in out.stderr
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert token.encode() not in heard.read()


def test_a_wrong_admin_token_leaves_an_audit_row_naming_no_token(keyed_daemon):
    """A wrong admin token on /admin/* (401) wrote no audit row and no log line: a
    token-guessing client was invisible. Its row says admin, 401, and never what was sent."""
    import sqlite3
    from pathlib import Path

    d = keyed_daemon
    guess = "adm-" + secrets.token_hex(16)
    for _ in range(3):
        assert httpx.get(f"{d.url}/admin/status", headers=bearer(guess), timeout=10).status_code == 401
    db = Path(d.config.read_text().split('state_dir = "')[1].split('"')[0]) / "appliance.db"

    def rows():
        with sqlite3.connect(db) as conn:
            found = conn.execute("SELECT endpoint, status, key_id FROM audit WHERE endpoint = 'admin'").fetchall()
            return (found, json.dumps(conn.execute("SELECT * FROM audit").fetchall())) if len(found) >= 3 else None

    found, everything = wait_until(rows, 15, what="three rows")
    assert found == [("admin", 401, None)] * 3
    assert guess not in everything and d.token not in everything
