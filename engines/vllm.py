"""vLLM's OpenAI server on GPUs, from the pinned environment in images/vllm.

Every flag emitted here exists in the pinned version: tests check the argv
against images/vllm/flags-<version>.txt, taken from vLLM's own parser.

vLLM's API key (VLLM_API_KEY) guards only the paths under /v1: /invocations,
/pooling, /tokenize, /metrics and the dev-mode /sleep, /wake_up and
/collective_rpc answer anyone who reaches the port. So a replica listens on a
unix socket (--uds) in its private 0700 directory instead, where only the
daemon's user can connect, and keeps the key for /v1 as well. The daemon's user
includes every other engine (Landlock does not mediate connecting to a unix
socket), so vLLM also loads the appliance's guard (--middleware, from
engines/vllm_guard/ on PYTHONPATH), which wants the key on every path.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp

from engines.base import (
    CannotLaunch,
    GpuSlot,
    LaunchSpec,
    LocalEngine,
    Lora,
    ProbeFailed,
    gpu_engine_command,
    http_post,
    http_text,
    offline_env,
    one_token_completion,
    otlp_traces,
)
from engines.metrics import EngineLoad, parse_vllm

if TYPE_CHECKING:
    from appliance.config import Config, ModelConfig
    from appliance.fleet.engine_access import EngineAccess

# The guard vLLM loads (--middleware): the key on every path, not only /v1. Its directory
# holds it alone, so putting it on vLLM's PYTHONPATH adds no other module to vLLM.
GUARD_DIR = Path(__file__).resolve().parent / "vllm_guard"
GUARD_MIDDLEWARE = "appliance_engine_guard.EngineKeyGuard"


class VllmAdapter(LocalEngine):
    name = "vllm"
    gpu = True
    can_sleep = True
    unix_socket = True
    # vLLM's OpenAI server: Responses (stored with VLLM_ENABLE_RESPONSES_API_STORE),
    # pooling models' rerank and score, tokenize and detokenize, and Whisper-class
    # models' audio transcriptions and translations.
    endpoints = frozenset(
        {
            "chat",
            "completions",
            "embeddings",
            "responses",
            "tokenize",
            "detokenize",
            "rerank",
            "score",
            "transcriptions",
            "translations",
        }
    )
    responses_store = True  # in the replica's memory (VLLM_ENABLE_RESPONSES_API_STORE)
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
            raise ValueError(f"model '{model.name}': a vllm replica needs GPUs from the placer")
        command, image = gpu_engine_command(cfg, "vllm")
        argv = [
            *command,
            str(weights),
            "--served-model-name",
            model.name,
            "--uds",
            str(access.socket),
            "--tensor-parallel-size",
            str(slot.tp),
            "--gpu-memory-utilization",
            f"{slot.memory_fraction:.2f}",
            "--max-model-len",
            str(model.context_length),
            "--max-num-seqs",
            str(model.parallel),
            "--enable-prefix-caching",
            "--middleware",
            GUARD_MIDDLEWARE,
        ]
        if model.kv_cache_dtype != "auto":
            argv += ["--kv-cache-dtype", model.kv_cache_dtype]
        env = {
            **offline_env(cfg),
            "CUDA_VISIBLE_DEVICES": slot.cuda_visible_devices,
            "VLLM_NO_USAGE_STATS": "1",
            "VLLM_ENABLE_RESPONSES_API_STORE": "1",
        }
        if model.sleep_mode:
            argv.append("--enable-sleep-mode")
            env["VLLM_SERVER_DEV_MODE"] = "1"  # the /sleep and /wake_up endpoints live in dev mode
        traces = otlp_traces(cfg.telemetry, model)
        if traces is not None:  # its request spans join the gateway's traces (the traceparent it sends)
            argv += ["--otlp-traces-endpoint", traces[0]]
            env.update(traces[1])
        if loras:
            argv += lora_args(loras, "--lora-modules", "--max-loras")
            # /v1/load_lora_adapter and /v1/unload_lora_adapter: adapters added or removed
            # by a reload without a restart (appliance/fleet/lora.py). Under /v1, so behind
            # the replica's key, on its private socket.
            env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "1"
        argv += model.args
        guarded = {"VLLM_API_KEY": access.secret, "PYTHONPATH": guard_path(model.env.get("PYTHONPATH", ""))}
        return LaunchSpec(argv=argv, env={**env, **model.env, **guarded}, image=image)

    def base_url(self, model: ModelConfig, host: str, port: int) -> str:
        return "http://localhost"  # the Host header; the replica's session connects to its socket

    async def probe_ready(
        self, session: aiohttp.ClientSession, base_url: str, model: ModelConfig, timeout: float
    ) -> None:
        await one_token_completion(session, base_url, model.name, timeout)
        await guard_in_force(session, base_url, timeout)

    async def probe_health(self, session: aiohttp.ClientSession, base_url: str, timeout: float) -> EngineLoad | None:
        return parse_vllm(await http_text(session, f"{base_url}/metrics", timeout))

    async def sleep(self, session: aiohttp.ClientSession, base_url: str, timeout: float) -> None:
        """Level 1: weights offloaded to host RAM, KV cache dropped, GPU memory freed."""
        await http_post(session, f"{base_url}/sleep?level=1", timeout)

    async def wake(self, session: aiohttp.ClientSession, base_url: str, timeout: float) -> None:
        await http_post(session, f"{base_url}/wake_up", timeout)

    async def load_lora(self, session: aiohttp.ClientSession, base_url: str, lora: Lora, timeout: float) -> None:
        """Serve one more adapter in a running replica (launched with LoRA on: lora_args)."""
        await _lora_call(
            session, f"{base_url}/v1/load_lora_adapter", {"lora_name": lora.name, "lora_path": str(lora.path)}, timeout
        )

    async def unload_lora(self, session: aiohttp.ClientSession, base_url: str, name: str, timeout: float) -> None:
        await _lora_call(session, f"{base_url}/v1/unload_lora_adapter", {"lora_name": name}, timeout)


def guard_path(model_pythonpath: str) -> str:
    """vLLM's PYTHONPATH: the guard's directory first, then the model's own entries (its
    env's PYTHONPATH), so no module of theirs can stand in for the guard."""
    return os.pathsep.join(p for p in (str(GUARD_DIR), model_pythonpath) if p)


async def guard_in_force(session: aiohttp.ClientSession, base_url: str, timeout: float) -> None:
    """/metrics (outside /v1, which vLLM's own key guards) must refuse a request without
    the key, on the replica's own socket; a replica that answers it does not run the guard
    and is not started (CannotLaunch: FATAL, with the fix)."""
    # The replica's connection (its unix socket), without the session's key header.
    async with aiohttp.ClientSession(connector=session.connector, connector_owner=False) as anonymous:
        try:
            async with anonymous.get(f"{base_url}/metrics", timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                status = resp.status
        except (TimeoutError, aiohttp.ClientError, OSError):
            return  # no answer at all: the health checks deal with an engine that is gone
    if status not in (401, 403):
        raise CannotLaunch(
            f"vLLM answered GET /metrics sent without its key (HTTP {status}): the appliance's guard "
            f"(--middleware {GUARD_MIDDLEWARE}, from {GUARD_DIR} on PYTHONPATH) is not in force, so any "
            "other engine could call its non-/v1 paths; an engines.vllm.command must keep the "
            "arguments and the environment it is given (docs/operations.md)"
        )


async def _lora_call(session: aiohttp.ClientSession, url: str, body: dict, timeout: float) -> None:
    """vLLM's runtime LoRA endpoints: ProbeFailed, saying why, unless they answer 200."""
    try:
        async with session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            text = await resp.text()
            if resp.status != 200:
                raise ProbeFailed(f"POST {url} answered {resp.status}: {text[:200]!r}")
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        raise ProbeFailed(f"POST {url} failed: {type(exc).__name__}: {exc}") from None


# The ranks vLLM and SGLang size their LoRA buffers for (--max-lora-rank's choices).
LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def lora_args(loras: tuple[Lora, ...], paths_flag: str, count_flag: str) -> list[str]:
    """LoRA serving on: each adapter as NAME=PATH (the name clients request), room for
    all of them in one batch, and buffers for the largest rank among them (the engine's
    default of 16 where none says)."""
    argv = ["--enable-lora", count_flag, str(len(loras))]
    rank = max(lora.rank for lora in loras)
    if rank > 0:
        argv += ["--max-lora-rank", str(next((r for r in LORA_RANKS if r >= rank), rank))]
    return [*argv, paths_flag, *(f"{lora.name}={lora.path}" for lora in loras)]
