"""Engine adapters, one per engine the appliance can supervise."""

from .base import EngineAdapter, LaunchSpec, ProbeFailed
from .llamacpp import LlamaCppAdapter
from .openai import OpenAIAdapter

ADAPTERS: dict[str, EngineAdapter] = {
    "llamacpp": LlamaCppAdapter(),
    "openai": OpenAIAdapter(),
}


def adapter_for(server: str) -> EngineAdapter:
    try:
        return ADAPTERS[server]
    except KeyError:
        raise KeyError(f"no engine adapter named {server!r}") from None


__all__ = ["ADAPTERS", "EngineAdapter", "LaunchSpec", "ProbeFailed", "adapter_for"]
