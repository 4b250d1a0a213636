"""One proxied request, from the front door to its ledger entry.

The front door (appliance/api/app.py) fills in who sent it and what it asks
for; routing (appliance/gateway/routing.py) decides where it goes and forwards
it through serving (appliance/gateway/serving.py), which notes the replica or
provider that served it; the relay (appliance/gateway/relay.py) records its
first byte; the ledger (appliance/gateway/ledger.py) writes its metrics, budget
settlement and audit row from it, once.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from random import getrandbits as _getrandbits
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from litestar.types import Receive

    from appliance.access.keys import ApiKey, Reservation, Standing
    from appliance.config import RouteConfig
    from appliance.fleet.deployment import Deployment
    from appliance.fleet.replica import Replica
    from appliance.gateway.capabilities import Endpoint
    from appliance.gateway.metering import StreamTap, Usage
    from appliance.gateway.tracing import RequestTrace


def new_request_id() -> str:
    # Unique enough for correlating logs; not a secret, so no urandom syscall per request.
    return "%032x" % _getrandbits(128)


# A client's own X-Request-Id: 1-128 printable ASCII characters.
_CLIENT_REQUEST_ID = re.compile(rb"[\x20-\x7e]{1,128}")


def request_id_of(sent: bytes | None) -> str:
    """The request's id: the client's X-Request-Id when it is 1-128 printable ASCII
    characters, else a new one. It is echoed, logged, audited and sent to the engine
    (made unique first: ``engine_request_id``), so a control character or a latin-1
    byte in it goes no further than here (the front door's rule, and a worker's for
    the answers it gives alone)."""
    if sent is not None and _CLIENT_REQUEST_ID.fullmatch(sent):
        return sent.decode("ascii")
    return new_request_id()


def engine_request_id(rid: str, chosen: bool) -> str:
    """The id the engine is sent as X-Request-Id: vLLM takes it as its own id for the
    request, one table for every key, and two requests with one id at once break or
    hang each other (before vLLM PR #27987). A client's own id (``chosen``) gets a
    daemon-made suffix, so no tenant can pick another's; a generated one is unique
    already. The client's id stays what the answer, the logs and the audit row name."""
    return f"{rid}.{_getrandbits(64):016x}" if chosen else rid


def peer_of(client: Any) -> str | None:
    """The ASGI scope's client, (host, port), as the audit row names it: host:port, an
    IPv6 host in brackets ([::1]:5000); None without one (a unix socket)."""
    if not client:
        return None
    host, port = client[0], client[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(slots=True)
class ProxyRequest:
    """A request's facts: what it asked, where it went, what it held and cost, how it ended."""

    # Who and when.
    rid: str
    started: float  # perf_counter at arrival
    arrived: float  # unix time at arrival
    endpoint: Endpoint  # what the client called: its request type, dialect, metering
    receive: Receive  # the client's side of the connection (a disconnect cancels the work)
    client: str | None = None  # who sent it: the peer's host:port (peer_of), audited
    # The trusted reverse proxy it came through (its host:port), when client is the
    # address that proxy named (gateway/forwarded.py); audited beside it.
    proxy: str | None = None
    key: ApiKey | None = None
    # A stream its worker carries has no key there: the standing the daemon's Cut ends.
    standing: Standing | None = None
    # What it asks for.
    model: str = ""  # the model the client asked for
    body: bytes = b""  # as the client sent it (metered by it when the engine reports no usage)
    # Its prompt's likely tokens, when a worker read the body (the daemon has only its facts).
    guess: int | None = None
    # The front door took its body (read it, or its worker's facts): a refusal before
    # leaves it unread, and its connection closes (api/app.py, the front's error path).
    body_taken: bool = False
    stream: bool = False
    route: RouteConfig | None = None
    # Where it goes, and what it carries there.
    target: str = ""  # the local model the route (or the name itself) points at
    deployment: Deployment | None = None
    pinned: Replica | None = None  # the replica holding the stored Response it continues
    path: str = ""  # the engine's path for it
    forwarded: bytes = b""  # the body sent on: the budget's cap, the usage option, the target's name
    fields: dict | None = None  # what the front door set in the body (forwarded: the body with them)
    salt: str | None = None  # the tenant's cache salt, for engines that partition their cache by one
    headers: dict[str, str] = field(default_factory=dict)
    prefix: list[int] | None = None  # the prompt's block hashes (prefix-aware replica choice)
    stores: bool = False  # a Responses request whose engine stores the response it makes
    # The budget: what the key's reservation holds, and the completion's cap.
    reservation: Reservation | None = None
    completion_cap: int | None = None
    # How it went.
    served_by: str | None = None  # the replica or provider
    fallback_reason: str | None = None
    # A stream its key's revocation (or lowered budget) ended: its row's status (401, 429).
    cut_status: int | None = None
    ttft: float | None = None
    tap: StreamTap | None = None
    usage: Usage | None = None
    # An answer dropped at upstream.max_answer_bytes (its bytes, the cap): the engine
    # made it, so the ledger charges it though the client got a 502 (gateway/ledger.py).
    dropped_at: int = 0
    bytes_sent: bool = False  # the answer has started: no fallback may take over
    request_text: bytes | None = None  # audit.include_text
    response_text: bytes | None = None  # b"" collects the answer (audit.include_text)
    # The most of a streamed answer's text kept for its row: a longer stream's text is
    # cut there, and says so (gateway/relay.py, _pump). Read only while response_text
    # collects; set with it by the front door (api/app.py with_body) to
    # upstream.max_answer_bytes, whose default the config alone owns.
    response_text_cap: int = 0
    # The ledger entry: written once; its audit row, and the future that resolves
    # once it (and the request's charge) is on disk (None: written in the background).
    finished: bool = False
    row: list | None = None
    receipt: asyncio.Future | None = None
    trace: RequestTrace | None = None  # its trace, with [telemetry] on (appliance/gateway/tracing.py)

    @property
    def accountable(self) -> bool:
        """A keyed or regulated request: its audit row and charge are on disk before its answer ends."""
        return self.key is not None or (self.route is not None and self.route.regulated)


__all__ = ["ProxyRequest"]
