"""Tenant isolation of engines' prompt caches: what one tenant may learn about
another's prompts.

Engines reuse the KV cache of a prompt prefix they have seen, and say so:
``usage.prompt_tokens_details.cached_tokens``, llama-server's ``timings``
(``cache_n``, ``prompt_n``) and ``prompt_progress``. Relayed as is, those fields
let one key learn another's prompt token by token (send a prefix plus a guess,
read how much was cached). ``[routing] tenant_isolation`` names the boundary:

- ``"key"`` (the default): every API key is its own tenant; keyless loopback
  clients are one tenant together.
- ``"route"``: every route is a tenant (the keys of one team share its cache);
  a request for a model no route matches falls back to its key.
- ``"shared"``: one tenant (a single-team box): answers are relayed untouched.

With a boundary, the appliance (1) strips those fields from every answer,
unary or streamed, whoever's the prefix (an engine that ignored the salt would
otherwise still leak); (2) gives vLLM and SGLang requests a ``cache_salt`` of
the tenant's (an HMAC under a per-process secret, narrowed by a salt the client
sent), so their prefix caches are never shared across tenants and no client can
name another's salt; (3) seeds the prefix-aware routing index with the tenant.

What remains: llama.cpp has no cache salt. Tenants' requests share its slots,
and a slot reuses the KV of the last prompt it ran, so a request that repeats
another tenant's prefix still prefills faster: a timing channel, noisy but real
(docs/routing.md says how an operator closes it).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from typing import TYPE_CHECKING

import msgspec
import xxhash

if TYPE_CHECKING:
    from appliance.access.keys import ApiKey
    from appliance.config import RouteConfig

# Engines that partition their prefix cache by the request's cache_salt.
SALTED_SERVERS = ("vllm", "sglang")

# Fields that tell how much of a prompt an engine found cached: top-level ones
# (llama-server's timings and prompt_progress, its native tokens_cached and slot
# id), and counters inside usage.
_REVEALING = ("timings", "prompt_progress", "tokens_cached", "id_slot")
_REVEALING_USAGE = ("cached_tokens", "prompt_cache_hit_tokens", "prompt_cache_miss_tokens")
# Anthropic's usage counts the cache's prompt tokens apart from input_tokens: they
# are folded back into it (input_tokens alone would say what was cached).
_ANTHROPIC_CACHE = ("cache_read_input_tokens", "cache_creation_input_tokens")
# Where a Responses or Messages stream event carries the answer (and its usage).
_NESTED = ("response", "message")


def revealing(data: bytes) -> bool:
    """Whether data may name a cache-revealing field. Two substring scans (cheaper
    than a regex alternation): every counter's name has "cache" in it, and
    llama-server's prompt_progress carries one ("cache": N); its slot id appears
    in its native API only, which the appliance does not serve."""
    return b"cache" in data or b"timings" in data


_OBJECT = msgspec.json.Decoder(dict[str, msgspec.Raw])


class Tenancy:
    def __init__(self, mode: str, secret: bytes | None = None) -> None:
        self.mode = mode
        self.isolated = mode != "shared"
        self._secret = secret or os.urandom(32)
        self._salts: dict[str, str] = {}
        self._seeds: dict[str, int] = {}

    def tenant(self, key: ApiKey | None, route: RouteConfig | None) -> str | None:
        """Whose prompt cache a request may share; None when all is shared."""
        if not self.isolated:
            return None
        if self.mode == "route" and route is not None:
            return "route:" + route.name
        return "key:" + key.id if key is not None else "local"

    def salt(self, tenant: str, client_salt: str | None) -> str:
        """The tenant's cache salt, narrowed by the client's own (a client may
        split its tenant's cache further, never join another's)."""
        if client_salt is None:
            cached = self._salts.get(tenant)
            if cached is None:
                cached = self._salts[tenant] = self._derive(tenant.encode())
            return cached
        return self._derive(tenant.encode() + b"\0" + client_salt.encode())

    def _derive(self, message: bytes) -> str:
        digest = hmac.new(self._secret, message, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def seed(self, tenant: str | None) -> int:
        """The prefix index's hash seed for the tenant (0: shared)."""
        if tenant is None:
            return 0
        seed = self._seeds.get(tenant)
        if seed is None:
            seed = self._seeds[tenant] = xxhash.xxh3_64_intdigest(tenant.encode())
        return seed

    def answer(self, data: bytes) -> bytes:
        """A whole JSON answer without its cache-revealing fields."""
        return cleaned(data, self.isolated)


def cleaned(data: bytes, isolated: bool) -> bytes:
    """A whole JSON answer, for tenants kept apart (isolated) without its cache-revealing fields."""
    return scrub(data) if isolated and revealing(data) else data


def scrub(data: bytes) -> bytes:
    """One JSON object (an answer or an SSE event's data) without the fields that
    reveal the engine's prompt cache; the same bytes when it has none."""
    try:
        top = _OBJECT.decode(data)
    except msgspec.MsgspecError:
        return data
    changed = False
    for name in _REVEALING:
        changed |= top.pop(name, None) is not None
    usage = top.get("usage")
    if usage is not None and revealing(bytes(usage)):
        top["usage"] = msgspec.Raw(_without_cache_counters(bytes(usage)))
        changed = True
    for name in _NESTED:
        inner = top.get(name)
        if inner is not None and bytes(inner).startswith(b"{") and revealing(bytes(inner)):
            top[name] = msgspec.Raw(scrub(bytes(inner)))
            changed = True
    return msgspec.json.encode(top) if changed else data


def _without_cache_counters(usage: bytes) -> bytes:
    try:
        fields = _OBJECT.decode(usage)
    except msgspec.MsgspecError:
        return b"null"
    for name in _REVEALING_USAGE:
        fields.pop(name, None)
    cached = [fields.pop(name) for name in _ANTHROPIC_CACHE if name in fields]
    if cached:
        try:
            total = sum(msgspec.json.decode(bytes(n), type=int | None) or 0 for n in cached)
            total += msgspec.json.decode(bytes(fields.get("input_tokens", b"0")), type=int)
            fields["input_tokens"] = msgspec.Raw(str(total).encode())
        except msgspec.MsgspecError:
            fields.pop("input_tokens", None)
    for name in ("prompt_tokens_details", "input_tokens_details"):  # chat's, Responses'
        details = fields.get(name)
        if details is not None and b"cached_tokens" in bytes(details):
            try:
                inner = _OBJECT.decode(details)
                inner.pop("cached_tokens", None)
                fields[name] = msgspec.Raw(msgspec.json.encode(inner))
            except msgspec.MsgspecError:
                fields.pop(name)
    return msgspec.json.encode(fields)


__all__ = ["SALTED_SERVERS", "Tenancy", "revealing", "scrub"]
