"""Where each stored Response lives: the OpenAI Responses API's ``store`` keeps a
response on the engine replica that made it (vLLM keeps them in its memory), so
a later ``GET /v1/responses/{id}`` or a request with ``previous_response_id``
must reach that replica, and only for the API key that created it.

The index is bounded (least recently used out); a response whose replica has
restarted or gone since is gone with it: a 404 that says so, never another
replica's guess.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgspec

from appliance.errors import NotFound
from appliance.fleet.replica import State

if TYPE_CHECKING:
    from appliance.access.keys import ApiKey
    from appliance.fleet.replica import Replica

# Ids remembered; a response older than the last this many is not found.
CAPACITY = 100_000


@dataclass(frozen=True, slots=True)
class Home:
    replica: Replica
    pid: int | None  # the engine process that holds it (a restart empties its store)
    owner: str | None  # the API key id that created it (None: keyless)


class _Id(msgspec.Struct):
    id: str = ""
    # A stream's response.completed event carries the response one level down.
    response: _Id | None = None


_ID = msgspec.json.Decoder(_Id)


def response_id(data: bytes) -> str:
    """The id of a whole response, or of the response in a stream's event."""
    try:
        top = _ID.decode(data)
    except msgspec.MsgspecError:
        return ""
    return top.response.id if top.response is not None else top.id


class ResponseHomes:
    def __init__(self, capacity: int = CAPACITY) -> None:
        self.capacity = capacity
        self._homes: OrderedDict[str, Home] = OrderedDict()

    def remember(self, rid: str, replica: Replica, key: ApiKey | None) -> None:
        if not rid:
            return
        self._homes[rid] = Home(replica, replica.pid, key.id if key is not None else None)
        self._homes.move_to_end(rid)
        while len(self._homes) > self.capacity:
            self._homes.popitem(last=False)

    def remember_answer(
        self, answer: bytes, replicas: Iterable[Replica], served_by: str | None, key: ApiKey | None
    ) -> None:
        """The response in answer is stored on the local replica that served it (if one did)."""
        replica = next((r for r in replicas if r.name == served_by), None)
        if replica is not None:
            self.remember(response_id(answer), replica, key)

    def find(self, rid: str, key: ApiKey | None, param: str) -> Replica:
        """The replica holding response rid, for this key; a 404 otherwise (another
        key's response is as unknown as one that never was)."""
        home = self._homes.get(rid)
        if home is None or home.owner != (key.id if key is not None else None):
            raise NotFound(f"No stored response with id '{rid}'", param=param, code="response_not_found")
        replica = home.replica
        if replica.state is not State.READY or replica.pid != home.pid:
            del self._homes[rid]
            raise NotFound(
                f"Response '{rid}' is gone: the engine replica that stored it has restarted or stopped since",
                param=param,
                code="response_not_found",
            )
        return replica


__all__ = ["Home", "ResponseHomes", "response_id"]
