"""Where each stored Response lives: the OpenAI Responses API's ``store`` keeps a
response on the engine replica that made it (vLLM keeps them in its memory), so
a later ``GET /v1/responses/{id}`` or a request with ``previous_response_id``
must reach that replica, and only for the API key that created it.

The index is bounded (least recently used out); a response whose replica has
restarted or gone since is gone with it: a 404 that says so, never another
replica's guess. GET, DELETE and POST .../cancel all find the replica here. It keeps
each response's input too (the request's ``input``, which GET .../input_items lists:
no engine lists it; and its ``max_output_tokens``, response_items.request_input),
within a byte budget that also pushes the oldest out.

It lives in the daemon's memory only, on purpose: the responses it points to
live in the replicas' memory (vLLM's store), and a daemon restart ends its
engines, so an index kept on disk could only point at responses that are gone,
and would outlive the API keys' rights to them for nothing.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import TYPE_CHECKING, NamedTuple

from appliance.errors import NotFound, quoted
from appliance.fleet.replica_state import State

if TYPE_CHECKING:
    from appliance.access.keys import ApiKey
    from appliance.fleet.replica import Replica

# Ids remembered; a response older than the last this many is not found.
CAPACITY = 100_000
# The bytes of input kept for them all; beyond it, the oldest responses are forgotten.
INPUT_BUDGET = 64 * 1024 * 1024


class Home(NamedTuple):  # a tuple: made once per stored response, on the hot path
    replica: Replica
    pid: int | None  # the engine process that holds it (a restart empties its store)
    owner: str | None  # the API key id that created it (None: keyless)
    inputs: bytes = b""  # the request's input and cap, as JSON (response_items.request_input)


class ResponseHomes:
    def __init__(self, capacity: int = CAPACITY, input_budget: int = INPUT_BUDGET) -> None:
        self.capacity = capacity
        self.input_budget = input_budget
        self._homes: OrderedDict[str, Home] = OrderedDict()
        self._input_bytes = 0

    def remember(self, rid: str, replica: Replica, key: ApiKey | None, inputs: bytes = b"") -> None:
        if not rid:
            return
        self.forget(rid)
        homes = self._homes
        homes[rid] = Home(replica, replica.pid, key.id if key is not None else None, inputs)  # ids are new: last
        self._input_bytes += len(inputs)
        while homes and (len(homes) > self.capacity or self._input_bytes > self.input_budget):
            _, oldest = homes.popitem(last=False)
            self._input_bytes -= len(oldest.inputs)

    def remember_made(
        self, made: str, replicas: Iterable[Replica], served_by: str | None, key: ApiKey | None, inputs: bytes = b""
    ) -> None:
        """Response made is stored on the local replica that served it (if one did)."""
        replica = next((r for r in replicas if r.name == served_by), None)
        if replica is not None:
            self.remember(made, replica, key, inputs)

    def forget(self, rid: str) -> None:
        """The response was deleted on its replica."""
        gone = self._homes.pop(rid, None)
        if gone is not None:
            self._input_bytes -= len(gone.inputs)

    def inputs(self, rid: str) -> bytes:
        """The input of a response ``find`` has found (the caller's to see)."""
        home = self._homes.get(rid)
        return home.inputs if home is not None else b""

    def find(self, rid: str, key: ApiKey | None, param: str) -> Replica:
        """The replica holding response rid, for this key; a 404 otherwise (another
        key's response is as unknown as one that never was)."""
        home = self._homes.get(rid)
        if home is None or home.owner != (key.id if key is not None else None):
            raise NotFound(f"No stored response with id {quoted(rid)}", param=param, code="response_not_found")
        replica = home.replica
        if replica.state is not State.READY or replica.pid != home.pid:
            self.forget(rid)
            raise NotFound(
                f"Response '{rid}' is gone: the engine replica that stored it has restarted or stopped since",
                param=param,
                code="response_not_found",
            )
        return replica


__all__ = ["Home", "ResponseHomes"]
