"""What a model's engine serves, for the gateway's capability checks: the fleet owns the
engine adapters, so the gateway asks here (the endpoints an adapter declares, whether it
keeps Responses) and never imports engines itself."""

import functools

from appliance.config import Config, ModelConfig
from appliance.store import gguf
from appliance.store.weights import model_path
from engines import adapter_for
from engines.base import EngineAdapter


def engine_of(model: ModelConfig) -> EngineAdapter:
    """The adapter of the engine the model runs on."""
    return adapter_for(model.server)


def serves_tools(cfg: Config, model: ModelConfig) -> bool | None:
    """Whether the model's chat template renders tools. llama.cpp: read from its GGUF's
    tokenizer.chat_template (a template that never mentions tools drops them, and the
    model answers as if none were given); None where that is not known here (another
    engine decides itself, or the operator gave llama-server a template of their own)."""
    if model.server != "llamacpp" or any(a.startswith("--chat-template") for a in model.args):
        return None
    path = model_path(cfg, model)
    try:
        st = path.stat() if path is not None else None
    except OSError:
        return None
    if path is None or st is None:
        return None
    return _template_mentions_tools(str(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _template_mentions_tools(path: str, size: int, mtime_ns: int) -> bool | None:
    try:
        template = gguf.read(path).metadata.get("tokenizer.chat_template")
    except gguf.GgufError:
        return None
    return "tools" in template if isinstance(template, str) else None
