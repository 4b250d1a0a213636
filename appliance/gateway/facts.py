"""What the front door's policy reads of a request's body, read once by whoever
read the body: the front door itself (appliance/api/app.py ``_serve``), or, with
workers, the worker that took the request (appliance/dataplane/worker_client.py), which
sends only these to the daemon (protocol.Request.facts). The policy that decides
on them (key, route, budget, capabilities, tenancy, replica) is the same code
either way; only who parsed the body differs.
"""

from __future__ import annotations

from typing import Any

import msgspec

from appliance.fleet.prefix import engine_view
from appliance.gateway import media_urls
from appliance.gateway.capabilities import Endpoint
from appliance.gateway.metering import choices, completion_cap, longest_length, stream_options


class Budget(msgspec.Struct, array_like=True, frozen=True):
    """What a key's reservation reads of the body (access/keys.py: Gate.admit)."""

    prompt: int  # the most tokens its prompt can be (the budget's bound; 0 on a free endpoint)
    cap: int | None  # the most completion tokens it asked for, all choices together (None: no limit)
    n: int  # its choices
    n_predict: int | None  # llama.cpp's own length field, as sent


class Facts(msgspec.Struct, array_like=True, frozen=True):
    model: str  # the model the client asked for
    size: int  # the body's bytes (its limit is the daemon's to check)
    # For a request that may carry a key (None: it has none, so nothing is reserved).
    budget: Budget | None
    stream: bool
    usage_asked: bool  # a stream whose client asked for its usage (stream_options.include_usage)
    cache_salt: str | None
    tool_choice: str | dict[str, Any] | None
    stateful: bool  # a Responses request that needs its engine to keep responses
    previous: str | None  # a Responses request's previous_response_id
    dimensions: int | None  # an embeddings request's (capabilities.check_fields)
    echo: bool  # a completions request's echo and suffix (capabilities.check_fields)
    suffix: str | None
    # Read only by a worker (None here: the front door reads them from the body it
    # has, only when the policy needs them; options b"" here too when the request has
    # none): the stream's options as sent (raw JSON, b"" when absent), the prompt as
    # the engine sees it (the prefix hashes' input), and the prompt's likely tokens
    # (its charge if the engine reports none).
    options: bytes | None = None
    view: bytes | None = None
    guess: int | None = None
    best_of: int | None = None  # a completions request's (capabilities.check_fields)
    background: bool = False  # a Responses request's (capabilities.check_fields)
    # A Messages request's content block types, each with where it first is
    # (capabilities.check_fields: blocks an engine would drop).
    blocks: tuple[tuple[str, str], ...] = ()
    # The media it names by a URL an engine would fetch (gateway/media_urls.py; checked
    # against the config in capabilities.check_fields): () for nearly every body.
    media: tuple[media_urls.Reference, ...] = ()
    names_its_id: bool = False  # a body's own request_id, vLLM's (capabilities.check_fields)
    # The largest completion length one choice asked, and its field (None: none set),
    # checked against the model's context (capabilities.check_fields).
    length: tuple[str, int] | None = None


def facts_of(endpoint: Endpoint, body: bytes, request: Any, keyed: bool) -> Facts:
    """A decoded request's facts (request: the endpoint's Struct, decoded from body);
    keyed: it may carry a key, whose reservation reads its Budget."""
    options = getattr(request, "stream_options", None)
    block_kinds = getattr(request, "block_kinds", None)
    return Facts(
        request.model,
        len(body),
        budget_of(endpoint, body, request) if keyed else None,
        bool(getattr(request, "stream", False)),
        options is not None and bool(options.include_usage),
        getattr(request, "cache_salt", None),
        getattr(request, "tool_choice", None),
        getattr(request, "stateful", False),
        getattr(request, "previous_response_id", None),
        getattr(request, "dimensions", None),
        getattr(request, "echo", False),
        getattr(request, "suffix", None),
        # No stream_options (absent or null): b"", so a metered stream's usage option
        # is set without decoding the body once more for them (api/app.py, _tap).
        options=b"" if options is None else None,
        best_of=getattr(request, "best_of", None),
        background=bool(getattr(request, "background", False)),
        blocks=block_kinds() if block_kinds is not None else (),
        media=() if endpoint.form else media_urls.found(body),
        names_its_id=getattr(request, "request_id", None) is not None,
        length=longest_length(request) if endpoint.generates else None,
    )


def budget_of(endpoint: Endpoint, body: bytes, request: Any) -> Budget:
    return Budget(
        0 if endpoint.free else endpoint.dialect.bound(body),
        completion_cap(request) if endpoint.generates else 0,
        choices(request),
        getattr(request, "n_predict", None),
    )


def carried_facts(endpoint: Endpoint, body: bytes, request: Any) -> Facts:
    """facts_of, with what the daemon cannot read without the body: a worker's (which
    does not know whether the key it passes on is valid: its budget always)."""
    facts = facts_of(endpoint, body, request, keyed=True)
    return msgspec.structs.replace(
        facts,
        options=(facts.options if facts.options is not None else stream_options(body))
        if facts.stream and not facts.usage_asked
        else b"",
        view=engine_view(body, endpoint.view) if endpoint.view != "" else b"",
        guess=endpoint.dialect.estimate(body, 0, 0).prompt_tokens,
    )


__all__ = ["Budget", "Facts", "budget_of", "carried_facts", "facts_of"]
