"""Config: the whole file, one field per section, and the lookups that need more than one
section (a model's idle TTL, residency and GPU overhead fall back to global settings)."""

from __future__ import annotations

import msgspec

from appliance.config.models import ModelConfig
from appliance.config.routes import ProviderConfig, RouteConfig, RoutingConfig
from appliance.config.sections import (
    AuditConfig,
    AutoscalerConfig,
    CapacityConfig,
    CpuConfig,
    EnginesConfig,
    GpuConfig,
    ImagesConfig,
    KeysConfig,
    PathsConfig,
    QueueConfig,
    ServerConfig,
    StoreConfig,
    SupervisorConfig,
    UpstreamConfig,
    _Section,
)
from appliance.config.telemetry import TelemetryConfig


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


def lora_names(cfg: Config) -> dict[str, ModelConfig]:
    """Every adapter's model name -> the base model that serves it."""
    return {a.name: m for m in cfg.models for a in m.adapters}


def idle_ttl_s(cfg: Config, model: ModelConfig) -> float:
    return (model.autoscaling.scale_to_zero_after or cfg.autoscaling.idle_ttl).seconds


def min_residency_s(cfg: Config, model: ModelConfig) -> float:
    return (model.autoscaling.min_residency or cfg.autoscaling.min_residency).seconds


def overhead_bytes(cfg: Config, model: ModelConfig) -> int:
    gib = model.gpu_overhead_gib or getattr(cfg.engines, model.server).overhead_gib
    return int(gib * 1024**3)
