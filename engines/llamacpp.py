"""llama.cpp's llama-server on CPU: parallel slots, continuous batching, prompt cache.

Its key comes from --api-key-file (never --api-key: argv is public); with a key,
llama-server refuses every endpoint but /health and /v1/health without it,
/metrics and /props included. /slots (the prompts in each slot) is off.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import aiohttp

from .base import GpuSlot, LaunchSpec, LocalEngine, http_text
from .metrics import EngineLoad, parse_llamacpp

if TYPE_CHECKING:
    from appliance.config import Config, ModelConfig
    from appliance.engine_access import EngineAccess


class LlamaCppAdapter(LocalEngine):
    name = "llamacpp"

    def launch(self, cfg: Config, model: ModelConfig, host: str, port: int,
               slot: GpuSlot | None, access: EngineAccess) -> LaunchSpec:
        from appliance.config import model_path

        path = model_path(cfg, model)
        threads = model.threads or max(1, os.cpu_count() or 1)
        argv = [
            cfg.engines.llamacpp.binary,
            "--model", str(path),
            "--alias", model.name,
            "--host", host,
            "--port", str(port),
            "--api-key-file", str(access.key_file),
            "--ctx-size", str(model.context_length),
            "--parallel", str(model.parallel),
            "--threads", str(threads),
            "--cont-batching",
            # Keep each slot's KV cache between requests and reuse shifted chunks of
            # it, so a conversation's next turn skips the prefill of its history.
            "--cache-prompt",
            "--cache-reuse", "256",
            "--metrics",
            "--no-slots",
            "--no-webui",
            "--offline",
            "--log-colors", "off",
        ]
        if model.embeddings:
            argv.append("--embeddings")
        argv += model.args
        # Never reach for a model hub: the appliance runs air-gapped.
        env = {"LLAMA_OFFLINE": "1", **model.env}
        return LaunchSpec(argv=argv, env=env)

    async def probe_health(self, session: aiohttp.ClientSession, base_url: str,
                           timeout: float) -> EngineLoad | None:
        # /metrics answers only while the server runs: one request, liveness and load.
        return parse_llamacpp(await http_text(session, f"{base_url}/metrics", timeout))
