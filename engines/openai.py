"""Any OpenAI-compatible server: launched from a command template, or external.

A command template is supervised like any engine; ``{port}``, ``{host}``,
``{model_path}``, ``{model_name}`` and ``{api_key_file}`` are filled in per
replica. The replica's key is in $ENGINE_API_KEY and in the 0600 file
{api_key_file}: the server must refuse requests without it, or the replica is
not started (base.refuses_anonymous). An external URL is only health-checked:
the appliance neither starts nor stops it, and sends it no key.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import aiohttp

from appliance.config import tasks_of
from engines.base import (
    CHAT,
    COMPLETIONS,
    EMBEDDINGS,
    GpuSlot,
    LaunchSpec,
    Lora,
    http_ok,
    one_token_generation,
    refuses_anonymous,
)
from engines.metrics import EngineLoad

if TYPE_CHECKING:
    from pathlib import Path

    from appliance.config import Config, ModelConfig
    from appliance.fleet.engine_access import EngineAccess

# The variable a supervised OpenAI-compatible server finds its key in.
KEY_VARIABLE = "ENGINE_API_KEY"


class OpenAIAdapter:
    name = "openai"
    gpu = False
    can_sleep = False
    unix_socket = False
    # Whatever the operator's server is: every endpoint, stored Responses (routed back
    # to the replica that made them; a server that keeps none says so itself); the
    # model's tasks narrow it.
    endpoints = frozenset(
        {
            "chat",
            "completions",
            "embeddings",
            "responses",
            "messages",
            "count_tokens",
            "tokenize",
            "detokenize",
            "infill",
            "rerank",
            "score",
            "transcriptions",
            "translations",
        }
    )
    responses_store = True
    lora = False  # an operator's own server: its adapters are its own business
    lora_blind: frozenset[str] = frozenset()

    def supervised(self, model: ModelConfig) -> bool:
        return not model.url

    def launch(
        self,
        cfg: Config,
        model: ModelConfig,
        weights: Path | None,
        host: str,
        port: int,
        slot: GpuSlot | None,
        access: EngineAccess,
        cpus: frozenset[int] = frozenset(),
        loras: tuple[Lora, ...] = (),
    ) -> LaunchSpec:
        fields = {
            "port": str(port),
            "host": host,
            "model_name": model.name,
            "model_path": str(weights) if weights else "",
            "api_key_file": str(access.key_file),
        }
        argv = [part.format_map(fields) for part in model.command] + model.args
        return LaunchSpec(argv=argv, env={**model.env, KEY_VARIABLE: access.secret})

    def base_url(self, model: ModelConfig, host: str, port: int) -> str:
        if model.url:
            return model.url.rstrip("/").removesuffix("/v1")
        return f"http://{host}:{port}"

    async def probe_ready(
        self, session: aiohttp.ClientSession, base_url: str, model: ModelConfig, timeout: float
    ) -> None:
        """Ready by what the server serves: its model.health_path answering 200; else
        /v1/models, then (for a chat model) a 1-token completion, or a 1-token chat
        completion from a chat-only server. A supervised server must then refuse a
        request without its key, on the path that answered."""
        path = None
        if model.health_path:
            await http_ok(session, f"{base_url}{model.health_path}", timeout)
        else:
            await http_ok(session, f"{base_url}/v1/models", timeout)
            if "chat" in tasks_of(model):
                path = await one_token_generation(session, base_url, model.name, timeout)
        if self.supervised(model):
            await refuses_anonymous(base_url, model.name, timeout, (path,) if path else (COMPLETIONS, CHAT, EMBEDDINGS))

    async def probe_health(self, session: aiohttp.ClientSession, base_url: str, timeout: float) -> EngineLoad | None:
        # /v1/models is the one endpoint every OpenAI-compatible server has.
        await http_ok(session, f"{base_url}/v1/models", timeout)
        return None
