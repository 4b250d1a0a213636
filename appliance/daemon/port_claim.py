"""One daemon per port: a second `appliance serve` on a port in use exits with one line.

The daemon binds the port itself (appliance/dataplane/listener.py): in one process
without SO_REUSEPORT, with workers as N sockets in a SO_REUSEPORT group. A group admits
any socket of the same uid that sets SO_REUSEPORT, so a second daemon run by the same
user on the same port could join it, and the kernel would spread clients over two daemons
with different models and policies (Granian, which bound the one-process port before,
set SO_REUSEPORT too). Before anything starts, `serve` therefore:

1. claims the port in the abstract UNIX socket namespace (``\\0appliance-port:HOST:PORT``,
   per network namespace like the port itself, no file to leave behind, dropped by the
   kernel when the holder dies, SIGKILL included). The holder answers whoever connects
   with one JSON line: to its own user or root (the kernel's word, SO_PEERCRED), its
   pid, config and state directory, so the second daemon's error can name them; to any
   other local user only that an appliance holds the port (where a daemon keeps its
   config and state is not theirs to learn);
2. binds the TCP address once WITHOUT SO_REUSEPORT and lets it go: a listener of any
   other program (or of an appliance of another version), SO_REUSEPORT or not, makes
   that bind fail.

The daemon binds right after; the claim, held for the daemon's life, keeps another
appliance from slipping in between.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import struct
import threading
from dataclasses import dataclass


class PortBusy(Exception):
    """One line: which address and port, who holds it if known, what to do."""


@dataclass
class PortClaim:
    sock: socket.socket

    def close(self) -> None:
        self.sock.close()


def claim_port(host: str, port: int, *, config: str, state_dir: str) -> PortClaim:
    """The held claim (keep it for the daemon's life), or PortBusy."""
    name = f"\0appliance-port:{host}:{port}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # close-on-exec: engines don't hold it
    try:
        sock.bind(name)
    except OSError as exc:
        sock.close()
        if exc.errno != errno.EADDRINUSE:
            raise
        raise PortBusy(
            f"{_where(host, port)} is already in use by another appliance daemon ({_holder(name)}); "
            "stop it first, or give this one its own server.port"
        ) from None
    try:
        _probe_tcp(host, port)
    except BaseException:
        sock.close()
        raise
    sock.listen(8)
    me = json.dumps({"pid": os.getpid(), "config": config, "state_dir": state_dir}).encode() + b"\n"
    threading.Thread(target=_answer, args=(sock, me, os.geteuid()), name="port-claim", daemon=True).start()
    return PortClaim(sock)


def _probe_tcp(host: str, port: int) -> None:
    """Bind host:port as an exclusive listener would, and let it go at once."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise PortBusy(f"server.host {host!r} does not resolve: {exc.strerror}") from None
    family, _, _, _, addr = infos[0]
    probe = socket.socket(family, socket.SOCK_STREAM)
    try:
        # SO_REUSEADDR: a port whose last connections sit in TIME_WAIT is free; a listener is not.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(addr)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise PortBusy(
                f"{_where(host, port)} is already in use by another program; "
                "stop it, or set server.port (or --port) to a free port"
            ) from None
        raise PortBusy(f"cannot bind {_where(host, port)}: {exc.strerror}") from None
    finally:
        probe.close()


def _where(host: str, port: int) -> str:
    return f"port {port} on {host}"


# What a local user other than the holder's (or root) is told: nothing but the fact.
HELD = json.dumps({"held": "an appliance daemon holds this port"}).encode() + b"\n"


def _answer(sock: socket.socket, me: bytes, owner: int) -> None:
    """Tell whoever asks that the port is held (until the claim is closed); who holds it,
    with which config and state directory, only to the holder's own user or root."""
    while True:
        try:
            conn, _ = sock.accept()
        except OSError:
            return  # closed: the daemon is exiting
        with conn:
            conn.settimeout(1.0)
            try:
                conn.sendall(me if _peer_uid(conn) in (owner, 0) else HELD)
            except OSError:
                pass


def _peer_uid(conn: socket.socket) -> int | None:
    """The connecting process's uid, as the kernel says (None: it would not say)."""
    try:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    return struct.unpack("3i", creds)[1]


def holder_ids(host: str, port: int) -> tuple[int, int] | None:
    """The uid and gid of the process holding the claim on host:port (the kernel's word
    for it, SO_PEERCRED), None when none does: whom a client on that port talks to."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(2.0)
        try:
            conn.connect(f"\0appliance-port:{host}:{port}")
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        except OSError:
            return None
    _, uid, gid = struct.unpack("3i", creds)
    return uid, gid


def _holder(name: str) -> str:
    """'pid N, config F, state directory D' of the daemon holding the claim, as far as it
    tells (another user's daemon tells only that it holds it: then its pid and uid, the
    kernel's word)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(2.0)
        try:
            conn.connect(name)
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            pid, uid, _ = struct.unpack("3i", creds)
            line = conn.makefile("rb").readline(4096)
        except OSError:
            return "pid unknown"
    try:
        said = json.loads(line)
        return f"pid {pid}, config {said['config']}, state directory {said['state_dir']}"
    except (ValueError, KeyError, TypeError):
        return f"pid {pid}" if uid == os.geteuid() else f"pid {pid}, run by uid {uid}"
