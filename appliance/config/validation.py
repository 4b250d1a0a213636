"""Validation: every rule a single field's type cannot say (ranges, names, a field that
needs another), checked on the finalized Config; every broken rule is collected and
reported at once, each naming its field and the fix."""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.config.errors import ConfigError
from appliance.config.models import (
    BUILTIN_PREFIX,
    CACHE_TYPES,
    EMBEDDED_MODEL_NAME,
    LORA_SERVERS,
    STORE_PREFIX,
    TASKS,
    ModelConfig,
)
from appliance.config.paths import UNIX_PATH_MAX
from appliance.config.routes import ENDPOINT_NAMES, ProviderConfig
from appliance.config.schema import lora_names
from appliance.config.sections import MAX_WORKERS
from appliance.config.telemetry import _validate_telemetry
from appliance.config.urls import prefix_error
from appliance.safe_paths import StoreError, check_name

if TYPE_CHECKING:
    from appliance.config.schema import Config

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")


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


# The engine flags that keep a replica the daemon's alone (engines/*.py set them): where it
# listens and the key it asks for.
ENGINE_OWNED_FLAGS = frozenset({"--host", "--port", "--uds", "--api-key", "--api-key-file"})


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
    need(0 < s.send_timeout_s <= 3600, "server.send_timeout_s", "must be within 0-3600 s")
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
    _validate_proxies(s.trusted_proxies, need)
    for i, prefix in enumerate(s.media_url_prefixes):
        need((why := prefix_error(prefix)) is None, f"server.media_url_prefixes[{i}]", why or "")
    u = cfg.upstream
    need(u.connect_timeout_s > 0, "upstream.connect_timeout_s", "must be positive")
    need(u.read_timeout_s > 0, "upstream.read_timeout_s", "must be positive")
    need(u.max_connections_per_replica >= 1, "upstream.max_connections_per_replica", "must be >= 1")
    need(u.max_answer_bytes >= 1024 * 1024, "upstream.max_answer_bytes", "must be at least 1048576 (1 MiB)")
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
    log_names: dict[str, str] = {}  # a replica log's name -> the model's (fleet/replica_state.py)
    for i, m in enumerate(cfg.models):
        at = f"models[{i}]"
        _need_model_name(need, m.name, f"{at}.name")
        need(m.name not in seen, f"{at}.name", f"duplicate model name {m.name!r}")
        seen.add(m.name)
        log_name = m.name.replace("/", "_")
        other = log_names.setdefault(log_name, m.name)
        need(
            other == m.name,
            f"{at}.name",
            f"its replicas would log to the same files as model {other!r} (<log_dir>/replicas/"
            f"{log_name}-N.log: '/' is written '_'); rename one of them",
        )
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
        if m.server != "openai":  # an openai engine's command is the operator's own, {port} and key included
            owned = [a for a in m.args if a.split("=", 1)[0] in ENGINE_OWNED_FLAGS]
            need(
                not owned,
                f"{at}.args",
                f"{owned[0] if owned else ''!r} is the appliance's to set: each replica listens on loopback "
                "(vLLM: a private unix socket) with a fresh key of its own, which an engine argument "
                "appended last would override (--host 0.0.0.0, a known --api-key); remove it",
            )
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


def _validate_proxies(proxies: list[str], need) -> None:
    """server.trusted_proxies: addresses or networks (CIDR), none trusting every address."""
    for i, entry in enumerate(proxies):
        at = f"server.trusted_proxies[{i}]"
        try:
            network = ipaddress.ip_network(entry, strict=True)
        except ValueError as exc:
            need(False, at, f"must be an IP address or a network (10.0.0.0/8, fd00::/8): {exc}")
            continue
        need(
            network.prefixlen > 0,
            at,
            f"{entry!r} trusts every address: any client could name itself anyone; list the proxies' addresses",
        )


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
    if cfg.server.trusted_proxies and not cfg.keys.required:
        # Its clients connect from its address, a loopback one on this box: without keys,
        # the model API and the tokenless admin API would be theirs.
        return (
            "field 'keys.required': server.trusted_proxies lists a reverse proxy in front, which serves "
            "other hosts, so API keys are required: set keys.required = true and create keys with "
            "`appliance keys create`"
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
    need(a.refusal_rows_per_minute >= 0, "audit.refusal_rows_per_minute", "must not be negative (0: no folding)")
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
                f"commercial provider {name!r} (a regulated route reaches only this box's engines, "
                "the models declared here and providers declared commercial = false)",
            )


def _validate_tasks(m: ModelConfig, at: str, need) -> None:
    unknown = [t for t in m.tasks if t not in TASKS]
    need(not unknown, f"{at}.tasks", f"unknown task(s) {unknown}: a model is for {', '.join(TASKS)}")
    need(
        not (m.tasks and m.embeddings and "embed" not in m.tasks),
        f"{at}.tasks",
        'embeddings = true needs "embed" among the tasks (or leave tasks empty)',
    )
