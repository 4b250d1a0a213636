"""The public port's listening sockets, bound by the daemon itself, in both modes.

One process (workers = 1): one socket bound WITHOUT SO_REUSEPORT, served by Granian in
the daemon (`OnListeningSocket`). No other process can bind the port, whatever it sets:
Granian bound its own with SO_REUSEPORT, and any process of the daemon's uid that set it
too could join the port and be handed a share of the clients' connections (their keys).

Workers (workers = N > 1): N sockets in one SO_REUSEPORT group, each bound and listening
in the daemon before any worker starts, worker i served on socket i for the daemon's
life (its replacement gets the same socket and the connections queued on it meanwhile).
One socket that every worker accepted from was spread badly by the kernel (the first
worker awake took a whole burst of new connections); a group gives each worker its own
accept queue, and a classic-BPF program (SO_ATTACH_REUSEPORT_CBPF, `ReuseportGroup.steer`)
picks one at random among the live workers' sockets only. The kernel numbers a group's
sockets in the order they listen, a socket that joins later takes the next number, and
the program never returns a number above the daemon's own (an index out of range would
fall back to the kernel's hash, over every member): a late joiner is given no
connection. Who can join at all: only a process of the daemon's uid that sets
SO_REUSEPORT (the kernel refuses any other uid); in production that uid runs only the
daemon, its workers and its engines, and the engines' seccomp filter
(appliance/fleet/sandbox.py) makes their SO_REUSEPORT a no-op. docs/operations.md "One door".
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import Any

from granian._granian import SocketHolder
from granian.server.embed import Server

from appliance.cbpf import JEQ_K, LD_W_ABS, MOD_K, RET_K, Instruction, Program, assemble

SO_ATTACH_REUSEPORT_CBPF = 51  # linux/asm-generic/socket.h; Python's socket module lacks it

# SKF_AD_OFF + SKF_AD_RANDOM (linux/filter.h): loading this word gives a random u32.
_RANDOM = 0xFFFFF038


def _address(host: str, port: int) -> tuple[int, Any]:
    family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    return family, addr


def listen_socket(host: str, port: int, backlog: int, *, reuse_port: bool = False) -> socket.socket:
    """A listening socket on host:port; with reuse_port, a member of the port's reuseport
    group (port_claim checked the port was free). SO_REUSEADDR: TIME_WAIT leftovers only.

    TCP_NODELAY, which every accepted connection inherits (Granian sets it only on the
    sockets it binds itself): without it Nagle's algorithm holds a stream's first event,
    written just after the response head, until the client ACKs that head, and a client
    delays its ACK by up to tens of ms (bench/gateway_overhead.py --stream: the first
    chunk of 64 streams ~20 ms later than the bare relay's)."""
    family, addr = _address(host, port)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(addr)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def steering_program(live: Sequence[int]) -> bytes:
    """Classic BPF that returns one of the live indices at random (A = rand % len;
    then A's index in live). It returns nothing else: not an index of a socket that
    joined after the daemon's."""
    if not live:
        raise ValueError("steering needs a socket to steer to")
    picks = [f"pick {k}" for k in range(len(live))]
    program: list[Instruction | str] = [(LD_W_ABS, None, None, _RANDOM), (MOD_K, None, None, len(live))]
    program += [(JEQ_K, picks[k], None, k) for k in range(len(live) - 1)]
    program += [picks[-1], (RET_K, None, None, live[-1])]
    for k, index in enumerate(live[:-1]):
        program += [picks[k], (RET_K, None, None, index)]
    return assemble(program)


def attach_steering(sock: socket.socket, live: Sequence[int]) -> None:
    """Set (or replace) the group's program, through any socket of the group."""
    program = Program(steering_program(live))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, bytes(program))  # copied by the kernel


class ReuseportGroup:
    """The daemon's N listening sockets in one reuseport group, held for its life:
    sockets[i] is worker i+1's. steer() says which of them take new connections."""

    def __init__(self, host: str, port: int, count: int, backlog: int) -> None:
        self.sockets: list[socket.socket] = []
        try:
            # One at a time, bound and listening: the kernel numbers the group's
            # sockets in the order they listen (checked on 6.18), so sockets[i] is index i.
            for _ in range(count):
                self.sockets.append(listen_socket(host, port, backlog, reuse_port=True))
                port = self.sockets[0].getsockname()[1]  # port 0 (tests): the one the kernel chose
            self.live = list(range(count))
            attach_steering(self.sockets[0], self.live)
        except BaseException:
            self.close()
            raise

    def steer(self, live: Sequence[int]) -> None:
        """New connections go to these sockets only (a worker that is down gets none);
        with none live, to all of them, where they wait for the replacements."""
        wanted = sorted(live) or list(range(len(self.sockets)))
        if wanted != self.live:
            attach_steering(self.sockets[0], wanted)
            self.live = wanted

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


class OnListeningSocket(Server):
    """Granian's embedded server on a listening socket bound by someone else (its own
    multi-process server does this on Windows); it never binds one itself. Granian is
    given the descriptor itself (detached from the socket object) and closes it as it
    stops serving, before the app's lifespan shuts down: a dup kept open here would
    keep the port listening through that shutdown, its queued connections reset at exit."""

    def __init__(self, sock: socket.socket | None, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sock = sock

    def _listening(self) -> socket.socket:
        assert self.sock is not None, "given"
        return self.sock

    def _init_shared_socket(self) -> None:
        self.sock = self._listening()
        self._ssp = None
        # Granian 2.x's SocketHolder(fd, is_uds, backlog); its .pyi lags behind.
        self._shd = SocketHolder(self.sock.detach(), False, self.backlog)  # type: ignore[call-arg,assignment]

    async def shutdown(self, exit_code: int = 0) -> None:
        await super().shutdown(exit_code)
        if self.sock is not None:
            self.sock.close()  # Granian's already (detached); ours if it never got that far


class OnExclusivePort(OnListeningSocket):
    """One process: Granian on host:port, bound by the daemon as Granian starts (where
    Granian bound its own), WITHOUT SO_REUSEPORT: no other process can bind the port."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(None, *args, **kwargs)

    def _listening(self) -> socket.socket:
        return listen_socket(self.bind_addr, self.bind_port, self.backlog)
