"""Traces of proxied requests (optional: ``[telemetry] otlp_endpoint``).

Off, nothing here runs: ``Gateway.tracing`` is None and each hook on the hot path
is one ``is None`` check. On, a request's ``RequestTrace`` records plain numbers
as the request goes (when it was held, which replica, when each engine or
provider attempt began and how it ended) and, once its ledger entry is written,
hands them to the exporter (appliance/gateway/otel.py, the only module that
imports OpenTelemetry), which builds the spans and queues them for its batch
thread:

    POST /v1/chat/completions            the request (server span)
    ├─ queue                             held: waiting for a READY replica (through its start)
    │  └─ cold_start | wake | evict      the part of the wait the replica spent loading
    ├─ engine <replica>                  one per attempt (a retry on another replica, too)
    │  └─ time_to_first_token            from sending to the engine to its first byte
    └─ fallback <target>                 a route's fallback attempt (a provider, a model)

What a span carries is numbers and names (model, route, key id, replica, status,
tokens, fallback target and reason): never a prompt, an answer, a body, a key or
a header value. A client's W3C ``traceparent`` (and ``tracestate``) continues its
trace; a malformed one is ignored, never refused. Local engines get a
``traceparent`` naming their attempt's span, so an engine that traces (vLLM with
``--otlp-traces-endpoint``) joins the trace; providers off the box get none.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from random import getrandbits
from typing import TYPE_CHECKING, Protocol, TypeVar

if TYPE_CHECKING:
    from appliance.config import Config
    from appliance.fleet.deployment import Deployment
    from appliance.fleet.replica import Replica
    from appliance.gateway.request import ProxyRequest

# traceparent: version-traceid-parentid-flags, lowercase hex (W3C Trace Context, level 1).
# A later version may append fields after a "-"; version ff is invalid.
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
# tracestate: at most 32 list members, each key=value of printable ASCII without , and =
# in the value; 512 characters is what a vendor must accept (and all we pass on).
_TRACESTATE_MEMBER = re.compile(
    r"[a-z0-9][a-z0-9_\-*/@]{0,255}=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]"
)
MAX_TRACESTATE = 512
MAX_NAME = 256  # what a span keeps of a name the client chose
HELD_S = 0.001  # a wait for a replica shorter than this (and no start) was none: no queue span
SAMPLED = 0x01
T = TypeVar("T")
# A request's ``started`` is perf_counter's; replicas keep time by time.monotonic.
PERF_TO_MONO = time.monotonic() - time.perf_counter()


@dataclass(frozen=True, slots=True)
class Parent:
    """A client's trace context: the trace it continues, the span it came from."""

    trace_id: int
    span_id: int
    sampled: bool
    tracestate: str = ""


def parse_traceparent(value: str, tracestate: str | None = None) -> Parent | None:
    """The client's trace context, or None for a missing or malformed one (ignored:
    the request starts a trace of its own). A tracestate counts only beside a valid
    traceparent, and only when well formed."""
    m = _TRACEPARENT.fullmatch(value.strip())
    if m is None:
        return None
    version, trace, span, flags, rest = m.groups()
    if version == "ff" or (version == "00" and rest is not None):
        return None
    trace_id, span_id = int(trace, 16), int(span, 16)
    if trace_id == 0 or span_id == 0:
        return None
    return Parent(trace_id, span_id, bool(int(flags, 16) & SAMPLED), _valid_tracestate(tracestate))


def _valid_tracestate(value: str | None) -> str:
    if not value or len(value) > MAX_TRACESTATE:
        return ""
    members = [m.strip() for m in value.split(",") if m.strip()]
    if len(members) > 32 or not all(_TRACESTATE_MEMBER.fullmatch(m) for m in members):
        return ""
    return ",".join(members)


def traceparent(trace_id: int, span_id: int, sampled: bool) -> str:
    return f"00-{trace_id:032x}-{span_id:016x}-{'01' if sampled else '00'}"


def new_id(bits: int) -> int:
    """A random trace (128) or span (64) id, never 0 (the invalid id). Not secret."""
    while True:
        value = getrandbits(bits)
        if value:
            return value


@dataclass(slots=True)
class SpanRecord:
    """One finished span as plain numbers: what the exporter turns into OpenTelemetry's."""

    name: str
    span_id: int
    parent_id: int
    start_ns: int
    end_ns: int
    kind: str = "internal"  # "server" | "client" | "internal"
    attributes: dict[str, str | int | float | bool] = field(default_factory=dict)
    error: str | None = None  # the span's error (its status ERROR), one line


class Exporter(Protocol):
    """Where finished traces go (appliance/gateway/otel.py: the OTLP/HTTP batch exporter)."""

    def export(self, trace_id: int, parent: Parent | None, spans: list[SpanRecord]) -> None: ...

    def close(self) -> None: ...


class Tracing:
    """The gateway's tracer: a RequestTrace per request, sampled by trace id."""

    def __init__(self, exporter: Exporter, sample_ratio: float = 1.0) -> None:
        self.exporter = exporter
        # TraceIdRatioBased's rule: the low 64 bits of the trace id under ratio * 2^64.
        self._bound = round(sample_ratio * (1 << 64))

    def begin(self, req: ProxyRequest, path: str, headers: Iterable[tuple[bytes, bytes]]) -> RequestTrace:
        """The request's trace: the client's, when it sent a valid traceparent (its
        sampled flag decides), else a new one (sampled at sample_ratio)."""
        sent = state = None
        for name, value in headers:
            if name == b"traceparent":
                sent = value.decode("latin-1")
            elif name == b"tracestate":
                state = value.decode("latin-1")
        parent = parse_traceparent(sent, state) if sent is not None else None
        if parent is not None:
            trace_id, sampled = parent.trace_id, parent.sampled
        else:
            trace_id = new_id(128)
            sampled = (trace_id & 0xFFFFFFFFFFFFFFFF) < self._bound
        return RequestTrace(self, req, f"POST {path}", trace_id, parent, sampled)

    def close(self) -> None:
        """Export what is queued and stop (the lifespan's end; blocking: run off the loop)."""
        self.exporter.close()


class RequestTrace:
    """One request's trace as it goes: cheap records on the hot path, spans at the end."""

    __slots__ = ("tracing", "req", "name", "trace_id", "parent", "sampled", "span_id", "spans", "answered", "_wall0")

    def __init__(
        self, tracing: Tracing, req: ProxyRequest, name: str, trace_id: int, parent: Parent | None, sampled: bool
    ) -> None:
        self.tracing = tracing
        self.req = req
        self.name = name  # the request span's: "POST <path>"
        self.trace_id = trace_id
        self.parent = parent
        self.sampled = sampled
        self.span_id = new_id(64)  # the request's own span
        self.spans: list[SpanRecord] = []
        self.answered: SpanRecord | None = None  # the attempt the answer came from, open until the end
        # Times are taken on the monotonic clock (the replicas' too) and written as wall
        # time: _wall0 is the wall time of monotonic 0.
        self._wall0 = time.time_ns() - int(time.monotonic() * 1e9)

    def ns(self, mono: float) -> int:
        return self._wall0 + int(mono * 1e9)

    def now(self) -> int:
        return self.ns(time.monotonic())

    # --- the hooks (gateway/serving.py) ------------------------------------------------

    async def held(self, dep: Deployment, acquiring: Awaitable[Replica]) -> Replica:
        """dep.acquire's replica. A request that was held (no READY replica for it at
        once) gets a queue span, and inside it the replica's start (or wake) when it
        waited for one; one that found a READY replica, nothing (a span per request
        saying "no wait" is CPU spent on nothing)."""
        if not self.sampled:
            return await acquiring
        held_at = time.monotonic()
        model = dep.model.name
        try:
            replica = await acquiring
        except BaseException as exc:
            end = self.now()
            queue = SpanRecord("queue", new_id(64), self.span_id, self.ns(held_at), end, error=_error_of(exc))
            queue.attributes["appliance.model"] = model
            self.spans.append(queue)
            raise
        now = time.monotonic()
        started = replica.ready_since > held_at  # it became READY while this request waited
        if not started and now - held_at < HELD_S:
            return replica
        queue = SpanRecord("queue", new_id(64), self.span_id, self.ns(held_at), self.ns(now))
        queue.attributes.update({"appliance.model": model, "appliance.replica": replica.name})
        self.spans.append(queue)
        if started:
            cause = dep.loading_cause
            start = max(held_at, replica.loading_since) if cause != "wake" else held_at
            queue.attributes["appliance.queue.cause"] = cause
            self.spans.append(
                SpanRecord(
                    "wake" if cause == "wake" else "cold_start",
                    new_id(64),
                    queue.span_id,
                    self.ns(start),
                    self.ns(min(replica.ready_since, now)),
                    attributes={"appliance.replica": replica.name, "appliance.load.cause": cause},
                )
            )
        return replica

    async def attempt(
        self, upstream: str, local: bool, headers: dict[str, str], send: Callable[[dict[str, str]], Awaitable[T]]
    ) -> T:
        """One attempt at an engine (local: it gets a traceparent naming this span) or
        a provider. A failed attempt's span ends with its error; the one that answers
        stays open until the request ends (a stream's last byte)."""
        if not self.sampled:  # not recorded; a local engine still learns its trace (and not to record it)
            return await send(self._engine_headers(headers, new_id(64)) if local else headers)
        req = self.req
        fallback = req.fallback_reason is not None
        span = SpanRecord(
            f"fallback {upstream}" if fallback else f"engine {upstream}",
            new_id(64),
            self.span_id,
            self.now(),
            0,
            kind="client",
            attributes={"appliance.replica" if local else "appliance.provider": upstream},
        )
        if fallback:
            span.attributes["appliance.fallback.reason"] = req.fallback_reason or ""
        self.spans.append(span)
        try:
            answer = await send(self._engine_headers(headers, span.span_id) if local else headers)
        except BaseException as exc:
            span.end_ns, span.error = self.now(), _error_of(exc)
            raise
        if not req.stream:  # a whole answer: its first token came with it
            self._first_token(span, self.now())
        self.answered = span
        return answer

    def _engine_headers(self, headers: dict[str, str], span_id: int) -> dict[str, str]:
        """The engine's headers with the trace context naming its attempt's span."""
        headers = {**headers, "traceparent": traceparent(self.trace_id, span_id, self.sampled)}
        if self.parent is not None and self.parent.tracestate:
            headers["tracestate"] = self.parent.tracestate
        return headers

    def _first_token(self, attempt: SpanRecord, at_ns: int) -> None:
        self.spans.append(SpanRecord("time_to_first_token", new_id(64), attempt.span_id, attempt.start_ns, at_ns))

    # --- the end (gateway/ledger.py) ---------------------------------------------------

    def finish(self, status: int, prompt: int | None, completion: int | None) -> None:
        """The request's span, its open attempt closed, all handed to the exporter."""
        if not self.sampled:
            return
        req = self.req
        end = self.now()
        attempt = self.answered
        if attempt is not None:
            attempt.end_ns = end
            if req.stream and req.ttft is not None:
                self._first_token(attempt, self.ns(req.started + PERF_TO_MONO + req.ttft))
        root = SpanRecord(
            self.name,
            self.span_id,
            self.parent.span_id if self.parent is not None else 0,
            self.ns(req.started + PERF_TO_MONO),
            end,
            kind="server",
            attributes=_request_attributes(req, status, prompt, completion),
        )
        if status >= 500:
            root.error = f"HTTP {status}"
        for span in self.spans:
            if span.end_ns == 0:  # cancelled under a hook's feet: ends with the request
                span.end_ns = end
        self.tracing.exporter.export(self.trace_id, self.parent, [root, *self.spans])


def _request_attributes(
    req: ProxyRequest, status: int, prompt: int | None, completion: int | None
) -> dict[str, str | int | float | bool]:
    """The request span's attributes: names and numbers only (no text, no key)."""
    attrs: dict[str, str | int | float | bool] = {
        "http.request.method": "POST",
        "http.response.status_code": status,
        "appliance.request_id": req.rid,
        "appliance.endpoint": req.endpoint.name,
        "appliance.stream": req.stream,
    }
    if req.model:
        attrs["gen_ai.request.model"] = req.model[:MAX_NAME]  # the client's: any length
    if req.target:
        attrs["appliance.model"] = req.target
    if req.route is not None:
        attrs["appliance.route"] = req.route.name
        attrs["appliance.route.regulated"] = req.route.regulated
    if req.key is not None:
        attrs["appliance.key_id"] = req.key.id
    if req.served_by is not None:
        attrs["appliance.served_by"] = req.served_by
    if req.fallback_reason is not None:
        attrs["appliance.fallback.reason"] = req.fallback_reason
        attrs["appliance.fallback.target"] = req.served_by or ""
    if prompt is not None:
        attrs["gen_ai.usage.input_tokens"] = prompt
    if completion is not None:
        attrs["gen_ai.usage.output_tokens"] = completion
    if req.ttft is not None:
        attrs["appliance.ttft_ms"] = round(req.ttft * 1000, 3)
    if status >= 400:
        attrs["error.type"] = str(status)
    return attrs


def _error_of(exc: BaseException) -> str:
    """An attempt's error for its span: its type and status only (an engine's error
    message may quote the request)."""
    status = getattr(exc, "status", None)
    return f"{type(exc).__name__} ({status})" if isinstance(status, int) else type(exc).__name__


def open_tracing(cfg: Config) -> Tracing | None:
    """The gateway's tracer when ``[telemetry] otlp_endpoint`` is set; None (and no
    OpenTelemetry imported) when it is not."""
    t = cfg.telemetry
    if not t.otlp_endpoint:
        return None
    from appliance import __version__
    from appliance.gateway.otel import OtlpExporter

    return Tracing(OtlpExporter(t, __version__), t.sample_ratio)


__all__ = [
    "Exporter",
    "Parent",
    "RequestTrace",
    "SpanRecord",
    "Tracing",
    "open_tracing",
    "parse_traceparent",
    "traceparent",
]
