"""Engine adapters, one per engine the appliance can supervise."""

from engines.base import CannotLaunch, EngineAdapter, GpuSlot, LaunchSpec, Lora, ProbeFailed
from engines.llamacpp import LlamaCppAdapter
from engines.metrics import EngineLoad
from engines.openai import OpenAIAdapter
from engines.sglang import SglangAdapter
from engines.vllm import VllmAdapter

ADAPTERS: dict[str, EngineAdapter] = {
    "llamacpp": LlamaCppAdapter(),
    "openai": OpenAIAdapter(),
    "vllm": VllmAdapter(),
    "sglang": SglangAdapter(),
}


def adapter_for(server: str) -> EngineAdapter:
    try:
        return ADAPTERS[server]
    except KeyError:
        raise KeyError(f"no engine adapter named {server!r}") from None


__all__ = [
    "ADAPTERS",
    "CannotLaunch",
    "EngineAdapter",
    "EngineLoad",
    "GpuSlot",
    "LaunchSpec",
    "Lora",
    "ProbeFailed",
    "adapter_for",
]
