"""[routing], [[routes]] and [[providers]]: how a request's model name and tag pick a local
model, and where it may fall back to."""

from __future__ import annotations

from typing import Literal

import msgspec

from appliance.config.sections import _Section


class RoutingConfig(_Section):
    # Prefix-aware choice among a model's READY replicas (docs/routing.md). The
    # request as the engine sees it (tools, then every message, in order) is
    # hashed in chained blocks of this many bytes (~4 bytes per token).
    # false: least requests in flight, round-robin on ties.
    prefix_aware: bool = True
    prefix_block_bytes: int = 512
    # A match shorter than this many blocks is no match: the prefix is new.
    prefix_min_match_blocks: int = 2
    # The preferred replica is skipped for the least-loaded one when its requests
    # in flight exceed the least-loaded one's by more than this.
    prefix_load_margin: int = 4
    # Memory for each replica's index of recently routed blocks (LRU beyond it).
    prefix_index_mib: float = 8.0
    # Request header carrying the tag a route may match on.
    tag_header: str = "x-appliance-tag"
    # Whose engine prompt caches are kept apart (appliance/access/tenancy.py): "key" (each
    # API key; keyless loopback clients together), "route" (each route), or "shared"
    # (one team: answers relayed untouched, cache counters included).
    tenant_isolation: Literal["key", "route", "shared"] = "key"


class RouteConfig(_Section):
    name: str
    # The model name clients request, and optionally a tag (tag_header, or the
    # API key's default tag); "" matches any tag.
    model: str
    # The local model that serves the route.
    target: str
    tag: str = ""
    # Tried in order when the local model cannot serve: provider or local model names.
    fallbacks: list[str] = msgspec.field(default_factory=list)
    # Regulated traffic never reaches a commercial provider: only this box's engines, the
    # models the config declares (a cluster model may be another host) and providers
    # declared commercial = false.
    regulated: bool = True
    # Burst to the fallbacks when taking a request locally would make more than
    # this many wait beyond the engines' slots (0: as soon as every slot is
    # busy; -1 = never burst, only fail over).
    burst_at_queue: int = -1


class ProviderConfig(_Section):
    name: str
    # Any OpenAI-compatible API, e.g. https://api.openai.com/v1.
    base_url: str
    # The API key: a file (relative: under $CREDENTIALS_DIRECTORY, systemd's
    # LoadCredential=) or an environment variable. Never in this config.
    api_key_file: str = ""
    api_key_env: str = ""
    # A commercial provider (the default); regulated routes may never use one. False: the
    # operator's own server, inside the perimeter, which regulated routes may use.
    commercial: bool = True
    # Requested model name -> the provider's model name (unmapped: sent as is).
    models: dict[str, str] = msgspec.field(default_factory=dict)
    # The APIs it serves (chat, completions, embeddings, responses, messages,
    # count_tokens, ...): a route falls back to it only for those.
    apis: list[str] = msgspec.field(default_factory=lambda: ["chat", "completions", "embeddings"])
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 120.0
    # This many failures in a row open the circuit breaker for breaker_reset_s.
    breaker_failures: int = 5
    breaker_reset_s: float = 30.0


# The proxy endpoints' names, as providers (apis = [...]) and engine adapters list them
# (gateway/capabilities.py has each one's table row).
ENDPOINT_NAMES = frozenset(
    {
        "chat",
        "completions",
        "embeddings",
        "responses",
        "messages",
        "count_tokens",
        "tokenize",
        "detokenize",
        "infill",
        "rerank",
        "score",
        "transcriptions",
        "translations",
    }
)
