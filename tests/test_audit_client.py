"""Who sent a request: every audit row names the client's address (host:port, as the
connection's peer), the refusals of a credential above all, through one process and
through the workers alike, and `appliance audit export` shows it. Behind a reverse
proxy listed in [server] trusted_proxies, the client that proxy names, the proxy beside
it (gateway/forwarded.py); a header from any other peer is never believed."""

from __future__ import annotations

import json
import re
import socket
import subprocess

import httpx
import pytest

from appliance.config import ConfigError, parse_config
from appliance.gateway.forwarded import REMEMBERED, TrustedProxies
from appliance.gateway.request import ProxyRequest

from .conftest import PY, ROOT, fake_model, over_admin_socket, wait_until
from .test_keys import keys_cli

CHAT = json.dumps({"model": "fake", "messages": [{"role": "user", "content": "hi"}]})


def _sent_from(port: int, head: str, body: str = "") -> tuple[int, str]:
    """One request on a connection of its own: its answer's status and the address it came from."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        host, local = sock.getsockname()[:2]
        length = f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n" if body else ""
        sock.sendall(f"{head}\r\nHost: 127.0.0.1\r\nConnection: close\r\n{length}\r\n{body}".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1]), f"{host}:{local}"


def _exported(daemon) -> dict[str, dict]:
    out = subprocess.run([PY, "-m", "appliance.cli", "audit", "export", "--config", str(daemon.config)],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    return {row["client"]: row for row in map(json.loads, out.stdout.splitlines()) if row["client"]}


@pytest.mark.parametrize("workers", [1, 2])
def test_every_audit_row_names_the_clients_address_refusals_included(daemons, workers):
    # A security reviewer asked who tried a key: the rows said what, when and which
    # endpoint, never from where.
    daemon = daemons.start(fake_model("fake"), extra="[keys]\nrequired = true\n", server=f"workers = {workers}")
    token = keys_cli(daemon, "create", "--name", "client")
    sent = {
        "no key": _sent_from(daemon.port, "POST /v1/chat/completions HTTP/1.1", CHAT),
        "wrong key": _sent_from(daemon.port, "POST /v1/chat/completions HTTP/1.1\r\nAuthorization: Bearer ak-0-no", CHAT),
        "wrong key, models": _sent_from(daemon.port, "GET /v1/models HTTP/1.1\r\nAuthorization: Bearer ak-0-no"),
        "keyed": _sent_from(daemon.port, f"POST /v1/chat/completions HTTP/1.1\r\nAuthorization: Bearer {token}", CHAT),
    }
    assert [status for status, _ in sent.values()] == [401, 401, 401, 200]
    rows = wait_until(lambda: r if len(r := _exported(daemon)) == len(sent) else None, 15, what="the rows")
    assert {what: (rows[client]["status"], rows[client]["endpoint"]) for what, (_, client) in sent.items()} == {
        "no key": (401, "chat"),
        "wrong key": (401, "chat"),
        "wrong key, models": (401, "models"),
        "keyed": (200, "chat"),
    }


@pytest.mark.parametrize("workers", [1, 2])
def test_a_flood_of_wrong_keys_leaves_its_first_rows_and_one_summary_counting_the_rest(daemons, workers):
    # Every refusal was a row: a local flood of wrong keys filled the disk up to retention.
    daemon = daemons.start(fake_model("fake"), extra="[keys]\nrequired = true\n[audit]\nrefusal_rows_per_minute = 2\n",
                           server=f"workers = {workers}")
    sent = [_sent_from(daemon.port, "POST /v1/chat/completions HTTP/1.1\r\nAuthorization: Bearer ak-0-no", CHAT)
            for _ in range(7)]
    assert [status for status, _ in sent] == [401] * 7
    assert daemon.terminate() == 0  # the log's close writes the summary of the minute so far
    rows = _exported(daemon)
    assert [(rows[client]["status"], rows[client]["folded"]) for _, client in sent if client in rows] == [
        (401, None), (401, None), (401, 5)  # the first two, then the third standing for five
    ]
    assert list(rows) == [client for _, client in sent[:3]]


# Behind a reverse proxy: every row named the proxy, and a reviewer could not tell who sent what.

def _client_of(proxies: TrustedProxies, peer: tuple[str, int] | None, *headers: tuple[bytes, bytes]):
    req = ProxyRequest("rid", 0.0, 0.0, None, None, f"{peer[0]}:{peer[1]}" if peer else None)  # type: ignore[arg-type]
    proxies.name_client(req, peer, headers)
    return req.client, req.proxy


XFF = b"x-forwarded-for"


def test_a_trusted_proxys_x_forwarded_for_names_the_right_most_address_no_trusted_proxy_owns():
    proxies = TrustedProxies(["10.0.0.0/8", "192.0.2.1"])
    peer = ("10.1.2.3", 40000)
    # The proxy appends its peer to what the client sent: the client's own words are left of it.
    assert _client_of(proxies, peer, (XFF, b"6.6.6.6, 198.51.100.7")) == ("198.51.100.7", "10.1.2.3:40000")
    # Through two proxies, the inner one's address is passed over.
    assert _client_of(proxies, peer, (XFF, b"198.51.100.7, 192.0.2.1")) == ("198.51.100.7", "10.1.2.3:40000")
    # Several header lines are one list, in order.
    assert _client_of(proxies, peer, (XFF, b"6.6.6.6"), (b"x-other", b"1"), (XFF, b"198.51.100.7, 10.9.9.9"))[0] == (
        "198.51.100.7"
    )
    # Every address trusted (a check from the proxies' own network): the left-most.
    assert _client_of(proxies, peer, (XFF, b"10.0.0.5, 192.0.2.1"))[0] == "10.0.0.5"
    # IPv6, bracketed or not, a port where the proxy gave one, written as peer_of writes a peer.
    assert _client_of(proxies, peer, (XFF, b"2001:DB8::0:1"))[0] == "[2001:db8::1]"
    assert _client_of(proxies, peer, (XFF, b"[2001:db8::1]:4711"))[0] == "[2001:db8::1]:4711"
    assert _client_of(proxies, peer, (XFF, b" 198.51.100.7:80 "))[0] == "198.51.100.7:80"
    # A dual-stack socket's IPv4 peer is the trusted proxy it is.
    assert _client_of(proxies, ("::ffff:10.1.2.3", 1), (XFF, b"198.51.100.7")) == ("198.51.100.7", "::ffff:10.1.2.3:1")


def test_x_forwarded_for_from_a_peer_not_trusted_is_never_believed():
    proxies = TrustedProxies(["10.0.0.0/8"])
    # A client connecting itself writes any address it likes: the row keeps its own.
    assert _client_of(proxies, ("198.51.100.9", 5000), (XFF, b"10.0.0.1")) == ("198.51.100.9:5000", None)
    assert _client_of(proxies, None, (XFF, b"198.51.100.7")) == (None, None)  # the admin socket: no peer


@pytest.mark.parametrize("value", [
    b"", b",", b"unknown", b"_hidden", b"proxy.example", b"198.51.100.7:", b"198.51.100.7:99999",
    b"198.51.100.7:\xd9\xa3", b"[2001:db8::1", b"[2001:db8::1]x", b"1.2.3.4.5", b"\xff\xfe", b"198.51.100.7, unknown",
    b"a" * 10000,
])
def test_a_malformed_x_forwarded_for_names_nobody_and_the_row_keeps_the_peer(value):
    proxies = TrustedProxies(["10.0.0.0/8"])
    assert _client_of(proxies, ("10.1.2.3", 40000), (XFF, value)) == ("10.1.2.3:40000", None)


def test_rfc_7239_forwarded_is_read_only_when_configured_and_then_alone():
    xff = TrustedProxies(["10.0.0.0/8"])
    forwarded = TrustedProxies(["10.0.0.0/8"], "forwarded")
    peer = ("10.1.2.3", 40000)
    sent = ((b"forwarded", b'for=6.6.6.6, For="[2001:db8::17]:4711";proto=https;by=10.1.2.3'), (XFF, b"6.6.6.6"))
    assert _client_of(forwarded, peer, *sent)[0] == "[2001:db8::17]:4711"
    # A proxy that writes one header passes the other on as its client wrote it.
    assert _client_of(xff, peer, (b"forwarded", b"for=198.51.100.7")) == ("10.1.2.3:40000", None)
    assert _client_of(forwarded, peer, (XFF, b"198.51.100.7")) == ("10.1.2.3:40000", None)
    for unreadable in (b"proto=https", b"for=unknown", b'for="_gazonk"', b"for=198.51.100.7, by=10.1.2.3"):
        assert _client_of(forwarded, peer, (b"forwarded", unreadable)) == ("10.1.2.3:40000", None)


def test_what_trusted_proxies_remember_of_addresses_is_bounded():
    # Parsing each address costs microseconds, so each is remembered; a flood of new
    # ones from a proxy must not grow the daemon's memory without end.
    proxies = TrustedProxies(["10.0.0.0/8"])
    for i in range(REMEMBERED + 10):
        assert proxies.client_in([f"198.51.{i // 250}.{i % 250}, 10.0.0.1".encode()]) == f"198.51.{i // 250}.{i % 250}"
    assert len(proxies._nodes) <= REMEMBERED
    assert proxies.client_in([b"198.51.0.1, 10.0.0.1"]) == "198.51.0.1"  # forgotten, then read again the same
    assert proxies.client_in([b"1" * 100]) is None and "1" * 100 not in proxies._nodes  # never an address: not kept


@pytest.mark.parametrize(("entry", "error"), [
    ("proxy.example", "field 'server.trusted_proxies[0]': must be an IP address or a network"),
    ("10.0.0.5/8", "field 'server.trusted_proxies[0]': must be an IP address or a network (10.0.0.0/8, fd00::/8): "
                   "10.0.0.5/8 has host bits set"),
    ("0.0.0.0/0", "field 'server.trusted_proxies[0]': '0.0.0.0/0' trusts every address"),
    ("::/0", "field 'server.trusted_proxies[0]': '::/0' trusts every address"),
])
def test_trusted_proxies_are_addresses_or_networks_never_everyone(entry, error):
    with pytest.raises(ConfigError, match=re.escape(error)):
        parse_config(f'[server]\ntrusted_proxies = ["{entry}"]\n')
    listed = parse_config('[server]\ntrusted_proxies = ["127.0.0.1", "fd00::/8"]\n[keys]\nrequired = true\n')
    assert TrustedProxies.of(listed.server) is not None
    assert TrustedProxies.of(parse_config("").server) is None  # the default: no header is read


def _sent_through(port: int, head: str, forwarded_for: str, body: str = "") -> tuple[int, str]:
    return _sent_from(port, f"{head}\r\nX-Forwarded-For: {forwarded_for}", body)


def _rows(daemon, count: int) -> dict[str, dict]:
    return wait_until(lambda: r if len(r := _exported(daemon)) >= count else None, 15, what="the rows")


@pytest.mark.parametrize("workers", [1, 2])
def test_behind_a_trusted_proxy_the_row_names_the_client_it_forwarded_and_the_proxy(daemons, workers):
    daemon = daemons.start(fake_model("fake"), extra="[keys]\nrequired = true\n",
                           server=f'workers = {workers}\ntrusted_proxies = ["127.0.0.1"]')
    token = keys_cli(daemon, "create", "--name", "client")
    chat = f"POST /v1/chat/completions HTTP/1.1\r\nAuthorization: Bearer {token}"
    spoofed = _sent_through(daemon.port, chat, "6.6.6.6, 198.51.100.7", CHAT)  # the client wrote 6.6.6.6
    refused = _sent_through(daemon.port, "GET /v1/models HTTP/1.1\r\nAuthorization: Bearer ak-0-no", "198.51.100.8")
    unreadable = _sent_through(daemon.port, chat, "unknown", CHAT)
    assert [status for status, _ in (spoofed, refused, unreadable)] == [200, 401, 200]
    rows = _rows(daemon, 3)
    assert {client: (row["status"], row["endpoint"], row["proxy"]) for client, row in rows.items()} == {
        "198.51.100.7": (200, "chat", spoofed[1]),
        "198.51.100.8": (401, "models", refused[1]),
        unreadable[1]: (200, "chat", None),  # named nobody: the peer, as with no list
    }


def test_a_direct_clients_x_forwarded_for_is_ignored_until_a_reload_trusts_its_address(daemons):
    keyed = "[keys]\nrequired = true\n"
    daemon = daemons.start(fake_model("fake"), extra=keyed, server='workers = 2\ntrusted_proxies = ["192.0.2.1"]')
    chat = f"POST /v1/chat/completions HTTP/1.1\r\nAuthorization: Bearer {keys_cli(daemon, 'create', '--name', 'c')}"
    direct = _sent_through(daemon.port, chat, "198.51.100.7", CHAT)
    assert direct[0] == 200
    rows = _rows(daemon, 1)
    assert list(rows) == [direct[1]] and rows[direct[1]]["proxy"] is None  # a spoofed header is not the client

    daemons.write_config(fake_model("fake"), keyed, daemon.port, server='workers = 2\ntrusted_proxies = ["127.0.0.0/8"]')
    with over_admin_socket(daemon.admin_socket) as admin:
        assert admin.post("http://appliance/admin/reload", json={}).status_code == 200
    proxied = _sent_through(daemon.port, chat, "198.51.100.7", CHAT)
    assert proxied[0] == 200
    assert _rows(daemon, 2)["198.51.100.7"]["proxy"] == proxied[1]


def test_a_listed_reverse_proxy_requires_keys_as_a_non_loopback_bind_does():
    # A loopback bind behind a proxy on this box was keyless for the proxy's clients, and
    # answered them the tokenless admin API (they all connect from its loopback address).
    with pytest.raises(ConfigError, match=re.escape("field 'keys.required': server.trusted_proxies lists a reverse")):
        parse_config('[server]\ntrusted_proxies = ["127.0.0.1"]\n')
    assert parse_config('[server]\ntrusted_proxies = ["127.0.0.1"]\n[keys]\nrequired = true\n').keys.required


def test_a_reload_that_requires_keys_closes_the_tokenless_admin_api_over_tcp(daemons):
    # A keyless loopback box answers its loopback clients' admin calls without a token. A
    # reload that puts a reverse proxy in front (whose clients all connect from loopback)
    # must require keys, and with them the admin token over TCP; the admin door kept the
    # keys.required it started with, so the proxy's clients were answered as the operator.
    daemon = daemons.start(fake_model("fake"))
    assert httpx.get(daemon.url + "/admin/status", timeout=10).status_code == 200  # tokenless, as before
    keyed = "[keys]\nrequired = true\n"
    daemons.write_config(fake_model("fake"), keyed, daemon.port, server='trusted_proxies = ["127.0.0.0/8"]')
    with over_admin_socket(daemon.admin_socket) as admin:
        assert admin.post("http://appliance/admin/reload", json={}).status_code == 200
    refused = httpx.get(daemon.url + "/admin/status", timeout=10)
    assert refused.status_code == 403, refused.text
    assert "needs the admin token when keys.required = true" in refused.json()["error"]["message"]
