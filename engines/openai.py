"""Any OpenAI-compatible server: launched from a command template, or external.

A command template is supervised like any engine; ``{port}``, ``{host}``,
``{model_path}`` and ``{model_name}`` are filled in per replica. An external
URL is only health-checked: the appliance neither starts nor stops it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import aiohttp

from .base import GpuSlot, LaunchSpec, http_ok, one_token_completion
from .metrics import EngineLoad

if TYPE_CHECKING:
    from appliance.config import Config, ModelConfig


class OpenAIAdapter:
    name = "openai"
    gpu = False
    can_sleep = False

    def supervised(self, model: ModelConfig) -> bool:
        return not model.url

    def launch(self, cfg: Config, model: ModelConfig, host: str, port: int,
               slot: GpuSlot | None = None) -> LaunchSpec:
        from appliance.config import model_path

        path = model_path(cfg, model)
        fields = {"port": str(port), "host": host, "model_name": model.name,
                  "model_path": str(path) if path else ""}
        argv = [part.format_map(fields) for part in model.command] + model.args
        return LaunchSpec(argv=argv, env=dict(model.env))

    def base_url(self, model: ModelConfig, host: str, port: int) -> str:
        if model.url:
            return model.url.rstrip("/").removesuffix("/v1")
        return f"http://{host}:{port}"

    async def probe_ready(self, session: aiohttp.ClientSession, base_url: str, model: ModelConfig,
                          timeout: float) -> None:
        await one_token_completion(session, base_url, model.name, timeout)

    async def probe_health(self, session: aiohttp.ClientSession, base_url: str,
                           timeout: float) -> EngineLoad | None:
        # /v1/models is the one endpoint every OpenAI-compatible server has.
        await http_ok(session, f"{base_url}/v1/models", timeout)
        return None
