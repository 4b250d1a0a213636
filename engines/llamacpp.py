"""llama.cpp's llama-server: parallel slots, continuous batching, prompt cache; on the CPU,
or with every layer on the GPUs the placer chose (the CUDA build, `llamacpp-cuda`).

Its key comes from --api-key-file (never --api-key: argv is public); with a key,
llama-server refuses every endpoint but /health and /v1/health without it,
/metrics and /props included. /slots (the prompts in each slot) is off.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import aiohttp

from engines.base import CannotLaunch, GpuSlot, LaunchSpec, LocalEngine, Lora, http_text
from engines.metrics import EngineLoad, parse_llamacpp

if TYPE_CHECKING:
    from pathlib import Path

    from appliance.config import Config, ModelConfig
    from appliance.fleet.engine_access import EngineAccess

# With every layer on the GPU, the CPU threads only sample and schedule.
GPU_THREADS = 2


class LlamaCppAdapter(LocalEngine):
    name = "llamacpp"
    # What the pinned llama-server answers (checked by tests/test_e2e_dialects.py);
    # rerank needs --reranking, embeddings --embeddings: added for the model's tasks.
    # No /v1/audio/transcriptions: llama-server has no such endpoint.
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
        }
    )
    lora = True
    # Endpoints that apply no per-request "lora" field (llama-server reads it only for
    # completions, chat, responses and infill): an adapter's name is refused there.
    lora_blind = frozenset({"messages", "embeddings", "rerank"})

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
        from appliance.config import tasks_of
        from appliance.dist.images import image_of, llamacpp_binary

        binary = cuda_binary(cfg) if slot is not None else llamacpp_binary(cfg)
        if slot is not None:
            threads = model.threads or GPU_THREADS
        else:  # exactly the cores the supervisor budgeted, and is bound to (launched alone: all ours)
            threads = len(cpus) or model.threads or max(1, len(os.sched_getaffinity(0)))
        argv = [
            binary,
            "--model",
            str(weights),
            "--alias",
            model.name,
            "--host",
            host,
            "--port",
            str(port),
            "--api-key-file",
            str(access.key_file),
            "--ctx-size",
            str(model.context_length),
            "--parallel",
            str(model.parallel),
            "--threads",
            str(threads),
            "--cont-batching",
            # Keep each slot's KV cache between requests and reuse shifted chunks of
            # it, so a conversation's next turn skips the prefill of its history.
            "--cache-prompt",
            "--cache-reuse",
            "256",
            "--metrics",
            "--no-slots",
            "--no-webui",
            "--offline",
            "--log-colors",
            "off",
        ]
        if (model.cache_type_k, model.cache_type_v) != ("f16", "f16"):
            argv += ["--cache-type-k", model.cache_type_k, "--cache-type-v", model.cache_type_v]
        # Never reach for a model hub: the appliance runs air-gapped.
        env = {"LLAMA_OFFLINE": "1"}
        if slot is not None:
            # Every layer on the placer's GPUs, split by layer across several; --fit off:
            # llama.cpp must not shrink the context to what is free (the placer sized it).
            argv += ["--n-gpu-layers", "all", "--split-mode", "layer" if slot.tp > 1 else "none", "--fit", "off"]
            env["CUDA_VISIBLE_DEVICES"] = slot.cuda_visible_uuids
        tasks = tasks_of(model)
        if "embed" in tasks:
            argv.append("--embeddings")
            if "chat" in tasks and "--pooling" not in model.args:
                # A chat model's GGUF declares no pooling, and llama-server refuses
                # OpenAI embeddings without one ("Pooling type 'none' is not OAI
                # compatible"); mean pooling serves both. A dedicated embedding model
                # (tasks = ["embed"]) keeps the pooling its GGUF declares.
                argv += ["--pooling", "mean"]
        if "rerank" in tasks:
            argv.append("--reranking")
        if loras:
            # Adapter i is id i in a request's "lora" field. Loaded at scale 0: a request
            # that selects none (and the endpoints that cannot: lora_blind) gets the base
            # model, never every adapter at once (--lora's default scale is 1, and
            # --lora-init-without-apply leaves the slots' scales at 1). One comma-separated
            # list: a repeated flag keeps only its last value.
            argv += ["--lora-scaled", ",".join(f"{lora.path}:0" for lora in loras)]
        argv += model.args
        return LaunchSpec(argv=argv, env={**env, **model.env}, image=image_of(binary))

    async def probe_health(self, session: aiohttp.ClientSession, base_url: str, timeout: float) -> EngineLoad | None:
        # /metrics answers only while the server runs: one request, liveness and load.
        return parse_llamacpp(await http_text(session, f"{base_url}/metrics", timeout))


def cuda_binary(cfg: Config) -> str:
    """[engines.llamacpp] cuda_binary, else the current llamacpp-cuda image's llama-server;
    CannotLaunch naming the fix when there is neither."""
    from appliance.dist.images import images_dir, llama_server

    if cfg.engines.llamacpp.cuda_binary:
        return cfg.engines.llamacpp.cuda_binary
    binary = llama_server(cfg.images.dir, engine="llamacpp-cuda")
    if binary is None:
        raise CannotLaunch(
            f"no llamacpp-cuda engine image in {images_dir(cfg) / 'llamacpp-cuda'}: run `appliance images "
            "build llamacpp-cuda` (it needs the CUDA toolkit: nvcc), set engines.llamacpp.cuda_binary, "
            "or remove [models.gpus] to serve this model on the CPU"
        )
    return str(binary)


def lora_selection(loras: tuple[str, ...], chosen: str | None) -> list[dict[str, float | int]]:
    """llama-server's per-request "lora" field: the adapter named chosen (its --lora
    index) at scale 1, every other one at 0 (None: the base model alone). Every id is
    set, so whatever a client sent in the field is replaced, never merged."""
    return [{"id": i, "scale": 1.0 if name == chosen else 0.0} for i, name in enumerate(loras)]
