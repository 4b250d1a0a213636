"""Configuration: loaded, defaulted and validated here and nowhere else.

One TOML file (``/etc/appliance/appliance.toml`` by default, ``--config`` or
``APPLIANCE_CONFIG`` to override). With no file at all the daemon serves the
embedded default model. Every validation error names the file and the field.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path
from typing import Literal

import msgspec

from appliance.safe_paths import StoreError, check_name

DEFAULT_CONFIG_PATH = Path("/etc/appliance/appliance.toml")
EMBEDDED_MODEL_NAME = "smollm2-135m-instruct"
EMBEDDED_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_MODEL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
BUILTIN_PREFIX = "builtin:"
STORE_PREFIX = "store:"

ServerKind = Literal["llamacpp", "openai", "vllm", "sglang"]
GPU_SERVERS = ("vllm", "sglang")  # always on GPUs; llamacpp when [models.gpus] count >= 1
# llama.cpp's --cache-type-k/-v values (appliance/store/gguf.py knows their sizes).
CACHE_TYPES = ("f16", "bf16", "f32", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl")
log = logging.getLogger("appliance.config")

UNIX_PATH_MAX = 108  # sun_path, the terminating NUL included
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")


def parse_duration(text: str | float | int, field_name: str = "duration") -> float:
    """'90s', '5m', '1h', '0' or a number of seconds."""
    if isinstance(text, (int, float)):
        return float(text)
    s = text.strip().lower()
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    for unit in ("ms", "s", "m", "h", "d"):
        if s.endswith(unit) and s[: -len(unit)].replace(".", "", 1).isdigit():
            return float(s[: -len(unit)]) * units[unit]
    if s.replace(".", "", 1).isdigit():
        return float(s)
    raise ValueError(f"{field_name}: {text!r} is not a duration (e.g. 90s, 5m, 1h, 0)")


class Duration:
    """A length of time as the operator wrote it ("90s", "5m", "1h", "0s"; "" = not set) and
    in seconds, parsed once when the config is loaded."""

    __slots__ = ("seconds", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self.seconds = parse_duration(text) if text else 0.0

    def __bool__(self) -> bool:
        return bool(self.text)

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"Duration({self.text!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Duration) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)


def _decode_duration(type_: type, value: object) -> object:
    """msgspec's hook for Duration fields: a TOML string, parsed here, at load."""
    if type_ is not Duration:
        raise NotImplementedError(type_)
    if not isinstance(value, str):
        raise TypeError(f"Expected `str`, got `{type(value).__name__}`")
    try:
        return Duration(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a duration (e.g. 90s, 5m, 1h, 0s)") from None


class ConfigError(Exception):
    """A config problem, phrased for the operator: file, field, what is wrong."""


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class ServerConfig(_Section):
    host: str = "127.0.0.1"
    port: int = 8000
    max_body_bytes: int = 4 * 1024 * 1024
    # A multipart upload (the audio endpoints' file) may be this large; beyond, 413.
    max_upload_bytes: int = 25 * 1024 * 1024
    # A client must send its request line and headers within this long, or its
    # connection is closed (slowloris); other clients are not affected.
    header_read_timeout_s: float = 10.0
    # The request body must arrive within this; a client trickling it gets 408.
    body_read_timeout_s: float = 30.0
    # SIGTERM: stop accepting, give in-flight requests this long to finish.
    drain_timeout_s: float = 30.0
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # A file holding the admin token (a systemd credential, say). Without it the
    # admin API (/admin/...) answers over TCP only loopback clients of a loopback
    # bind, and only while keys.required is false; the admin socket always works.
    admin_token_file: str = ""
    # Names (besides loopback addresses, localhost and server.host) the admin API
    # answers to in the Host header: the DNS name of a reverse proxy, say. A
    # DNS-rebinding web page sends its own name and is refused.
    admin_hosts: list[str] = msgspec.field(default_factory=list)
    # With keys.required, /metrics needs an API key or the admin token; true opens it
    # to anyone who reaches the port (a local Prometheus without credentials).
    metrics_public: bool = False
    # A provider key file (providers[].api_key_file) its group or others may read:
    # "refuse" (the daemon does not start, naming the file and the fix) or "warn".
    key_file_permissions: Literal["refuse", "warn"] = "refuse"
    # The admin API also on a unix socket (relative: under paths.state_dir), mode
    # 0660: who may open the file may administer, no token needed. Empty: off.
    admin_socket: str = "admin.sock"
    # The daemon logs to stderr (the journal under systemd); a path here also
    # appends it to that file (relative: under paths.log_dir), which `appliance
    # logs` follows when systemd does not run.
    log_file: str = ""
    # Data-plane processes taking the port's connections (appliance/dataplane/): 1 is
    # the daemon alone; N > 1 adds N worker processes that do the HTTP work while the
    # daemon still decides every request; "auto": one per 4 cores, at most 4 (worker_count).
    workers: int | Literal["auto"] = 1


class PathsConfig(_Section):
    # Empty means: FHS defaults for root, XDG defaults for other users.
    state_dir: str = ""
    cache_dir: str = ""
    log_dir: str = ""


# Licenses a model may carry and be served without an operator's acceptance.
DEFAULT_ALLOWED_LICENSES = ["Apache-2.0", "MIT", "BSD-2-Clause", "BSD-3-Clause", "CC-BY-4.0", "CC0-1.0"]


class StoreConfig(_Section):
    # The default: `appliance models pull` is refused; models arrive on offline media.
    offline: bool = True
    # Hub endpoint for pulls (a mirror on the LAN); empty: huggingface_hub's default.
    hub_endpoint: str = ""
    # Disk budget for stored weights; 0 = no budget. Imports evict least-recently-used
    # unpinned models that no replica uses to stay under it.
    budget_gib: float = 0.0
    allowed_licenses: list[str] = msgspec.field(default_factory=lambda: list(DEFAULT_ALLOWED_LICENSES))
    # The daemon rehashes, in the background, store files last verified longer ago than
    # this (bit rot changes no file's stat, so the start-time checks cannot see it); 0 = off.
    scrub_interval_h: float = 168.0
    # The background scrub reads at most this many MB (10^6 bytes) per second, so that it
    # does not starve cold starts; 0 = unlimited.
    scrub_mb_per_s: float = 200.0


class ImagesConfig(_Section):
    # Where engine images are built; empty: <the appliance's venv>/images.
    dir: str = ""
    # Versions kept per engine: the current one and the previous ones, for rollback.
    keep: int = 2


class UpstreamConfig(_Section):
    connect_timeout_s: float = 5.0
    # Longest silence between two bytes of an engine's answer.
    read_timeout_s: float = 600.0
    # Pooled keep-alive connections kept open to each engine replica.
    max_connections_per_replica: int = 256


class SupervisorConfig(_Section):
    startup_timeout_s: float = 300.0
    # Grace between SIGTERM and SIGKILL when an engine is stopped.
    stop_grace_s: float = 10.0
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 30.0
    # More than max_crashes within crash_window_s marks a replica FATAL.
    max_crashes: int = 5
    crash_window_s: float = 120.0
    health_interval_s: float = 5.0
    health_failures_before_restart: int = 3
    # Each replica's log file is capped at this size (one rotated copy is kept).
    log_max_bytes: int = 10 * 1024 * 1024


class LlamaCppConfig(_Section):
    # Empty: the current llamacpp engine image's llama-server (install.sh builds the image).
    binary: str = ""
    # GGUF models with [models.gpus] count >= 1 run this CUDA build. Empty: the current
    # llamacpp-cuda image's llama-server (`appliance images build llamacpp-cuda`).
    cuda_binary: str = ""
    # GPU memory of a replica beyond weights, KV cache and compute buffers (sized from
    # the GGUF header): the CUDA context and cuBLAS; measured on an H200 with CUDA 13.
    overhead_gib: float = 0.58


class GpuEngineConfig(_Section):
    # argv that starts the engine's OpenAI server. Empty: the engine's current image
    # (`appliance images build vllm|sglang`): <images.dir>/vllm/current/bin/vllm serve,
    # <images.dir>/sglang/current/bin/python -m sglang.launch_server.
    command: list[str] = msgspec.field(default_factory=list)
    # GPU memory beyond weights and KV cache: CUDA context, activations, CUDA graphs.
    overhead_gib: float = 3.0


class EnginesConfig(_Section):
    llamacpp: LlamaCppConfig = msgspec.field(default_factory=LlamaCppConfig)
    vllm: GpuEngineConfig = msgspec.field(default_factory=GpuEngineConfig)
    sglang: GpuEngineConfig = msgspec.field(default_factory=GpuEngineConfig)


class GpuRequest(_Section):
    # A GPU family ("H100", "A100", "L40S", ...) every GPU of a replica must be, or "any".
    type: str = "any"
    # GPUs per replica (the tensor-parallel size); 0 = the smallest count that fits.
    count: int = 0


class Autoscaling(_Section):
    metric: Literal["rps"] = "rps"
    min_replicas: int = 1
    max_replicas: int = 1
    target_rps_per_replica: float = 4.0
    # Idle this long (no requests, nothing in flight): go to zero replicas. "" = the
    # global [autoscaling] idle_ttl; "0s" = never. A pinned model never idles out.
    scale_to_zero_after: Duration = Duration("")
    # vLLM with sleep_mode: put idle replicas to sleep after this ("0s" = never),
    # then to zero after scale_to_zero_after.
    sleep_after: Duration = Duration("0s")
    # Not evicted for another model within this long of loading; "" = [autoscaling] min_residency.
    min_residency: Duration = Duration("")


class AutoscalerConfig(_Section):
    interval_s: float = 1.0
    idle_ttl: Duration = Duration("0s")
    # Scale down only after the desired count stayed lower this long, and this
    # long after the last change; one replica at a time.
    stabilization_s: float = 30.0
    cooldown_s: float = 10.0
    # A replica loaded less than this long ago is never evicted to make room for another
    # model (anti-thrash); per model: [models.autoscaling] min_residency.
    min_residency: Duration = Duration("30s")


class QueueConfig(_Section):
    # Requests held per model while it cold-starts: beyond max_held 429, after timeout_s
    # 503, both with Retry-After.
    max_held: int = 64
    timeout_s: float = 120.0
    # Streamed requests held during a cold start get an SSE comment this often
    # so proxies and clients do not time out (0 = off).
    keepalive_s: float = 5.0


class CpuConfig(_Section):
    # CPU engines (llama.cpp on the CPU): cores their replicas may use together (0 = every
    # CPU this daemon may run on: its affinity mask, not the machine's count).
    cores: int = 0


class CapacityConfig(_Section):
    # Host RAM that CPU engine replicas and sleeping GPU replicas (their weights) may hold
    # together, in GiB; 0 = /proc/meminfo's MemTotal less a tenth (at least 2 GiB).
    host_ram_gib: float = 0.0
    # Fairness: a model whose oldest held request has waited this long for room that busy
    # replicas of other models hold drains one of them (no new requests; those in flight
    # finish) and takes its room; floors, min_residency and priority still hold. 0 = never.
    max_wait_before_preempt_s: float = 10.0
    # Headroom: a model unused this long is stopped (or put to sleep) in the background when
    # a model requested within the last minute is at zero and has no room: its next cold
    # start then frees nothing first. 0 = off.
    headroom_idle_s: float = 0.0


class ModelConfig(_Section):
    name: str
    server: ServerKind = "llamacpp"
    # A GGUF path, a directory, builtin:<name> for the bundled model, or store:<name>
    # for a model imported into the store (`appliance models import`).
    source: str = ""
    # openai engine: a command template ({port}, {host}, {model_path}, {model_name},
    # {api_key_file}) to supervise, which must refuse requests without the replica's key
    # ($ENGINE_API_KEY, or the file {api_key_file}); or the URL of an external server
    # that is only health-checked.
    command: list[str] = msgspec.field(default_factory=list)
    url: str = ""
    # openai engine: ready when a GET of this path (e.g. "/health") answers 200. Empty:
    # /v1/models, then a 1-token completion (a 1-token chat completion from a server
    # without /v1/completions).
    health_path: str = ""
    # Extra engine arguments and environment, appended after the adapter's own.
    args: list[str] = msgspec.field(default_factory=list)
    env: dict[str, str] = msgspec.field(default_factory=dict)
    # llama.cpp: parallel decode slots and total context (shared by the slots: each
    # request gets context_length / parallel tokens, prompt and answer together), or the
    # context each request gets (then context_length = context_per_request x parallel).
    parallel: int = 4
    context_length: int = 8192
    context_per_request: int = 0
    threads: int = 0
    embeddings: bool = False
    # What the model is for: "chat" (chat, completions, responses, messages, infill),
    # "embed" (embeddings), "rerank" (rerank, score), "transcribe" (audio transcriptions
    # and translations: a Whisper-class model on vLLM). Empty: ["chat"], plus "embed"
    # with embeddings = true. Other endpoints get a 400 (appliance/gateway/capabilities.py).
    tasks: list[str] = msgspec.field(default_factory=list)
    # GPU engines: KV-cache budget in tokens (0 = context_length x parallel), its
    # dtype ("auto" = the model's), engine overhead override (0 = the engine's),
    # and vLLM's sleep mode (a warm tier: weights to host RAM, GPU memory freed).
    kv_cache_tokens: int = 0
    kv_cache_dtype: Literal["auto", "fp8", "fp8_e4m3", "fp8_e5m2", "bfloat16", "float16"] = "auto"
    gpu_overhead_gib: float = 0.0
    sleep_mode: bool = False
    # A budgeted API key's request that sets no max_tokens is reserved for, and
    # capped at, this many completion tokens per choice; 0 = context_length (the
    # most the engine generates on its own).
    default_max_tokens: int = 0
    # llama.cpp's KV-cache types (--cache-type-k/-v): f16, bf16, q8_0, q4_0, ... A
    # quantized V cache needs FlashAttention (on by default where the GPU has it).
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    # When capacity runs out, a model's request may evict idle replicas of models of
    # the same or a lower priority, never of a higher one.
    priority: int = 0
    tags: list[str] = msgspec.field(default_factory=list)
    gpus: GpuRequest = msgspec.field(default_factory=GpuRequest)
    autoscaling: Autoscaling = msgspec.field(default_factory=Autoscaling)
    # LoRA adapters served by this model's replicas, each under its own model name
    # ([[models.adapters]], appliance/fleet/lora.py).
    adapters: list[LoraAdapterConfig] = msgspec.field(default_factory=list)


# --- LoRA adapters ([[models.adapters]]) ---------------------------------------------


class LoraAdapterConfig(_Section):
    # The model name clients request for the base model with this adapter applied.
    name: str
    # store:NAME (an adapter imported with `appliance models import`), or a path: a
    # PEFT directory (adapter_config.json + weights) for vllm and sglang, a LoRA GGUF
    # file for llamacpp; relative paths are under paths.cache_dir/models.
    source: str
    # A path adapter's license (SPDX): one not in store.allowed_licenses is not served;
    # "" = undeclared. A store adapter's license is its record's, gated like weights.
    license: str = ""


# The engines that serve LoRA adapters (engines/: vllm --lora-modules, sglang
# --lora-paths, llama-server --lora with per-request selection).
LORA_SERVERS = ("llamacpp", "vllm", "sglang")


def lora_names(cfg: Config) -> dict[str, ModelConfig]:
    """Every adapter's model name -> the base model that serves it."""
    return {a.name: m for m in cfg.models for a in m.adapters}


def _need_model_name(need, name: str, field: str) -> None:
    """A name clients send as `model` (a model's or a LoRA adapter's)."""
    need(bool(_NAME_RE.match(name)), field, f"{name!r} is not a valid model name (letters, digits, . _ : / -)")


def _validate_adapters(cfg: Config, need) -> None:
    """Adapter names share the models' namespace (they are model names to clients);
    a base model must be on an engine that applies LoRA adapters."""
    taken = {m.name for m in cfg.models}
    for i, m in enumerate(cfg.models):
        for j, a in enumerate(m.adapters):
            at = f"models[{i}].adapters[{j}]"
            _need_model_name(need, a.name, f"{at}.name")
            need(
                a.name not in taken,
                f"{at}.name",
                f"{a.name!r} is already a model or adapter name; give the adapter a name of its own",
            )
            taken.add(a.name)
            need(
                m.server in LORA_SERVERS,
                f"{at}",
                f"model {m.name!r} runs on {m.server!r}, which serves no LoRA adapters; serve "
                f"it on {', '.join(LORA_SERVERS)}, or remove its [[models.adapters]]",
            )
            _validate_adapter_source(a.source, f"{at}.source", need)


def _validate_adapter_source(source: str, field: str, need) -> None:
    if source.startswith(STORE_PREFIX):
        try:
            check_name(source[len(STORE_PREFIX) :])
        except StoreError as exc:
            need(False, field, f"{exc}; name an adapter imported with `appliance models import`")
        return
    need(
        bool(source) and not source.startswith(BUILTIN_PREFIX),
        field,
        "must be store:NAME or the path of a LoRA adapter (a PEFT directory, or a LoRA GGUF for llamacpp)",
    )
    parts = Path(source).parts
    need(
        ".." not in parts and "\0" not in source,
        field,
        f"{source!r}: no '..' segments (name the adapter's own path)",
    )


# --- end of LoRA adapters --------------------------------------------------------------


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
    # Regulated traffic never leaves this server: no commercial provider, ever.
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
    # A commercial provider; regulated routes may never use one.
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


class KeysConfig(_Section):
    # false: clients on loopback may call without a key (an ak-... key sent is
    # still checked and applied). A non-loopback server.host requires true.
    required: bool = False


class AuditConfig(_Section):
    # One row per request in the state database (time, key, route, model, where
    # it ran, tokens, status, latency, fallback reason); written in batches.
    enabled: bool = True
    # Also keep the request body and the answer (off: no prompt or completion text).
    include_text: bool = False
    # When a keyed or regulated request's row and token charge reach the disk:
    # "commit" before its answer ends (batched with concurrent requests' rows; a
    # crash or SIGKILL loses none), "fsync" the same and fsync'd (power loss loses
    # none either), "batch" every flush_interval_s like other rows (a crash loses
    # up to that window).
    durability: Literal["commit", "fsync", "batch"] = "commit"
    flush_interval_s: float = 1.0
    flush_rows: int = 2048
    # While the state database cannot be written (disk full), rows wait in memory;
    # beyond this many, requests get 503 state_write_failed.
    max_pending_rows: int = 100_000
    # Retention (0: keep forever): rows older than this many days, and rows beyond the
    # newest max_rows, are deleted every purge_interval in small batches, and the freed
    # space goes back to the filesystem (appliance/access/retention.py).
    retention_days: float = 0.0
    max_rows: int = 0
    purge_interval: Duration = Duration("1h")


class TelemetryConfig(_Section):
    # Traces of proxied requests (OpenTelemetry, OTLP/HTTP; appliance/gateway/tracing.py).
    # Empty: off, nothing is sent anywhere. Else the collector's OTLP/HTTP URL, e.g.
    # "http://127.0.0.1:4318" (/v1/traces is added when the URL has no path). Needs the
    # OpenTelemetry packages (the "telemetry" extra; install.sh installs them).
    otlp_endpoint: str = ""
    service_name: str = "appliance"
    # The share of new traces recorded (0-1); a client's traceparent decides for its own.
    sample_ratio: float = 1.0
    # Sent with every export (a collector's tenant or token); never sent to engines.
    headers: dict[str, str] = msgspec.field(default_factory=dict)


def traces_url(t: TelemetryConfig) -> str:
    """The OTLP/HTTP traces URL: the endpoint, /v1/traces added when it names no path."""
    from urllib.parse import urlsplit

    if urlsplit(t.otlp_endpoint).path in ("", "/"):
        return t.otlp_endpoint.rstrip("/") + "/v1/traces"
    return t.otlp_endpoint


# The packages [telemetry] needs, looked for (never imported) when an endpoint is set.
TELEMETRY_MODULES = ("opentelemetry.sdk", "opentelemetry.exporter.otlp.proto.http")
_HEADER_NAME_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}$")


def _validate_telemetry(t: TelemetryConfig, need) -> None:
    """[telemetry]: an http(s) URL with a host, a printable service name, a ratio
    within 0-1, header names and values that cannot split a request, the packages."""
    from importlib.util import find_spec
    from urllib.parse import urlsplit

    need(0.0 <= t.sample_ratio <= 1.0, "telemetry.sample_ratio", f"must be within 0-1, got {t.sample_ratio}")
    need(
        0 < len(t.service_name) <= 128 and t.service_name.isprintable(),
        "telemetry.service_name",
        "must be 1-128 printable characters",
    )
    for name, value in t.headers.items():
        need(bool(_HEADER_NAME_RE.match(name)), f"telemetry.headers.{name}", "is not a valid HTTP header name")
        need(value.isprintable(), f"telemetry.headers.{name}", "must be printable (no line breaks)")
    if not t.otlp_endpoint:
        return
    try:
        url = urlsplit(t.otlp_endpoint)
        _ = url.port  # a port that is not a number raises here
        ok = url.scheme in ("http", "https") and bool(url.hostname) and not (url.query or url.fragment)
        # urlsplit drops tabs and line breaks: the URL as written must have none.
        ok = ok and t.otlp_endpoint.isprintable()
    except ValueError:
        ok = False
    # A credential in the URL (user:pw@, or :pw@ with no user) would be logged wherever
    # the URL is: it goes in telemetry.headers, and is never echoed back.
    credential = "@" in url.netloc if ok else "@" in t.otlp_endpoint
    shown = "the URL (it holds a credential)" if credential else repr(t.otlp_endpoint)
    need(
        ok and not credential,
        "telemetry.otlp_endpoint",
        f'{shown} is not an http(s) URL of an OTLP/HTTP collector, e.g. "http://127.0.0.1:4318"'
        + ("; send a collector's credential as telemetry.headers (e.g. Authorization)" if credential else ""),
    )
    try:
        missing = [m for m in TELEMETRY_MODULES if find_spec(m) is None]
    except ImportError:  # a parent package missing
        missing = list(TELEMETRY_MODULES)
    need(
        not missing,
        "telemetry.otlp_endpoint",
        "traces need the OpenTelemetry packages, not installed here: pip install 'appliance[telemetry]' "
        "(opentelemetry-sdk, opentelemetry-exporter-otlp-proto-http; install.sh and the offline bundle carry "
        "them), or leave otlp_endpoint empty",
    )


class GpuConfig(_Section):
    # A simulated GPU inventory (TOML or JSON) instead of NVML: for planning and
    # tests on machines without GPUs. Empty: read the real GPUs.
    inventory: str = ""


class Config(_Section):
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    gpu: GpuConfig = msgspec.field(default_factory=GpuConfig)
    autoscaling: AutoscalerConfig = msgspec.field(default_factory=AutoscalerConfig)
    queue: QueueConfig = msgspec.field(default_factory=QueueConfig)
    cpu: CpuConfig = msgspec.field(default_factory=CpuConfig)
    capacity: CapacityConfig = msgspec.field(default_factory=CapacityConfig)
    paths: PathsConfig = msgspec.field(default_factory=PathsConfig)
    store: StoreConfig = msgspec.field(default_factory=StoreConfig)
    images: ImagesConfig = msgspec.field(default_factory=ImagesConfig)
    upstream: UpstreamConfig = msgspec.field(default_factory=UpstreamConfig)
    supervisor: SupervisorConfig = msgspec.field(default_factory=SupervisorConfig)
    engines: EnginesConfig = msgspec.field(default_factory=EnginesConfig)
    routing: RoutingConfig = msgspec.field(default_factory=RoutingConfig)
    keys: KeysConfig = msgspec.field(default_factory=KeysConfig)
    audit: AuditConfig = msgspec.field(default_factory=AuditConfig)
    telemetry: TelemetryConfig = msgspec.field(default_factory=TelemetryConfig)
    models: list[ModelConfig] = msgspec.field(default_factory=list)
    routes: list[RouteConfig] = msgspec.field(default_factory=list)
    providers: list[ProviderConfig] = msgspec.field(default_factory=list)
    # Where the config came from, for messages; not a TOML key.
    origin: str = "<built-in defaults>"
    # Renamed keys this file still uses (RENAMED_KEYS), one warning each; not a TOML key.
    deprecations: tuple[str, ...] = ()

    def model(self, name: str) -> ModelConfig | None:
        return next((m for m in self.models if m.name == name), None)


def embedded_default_model() -> ModelConfig:
    return ModelConfig(
        name=EMBEDDED_MODEL_NAME,
        server="llamacpp",
        source=BUILTIN_PREFIX + EMBEDDED_MODEL_NAME,
        parallel=4,
        context_length=8192,
    )


# --- paths -------------------------------------------------------------------


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def default_paths() -> PathsConfig:
    """The directories systemd made for the service (appliance.service's
    StateDirectory=, CacheDirectory=, LogsDirectory=), else FHS locations for
    root, XDG locations for a user."""
    fallback = _user_paths()
    return PathsConfig(
        state_dir=_systemd_dir("STATE_DIRECTORY") or fallback.state_dir,
        cache_dir=_systemd_dir("CACHE_DIRECTORY") or fallback.cache_dir,
        log_dir=_systemd_dir("LOGS_DIRECTORY") or fallback.log_dir,
    )


def _systemd_dir(variable: str) -> str:
    # A colon-separated list when a unit names several; the first is ours.
    return os.environ.get(variable, "").split(":")[0]


def _user_paths() -> PathsConfig:
    if _is_root():
        return PathsConfig(
            state_dir="/var/lib/appliance",
            cache_dir="/var/cache/appliance",
            log_dir="/var/log/appliance",
        )
    home = Path.home()
    state = Path(os.environ.get("XDG_STATE_HOME") or home / ".local/state") / "appliance"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or home / ".cache") / "appliance"
    return PathsConfig(state_dir=str(state), cache_dir=str(cache), log_dir=str(state / "log"))


def install_prefix() -> Path:
    """The virtual environment this program runs from; install.sh puts the
    CPU engine in its bin/ and the bundled model in its share/appliance/."""
    return Path(sys.prefix)


def builtin_model_path(name: str) -> Path:
    if name != EMBEDDED_MODEL_NAME:
        raise KeyError(name)
    return install_prefix() / "share" / "appliance" / "models" / EMBEDDED_MODEL_FILE


# --- loading -----------------------------------------------------------------


def resolve_config_path(cli_path: str | None) -> tuple[Path, bool]:
    """The config file to read and whether the operator asked for it explicitly
    (an explicit file that is missing is an error; the default may be absent)."""
    if cli_path:
        return Path(cli_path), True
    env = os.environ.get("APPLIANCE_CONFIG")
    if env:
        return Path(env), True
    return DEFAULT_CONFIG_PATH, False


def load_config(cli_path: str | None = None) -> Config:
    path, explicit = resolve_config_path(cli_path)
    if not path.exists():
        if explicit:
            raise ConfigError(f"{path}: config file not found")
        return finalize(Config(), origin="<built-in defaults>")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from exc
    return parse_config(raw, origin=str(path))


def parse_config(raw: bytes | str, origin: str = "<string>") -> Config:
    try:
        table = msgspec.toml.decode(raw)
    except msgspec.DecodeError as exc:
        raise ConfigError(f"{origin}: not valid TOML: {exc}") from None
    if not isinstance(table, dict):
        raise ConfigError(f"{origin}: not a TOML table")
    deprecations = _rename_keys(table, origin)
    try:
        cfg = msgspec.convert(table, type=Config, dec_hook=_decode_duration)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{origin}: {_field_message(exc)}") from None
    return finalize(msgspec.structs.replace(cfg, deprecations=tuple(deprecations)), origin=origin)


# Keys renamed in a release: (old, new, the release that renamed it). The old name is read
# as the new one, with a warning, for one release; then the entry goes and the old name is
# an unknown field. "models[].x" is key x of every [[models]] table.
RENAMED_KEYS: list[tuple[str, str, str]] = [
    # [autoscaling] keeps only autoscaling: the cold-start queue and the CPU budget have their own.
    ("autoscaling.max_queue", "queue.max_held", "0.2.0"),
    ("autoscaling.queue_timeout_s", "queue.timeout_s", "0.2.0"),
    ("autoscaling.keepalive_s", "queue.keepalive_s", "0.2.0"),
    ("autoscaling.cpu_cores", "cpu.cores", "0.2.0"),
]


def _rename_keys(table: dict, origin: str) -> list[str]:
    """Move each renamed key the file uses to its new name; a warning for each."""
    warnings = []
    for old, new, release in RENAMED_KEYS:
        for where, parent, new_parent in _key_places(table, old, new):
            old_key, new_key = old.rsplit(".", 1)[-1], new.rsplit(".", 1)[-1]
            if new_key in new_parent:
                raise ConfigError(
                    f"{origin}: field '{where}{old_key}' is the old name of '{new}' (renamed in "
                    f"{release}) and both are set; keep only '{new}'"
                )
            new_parent[new_key] = parent.pop(old_key)
            warnings.append(
                f"{origin}: field '{where}{old_key}' is deprecated: it was renamed '{new}' in "
                f"{release} and is read as that for now; rename it before the next release"
            )
    return warnings


def _key_places(table: dict, old: str, new: str) -> list[tuple[str, dict, dict]]:
    """(path shown, the table holding the old key, the table the new key goes in) for each
    place the file sets old."""
    *old_path, old_key = old.split(".")
    new_path = new.split(".")[:-1]
    places = [("", table)]
    for part in old_path:
        many = part.endswith("[]")
        name = part.removesuffix("[]")
        found = []
        for shown, t in places:
            value = t.get(name)
            items = value if many and isinstance(value, list) else [value] if not many else []
            for i, item in enumerate(items):
                if isinstance(item, dict):
                    found.append((f"{shown}{name}[{i}]." if many else f"{shown}{name}.", item))
        places = found
    out = []
    for shown, parent in places:
        if old_key not in parent:
            continue
        target = parent if new_path == old_path else _subtable(table, new_path)
        out.append((shown, parent, target))
    return out


def _subtable(table: dict, path: list[str]) -> dict:
    for part in path:
        table = table.setdefault(part, {})
    return table


def _field_message(exc: msgspec.ValidationError) -> str:
    # msgspec says "Expected `int`, got `str` - at `$.server.port`"; turn the
    # JSON path into the TOML field the operator edits: server.port, models[0].name.
    text = str(exc)
    match = re.search(r" - at `\$(.*)`$", text)
    if not match:
        return text
    field = match.group(1).lstrip(".")
    message = text[: match.start()]
    return f"field '{field}': {message}"


def finalize(cfg: Config, origin: str) -> Config:
    """Fill defaults that depend on the machine, then check cross-field rules."""
    defaults = default_paths()
    paths = PathsConfig(
        state_dir=cfg.paths.state_dir or defaults.state_dir,
        cache_dir=cfg.paths.cache_dir or defaults.cache_dir,
        log_dir=cfg.paths.log_dir or defaults.log_dir,
    )
    models = [_with_request_context(m) for m in cfg.models or [embedded_default_model()]]
    server = cfg.server
    if server.log_file:
        server = msgspec.structs.replace(server, log_file=str(Path(paths.log_dir) / server.log_file))
    if server.admin_socket:
        server = msgspec.structs.replace(server, admin_socket=str(Path(paths.state_dir) / server.admin_socket))
    cfg = msgspec.structs.replace(cfg, server=server, paths=paths, models=models, origin=origin)
    _validate(cfg)
    return cfg


def _with_request_context(m: ModelConfig) -> ModelConfig:
    """llama.cpp's slots share its context: context_per_request set, the total is that x parallel."""
    if m.context_per_request <= 0 or m.server != "llamacpp":
        return m
    return msgspec.structs.replace(m, context_length=m.context_per_request * m.parallel)


def request_context(m: ModelConfig) -> int:
    """The tokens one request may use, prompt and answer together."""
    return m.context_length // m.parallel if m.server == "llamacpp" else m.context_length


MAX_WORKERS = 64


def worker_count(server: ServerConfig, cores: int | None = None) -> int:
    """How many data-plane processes serve the port: server.workers, or for "auto" one
    per 4 cores the daemon may run on, at most 4: the other cores are the daemon's own
    (it decides every request, on one core) and the engines', and beyond 4 workers
    the daemon's core is the limit (docs/architecture.md, "Workers")."""
    if server.workers != "auto":
        return server.workers
    if cores is None:
        cores = len(os.sched_getaffinity(0))
    return max(1, min(4, cores // 4))


def _validate(cfg: Config) -> None:
    errors: list[str] = []

    def need(ok: bool, field: str, message: str) -> None:
        if not ok:
            errors.append(f"field '{field}': {message}")

    s = cfg.server
    need(0 < s.port < 65536, "server.port", f"must be 1-65535, got {s.port}")
    need(s.max_body_bytes >= 1024, "server.max_body_bytes", "must be at least 1024")
    need(s.max_upload_bytes >= 1024, "server.max_upload_bytes", "must be at least 1024")
    need(0 < s.header_read_timeout_s <= 3600, "server.header_read_timeout_s", "must be within 0-3600 s")
    need(0 < s.body_read_timeout_s <= 3600, "server.body_read_timeout_s", "must be within 0-3600 s")
    need(s.drain_timeout_s >= 0, "server.drain_timeout_s", "must not be negative")
    need(
        len(os.fsencode(s.admin_socket)) < UNIX_PATH_MAX,
        "server.admin_socket",
        f"{s.admin_socket} is longer than a unix socket path may be ({UNIX_PATH_MAX - 1} bytes)",
    )
    need(
        s.workers == "auto" or 1 <= s.workers <= MAX_WORKERS,
        "server.workers",
        f'must be 1-{MAX_WORKERS} or "auto", got {s.workers!r}: 1 runs the daemon alone, more adds worker processes',
    )
    u = cfg.upstream
    need(u.connect_timeout_s > 0, "upstream.connect_timeout_s", "must be positive")
    need(u.read_timeout_s > 0, "upstream.read_timeout_s", "must be positive")
    need(u.max_connections_per_replica >= 1, "upstream.max_connections_per_replica", "must be >= 1")
    sv = cfg.supervisor
    for field in ("startup_timeout_s", "backoff_initial_s", "backoff_max_s", "crash_window_s", "health_interval_s"):
        need(getattr(sv, field) > 0, f"supervisor.{field}", "must be positive")
    need(sv.stop_grace_s >= 0, "supervisor.stop_grace_s", "must not be negative")
    need(sv.max_crashes >= 1, "supervisor.max_crashes", "must be >= 1")
    need(sv.log_max_bytes >= 4096, "supervisor.log_max_bytes", "must be at least 4096")
    need(cfg.store.budget_gib >= 0, "store.budget_gib", "must not be negative")
    need(cfg.store.scrub_interval_h >= 0, "store.scrub_interval_h", "must not be negative (0 = off)")
    need(cfg.store.scrub_mb_per_s >= 0, "store.scrub_mb_per_s", "must not be negative (0 = unlimited)")
    need(cfg.images.keep >= 1, "images.keep", "must be >= 1")

    asc = cfg.autoscaling
    need(asc.interval_s > 0, "autoscaling.interval_s", "must be positive")
    need(cfg.queue.max_held >= 0, "queue.max_held", "must not be negative")
    need(cfg.queue.timeout_s > 0, "queue.timeout_s", "must be positive")
    need(cfg.cpu.cores >= 0, "cpu.cores", "must not be negative")
    need(cfg.capacity.host_ram_gib >= 0, "capacity.host_ram_gib", "must not be negative (0 = MemTotal less a reserve)")
    need(
        cfg.capacity.max_wait_before_preempt_s >= 0,
        "capacity.max_wait_before_preempt_s",
        "must not be negative (0 = never)",
    )
    need(cfg.capacity.headroom_idle_s >= 0, "capacity.headroom_idle_s", "must not be negative (0 = off)")

    seen: set[str] = set()
    for i, m in enumerate(cfg.models):
        at = f"models[{i}]"
        _need_model_name(need, m.name, f"{at}.name")
        need(m.name not in seen, f"{at}.name", f"duplicate model name {m.name!r}")
        seen.add(m.name)
        a = m.autoscaling
        need(a.min_replicas >= 0, f"{at}.autoscaling.min_replicas", "must not be negative")
        need(
            a.max_replicas >= max(a.min_replicas, 1),
            f"{at}.autoscaling.max_replicas",
            "must be >= min_replicas and >= 1",
        )
        need(a.target_rps_per_replica > 0, f"{at}.autoscaling.target_rps_per_replica", "must be positive")
        need(
            not a.sleep_after.seconds or m.sleep_mode, f"{at}.autoscaling.sleep_after", "needs sleep_mode = true (vllm)"
        )
        need(m.parallel >= 1, f"{at}.parallel", "must be >= 1")
        need(m.context_length >= 64, f"{at}.context_length", "must be >= 64")
        need(
            m.context_per_request == 0 or (m.context_per_request >= 64 and m.server == "llamacpp"),
            f"{at}.context_per_request",
            "must be >= 64, and only for llamacpp (whose slots share context_length; 0: not set)",
        )
        need(m.threads >= 0, f"{at}.threads", "must not be negative")
        need(m.default_max_tokens >= 0, f"{at}.default_max_tokens", "must not be negative (0 = context_length)")
        _validate_tasks(m, at, need)
        if m.source.startswith(STORE_PREFIX):
            try:
                check_name(m.source[len(STORE_PREFIX) :])
            except StoreError as exc:
                need(False, f"{at}.source", str(exc))
        need(not m.health_path or m.server == "openai", f"{at}.health_path", "only an openai engine has one")
        if m.server == "llamacpp":
            need(bool(m.source), f"{at}.source", "llamacpp needs a GGUF file (or builtin:NAME)")
            need(m.gpus.count >= 0, f"{at}.gpus.count", "must not be negative (0: on the CPU)")
            need(m.gpu_overhead_gib >= 0, f"{at}.gpu_overhead_gib", "must not be negative")
            for field in ("cache_type_k", "cache_type_v"):
                need(
                    getattr(m, field) in CACHE_TYPES,
                    f"{at}.{field}",
                    f"{getattr(m, field)!r} is not a llama.cpp cache type ({', '.join(CACHE_TYPES)})",
                )
            if m.source.startswith(BUILTIN_PREFIX):
                name = m.source[len(BUILTIN_PREFIX) :]
                need(
                    name == EMBEDDED_MODEL_NAME,
                    f"{at}.source",
                    f"unknown builtin model {name!r}; the bundled one is {EMBEDDED_MODEL_NAME!r}",
                )
        elif m.server == "openai":
            need(
                not m.health_path or bool(re.fullmatch(r"(/[A-Za-z0-9_~-][A-Za-z0-9._~-]*)+/?", m.health_path)),
                f"{at}.health_path",
                f'{m.health_path!r} is not a URL path (like "/health": a leading /, no query, no dot segments)',
            )
            need(
                bool(m.command) != bool(m.url),
                f"{at}",
                "an openai engine needs exactly one of 'command' (supervised) or 'url' (external)",
            )
            if m.url:
                need(m.url.startswith(("http://", "https://")), f"{at}.url", "must be an http(s) URL")
            if m.command:
                need(
                    any("{port}" in part for part in m.command),
                    f"{at}.command",
                    "must contain {port} so the engine listens where the supervisor expects",
                )
        else:  # vllm, sglang
            need(bool(m.source), f"{at}.source", f"{m.server} needs a model directory (a hub snapshot)")
            need(
                not m.source.startswith(BUILTIN_PREFIX),
                f"{at}.source",
                f"the bundled model is a GGUF for llamacpp, not for {m.server}",
            )
            need(m.gpus.count >= 0, f"{at}.gpus.count", "must not be negative")
            need(m.kv_cache_tokens >= 0, f"{at}.kv_cache_tokens", "must not be negative")
            need(m.gpu_overhead_gib >= 0, f"{at}.gpu_overhead_gib", "must not be negative")
            need(not m.sleep_mode or m.server == "vllm", f"{at}.sleep_mode", "only vllm has a sleep mode")
    _validate_adapters(cfg, need)
    _validate_routes(cfg, need)
    _validate_telemetry(cfg.telemetry, need)
    if errors:
        raise ConfigError(f"{cfg.origin}: " + "; ".join(errors))


LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


def is_loopback(host: str) -> bool:
    return host in LOOPBACK_HOSTS or host.startswith("127.")


def bind_error(cfg: Config) -> str | None:
    """Why this config must not serve on its bind address, if it must not."""
    if not is_loopback(cfg.server.host) and not cfg.keys.required:
        return (
            f"field 'keys.required': server.host {cfg.server.host!r} is not loopback, so API keys "
            "are required: set keys.required = true and create keys with `appliance keys create`"
        )
    return None


def _validate_routes(cfg: Config, need) -> None:
    r = cfg.routing
    need(r.prefix_block_bytes >= 16, "routing.prefix_block_bytes", "must be >= 16")
    need(r.prefix_min_match_blocks >= 1, "routing.prefix_min_match_blocks", "must be >= 1")
    need(r.prefix_load_margin >= 0, "routing.prefix_load_margin", "must not be negative")
    need(r.prefix_index_mib > 0, "routing.prefix_index_mib", "must be positive")
    need(bool(r.tag_header), "routing.tag_header", "must not be empty")
    a = cfg.audit
    need(a.flush_interval_s > 0, "audit.flush_interval_s", "must be positive")
    need(a.flush_rows >= 1, "audit.flush_rows", "must be >= 1")
    need(a.max_pending_rows >= a.flush_rows, "audit.max_pending_rows", "must be >= flush_rows")
    need(a.retention_days >= 0, "audit.retention_days", "must not be negative (0: keep forever)")
    need(a.max_rows >= 0, "audit.max_rows", "must not be negative (0: no limit)")
    need(a.purge_interval.seconds >= 1, "audit.purge_interval", "must be at least 1s")
    bind = bind_error(cfg)
    if bind:
        need(False, "keys.required", bind.split(": ", 1)[1])
    models = {m.name for m in cfg.models} | set(lora_names(cfg))  # an adapter is a model name
    providers: dict[str, ProviderConfig] = {}
    for i, p in enumerate(cfg.providers):
        at = f"providers[{i}]"
        need(bool(_NAME_RE.match(p.name)), f"{at}.name", f"{p.name!r} is not a valid name")
        need(
            p.name not in providers and p.name not in models,
            f"{at}.name",
            f"{p.name!r} is already a provider or model name",
        )
        providers[p.name] = p
        need(p.base_url.startswith(("http://", "https://")), f"{at}.base_url", "must be an http(s) URL")
        need(not (p.api_key_file and p.api_key_env), f"{at}", "name at most one of 'api_key_file' and 'api_key_env'")
        need(p.connect_timeout_s > 0, f"{at}.connect_timeout_s", "must be positive")
        need(p.read_timeout_s > 0, f"{at}.read_timeout_s", "must be positive")
        need(p.breaker_failures >= 1, f"{at}.breaker_failures", "must be >= 1")
        need(p.breaker_reset_s > 0, f"{at}.breaker_reset_s", "must be positive")
        unknown = [a for a in p.apis if a not in ENDPOINT_NAMES]
        need(not unknown, f"{at}.apis", f"unknown API(s) {unknown}: known are {', '.join(sorted(ENDPOINT_NAMES))}")
    names: set[str] = set()
    matches: set[tuple[str, str]] = set()
    for i, route in enumerate(cfg.routes):
        at = f"routes[{i}]"
        need(bool(_NAME_RE.match(route.name)), f"{at}.name", f"{route.name!r} is not a valid route name")
        need(route.name not in names, f"{at}.name", f"duplicate route name {route.name!r}")
        names.add(route.name)
        need(bool(route.model), f"{at}.model", "must name the model clients request")
        need(
            (route.model, route.tag) not in matches,
            f"{at}.model",
            f"another route already matches model {route.model!r} with tag {route.tag!r}",
        )
        matches.add((route.model, route.tag))
        need(route.target in models, f"{at}.target", f"{route.target!r} is not a configured model")
        need(route.burst_at_queue >= -1, f"{at}.burst_at_queue", "must be >= -1")
        for name in route.fallbacks:
            need(name in providers or name in models, f"{at}.fallbacks", f"{name!r} is neither a provider nor a model")
            provider = providers.get(name)
            need(
                not (route.regulated and provider is not None and provider.commercial),
                f"{at}.fallbacks",
                f"route {route.name!r} is regulated: it may not fall back to the "
                f"commercial provider {name!r} (regulated traffic never leaves this server)",
            )


# What a model can be for (tasks = [...]); the gateway's endpoints each need one of them.
TASKS = ("chat", "embed", "rerank", "transcribe")
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


def tasks_of(model: ModelConfig) -> tuple[str, ...]:
    """A model's tasks: as configured, else chat (and embed with embeddings = true)."""
    if model.tasks:
        return tuple(model.tasks)
    return ("chat", "embed") if model.embeddings else ("chat",)


def _validate_tasks(m: ModelConfig, at: str, need) -> None:
    unknown = [t for t in m.tasks if t not in TASKS]
    need(not unknown, f"{at}.tasks", f"unknown task(s) {unknown}: a model is for {', '.join(TASKS)}")
    need(
        not (m.tasks and m.embeddings and "embed" not in m.tasks),
        f"{at}.tasks",
        'embeddings = true needs "embed" among the tasks (or leave tasks empty)',
    )


def idle_ttl_s(cfg: Config, model: ModelConfig) -> float:
    return (model.autoscaling.scale_to_zero_after or cfg.autoscaling.idle_ttl).seconds


def read_admin_token(cfg: Config) -> str:
    if not cfg.server.admin_token_file:
        return ""
    path = Path(cfg.server.admin_token_file)
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(
            f"{cfg.origin}: field 'server.admin_token_file': cannot read {path}: "
            f"{exc.strerror}; create it (one line of 16 or more characters, mode 0600, "
            "readable by the daemon's user) or remove the setting"
        ) from None
    if len(token) < 16:
        raise ConfigError(
            f"{cfg.origin}: field 'server.admin_token_file': the token in {path} is shorter than 16 characters"
        )
    if problem := exposed_secret(path):
        log.warning("field 'server.admin_token_file': %s", problem)
    return token


def exposed_secret(path: Path) -> str | None:
    """Why a file holding a secret is open to more than its owner, if it is."""
    mode = path.stat().st_mode & 0o777
    if mode & 0o044:
        return (
            f"{path} is readable by its group or others (mode {mode:04o}): run chmod 600 {path} "
            "(and chown it to the daemon's user)"
        )
    return None


def check_writable_dirs(cfg: Config) -> None:
    """The directories the daemon writes, made if missing and tried with a real file:
    a ConfigError naming the field, the path and the fix, before anything opens there."""
    import tempfile

    for field, path in (
        ("paths.state_dir", cfg.paths.state_dir),
        ("paths.cache_dir", cfg.paths.cache_dir),
        ("paths.log_dir", cfg.paths.log_dir),
    ):
        try:
            Path(path).mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=path):
                pass
        except OSError as exc:
            raise ConfigError(
                f"{cfg.origin}: field '{field}': {path} is not writable by this user "
                f"(uid {os.getuid()}): {exc.strerror}; give the daemon's user write access "
                f"(chown/chmod) or point {field} elsewhere"
            ) from None


def kv_tokens(model: ModelConfig) -> int:
    return model.kv_cache_tokens or model.context_length * model.parallel


def uses_gpus(model: ModelConfig) -> bool:
    """Replicas of this model need GPUs from the placer: vLLM and SGLang always, a GGUF
    model on llama.cpp when it asks for GPUs ([models.gpus] count >= 1); else the CPU."""
    return model.server in GPU_SERVERS or (model.server == "llamacpp" and model.gpus.count >= 1)


def min_residency_s(cfg: Config, model: ModelConfig) -> float:
    return (model.autoscaling.min_residency or cfg.autoscaling.min_residency).seconds


def overhead_bytes(cfg: Config, model: ModelConfig) -> int:
    gib = model.gpu_overhead_gib or getattr(cfg.engines, model.server).overhead_gib
    return int(gib * 1024**3)
