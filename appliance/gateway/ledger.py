"""A request's ledger entry, written from its ProxyRequest in this one place:
its metrics, its key's budget settled to what it used (and the key's usage
tally), its time to first token, and its audit row, which a keyed or regulated
request's answer waits for (``committed``) before it ends."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from appliance.errors import StateWriteFailed
from appliance.gateway.api_responses import usage_and_id
from appliance.gateway.metering import Usage, guessed_usage
from appliance.gateway.response_items import request_input

if TYPE_CHECKING:
    from appliance.gateway.request import ProxyRequest
    from appliance.gateway.runtime import Gateway

STATUS = 7  # the status column of an audit row


def estimate(req: ProxyRequest, events: int) -> Usage:
    """What a request is charged when its engine never said: our count (its prompt's
    tokens guessed by the worker that read its body, when one did)."""
    if req.guess is not None:
        return guessed_usage(req.guess, events, req.completion_cap)
    return req.endpoint.dialect.estimate(req.body, events, req.completion_cap)


def dropped_usage(req: ProxyRequest) -> Usage:
    """What an answer dropped at upstream.max_answer_bytes is charged: its prompt as we
    count it, and its completion's cap, which an answer that large reached (without a
    cap: one token per 4 bytes of the answer it had at least). Free generation otherwise."""
    prompt = estimate(req, 0).prompt_tokens
    cap = req.completion_cap
    return Usage(prompt, cap if cap is not None else req.dropped_at // 4)


# What an audit row keeps of the model name: the client's word, any length up to the
# body limit (a name no model has: configured names are at most 128 characters).
AUDITED_MODEL_CHARS = 256


def _cut(model: str) -> str:
    """A model name too long to keep whole: its start and its length. One request's row
    must not cost the state database megabytes (a 404 costs the daemon nothing else)."""
    return f"{model[:AUDITED_MODEL_CHARS]}... (cut: {len(model)} characters in all)"


def finish(rt: Gateway, req: ProxyRequest, status: int) -> None:
    """The request is answered: metrics (every request, refused ones too), the key's
    budget settled, one audit row
    (awaited by ``committed`` before the answer ends, for a keyed or regulated request)."""
    if req.finished:
        return
    req.finished = True
    latency = time.perf_counter() - req.started
    endpoint = req.endpoint.name
    if req.served_by is not None or req.route is not None:
        rt.metrics.observe(req.model, endpoint, status, latency)
    else:
        # Refused before routing (401, 413, 429, ...): counted too, under model "", since
        # the name is the client's word (any number of them). The routed path pays nothing more.
        rt.metrics.observe("", endpoint, status, latency)
    tap = req.tap
    usage = req.usage or (tap.usage if tap is not None else None)
    events = tap.events if tap is not None else 0
    if usage is None and req.served_by is not None and (status in (200, 499) or events):
        # The engine ran it but never said what it used (a client that left, a
        # stream cut short, an engine that ignores stream_options): our count.
        usage = estimate(req, events)
    elif usage is None and req.dropped_at:
        usage = dropped_usage(req)
    prompt = completion = None
    if usage is not None:
        prompt, completion = usage.prompt_tokens, usage.completion_tokens
        rt.metrics.usage(req.model, prompt, completion)
    if req.key is not None:
        rt.gate.settle(req.key, req.reservation, prompt or 0, completion or 0)
    ttft_ms = None
    if status == 200 and req.ttft is None and endpoint != "embeddings" and not req.bytes_sent:
        req.ttft = latency  # a whole answer: its first token came with it
    if req.ttft is not None:
        rt.metrics.first_token(req.model, req.ttft)
        rt.ttft.observe(req.model, req.ttft)  # the in-memory p50 the status and the TUI show
        ttft_ms = round(req.ttft * 1000, 3)
    req.row = [
        req.arrived,
        req.rid,
        req.key.id if req.key is not None else None,
        req.route.name if req.route is not None else None,
        req.model if len(req.model) <= AUDITED_MODEL_CHARS else _cut(req.model),
        endpoint,
        req.served_by,
        status,
        prompt,
        completion,
        round(latency * 1000, 3),
        ttft_ms,
        req.fallback_reason,
        _text(req.request_text),
        _text(req.response_text),
        req.client,
        None,  # folded: a summary row's (access/refusals.py)
        req.proxy,
    ]
    req.receipt = rt.audit.record(req.row, durable=req.accountable)
    if req.trace is not None:
        req.trace.finish(status, prompt, completion)


def finish_stream(rt: Gateway, req: ProxyRequest, status: int) -> None:
    """A relayed stream ended (the proxy's callback): the Response it stored is
    remembered where it lives, then the request is finished."""
    if req.stores and req.tap is not None and req.tap.held and req.deployment is not None:
        # The response.completed event, held back until now.
        _, made = usage_and_id(req.tap.held.split(b"data: ", 1)[-1])
        inputs = request_input(req.forwarded or req.body)
        rt.response_homes.remember_made(made, req.deployment.replicas, req.served_by, req.key, inputs)
    finish(rt, req, req.cut_status or status)


async def committed(req: ProxyRequest) -> None:
    """Wait until the request's audit row and charge are durable (a no-op for one
    written in the background). When the state database cannot take them, the
    request fails with 503 state_write_failed, and so says its row (kept to retry)."""
    if req.receipt is None:
        return
    try:
        await req.receipt
    except StateWriteFailed:
        if req.row is not None:
            req.row[STATUS] = StateWriteFailed.status
        raise


def _text(data: bytes | None) -> str | None:
    return data.decode("utf-8", "replace") if data else None


__all__ = ["committed", "estimate", "finish", "finish_stream"]
