"""Prefix-aware choice among a model's READY replicas.

Engines keep the KV cache of recent prompts; a request whose prefix (system
prompt, tools, earlier turns) one replica has seen recently starts generating
sooner there. The request as the engine sees it (tools, then every message, in
order, as the client sent them) is cut into fixed-size blocks, and each block's
hash covers every byte before it (a chained hash), so "block i matches" means
"the first i+1 blocks match". Each replica keeps a bounded LRU index of the
block hashes recently routed to it.

The choice: the replica with the longest match; with no real match (shorter
than ``prefix_min_match_blocks``), the replica that rendezvous hashing picks for
the request's deepest block (which covers everything before it), so new prefixes spread evenly and only the prefixes
of a replica that leaves (or a share of new ones for one that joins) move. In
both cases a replica whose in-flight count exceeds the least-loaded one's by
more than ``prefix_load_margin`` gives way to the least-loaded one. Everything
here is deterministic: no randomness, no per-process hash seeds.
"""

from __future__ import annotations

import zlib
from collections import OrderedDict
from collections.abc import Sequence
from typing import Protocol, TypeVar

import msgspec
import xxhash

from appliance.config import RoutingConfig

# Measured with tracemalloc under LRU churn (tests/test_prefix.py checks the
# cap): an OrderedDict entry keyed by a 64-bit int, key and table slack
# included, takes 170-200 bytes.
ENTRY_BYTES = 200
_MASK = (1 << 64) - 1
BYTES_PER_TOKEN = 4


class _ReplicaLike(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def inflight(self) -> int: ...


R = TypeVar("R", bound=_ReplicaLike)


class _ChatShape(msgspec.Struct):
    messages: list[msgspec.Raw] = []
    tools: msgspec.Raw = msgspec.Raw(b"")


class _PromptShape(msgspec.Struct):
    prompt: msgspec.Raw = msgspec.Raw(b"")


class _ResponsesShape(msgspec.Struct):
    instructions: msgspec.Raw = msgspec.Raw(b"")
    tools: msgspec.Raw = msgspec.Raw(b"")
    input: msgspec.Raw = msgspec.Raw(b"")


class _MessagesShape(msgspec.Struct):
    system: msgspec.Raw = msgspec.Raw(b"")
    tools: msgspec.Raw = msgspec.Raw(b"")
    messages: list[msgspec.Raw] = []


_CHAT = msgspec.json.Decoder(_ChatShape)
_PROMPT = msgspec.json.Decoder(_PromptShape)
_RESPONSES = msgspec.json.Decoder(_ResponsesShape)
_MESSAGES = msgspec.json.Decoder(_MessagesShape)
_ITEMS = msgspec.json.Decoder(list[msgspec.Raw])


def engine_view(body: bytes, chat: bool | str) -> bytes:
    """What the engine's prompt is made of, in its order, each part exactly as the
    client sent it: tools, then every message (chat: True), or the prompt (False);
    a Responses request's instructions, tools and input items ("responses"); a
    Messages request's system prompt, tools and messages ("messages")."""
    try:
        if chat == "responses":
            r = _RESPONSES.decode(body)
            raw = bytes(r.input or b"")
            items = _ITEMS.decode(raw) if raw.startswith(b"[") else [raw]
            return b"\x1e".join([bytes(r.instructions or b""), bytes(r.tools or b""), *map(bytes, items)])
        if chat == "messages":
            m = _MESSAGES.decode(body)
            return b"\x1e".join([bytes(m.system or b""), bytes(m.tools or b""), *map(bytes, m.messages)])
        if chat:
            shape = _CHAT.decode(body)
            return b"\x1e".join([bytes(shape.tools or b""), *map(bytes, shape.messages)])
        return bytes(_PROMPT.decode(body).prompt or b"")
    except msgspec.MsgspecError:
        return b""


def block_hashes(data: bytes, block: int, seed: int = 0) -> list[int]:
    """Chained 64-bit hashes of every whole block of data: hash i covers
    data[:block*(i+1)] (each block's xxh3 is seeded with the previous hash, the
    first with seed: a tenant's, so tenants' prefixes never match each other)."""
    h = seed
    view = memoryview(data)
    out = []
    digest = xxhash.xxh3_64_intdigest
    for end in range(block, len(data) + 1, block):
        h = digest(view[end - block : end], h)
        out.append(h)
    return out


def _mix(x: int) -> int:
    """splitmix64's finalizer: a cheap, well-spread 64-bit mix."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK
    return x ^ (x >> 31)


class PrefixRouter:
    """One model's per-replica indices and the choice among its READY replicas."""

    def __init__(self, cfg: RoutingConfig, engine_kv_tokens: int = 0) -> None:
        self.block = cfg.prefix_block_bytes
        self.min_match = cfg.prefix_min_match_blocks
        self.margin = cfg.prefix_load_margin
        self.capacity = max(1, int(cfg.prefix_index_mib * 1024 * 1024 / ENTRY_BYTES))
        if engine_kv_tokens:
            # Remember no more than the engine can keep: ~4 bytes of request per token.
            self.capacity = min(self.capacity, max(1, engine_kv_tokens * BYTES_PER_TOKEN // self.block))
        self.indices: dict[str, OrderedDict[int, None]] = {}
        self._salts: dict[str, int] = {}
        # Read by the metrics collector at scrape time.
        self.outcomes = {"hit": 0, "miss": 0, "load_guard": 0}

    def hashes(self, body: bytes, chat: bool | str, seed: int = 0) -> list[int]:
        return block_hashes(engine_view(body, chat), self.block, seed)

    def view_hashes(self, view: bytes, seed: int = 0) -> list[int]:
        """hashes, of a request whose engine_view was taken already (by its worker)."""
        return block_hashes(view, self.block, seed)

    def forget(self, replica_name: str) -> None:
        """The replica's engine lost its cache (stopped, crashed, slept)."""
        self.indices.pop(replica_name, None)

    def match(self, replica_name: str, hashes: Sequence[int]) -> int:
        """How many leading blocks of the request the replica's index holds."""
        index = self.indices.get(replica_name)
        if not index or not hashes:
            return 0
        # Chained hashes and first-block-last touches keep each indexed prefix
        # contiguous from block 0, so the longest match is a binary search.
        lo, hi = 0, len(hashes)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if hashes[mid - 1] in index:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def _weight(self, name: str, head: int) -> int:
        salt = self._salts.get(name)
        if salt is None:
            salt = self._salts[name] = _mix(zlib.crc32(name.encode()) | 1 << 40)
        return _mix(head ^ salt)

    def choose(self, ready: Sequence[R], hashes: Sequence[int]) -> R:
        """The replica for a request with these block hashes; records the choice."""
        least = min(ready, key=lambda r: r.inflight)
        if not hashes:
            return least
        # The deepest block identifies the whole prefix: shared preambles (a chat
        # template, a company-wide system prompt) must not pile onto one replica.
        head = hashes[-1]
        best_len, best = 0, None
        for r in ready:
            n = self.match(r.name, hashes)
            if n > best_len or (
                n == best_len
                and best is not None
                and n
                and (r.inflight, -self._weight(r.name, head)) < (best.inflight, -self._weight(best.name, head))
            ):
                best_len, best = n, r
        if best is not None and best_len >= self.min_match:
            chosen, outcome = best, "hit"
        else:
            chosen = max(ready, key=lambda r: self._weight(r.name, head))
            outcome = "miss"
        if chosen.inflight > least.inflight + self.margin:
            chosen, outcome = least, "load_guard"
        self.outcomes[outcome] += 1
        self._record(chosen.name, hashes)
        return chosen

    def _record(self, name: str, hashes: Sequence[int]) -> None:
        index = self.indices.get(name)
        if index is None:
            index = self.indices[name] = OrderedDict()
        # Deepest block first, so block 0 is the most recent: eviction trims a
        # prefix from its end and the indexed part stays contiguous.
        for h in reversed(hashes):
            if h in index:
                index.move_to_end(h)
            else:
                index[h] = None
        while len(index) > self.capacity:
            index.popitem(last=False)

    def memory_entries(self) -> int:
        return sum(len(i) for i in self.indices.values())
