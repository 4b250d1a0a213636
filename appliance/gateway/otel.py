"""Request traces out to an OTLP/HTTP collector, with OpenTelemetry's SDK: the only
module that imports it, and only imported when ``[telemetry] otlp_endpoint`` is set
(appliance/gateway/tracing.py's ``open_tracing``).

Spans are built from a finished request's records (tracing.SpanRecord: ids chosen
on the hot path, so that an engine's traceparent names its attempt's span) and
handed to the SDK's batch span processor, whose own thread encodes and posts them:
the event loop only appends to its queue. A collector that is down or slow costs
the loop nothing; past the queue's size, spans are dropped (the SDK logs it).
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

from appliance.config import traces_url

if TYPE_CHECKING:
    from appliance.config import TelemetryConfig
    from appliance.gateway.tracing import Parent, SpanRecord

KINDS = {"server": SpanKind.SERVER, "client": SpanKind.CLIENT, "internal": SpanKind.INTERNAL}
SAMPLED = TraceFlags(TraceFlags.SAMPLED)
OK = Status(StatusCode.UNSET)
# Spans appear at the collector within this long of their request's end.
SCHEDULE_DELAY_MS = 1000
EXPORT_TIMEOUT_S = 10.0
# At shutdown, what is queued gets this long to leave; then the daemon exits anyway.
CLOSE_TIMEOUT_S = 5.0
# The SDK logs a warning for each span it drops while its queue is full (a LogRecord
# each: ~60 us, per span, just when the collector is down). The exporter's own logger
# says that the collector is down, once per failed batch: that is the message kept.
DROPS_LOGGER = "opentelemetry.sdk._shared_internal"


class OtlpExporter:
    """tracing.Exporter over the SDK's BatchSpanProcessor and OTLP/HTTP (protobuf) exporter."""

    def __init__(self, cfg: TelemetryConfig, version: str) -> None:
        self.resource = Resource.create({"service.name": cfg.service_name, "service.version": version})
        self.scope = InstrumentationScope("appliance.gateway", version)
        exporter = OTLPSpanExporter(endpoint=traces_url(cfg), headers=dict(cfg.headers), timeout=EXPORT_TIMEOUT_S)
        self.processor = BatchSpanProcessor(exporter, schedule_delay_millis=SCHEDULE_DELAY_MS)
        logging.getLogger(DROPS_LOGGER).setLevel(logging.ERROR)

    def export(self, trace_id: int, parent: Parent | None, spans: list[SpanRecord]) -> None:
        state = TraceState.from_header([parent.tracestate]) if parent is not None and parent.tracestate else None
        contexts = {s.span_id: SpanContext(trace_id, s.span_id, False, SAMPLED, state) for s in spans}
        if parent is not None:
            contexts[parent.span_id] = SpanContext(trace_id, parent.span_id, True, SAMPLED, state)
        for s in spans:
            self.processor.on_end(
                ReadableSpan(
                    name=s.name,
                    context=contexts[s.span_id],
                    parent=contexts.get(s.parent_id),
                    resource=self.resource,
                    attributes=s.attributes,
                    kind=KINDS[s.kind],
                    status=Status(StatusCode.ERROR, s.error) if s.error else OK,
                    start_time=s.start_ns,
                    end_time=s.end_ns,
                    instrumentation_scope=self.scope,
                )
            )

    def close(self) -> None:
        """Send what is queued, for up to CLOSE_TIMEOUT_S (a collector that is down
        must not hold the daemon's exit: the SDK's own bound is 30 s)."""
        closing = threading.Thread(target=self.processor.shutdown, name="otel-shutdown", daemon=True)
        closing.start()
        closing.join(CLOSE_TIMEOUT_S)


__all__ = ["OtlpExporter"]
