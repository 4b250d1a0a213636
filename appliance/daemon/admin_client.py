"""How the CLI and the TUI reach the daemon's admin API: the admin socket (its file
permissions decide who may open it; each request carries the token the daemon wrote
next to it, which the same owner and group may read: appliance/socket_token.py), else
TCP with the admin token. One resolution (``target_from_config``), one way to say why
the daemon did not answer."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import msgspec

from appliance.socket_token import read_token, token_path
from appliance.status import ActionBody

T = TypeVar("T")


class DaemonDown(Exception):
    """The daemon does not answer (not running, or the socket is not ours to open)."""


class AdminError(Exception):
    """The daemon answered with an error; its message is for the operator."""


@dataclass(frozen=True)
class Target:
    """Where the admin API is: a unix socket, or a URL with the admin token."""

    socket: str | None = None
    url: str | None = None
    token: str = ""

    @property
    def where(self) -> str:
        return f"unix:{self.socket}" if self.socket else (self.url or "")

    def client_options(self) -> dict[str, Any]:
        """httpx.Client / AsyncClient keyword arguments: base URL and the token header
        (the transport, for a socket, is the caller's: sync or async)."""
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        return {"base_url": "http://appliance" if self.socket else (self.url or "").rstrip("/"), "headers": headers}

    def reread(self) -> Target | None:
        """This target with the socket's token read again, if it changed (the daemon
        restarted and wrote a new one); None otherwise."""
        if not self.socket:
            return None
        token = socket_token(self.socket)
        return Target(socket=self.socket, token=token) if token and token != self.token else None

    def why_down(self, exc: Exception) -> str:
        text = str(exc) or type(exc).__name__
        if self.socket and "Permission denied" in text:
            return (
                f"no permission to open {self.socket}: administering needs its owner or group "
                "(ls -l shows them), or the admin token over TCP"
            )
        if "No such file" in text or "Connection refused" in text or "Errno 111" in text:
            return f"the daemon is not running (nothing answers at {self.where})"
        return f"the daemon does not answer at {self.where}: {text}"


def target_from_config(
    cfg,
    *,
    socket: str | None = None,
    url: str | None = None,
    token_file: str | None = None,
    port: int | None = None,
    socket_if_usable: bool = False,
) -> Target:
    """--url (or --port): TCP with the admin token (--token-file, else
    server.admin_token_file); else the admin socket (--socket, else
    server.admin_socket); with the socket off, TCP to server.host:server.port.
    socket_if_usable: fall back to TCP when the socket is not there or not ours
    to open, or its token not ours to read and an admin token is set (the CLI; the
    TUI reports it instead)."""
    from appliance.config import read_admin_token

    def token() -> str:
        if token_file:
            return Path(token_file).read_text().strip()
        return read_admin_token(cfg)

    if url:
        return Target(url=url, token=token())
    path = socket or cfg.server.admin_socket
    if path and port is None and (not socket_if_usable or os.access(path, os.R_OK | os.W_OK)):
        try:
            return Target(socket=path, token=socket_token(path))
        except DaemonDown:
            if not (socket_if_usable and (token_file or cfg.server.admin_token_file)):
                raise  # else: the admin token over TCP, as for a socket not ours to open
    host = "127.0.0.1" if cfg.server.host in ("0.0.0.0", "::", "") else cfg.server.host
    if ":" in host:
        host = f"[{host}]"
    target = Target(url=f"http://{host}:{port or cfg.server.port}", token=token())
    if target.token:
        _refuse_unless_the_daemon(
            cfg.server.host, port or cfg.server.port, target, token_file or cfg.server.admin_token_file
        )
    return target


def socket_token(path: str) -> str:
    """The token to send on the admin socket at path ("" with no token file: no daemon
    there, and the connection says so); DaemonDown, saying what to do, when this user
    may open the socket but not read its token."""
    try:
        return read_token(path)
    except PermissionError:
        raise DaemonDown(_unreadable_token(path)) from None
    except OSError as exc:
        raise DaemonDown(f"cannot read the admin socket's token: {exc}") from None


def _unreadable_token(path: str) -> str:
    import grp

    token = token_path(path)
    try:
        gid = os.stat(token).st_gid
        group = grp.getgrgid(gid).gr_name
    except (OSError, KeyError):
        group = "the daemon's group"
    return (
        f"you may open the admin socket {path} but not read its token {token} (mode 0640, readable by "
        f"its owner and group {group}): add yourself to {group} (then log in again), run as the "
        "daemon's user, or use the admin token over TCP (--url, --token-file)"
    )


def _refuse_unless_the_daemon(host: str, port: int, target: Target, token_file: str) -> None:
    """The admin token goes to this box's port only while the daemon holds it: with the
    daemon down, any local user's program listening there would be sent the token. The
    daemon holds the port's claim (port_claim.py) as a user that reads the token file:
    root, its owner, or its group where the file is group-readable."""
    from appliance.daemon.port_claim import holder_ids

    ids = holder_ids(host, port)
    if ids is None:
        raise DaemonDown(f"the daemon is not running (nothing answers at {target.where})")
    uid, gid = ids
    st = os.stat(token_file)
    if uid not in (0, st.st_uid) and not (st.st_mode & 0o040 and gid == st.st_gid):
        raise DaemonDown(
            f"{target.where} is held by uid {uid}, not by the daemon (root, or the user or group that "
            f"reads the admin token file {token_file}): the admin token was not sent"
        )


def answer(resp: httpx.Response, into: type[T]) -> T:
    """A good answer decoded into its type (appliance/status.py); AdminError with the
    daemon's own message otherwise."""
    if resp.status_code >= 400:
        try:
            message = resp.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = f"HTTP {resp.status_code}"
        raise AdminError(message)
    try:
        return msgspec.json.decode(resp.content, type=into)
    except msgspec.DecodeError as exc:  # ValidationError included
        where = f"{resp.request.method} {resp.request.url.path}"
        raise AdminError(f"{where}: the daemon's answer is not what this client reads ({exc})") from None


JSON_BODY = {"Content-Type": "application/json"}


def encode_body(body: msgspec.Struct | None) -> bytes:
    """A state-changing call's body: its Struct, or {} (ActionBody) when it says nothing."""
    return msgspec.json.encode(body if body is not None else ActionBody())


def call(
    target: Target, method: str, path: str, into: type[T], body: msgspec.Struct | None = None, timeout: float = 30.0
) -> T:
    """One admin call, synchronously (the CLI). State-changing calls always send a
    JSON body ({} when there is nothing to say): the daemon refuses any other content type."""
    transport = httpx.HTTPTransport(uds=target.socket) if target.socket else None
    kwargs: dict[str, Any] = {"content": encode_body(body), "headers": JSON_BODY} if method != "GET" else {}
    try:
        with httpx.Client(transport=transport, timeout=timeout, **target.client_options()) as client:
            return answer(client.request(method, path, **kwargs), into)
    except httpx.TransportError as exc:
        raise DaemonDown(target.why_down(exc)) from None
