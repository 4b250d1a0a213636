"""Who sent a request that came through a trusted reverse proxy ([server] trusted_proxies).

An audit row's client is the connection's peer (gateway/request.peer_of). Behind a
reverse proxy (TLS in front: docs/security.md, residual risk 5) that peer is the
proxy, for every request; the proxy names its own peer in a header it appends to:
X-Forwarded-For (``client, proxy1``) or RFC 7239 Forwarded (``for=client, for=proxy1``),
whichever ``[server] forwarded_header`` says. Anyone can write either header, so:

- it is read only on a connection from a trusted proxy; from any other peer it is
  ignored, and the row names that peer, as with no list;
- it is read from the right: each address a trusted proxy appended is passed over, and
  the first that no trusted proxy owns is the client (what the last trusted proxy saw
  connect to it). What stands left of it, which that client may have written itself,
  is never read. Every address trusted: the left-most is the client;
- only the header configured: a proxy that appends to one passes the other on as its
  client wrote it;
- a value that cannot be read that far (an obfuscated node, ``unknown``, a name,
  garbage) names nobody: the row names the peer, as with no list. Nothing here raises.

The row's ``client`` is then the address named (``host``, or ``host:port`` when the
proxy gave a port; an IPv6 host in brackets, as peer_of writes it), and its ``proxy``
the peer it came through (host:port). With the list empty (the default) nothing here
runs: the front door checks one attribute (bench/trusted_proxies.py: the same Python
calls per request as before the list existed). With it, a request pays one walk over its
headers and a dict lookup per node read (REMEMBERED): 13 more calls per request, ~3 µs
alone, against ~30 µs for the whole front door.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from appliance.config import ServerConfig
    from appliance.gateway.request import ProxyRequest

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
# Parsing an address (ipaddress) costs microseconds, the front door's whole work per
# request ~30 µs: what each peer and node text came to is remembered, these many of
# each (then forgotten at once, so a flood of new ones costs only their parsing).
REMEMBERED = 4096
# The longest node text that can be an address: [IPv6 written long]:port (53 characters).
LONGEST_NODE = 64


class TrustedProxies:
    """The reverse proxies whose word on who their client is the audit takes."""

    __slots__ = ("_nodes", "_peers", "header", "networks", "rfc7239")

    def __init__(self, proxies: Iterable[str], header: str = "x-forwarded-for") -> None:
        # Validated in appliance/config (server.trusted_proxies): addresses or CIDRs.
        self.networks = tuple(ipaddress.ip_network(entry) for entry in proxies)
        self.header = header.encode("latin-1")
        self.rfc7239 = header == "forwarded"
        self._peers: dict[str, bool] = {}  # a peer's host: whether a trusted proxy
        self._nodes: dict[str, tuple[str, bool] | None] = {}  # a node: _named's answer

    @classmethod
    def of(cls, server: ServerConfig) -> TrustedProxies | None:
        """The list a config sets; None when it is empty (the front door then reads no header)."""
        return cls(server.trusted_proxies, server.forwarded_header) if server.trusted_proxies else None

    def name_client(self, req: ProxyRequest, peer: Any, headers: Iterable[tuple[bytes, bytes]]) -> None:
        """req.client: the client a trusted proxy names, and req.proxy that proxy (the
        peer, req.client until now); unchanged for any other peer or header value."""
        if not peer or not self._trusted_peer(str(peer[0])):
            return
        named = self.client_in([value for name, value in headers if name == self.header])
        if named is not None:
            req.client, req.proxy = named, req.client

    def client_in(self, values: list[bytes]) -> str | None:
        """The client the header's values name (several lines read as one list), or None."""
        if not values:
            return None
        nodes = b",".join(values).decode("latin-1").split(",")
        client = None
        for node in reversed(nodes):
            named = self._named((_for(node) if self.rfc7239 else node).strip())
            if named is None:
                return None  # unreadable: nobody this side of it can be believed
            client, trusted = named
            if not trusted:
                break
        return client

    def _trusted_peer(self, host: str) -> bool:
        trusted = self._peers.get(host)
        if trusted is None:
            trusted = self.trusts(_address(host))
            _remember(self._peers, host, trusted)
        return trusted

    def _named(self, node: str) -> tuple[str, bool] | None:
        """A node's address as the row writes it, and whether a trusted proxy owns it;
        None for one that names no address."""
        if node in self._nodes:
            return self._nodes[node]
        if len(node) > LONGEST_NODE:
            return None
        parsed = _node(node)
        named = None if parsed is None else (_written(*parsed), self.trusts(parsed[0]))
        _remember(self._nodes, node, named)
        return named

    def trusts(self, address: Address | None) -> bool:
        if address is None:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # a dual-stack socket's IPv4 peer
        return any(address in network for network in self.networks)


def _remember(memory: dict, key: str, value: object) -> None:
    if len(memory) >= REMEMBERED:
        memory.clear()
    memory[key] = value


def _address(text: str) -> Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _for(element: str) -> str:
    """A Forwarded element's for= value, unquoted ("" without one: unreadable)."""
    for pair in element.split(";"):
        name, _, value = pair.strip().partition("=")
        if name.lower() == "for":
            return value[1:-1] if len(value) >= 2 and value[0] == value[-1] == '"' else value
    return ""


def _node(text: str) -> tuple[Address, int | None] | None:
    """An address and its port, if any: 192.0.2.1, 192.0.2.1:80, 2001:db8::1, [2001:db8::1],
    [2001:db8::1]:80. None for anything else (unknown, _hidden, a name, a bad port)."""
    port: str | None = None
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            return None
        port = rest[1:] if rest else None
    elif text.count(":") == 1:  # an IPv4 address and its port
        host, port = text.split(":")
    else:
        host = text
    address = _address(host)
    if address is None or (port is not None and not _is_port(port)):
        return None
    return address, int(port) if port is not None else None


def _is_port(text: str) -> bool:
    return text.isascii() and text.isdigit() and len(text) <= 5 and int(text) <= 65535


def _written(address: Address, port: int | None) -> str:
    """As the audit row writes a client: host[:port], an IPv6 host in brackets."""
    host = f"[{address}]" if address.version == 6 else str(address)
    return host if port is None else f"{host}:{port}"
