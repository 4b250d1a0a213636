"""What a model's engine serves, for the gateway's capability checks: the fleet owns the
engine adapters, so the gateway asks here (the endpoints an adapter declares, whether it
keeps Responses) and never imports engines itself."""

from appliance.config import ModelConfig
from engines import adapter_for
from engines.base import EngineAdapter


def engine_of(model: ModelConfig) -> EngineAdapter:
    """The adapter of the engine the model runs on."""
    return adapter_for(model.server)
