"""Configuration: loaded, defaulted and validated here and nowhere else.

One TOML file (``/etc/appliance/appliance.toml`` by default, ``--config`` or
``APPLIANCE_CONFIG`` to override). With no file at all the daemon serves the
embedded default model. Every validation error names the file and the field.

Every name is imported from here (``from appliance.config import Config``); the modules
say where each part lives. A new setting is a field, with its default and its meaning in
a comment, in its section's Struct (sections.py for the daemon-wide sections, models.py
for [[models]], routes.py for [routing]/[[routes]]/[[providers]], telemetry.py), its
checks in validation.py (telemetry's in telemetry.py), and its default and meaning in
appliance.example.toml. A key renamed is an entry in loading.RENAMED_KEYS.
"""

from appliance.config.durations import (
    Duration,
    parse_duration,
)
from appliance.config.errors import (
    ConfigError,
)
from appliance.config.loading import (
    DEFAULT_CONFIG_PATH,
    RENAMED_KEYS,
    finalize,
    load_config,
    parse_config,
    resolve_config_path,
)
from appliance.config.models import (
    BUILTIN_PREFIX,
    CACHE_TYPES,
    EMBEDDED_MODEL_FILE,
    EMBEDDED_MODEL_NAME,
    EMBEDDED_MODEL_SHA256,
    GPU_SERVERS,
    LORA_SERVERS,
    STORE_PREFIX,
    TASKS,
    Autoscaling,
    GpuRequest,
    LoraAdapterConfig,
    ModelConfig,
    ServerKind,
    embedded_default_model,
    kv_tokens,
    request_context,
    tasks_of,
    uses_gpus,
)
from appliance.config.paths import (
    UNIX_PATH_MAX,
    builtin_model_path,
    check_dirs_are_dirs,
    check_writable_dirs,
    default_paths,
    exposed_secret,
    install_prefix,
    read_admin_token,
    read_secret_file,
)
from appliance.config.routes import (
    ENDPOINT_NAMES,
    ProviderConfig,
    RouteConfig,
    RoutingConfig,
)
from appliance.config.schema import (
    Config,
    idle_ttl_s,
    lora_names,
    min_residency_s,
    overhead_bytes,
)
from appliance.config.sections import (
    DEFAULT_ALLOWED_LICENSES,
    MAX_WORKERS,
    AuditConfig,
    AutoscalerConfig,
    CapacityConfig,
    CpuConfig,
    EnginesConfig,
    GpuConfig,
    GpuEngineConfig,
    ImagesConfig,
    KeysConfig,
    LlamaCppConfig,
    PathsConfig,
    QueueConfig,
    ServerConfig,
    StoreConfig,
    SupervisorConfig,
    UpstreamConfig,
    worker_count,
)
from appliance.config.telemetry import (
    TELEMETRY_MODULES,
    TelemetryConfig,
    traces_url,
)
from appliance.config.validation import (
    LOOPBACK_HOSTS,
    bind_error,
    is_loopback,
)

__all__ = [
    "AuditConfig",
    "AutoscalerConfig",
    "Autoscaling",
    "BUILTIN_PREFIX",
    "CACHE_TYPES",
    "CapacityConfig",
    "Config",
    "ConfigError",
    "CpuConfig",
    "DEFAULT_ALLOWED_LICENSES",
    "DEFAULT_CONFIG_PATH",
    "Duration",
    "EMBEDDED_MODEL_FILE",
    "EMBEDDED_MODEL_NAME",
    "EMBEDDED_MODEL_SHA256",
    "ENDPOINT_NAMES",
    "EnginesConfig",
    "GPU_SERVERS",
    "GpuConfig",
    "GpuEngineConfig",
    "GpuRequest",
    "ImagesConfig",
    "KeysConfig",
    "LOOPBACK_HOSTS",
    "LORA_SERVERS",
    "LlamaCppConfig",
    "LoraAdapterConfig",
    "MAX_WORKERS",
    "ModelConfig",
    "PathsConfig",
    "ProviderConfig",
    "QueueConfig",
    "RENAMED_KEYS",
    "RouteConfig",
    "RoutingConfig",
    "STORE_PREFIX",
    "ServerConfig",
    "ServerKind",
    "StoreConfig",
    "SupervisorConfig",
    "TASKS",
    "TELEMETRY_MODULES",
    "TelemetryConfig",
    "UNIX_PATH_MAX",
    "UpstreamConfig",
    "bind_error",
    "builtin_model_path",
    "check_dirs_are_dirs",
    "check_writable_dirs",
    "default_paths",
    "embedded_default_model",
    "exposed_secret",
    "finalize",
    "idle_ttl_s",
    "install_prefix",
    "is_loopback",
    "kv_tokens",
    "load_config",
    "lora_names",
    "min_residency_s",
    "overhead_bytes",
    "parse_config",
    "parse_duration",
    "read_admin_token",
    "read_secret_file",
    "request_context",
    "resolve_config_path",
    "tasks_of",
    "traces_url",
    "uses_gpus",
    "worker_count",
]
