"""Request traces ([telemetry] otlp_endpoint): spans exported over OTLP/HTTP to an
in-process collector (an aiohttp receiver on 127.0.0.1 decoding the protobuf), their
parent/child structure and attributes, no prompt and no key in any of them, a client's
traceparent continued and passed on to the engine; and with telemetry off, nothing
sent and no OpenTelemetry imported."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from aiohttp import web

from appliance.access.keys import KeyStore
from appliance.config import ConfigError, TelemetryConfig, parse_config, traces_url
from appliance.fleet.engine_access import EngineAccess
from appliance.gateway.tracing import parse_traceparent, traceparent
from appliance.store.weights import model_path
from engines import GpuSlot, adapter_for

from .conftest import ROOT, engine_client, fake_model, free_port, wait_until
from .test_gpu_adapters import pinned_flags
from .test_routes import Recorder, provider, route

pytest.importorskip("opentelemetry.sdk", reason="the telemetry extra (pip install 'appliance[telemetry]')")
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest  # noqa: E402

PROMPT = "the secret launch code is swordfish"
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


class Collector:
    """An OTLP/HTTP trace receiver on 127.0.0.1, in its own thread: every span it is sent,
    as (resource attributes, span) pairs, plus the raw bodies and headers of the posts."""

    def __init__(self) -> None:
        self.port = free_port()
        self.spans: list[tuple[dict, object]] = []
        self.posts: list[tuple[dict, bytes]] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def traces(request: web.Request) -> web.Response:
            body = await request.read()
            self.posts.append((dict(request.headers), body))
            msg = ExportTraceServiceRequest()
            msg.ParseFromString(body)
            for rs in msg.resource_spans:
                resource = {a.key: _value(a.value) for a in rs.resource.attributes}
                for ss in rs.scope_spans:
                    self.spans.extend((resource, s) for s in ss.spans)
            return web.Response(body=b"", content_type="application/x-protobuf")

        app = web.Application()
        app.router.add_post("/v1/traces", traces)
        self._runner = runner = web.AppRunner(app)
        self._loop.run_until_complete(runner.setup())
        self._loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self._ready.set()
        self._loop.run_forever()

    def wait_for(self, name: str, count: int = 1, timeout: float = 15) -> list:
        wait_until(lambda: len(self.named(name)) >= count, timeout, what=f"{count} span(s) {name!r} at the collector")
        return self.named(name)

    def named(self, name: str) -> list:
        return [s for _, s in list(self.spans) if s.name == name]

    def trace(self, trace_id: bytes) -> list:
        return [s for _, s in list(self.spans) if s.trace_id == trace_id]

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


def _value(v) -> object:
    return getattr(v, v.WhichOneof("value")) if v.WhichOneof("value") else None


def attrs(span) -> dict:
    return {a.key: _value(a.value) for a in span.attributes}


@pytest.fixture
def collector():
    c = Collector()
    yield c
    c.close()


def telemetry(collector: Collector, extra: str = "") -> str:
    return f'[telemetry]\notlp_endpoint = "{collector.url}"\nservice_name = "box-7"\n{extra}\n'


def chat(client: httpx.Client, model: str = "fake", headers: dict | None = None, stream: bool = False):
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 3, "stream": stream}
    return client.post("/v1/chat/completions", json=body, headers=headers or {})


def by_id(spans: list) -> dict:
    return {s.span_id: s for s in spans}


# --- the trace of a request ----------------------------------------------------------------


def test_a_request_is_one_trace_of_engine_and_first_token_spans_with_no_prompt_or_key(daemons, collector):
    d = daemons.start(fake_model("fake"), extra=telemetry(collector) + "[keys]\nrequired = true\n")
    key, token = KeyStore(d.config.parent / "state" / "appliance.db").create("tracer")
    with d.client(headers={"Authorization": f"Bearer {token}"}) as c:
        wait_until(lambda: chat(c).status_code == 200, 10, what="the new key accepted")
        resp = chat(c, stream=True)
        assert resp.status_code == 200 and "[DONE]" in resp.text
    # Two requests: the unary one (the key's first) and the stream.
    roots = collector.wait_for("POST /v1/chat/completions", 2)
    stream = next(r for r in roots if attrs(r)["appliance.stream"])
    spans = collector.trace(stream.trace_id)
    collector.wait_for("time_to_first_token", 2)
    spans = collector.trace(stream.trace_id)
    names = sorted(s.name for s in spans)
    # A READY replica at once: not held, so no queue span.
    assert names == ["POST /v1/chat/completions", "engine fake#0", "time_to_first_token"], names
    index = by_id(spans)
    engine = next(s for s in spans if s.name.startswith("engine"))
    first = next(s for s in spans if s.name == "time_to_first_token")
    assert stream.parent_span_id == b"" and stream.kind == stream.SPAN_KIND_SERVER
    assert engine.parent_span_id == stream.span_id
    assert index[first.parent_span_id] is engine and engine.kind == engine.SPAN_KIND_CLIENT
    # Children lie within their parents.
    assert stream.start_time_unix_nano <= engine.start_time_unix_nano <= engine.end_time_unix_nano
    assert engine.end_time_unix_nano <= stream.end_time_unix_nano
    assert engine.start_time_unix_nano <= first.end_time_unix_nano <= engine.end_time_unix_nano
    a = attrs(stream)
    assert a["gen_ai.request.model"] == "fake" and a["http.response.status_code"] == 200
    assert a["appliance.key_id"] == key.id and a["appliance.served_by"] == "fake#0"
    assert a["gen_ai.usage.input_tokens"] == 5 and a["gen_ai.usage.output_tokens"] == 3
    resource = next(r for r, s in collector.spans if s is stream)
    assert resource["service.name"] == "box-7"
    # Nothing anywhere in what was sent holds the prompt, the answer or the key.
    for _, body in collector.posts:
        assert PROMPT.encode() not in body and token.encode() not in body and b"tok0" not in body


def test_a_clients_traceparent_continues_its_trace_and_reaches_the_engine(daemons, collector):
    d = daemons.start(fake_model("fake"), extra=telemetry(collector))
    state = "vendor=abc,other=x1"
    sent = {"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01", "tracestate": state}
    with d.client() as c:
        assert chat(c, headers=sent).status_code == 200
    root = collector.wait_for("POST /v1/chat/completions")[0]
    assert root.trace_id.hex() == CLIENT_TRACE and root.parent_span_id.hex() == CLIENT_SPAN
    assert root.trace_state == state
    engine = next(s for s in collector.trace(root.trace_id) if s.name.startswith("engine"))
    # The engine got the trace, with its attempt's span as the parent: its own spans join.
    with engine_client(d.replicas("fake")[0]) as e:
        seen = e.get("/fake/stats").json()["last_trace_headers"]
    assert seen == {"traceparent": f"00-{CLIENT_TRACE}-{engine.span_id.hex()}-01", "tracestate": state}


def test_a_traced_request_through_the_workers_is_carried_by_its_worker_with_the_same_spans(daemons, collector):
    # With workers, a traced request was sent back whole to the daemon (its body over the
    # link, the engine's answer relayed through the daemon): it is granted to its worker
    # now, its spans made by the daemon as one process makes them, the traceparent naming
    # its attempt's span sent to the engine in the grant.
    d = daemons.start(fake_model("fake"), extra=telemetry(collector), server="workers = 2")
    with d.client() as c:
        whole = chat(c, headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"})
        assert whole.status_code == 200 and whole.headers.get("x-appliance-path") == "fast"
        root = collector.wait_for("POST /v1/chat/completions")[0]
        assert root.trace_id.hex() == CLIENT_TRACE and root.parent_span_id.hex() == CLIENT_SPAN
        engine = next(s for s in collector.trace(root.trace_id) if s.name.startswith("engine"))
        assert engine.parent_span_id == root.span_id
        with engine_client(d.replicas("fake")[0]) as e:
            seen = e.get("/fake/stats").json()["last_trace_headers"]
        assert seen == {"traceparent": f"00-{CLIENT_TRACE}-{engine.span_id.hex()}-01"}

        stream = chat(c, stream=True)
        assert stream.status_code == 200 and "[DONE]" in stream.text
        assert stream.headers.get("x-appliance-path") == "fast"
    root = next(r for r in collector.wait_for("POST /v1/chat/completions", 2) if attrs(r)["appliance.stream"])
    collector.wait_for("time_to_first_token", 2)
    spans = collector.trace(root.trace_id)
    assert sorted(s.name for s in spans) == ["POST /v1/chat/completions", "engine fake#0", "time_to_first_token"]
    engine = next(s for s in spans if s.name.startswith("engine"))
    first = next(s for s in spans if s.name == "time_to_first_token")
    assert engine.parent_span_id == root.span_id and first.parent_span_id == engine.span_id
    assert root.start_time_unix_nano <= engine.start_time_unix_nano <= first.end_time_unix_nano
    assert first.end_time_unix_nano <= engine.end_time_unix_nano <= root.end_time_unix_nano
    a = attrs(root)
    assert a["http.response.status_code"] == 200 and a["appliance.served_by"] == "fake#0"
    assert a["gen_ai.usage.input_tokens"] == 5 and a["gen_ai.usage.output_tokens"] == 3


@pytest.mark.parametrize(
    "value",
    [
        "00-" + "0" * 32 + "-" + CLIENT_SPAN + "-01",  # the invalid trace id
        "00-" + CLIENT_TRACE + "-" + "0" * 16 + "-01",  # the invalid span id
        "ff-" + CLIENT_TRACE + "-" + CLIENT_SPAN + "-01",  # the invalid version
        "00-" + CLIENT_TRACE.upper() + "-" + CLIENT_SPAN + "-01",  # uppercase
        "00-" + CLIENT_TRACE + "-" + CLIENT_SPAN + "-01-extra",  # version 00 has no more fields
        "garbage\x7f",
        "",
    ],
)
def test_a_malformed_traceparent_is_ignored_and_never_refused(value):
    assert parse_traceparent(value, "vendor=abc") is None


def test_traceparent_parsing_keeps_what_is_valid():
    p = parse_traceparent(f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-00", "a=1, b=2")
    assert p is not None and p.trace_id == int(CLIENT_TRACE, 16) and not p.sampled and p.tracestate == "a=1,b=2"
    # A later version may carry more fields; a bad tracestate is dropped, the traceparent kept.
    later = parse_traceparent(f"01-{CLIENT_TRACE}-{CLIENT_SPAN}-01-more", "bad state with spaces=\x01")
    assert later is not None and later.sampled and later.tracestate == ""
    assert parse_traceparent(f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01", "x" * 600).tracestate == ""
    assert traceparent(1, 2, True) == "00-" + "0" * 31 + "1-" + "0" * 15 + "2-01"


def test_a_malformed_traceparent_on_the_wire_gets_an_answer_and_a_trace_of_its_own(daemons, collector):
    d = daemons.start(fake_model("fake"), extra=telemetry(collector))
    with d.client() as c:
        resp = chat(c, headers={"traceparent": f"00-{CLIENT_TRACE}-zz-01", "tracestate": "a=1"})
    assert resp.status_code == 200
    root = collector.wait_for("POST /v1/chat/completions")[0]
    assert root.trace_id.hex() != CLIENT_TRACE and root.parent_span_id == b"" and root.trace_state == ""


def test_a_request_held_through_a_cold_start_has_the_start_inside_its_queue_span(daemons, collector):
    cold = fake_model("cold", "--slow-start", "1", extra="[models.autoscaling]\nmin_replicas = 0\nmax_replicas = 1")
    d = daemons.start(cold, extra=telemetry(collector))
    with d.client() as c:
        assert chat(c, "cold").status_code == 200
    start = collector.wait_for("cold_start")[0]
    spans = by_id(collector.trace(start.trace_id))
    queue = spans[start.parent_span_id]
    assert queue.name == "queue" and attrs(queue)["appliance.queue.cause"] == "cold"
    assert attrs(queue)["appliance.replica"] == "cold#0" and attrs(start)["appliance.load.cause"] == "cold"
    assert spans[queue.parent_span_id].name == "POST /v1/chat/completions"
    assert queue.start_time_unix_nano <= start.start_time_unix_nano <= start.end_time_unix_nano
    assert start.end_time_unix_nano <= queue.end_time_unix_nano
    assert start.end_time_unix_nano - start.start_time_unix_nano >= 0.5e9  # the engine's slow start


def test_each_fallback_attempt_is_a_span_and_the_failed_one_says_so(daemons, collector):
    models = fake_model("primary", "--fail-status", "500") + fake_model("backup")
    route = '[[routes]]\nname = "chat"\nmodel = "primary"\ntarget = "primary"\nfallbacks = ["backup"]\n'
    d = daemons.start(models, extra=telemetry(collector) + route)
    with d.client() as c:
        assert chat(c, "primary").status_code == 200
    fallback = collector.wait_for("fallback backup#0")[0]
    spans = collector.trace(fallback.trace_id)
    failed = next(s for s in spans if s.name == "engine primary#0")
    root = next(s for s in spans if s.name == "POST /v1/chat/completions")
    assert failed.status.code == failed.status.STATUS_CODE_ERROR and "EngineFailure" in failed.status.message
    assert fallback.parent_span_id == root.span_id and fallback.status.code != fallback.status.STATUS_CODE_ERROR
    assert attrs(fallback)["appliance.fallback.reason"] == "engine_error"
    a = attrs(root)
    assert a["appliance.route"] == "chat" and a["appliance.fallback.target"] == "backup#0"
    assert a["http.response.status_code"] == 200
    # The failed attempt ended before the fallback began.
    assert failed.end_time_unix_nano <= fallback.start_time_unix_nano


def test_sample_ratio_zero_records_no_new_trace_but_a_clients_sampled_one_and_engines_learn_both(daemons, collector):
    d = daemons.start(fake_model("fake"), extra=telemetry(collector, "sample_ratio = 0.0"))
    with d.client() as c, engine_client(d.replicas("fake")[0]) as e:
        assert chat(c).status_code == 200
        unsampled = e.get("/fake/stats").json()["last_trace_headers"]["traceparent"]
        assert chat(c, headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"}).status_code == 200
    assert unsampled.endswith("-00") and CLIENT_TRACE not in unsampled  # not recorded: the engine is told so
    root = collector.wait_for("POST /v1/chat/completions")[0]
    assert root.trace_id.hex() == CLIENT_TRACE
    assert d.terminate() == 0  # what was queued is sent at shutdown: still only the client's trace
    assert {s.trace_id.hex() for _, s in collector.spans} == {CLIENT_TRACE}


def test_a_collector_that_is_down_costs_requests_nothing_and_holds_no_exit(daemons):
    d = daemons.start(fake_model("fake"), extra=f'[telemetry]\notlp_endpoint = "http://127.0.0.1:{free_port()}"\n')
    with d.client() as c:
        for stream in (False, True, False):
            assert chat(c, stream=stream).status_code == 200
    assert d.terminate() == 0


def test_a_providers_fallback_is_a_span_and_no_trace_context_leaves_the_box(daemons, collector, tmp_path):
    rec = Recorder(tmp_path)
    try:
        routes = route("general", "general", "err5xx", False, ["cloud"])
        models = fake_model("err5xx", "--fail-status", "500")
        d = daemons.start(models, extra=telemetry(collector) + provider(rec, tmp_path) + routes)
        sent = {"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01", "tracestate": "vendor=abc"}
        with d.client() as c:
            assert chat(c, "general", headers=sent).status_code == 200
        assert rec.requests() == 1
        assert httpx.get(f"{rec.url}/fake/stats", timeout=5).json()["last_trace_headers"] == {}
    finally:
        rec.proc.kill()
        rec.proc.wait()
    fallback = collector.wait_for("fallback provider:cloud")[0]
    assert fallback.trace_id.hex() == CLIENT_TRACE and attrs(fallback)["appliance.provider"] == "provider:cloud"
    assert attrs(fallback)["appliance.fallback.reason"] == "engine_error"


# --- off -----------------------------------------------------------------------------------


def test_telemetry_off_sends_nothing_even_with_the_otel_environment_set(daemons, collector):
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": collector.url, "OTEL_TRACES_EXPORTER": "otlp"}
    d = daemons.start(fake_model("fake"), env=env)
    with d.client() as c:
        assert chat(c, headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"}).status_code == 200
        with engine_client(d.replicas("fake")[0]) as e:
            assert e.get("/fake/stats").json()["last_trace_headers"] == {}  # not passed on either
    assert d.terminate() == 0  # a batch processor would flush at its shutdown
    time.sleep(0.5)
    assert collector.posts == []


def test_telemetry_off_imports_no_opentelemetry_on_the_request_path():
    code = (
        "import sys\n"
        "from appliance.config import parse_config\n"
        "from appliance.api.app import create_app, front_door\n"
        "from appliance.cli import main\n"
        "from appliance.gateway.tracing import open_tracing\n"
        "cfg = parse_config('[server]\\nport = 8000\\n')\n"
        "front_door(create_app(cfg))\n"
        "assert open_tracing(cfg) is None\n"
        "print(sorted(m for m in sys.modules if m.startswith(SDK)))\n"
    )
    # Litestar itself imports OpenTelemetry's API (if installed) when an app is made, to
    # look for its own middleware: the SDK, the exporter and protobuf are ours alone.
    sdk = (
        "opentelemetry.sdk",
        "opentelemetry.exporter",
        "opentelemetry.proto",
        "google.protobuf",
        "appliance.gateway.otel",
    )
    code = f"SDK = {sdk!r}\n{code}"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# --- configuration and engines -------------------------------------------------------------


@pytest.mark.parametrize(
    ("toml", "field"),
    [
        ('otlp_endpoint = "collector:4318"', "telemetry.otlp_endpoint"),
        ('otlp_endpoint = "http://user:pw@collector:4318"', "telemetry.otlp_endpoint"),
        ('otlp_endpoint = "http://collector:port"', "telemetry.otlp_endpoint"),
        ("sample_ratio = 1.5", "telemetry.sample_ratio"),
        ('service_name = ""', "telemetry.service_name"),
        ('headers = { "x-tenant" = "a\\nb" }', "telemetry.headers.x-tenant"),
        ('headers = { "bad header" = "a" }', "telemetry.headers.bad header"),
    ],
)
def test_a_bad_telemetry_setting_names_its_field(toml, field):
    with pytest.raises(ConfigError, match=f"field '{field}'"):
        parse_config(f"[telemetry]\n{toml}\n")


@pytest.mark.parametrize(
    "endpoint",
    ["http://:s3cret@collector:4318", "http://user:s3cret@collector:4318", "https://s3cret@collector/v1/traces"],
)
def test_an_endpoint_holding_a_credential_is_refused_without_echoing_it(endpoint):
    with pytest.raises(ConfigError, match="field 'telemetry.otlp_endpoint'") as refused:
        parse_config(f'[telemetry]\notlp_endpoint = "{endpoint}"\n')
    assert "s3cret" not in str(refused.value) and "telemetry.headers" in str(refused.value)


def test_an_endpoint_with_a_line_break_is_refused():
    with pytest.raises(ConfigError, match="field 'telemetry.otlp_endpoint'"):
        parse_config('[telemetry]\notlp_endpoint = "http://collec\\ntor:4318"\n')


def test_an_endpoint_without_the_packages_says_how_to_install_them(monkeypatch):
    monkeypatch.setattr("appliance.config.telemetry.TELEMETRY_MODULES", ("opentelemetry.not_installed_here",))
    with pytest.raises(ConfigError, match=r"telemetry.otlp_endpoint.*pip install 'appliance\[telemetry\]'"):
        parse_config('[telemetry]\notlp_endpoint = "http://127.0.0.1:4318"\n')


def test_the_traces_url_adds_the_otlp_path_only_when_the_endpoint_names_none():
    assert traces_url(TelemetryConfig(otlp_endpoint="http://c:4318")) == "http://c:4318/v1/traces"
    assert traces_url(TelemetryConfig(otlp_endpoint="http://c:4318/")) == "http://c:4318/v1/traces"
    assert traces_url(TelemetryConfig(otlp_endpoint="https://c/otlp/v1/traces")) == "https://c/otlp/v1/traces"


VLLM = """
[engines.vllm]
command = ["/opt/vllm/bin/vllm", "serve"]
[[models]]
name = "llama-8b"
server = "vllm"
source = "/srv/models/llama-8b"
"""


def _vllm_spec(toml: str):
    cfg = parse_config(toml)
    access = EngineAccess(secret="s" * 64, dir=Path("/run/appliance/engines/r1"))
    slot = GpuSlot(gpus=(0,), memory_fraction=0.9)
    return adapter_for("vllm").launch(
        cfg, cfg.models[0], model_path(cfg, cfg.models[0]), "127.0.0.1", 9100, slot, access
    )


def test_vllm_sends_its_spans_to_the_same_collector_when_telemetry_is_on():
    spec = _vllm_spec(VLLM + '[telemetry]\notlp_endpoint = "http://10.0.0.5:4318"\nheaders = { "x-tenant" = "a b" }\n')
    i = spec.argv.index("--otlp-traces-endpoint")
    assert spec.argv[i + 1] == "http://10.0.0.5:4318/v1/traces"
    assert spec.env["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] == "http/protobuf"
    assert spec.env["OTEL_SERVICE_NAME"] == "appliance-vllm"
    assert spec.env["OTEL_EXPORTER_OTLP_TRACES_HEADERS"] == "x-tenant=a%20b"
    assert "--otlp-traces-endpoint" in pinned_flags("vllm")  # the pinned vLLM has it
    off = _vllm_spec(VLLM)
    assert "--otlp-traces-endpoint" not in off.argv and not any(k.startswith("OTEL_") for k in off.env)
