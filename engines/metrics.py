"""Engines' Prometheus metrics read into one shape for the router and autoscaler."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class EngineLoad:
    running: float | None = None  # requests being decoded
    waiting: float | None = None  # requests queued inside the engine
    kv_cache_usage: float | None = None  # 0..1 of the KV cache in use
    prefix_cache_hit_rate: float | None = None  # 0..1, since the engine started


def _samples(text: str) -> dict[str, float]:
    """Sample name -> value, summed over label sets (engines label by model name)."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name] = out.get(sample.name, 0.0) + float(sample.value)
    return out


def _first(values: dict[str, float], *names: str) -> float | None:
    for name in names:
        if name in values:
            return values[name]
    return None


def _ratio(hits: float | None, total: float | None) -> float | None:
    if hits is None or total is None:
        return None
    return hits / total if total > 0 else 0.0


def parse_vllm(text: str) -> EngineLoad:
    v = _samples(text)
    hits = _first(v, "vllm:prefix_cache_hits_total", "vllm:prefix_cache_hits")
    queries = _first(v, "vllm:prefix_cache_queries_total", "vllm:prefix_cache_queries")
    return EngineLoad(
        running=_first(v, "vllm:num_requests_running"),
        waiting=_first(v, "vllm:num_requests_waiting"),
        kv_cache_usage=_first(v, "vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
        prefix_cache_hit_rate=_ratio(hits, queries)
        if queries is not None
        else _first(v, "vllm:gpu_prefix_cache_hit_rate"),
    )


def parse_sglang(text: str) -> EngineLoad:
    v = _samples(text)
    return EngineLoad(
        running=_first(v, "sglang:num_running_reqs"),
        waiting=_first(v, "sglang:num_queue_reqs"),
        kv_cache_usage=_first(v, "sglang:token_usage"),
        prefix_cache_hit_rate=_first(v, "sglang:cache_hit_rate"),
    )


def parse_llamacpp(text: str) -> EngineLoad:
    v = _samples(text)
    cached = _first(v, "llamacpp:prompt_tokens_cached_total", "llamacpp:prompt_tokens_cached")
    fresh = _first(v, "llamacpp:prompt_tokens_total", "llamacpp:prompt_tokens")
    return EngineLoad(
        running=_first(v, "llamacpp:requests_processing"),
        waiting=_first(v, "llamacpp:requests_deferred"),
        kv_cache_usage=_first(v, "llamacpp:kv_cache_usage_ratio"),
        prefix_cache_hit_rate=_ratio(cached, (cached or 0) + (fresh or 0)) if cached is not None else None,
    )
