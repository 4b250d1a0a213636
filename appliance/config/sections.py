"""The daemon-wide sections of the file ([server], [paths], [store], ... [gpu]): one
msgspec Struct each, every field with its default and, above it, its meaning
(appliance.example.toml says the same to operators). Models, routes and telemetry have
their own modules; the whole file's shape is schema.Config."""

from __future__ import annotations

import os
from typing import Literal

import msgspec

from appliance.config.durations import Duration


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
    # A client that takes no piece of its answer for this long (it stopped reading:
    # its socket is full) is dropped: the engine's request is closed, freeing its
    # replica slot, and it is charged what was relayed, as a client that left.
    send_timeout_s: float = 60.0
    # SIGTERM: stop accepting, give in-flight requests this long to finish.
    drain_timeout_s: float = 30.0
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # A file holding the admin token (a systemd credential, say). Without it the
    # admin API (/admin/...) answers over TCP only loopback clients of a loopback
    # bind, and only while keys.required is false; the admin socket always works.
    admin_token_file: str = ""
    # Names (besides loopback addresses, localhost and server.host) the admin API
    # answers to in the Host header: the DNS name of a reverse proxy, say. A
    # DNS-rebinding web page sends its own name and is refused. The model API's GETs
    # that no key guards (keyless /v1/models, a public /metrics) read the same list.
    admin_hosts: list[str] = msgspec.field(default_factory=list)
    # With keys.required, /metrics needs an API key or the admin token; true opens it
    # to anyone who reaches the port (a local Prometheus without credentials).
    metrics_public: bool = False
    # The reverse proxies in front (addresses or CIDRs): a request whose connection
    # comes from one of them is audited as from the client that proxy names in
    # forwarded_header, the proxy itself kept beside it. Empty: every header naming a
    # client is ignored and the row names the connection's peer.
    trusted_proxies: list[str] = msgspec.field(default_factory=list)
    # The header the proxies in trusted_proxies append the client's address to:
    # X-Forwarded-For, or RFC 7239 Forwarded (its for=). The other is never read: a
    # proxy that writes one passes the other on as the client wrote it.
    forwarded_header: Literal["x-forwarded-for", "forwarded"] = "x-forwarded-for"
    # A provider key file (providers[].api_key_file) its group or others may read:
    # "refuse" (the daemon does not start, naming the file and the fix) or "warn".
    key_file_permissions: Literal["refuse", "warn"] = "refuse"
    # Where requests may point an engine at media by URL (image_url, video_url, audio_url,
    # file_url, Anthropic's source url): absolute http(s) URL prefixes ending in "/", in
    # normal form (config/urls.py). Empty: only data: URLs (the bytes themselves); any
    # other is a 400 media_url_not_allowed (appliance/gateway/media_urls.py).
    media_url_prefixes: list[str] = msgspec.field(default_factory=list)
    # The admin API also on a unix socket (relative: under paths.state_dir), mode
    # 0660; each request carries the token the daemon writes at each start next to
    # it, <admin_socket>.token, mode 0640 (appliance/socket_token.py). Empty: off.
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
    # The most bytes of a whole (unary) answer read from an engine or a provider;
    # a larger one is a 502 naming this cap (an error answer's body is kept to its
    # first 64 KiB: appliance/gateway/proxy.py MAX_ERROR_BYTES).
    max_answer_bytes: int = 64 * 1024 * 1024


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
    # Unauthenticated refusals (401/403 with no key) per client host, endpoint and status
    # written one row each per minute; the minute's rest leave one summary row with their
    # count (`folded`): a flood of wrong keys cannot fill the disk (0: every one a row).
    refusal_rows_per_minute: int = 60
    # Retention (0: keep forever): rows older than this many days, and rows beyond the
    # newest max_rows, are deleted every purge_interval in small batches, and the freed
    # space goes back to the filesystem (appliance/access/retention.py).
    retention_days: float = 0.0
    max_rows: int = 0
    purge_interval: Duration = Duration("1h")


class GpuConfig(_Section):
    # A simulated GPU inventory (TOML or JSON) instead of NVML: for planning and
    # tests on machines without GPUs. Empty: read the real GPUs.
    inventory: str = ""


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
