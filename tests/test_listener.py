"""The public port's listening sockets (appliance/dataplane/listener.py), with the real
kernel: the reuseport group's program steers new connections among the daemon's own
live sockets only; one process's socket is exclusive."""

from __future__ import annotations

import errno
import socket

import pytest

from appliance.dataplane.listener import ReuseportGroup, listen_socket

BURST = 32


def _burst(port: int) -> list[socket.socket]:
    """BURST connections opened at once (each completed by the kernel, accepted by no one yet)."""
    return [socket.create_connection(("127.0.0.1", port)) for _ in range(BURST)]


def _queued(sock: socket.socket) -> int:
    """How many connections wait in sock's accept queue (accepted and closed here)."""
    sock.setblocking(False)
    count = 0
    while True:
        try:
            conn, _ = sock.accept()
        except BlockingIOError:
            return count
        conn.close()
        count += 1


def _joiner(port: int) -> socket.socket:
    """A process of the daemon's uid joining its port: SO_REUSEPORT, bound and listening."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(64)
    return sock


@pytest.fixture
def group():
    group = ReuseportGroup("127.0.0.1", 0, 3, 64)
    yield group
    group.close()


def _spread(group: ReuseportGroup, *others: socket.socket) -> list[int]:
    port = group.sockets[0].getsockname()[1]
    clients = _burst(port)
    try:
        return [_queued(s) for s in (*group.sockets, *others)]
    finally:
        for c in clients:
            c.close()


def test_a_burst_of_connections_is_spread_over_every_socket_of_the_group(group):
    got = _spread(group)
    # Random among 3: all 32 on fewer than 3 sockets is a 1-in-~10^5 event.
    assert sum(got) == BURST and all(got), got


def test_a_socket_steered_out_gets_no_connection_and_back_in_gets_its_share(group):
    group.steer([0, 2])  # the worker of socket 1 is down
    got = _spread(group)
    assert got[1] == 0 and sum(got) == BURST and got[0] and got[2], got
    group.steer([1])
    assert _spread(group) == [0, BURST, 0]
    group.steer([0, 1, 2])
    assert all(_spread(group))


def test_with_no_socket_live_connections_wait_on_all_of_them(group):
    group.steer([])
    assert all(_spread(group))


def test_a_late_joiner_of_the_daemons_uid_joins_the_group_but_gets_no_connection(group):
    with _joiner(group.sockets[0].getsockname()[1]) as joiner:
        got = _spread(group, joiner)
        assert got[-1] == 0 and sum(got) == BURST, got
        group.steer([2])  # a new program is as closed to it as the first
        assert _spread(group, joiner) == [0, 0, BURST, 0]


def test_the_groups_index_is_the_order_its_sockets_listen_in(group):
    # What steer() relies on: sockets[i] is the kernel's index i (the group is made at listen()).
    for i in range(3):
        group.steer([i])
        assert _spread(group) == [BURST if j == i else 0 for j in range(3)]


def test_no_process_binds_the_port_of_an_exclusive_listener_even_with_so_reuseport():
    with listen_socket("127.0.0.1", 0, 8) as sock:
        for reuse_port in (False, True):
            with socket.socket() as probe, pytest.raises(OSError) as err:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, int(reuse_port))
                probe.bind(("127.0.0.1", sock.getsockname()[1]))
            assert err.value.errno == errno.EADDRINUSE


def _accepted_nodelay(listener: socket.socket) -> int:
    """TCP_NODELAY on a connection the listener accepted (what Granian serves a client on)."""
    with socket.create_connection(listener.getsockname()[:2]):
        listener.setblocking(True)
        conn, _ = listener.accept()
        with conn:
            return conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def test_a_clients_connection_sends_each_write_at_once_nagle_off_in_both_modes(group):
    """Nagle's algorithm held a stream's first event behind the response head until the
    client ACKed the head (a delayed ACK: tens of ms); Granian sets TCP_NODELAY only on
    sockets it binds itself, so the daemon's own listeners set it for their connections."""
    with listen_socket("127.0.0.1", 0, 8) as sock:
        assert _accepted_nodelay(sock) == 1
    steer_all = group.sockets[0]
    group.steer([0])
    assert _accepted_nodelay(steer_all) == 1
