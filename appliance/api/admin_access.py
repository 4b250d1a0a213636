"""Who may use the admin API: one credential model, checked in one place.

- The admin socket (server.admin_socket, mode 0660): its file permissions decide who
  may connect, and every request on it carries the socket's token (a fresh one at each
  start, in ``<admin_socket>.token``, mode 0640: appliance/socket_token.py), or the admin
  token. An engine runs as the daemon's user and may connect (Landlock does not mediate
  connecting to a unix socket) but cannot read the token file. A browser cannot reach it.
- TCP: the admin token (server.admin_token_file) when one is set, from anywhere.
  Without one, loopback clients only, and only on a loopback-bound daemon whose
  API keys are not required (a developer's box): once keys.required is true, or
  the daemon listens beyond loopback, TCP admin needs the token.

Every admin request over TCP must also name this server in its one Host header (a
DNS-rebinding page sends its own name), come from no other web origin (a page in
the operator's browser posting cross-site), and a state-changing call must send
``Content-Type: application/json``, which no cross-site "simple" request can.
The same credential (admin token or admin socket) also opens /metrics and
/v1/models when API keys are required; without keys, their GETs (and the calls on a
stored Response) get the same Host check (``check_host``), since no credential stands
between a page and their answers.
"""

from __future__ import annotations

import hmac
import ipaddress
from urllib.parse import urlsplit

from litestar import Request

from appliance.access.keys import bearer_token
from appliance.api.admin_socket import via_admin_socket
from appliance.config import Config, is_loopback
from appliance.errors import Forbidden, Unauthorized, UnsupportedMediaType, quoted
from appliance.socket_token import new_token, token_path

WILDCARD_BINDS = ("0.0.0.0", "::", "")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


class AdminAccess:
    def __init__(self, cfg: Config, token: str) -> None:
        self.token = token
        self.port = cfg.server.port
        self.bind = cfg.server.host.lower()
        self.names = {n.lower().rstrip(".") for n in cfg.server.admin_hosts}
        self.socket = cfg.server.admin_socket
        # This start's socket token (the daemon writes it next to the socket).
        self.socket_token = new_token() if self.socket else ""
        self.keys_required = cfg.keys.required

    def adopt(self, cfg: Config) -> None:
        """A reloaded config's keys.required (a live setting): with it, the admin API over
        TCP needs the admin token, as at a start with it (a reload that lists a reverse
        proxy in front, whose clients connect from loopback, requires it)."""
        self.keys_required = cfg.keys.required

    def check(self, request: Request) -> None:
        """Raise, saying what was refused and why, unless this request may administer."""
        if via_admin_socket(request.scope):
            if not self._socket_credential(request):
                raise Unauthorized(
                    "Admin socket: missing or wrong token: send 'Authorization: Bearer <token>' with the "
                    f"token in {token_path(self.socket)} (new at each start) or the admin token",
                    code="invalid_admin_token",
                )
            self._check_content_type(request)
            return
        self._check_origin(request)
        if self.token:
            if not _matches(_bearer(request), self.token):
                raise Unauthorized("Admin API: missing or wrong admin token", code="invalid_admin_token")
        else:
            self._check_tokenless(request)
        self._check_content_type(request)

    def is_admin(self, request: Request) -> bool:
        """The admin credential without raising: for what it opens besides /admin/."""
        if via_admin_socket(request.scope):
            return self._socket_credential(request)
        return _matches(_bearer(request), self.token)

    def _socket_credential(self, request: Request) -> bool:
        """A request on the admin socket carries its token, or the admin token: opening the
        socket is not enough (an engine, as the daemon's user, may)."""
        sent = _bearer(request)
        return _matches(sent, self.socket_token) | _matches(sent, self.token)  # both compared, always

    def _check_tokenless(self, request: Request) -> None:
        fix = (
            f"set server.admin_token_file and send it as 'Authorization: Bearer <token>', or use "
            f"the admin socket ({self.socket or 'server.admin_socket'})"
        )
        if self.keys_required:
            raise Forbidden(f"Admin API over TCP needs the admin token when keys.required = true: {fix}")
        if not is_loopback(self.bind):
            raise Forbidden(f"Admin API over TCP needs the admin token when server.host is not loopback: {fix}")
        client = request.scope.get("client")
        if client and client[0] and not is_loopback(client[0]):
            raise Forbidden("Admin API is served to loopback clients only unless server.admin_token_file is set")

    def _check_origin(self, request: Request) -> None:
        self.check_host(request, "Admin API")
        headers = request.headers
        self.refuse_cross_site(headers.get("origin"), headers.get("sec-fetch-site"), "Admin API", "administer")

    def check_host(self, request: Request, api: str) -> None:
        """A 403 unless the request names this server in its one Host header: a page that
        rebound its own DNS name to this address reads the answers of a same-origin GET
        (it sends no Origin then), so its name must not be served. The admin API checks
        every request; the model API its GETs that no key guards (appliance/api/callers.py)."""
        if via_admin_socket(request.scope):
            return
        hosts = request.headers.getall("host", [])
        if len(hosts) > 1:  # which one a proxy in front read is anyone's guess
            raise Forbidden(
                f"{api}: a request with {len(hosts)} Host headers is refused (one names this server)",
                code="untrusted_host",
            )
        host = hosts[0] if hosts else ""
        if host and not self._our_name(_hostname(host)):
            raise Forbidden(
                f"{api}: Host {quoted(host)} is not this server's address (a DNS-rebinding page "
                "sends its own name); use 127.0.0.1, localhost or a name in server.admin_hosts",
                code="untrusted_host",
            )

    def refuse_cross_site(self, origin: str | None, fetch_site: str | None, api: str, verb: str) -> None:
        """A request a browser sent for a page of another web origin: refused, on the
        admin API and the model API alike (the daemon serves no CORS, so no other
        origin may use it; a "simple" cross-site POST would otherwise run, unread)."""
        if origin is not None and not self._our_origin(origin):
            raise Forbidden(
                f"{api}: refused a cross-origin request from {quoted(origin)} (a web page may not {verb} this server)",
                code="cross_origin",
            )
        if fetch_site in ("cross-site", "same-site"):
            raise Forbidden(f"{api}: refused a request a browser marked cross-site", code="cross_origin")

    def _our_name(self, name: str) -> bool:
        if name == "localhost" or name == self.bind or name in self.names:
            return True
        try:
            ip = ipaddress.ip_address(name)
        except ValueError:
            return False
        # No DNS name is involved with an address literal, so no rebinding: a loopback one,
        # or, for a daemon listening on every address, any of them.
        return ip.is_loopback or self.bind in WILDCARD_BINDS

    def _our_origin(self, origin: str) -> bool:
        try:
            parts = urlsplit(origin)
            port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
        except ValueError:
            return False
        name = (parts.hostname or "").rstrip(".")
        if parts.scheme not in ("http", "https") or not self._our_name(name):
            return False
        # Another port on localhost is another web origin (any local user's server).
        return port == self.port or name in self.names

    @staticmethod
    def _check_content_type(request: Request) -> None:
        if request.method in SAFE_METHODS:
            return
        sent = request.headers.get("content-type", "")
        if sent.split(";", 1)[0].strip().lower() != "application/json":
            raise UnsupportedMediaType(
                f"Admin API: a {request.method} needs 'Content-Type: application/json' "
                f"(got {quoted(sent or 'none')}); nothing was changed"
            )


def _matches(sent: str, token: str) -> bool:
    """sent is token, compared in constant time; an empty token matches nothing."""
    return bool(token) and hmac.compare_digest(sent.encode(), token.encode())


def _bearer(request: Request) -> str:
    """The token sent, or none when Authorization came twice with different tokens:
    which one a proxy in front checked is unknowable, so neither is taken."""
    sent = {bearer_token(value) for value in request.headers.getall("authorization", [])}
    return sent.pop() if len(sent) == 1 else ""


def _hostname(host: str) -> str:
    """The name in a Host header: without its port, IPv6 brackets or trailing dot."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0].rstrip(".") if host.count(":") == 1 else host.rstrip(".")
