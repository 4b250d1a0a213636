"""SGLang's OpenAI server on GPUs, from the pinned environment in images/sglang.

Prefix caching is SGLang's radix cache, on by default (never --disable-radix-cache).
Every flag emitted here exists in the pinned version (images/sglang/flags-*.txt).

SGLang reads its API key from --api-key only, so the key goes in a 0600 config
file in the replica's private directory (--config FILE.yaml, which SGLang merges
into its arguments in-process): never on the command line. With a key, SGLang
refuses everything but /health*, /ready* and /metrics (its load numbers) without it.
A model's own args must not carry a second --config.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import aiohttp

from engines.base import GpuSlot, LaunchSpec, LocalEngine, Lora, gpu_engine_command, http_text, offline_env
from engines.metrics import EngineLoad, parse_sglang
from engines.vllm import lora_args

if TYPE_CHECKING:
    from pathlib import Path

    from appliance.config import Config, ModelConfig
    from appliance.fleet.engine_access import EngineAccess


# The key's config file; JSON is YAML, and SGLang wants the .yaml suffix.
KEY_CONFIG = "sglang.yaml"


class SglangAdapter(LocalEngine):
    name = "sglang"
    gpu = True
    can_sleep = False
    # No audio transcriptions: the OpenAI endpoints SGLang's docs list stop at these.
    endpoints = frozenset({"chat", "completions", "embeddings", "responses", "rerank"})
    lora = True

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
        if slot is None:
            raise ValueError(f"model '{model.name}': an sglang replica needs GPUs from the placer")
        command, image = gpu_engine_command(cfg, "sglang")
        argv = [
            *command,
            "--model-path",
            str(weights),
            "--served-model-name",
            model.name,
            "--host",
            host,
            "--port",
            str(port),
            "--tp-size",
            str(slot.tp),
            "--mem-fraction-static",
            f"{slot.memory_fraction:.2f}",
            "--context-length",
            str(model.context_length),
            "--max-running-requests",
            str(model.parallel),
            "--enable-metrics",
            "--config",
            str(access.dir / KEY_CONFIG),
        ]
        if model.kv_cache_dtype not in ("auto", "bfloat16", "float16"):
            argv += ["--kv-cache-dtype", model.kv_cache_dtype]
        if loras:
            argv += lora_args(loras, "--lora-paths", "--max-loras-per-batch")
        argv += model.args
        env = {
            **offline_env(cfg),
            "CUDA_VISIBLE_DEVICES": slot.cuda_visible_devices,
            "SGLANG_DISABLE_REQUEST_LOGGING": "1",
        }
        return LaunchSpec(
            argv=argv, env={**env, **model.env}, image=image, files={KEY_CONFIG: json.dumps({"api-key": access.secret})}
        )

    async def probe_health(self, session: aiohttp.ClientSession, base_url: str, timeout: float) -> EngineLoad | None:
        return parse_sglang(await http_text(session, f"{base_url}/metrics", timeout))
