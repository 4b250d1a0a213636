"""What the supervisor needs to know about an engine, one adapter per engine.

An adapter is pure: it turns a model deployment into a launch spec (argv, env, files)
and says how to tell that a replica is ready and healthy. The supervisor does
the spawning, the waiting and the restarting.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import aiohttp

from engines.metrics import EngineLoad

if TYPE_CHECKING:
    from appliance.config import Config, ModelConfig, TelemetryConfig
    from appliance.fleet.engine_access import EngineAccess


class ProbeFailed(Exception):
    """A readiness or health probe got no good answer; the message says why."""


class CannotLaunch(Exception):
    """The engine cannot be started at all (no image built, say): the replica goes FATAL
    at once with this one-line reason, which names the fix; no crash loop."""


@dataclass(frozen=True)
class LaunchSpec:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    image: str = ""  # the engine image (<version>-<hash>) the argv runs from, if any
    # Files (name -> text) written 0600 into the replica's private directory before it
    # starts: what must not be on the command line.
    files: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Lora:
    """A LoRA adapter a replica loads beside its weights, served under its own model
    name: resolved and checked by the appliance (appliance/fleet/lora.py); rank 0
    where the adapter does not say (a GGUF carries it in its tensors' shapes)."""

    name: str
    path: Path
    rank: int = 0


@dataclass(frozen=True)
class GpuSlot:
    """Where the placer put a GPU replica: which GPUs, and its share of each."""

    gpus: tuple[int, ...]
    memory_fraction: float
    uuids: tuple[str, ...] = ()  # NVML's UUIDs of those GPUs, where the probe knows them
    bytes_per_gpu: int = 0  # what the placer reserved on each (0: memory_fraction of the card)

    @property
    def tp(self) -> int:
        return len(self.gpus)

    @property
    def cuda_visible_devices(self) -> str:
        return ",".join(str(g) for g in self.gpus)

    @property
    def cuda_visible_uuids(self) -> str:
        """CUDA_VISIBLE_DEVICES by UUID: CUDA numbers GPUs fastest first, NVML by PCI bus, so
        an index can name another card; a UUID cannot. Indices where UUIDs are unknown."""
        return ",".join(self.uuids) if len(self.uuids) == len(self.gpus) else self.cuda_visible_devices


class EngineAdapter(Protocol):
    name: str
    gpu: bool  # replicas need GPUs from the placer
    can_sleep: bool  # sleep()/wake() exist (vLLM's sleep mode)
    unix_socket: bool  # listens on access.socket, not host:port
    # The proxy endpoints it serves (appliance/gateway/capabilities.py names them), and
    # whether it keeps Responses (store, previous_response_id) for a later request.
    endpoints: frozenset[str]
    responses_store: bool
    lora: bool  # serves LoRA adapters (launch's loras) under their own names
    lora_blind: frozenset[str]  # endpoints on which it cannot apply an adapter per request

    def supervised(self, model: ModelConfig) -> bool:
        """False for an external server the appliance only health-checks."""

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
        """argv and extra environment for one replica of model, loading weights (resolved by
        the appliance; None for an engine that brings its own), listening on host:port
        (on the GPUs of slot, for GPU engines), refusing every request without
        access.secret, which never appears in argv (appliance/fleet/engine_access.py); a CPU
        replica runs one thread per core in cpus (the supervisor's share of the CPU budget);
        loras: the LoRA adapters it serves, each under its own name (engines with lora)."""

    def base_url(self, model: ModelConfig, host: str, port: int) -> str:
        """Where the replica's OpenAI API lives (without the /v1)."""

    async def probe_ready(
        self, session: aiohttp.ClientSession, base_url: str, model: ModelConfig, timeout: float
    ) -> None:
        """Return once the replica answered a real request; raise ProbeFailed otherwise."""

    async def probe_health(self, session: aiohttp.ClientSession, base_url: str, timeout: float) -> EngineLoad | None:
        """Cheap periodic liveness check of a READY replica, with the engine's load
        where it exposes one; raise ProbeFailed when unhealthy."""


@runtime_checkable
class SleepingEngine(Protocol):
    """What an adapter with can_sleep adds: free a READY replica's GPU memory and bring it back."""

    async def sleep(self, session: aiohttp.ClientSession, base_url: str, timeout: float) -> None: ...

    async def wake(self, session: aiohttp.ClientSession, base_url: str, timeout: float) -> None: ...


COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
# What a server without an endpoint answers (a chat-only server has no /v1/completions).
ABSENT = (404, 405, 501)


async def one_token_completion(session: aiohttp.ClientSession, base_url: str, model_name: str, timeout: float) -> None:
    """Readiness is a real 1-token completion answered, not an open port."""
    status, payload = await _one_token(session, base_url, COMPLETIONS, model_name, timeout)
    if status != 200:
        raise ProbeFailed(f"1-token completion answered {status}: {payload[:200]!r}")


async def one_token_generation(session: aiohttp.ClientSession, base_url: str, model_name: str, timeout: float) -> str:
    """A 1-token completion or, from a server without /v1/completions (many
    OpenAI-compatible servers are chat-only), a 1-token chat completion; the path
    that answered."""
    status, payload = await _one_token(session, base_url, COMPLETIONS, model_name, timeout)
    if status == 200:
        return COMPLETIONS
    if status not in ABSENT:
        raise ProbeFailed(f"1-token completion answered {status}: {payload[:200]!r}")
    chat_status, chat_payload = await _one_token(session, base_url, CHAT, model_name, timeout)
    if chat_status != 200:
        raise ProbeFailed(
            f"no /v1/completions (HTTP {status}), and a 1-token chat completion answered "
            f"{chat_status}: {chat_payload[:200]!r}"
        )
    return CHAT


EMBEDDINGS = "/v1/embeddings"


def _one_token_body(path: str, model_name: str) -> dict:
    if path == CHAT:
        return {"model": model_name, "messages": [{"role": "user", "content": "ok"}], "max_tokens": 1, "temperature": 0}
    if path == EMBEDDINGS:
        return {"model": model_name, "input": "ok"}
    return {"model": model_name, "prompt": "ok", "max_tokens": 1, "temperature": 0}


async def _one_token(
    session: aiohttp.ClientSession, base_url: str, path: str, model_name: str, timeout: float
) -> tuple[int, bytes]:
    try:
        async with session.post(
            f"{base_url}{path}", json=_one_token_body(path, model_name), timeout=aiohttp.ClientTimeout(total=timeout)
        ) as resp:
            return resp.status, await resp.read()
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        raise ProbeFailed(
            f"1-token {'chat ' if path == CHAT else ''}completion failed: {type(exc).__name__}: {exc}"
        ) from None


async def refuses_anonymous(
    base_url: str, model_name: str, timeout: float, paths: tuple[str, ...] = (COMPLETIONS,)
) -> None:
    """The engine must refuse a request without its secret; one that answers anyone is
    not started (CannotLaunch: FATAL, with the fix). Tried on each of paths in turn
    while the server has no such endpoint (404/405/501); one that has none of them
    cannot be checked, so it is not started either."""
    async with aiohttp.ClientSession() as anonymous:
        for path in paths:
            try:
                async with anonymous.post(
                    f"{base_url}{path}",
                    json=_one_token_body(path, model_name),
                    timeout=aiohttp.ClientTimeout(total=timeout),
                ) as resp:
                    status = resp.status
            except (TimeoutError, aiohttp.ClientError, OSError):
                return  # no answer at all: the health checks deal with an engine that is gone
            if status in (401, 403):
                return
            if status not in ABSENT:
                raise CannotLaunch(
                    f"the engine answered a request to {path} sent without its key (HTTP {status}): it "
                    "does not enforce the per-replica key, so any local user could bypass the "
                    'appliance; a server = "openai" command must read $ENGINE_API_KEY or '
                    "--api-key-file {api_key_file} (docs/operations.md)"
                )
    raise CannotLaunch(
        f"the engine has none of {', '.join(paths)}, so whether it refuses requests without its "
        "key cannot be checked; serve one of them behind the key (docs/operations.md)"
    )


async def http_ok(session: aiohttp.ClientSession, url: str, timeout: float) -> None:
    await http_text(session, url, timeout)


async def http_text(session: aiohttp.ClientSession, url: str, timeout: float) -> str:
    return await _request(session, "GET", url, timeout)


async def http_post(session: aiohttp.ClientSession, url: str, timeout: float) -> None:
    await _request(session, "POST", url, timeout)


async def _request(session: aiohttp.ClientSession, method: str, url: str, timeout: float) -> str:
    """The body of a 200 answer; ProbeFailed (saying why) for anything else."""
    try:
        async with session.request(method, url, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            body = await resp.text()
            if resp.status != 200:
                raise ProbeFailed(f"{method} {url} answered {resp.status}: {body[:200]!r}")
            return body
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        raise ProbeFailed(f"{method} {url} failed: {type(exc).__name__}: {exc}") from None


class LocalEngine:
    """What every engine the appliance launches on 127.0.0.1 shares: supervised,
    reached at http://host:port, ready once a real 1-token completion answers."""

    name = ""
    gpu = False
    can_sleep = False
    unix_socket = False
    endpoints: frozenset[str] = frozenset({"chat", "completions", "embeddings"})
    responses_store = False
    lora = False
    lora_blind: frozenset[str] = frozenset()

    def supervised(self, model: ModelConfig) -> bool:
        return True

    def base_url(self, model: ModelConfig, host: str, port: int) -> str:
        return f"http://{host}:{port}"

    async def probe_ready(
        self, session: aiohttp.ClientSession, base_url: str, model: ModelConfig, timeout: float
    ) -> None:
        await one_token_completion(session, base_url, model.name, timeout)
        await refuses_anonymous(base_url, model.name, timeout)


def gpu_engine_command(cfg: Config, engine: str) -> tuple[list[str], str]:
    """[engines.<engine>] command, else the current image's entry point; and its image tag."""
    from appliance.dist.images import ImageError
    from appliance.dist.images import gpu_engine_command as command

    try:
        return command(engine, cfg)
    except ImageError as exc:
        raise CannotLaunch(str(exc)) from None


# Air-gapped: no hub, no telemetry (also what `appliance export` gives engines elsewhere).
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
}


def offline_env(cfg: Config) -> dict[str, str]:
    """Air-gapped, reading the store's hub cache, which engines may only read
    (appliance/fleet/landlock.py). HF_HOME, where Hugging Face writes (its modules cache
    of trust_remote_code code), is left to its default under the replica's own HOME:
    code one engine leaves there is loaded by no other."""
    return {**OFFLINE_ENV, "HF_HUB_CACHE": f"{cfg.paths.cache_dir}/hf/hub"}


def otlp_traces(telemetry: TelemetryConfig, model: ModelConfig) -> tuple[str, dict[str, str]] | None:
    """Where an engine that traces sends its spans when [telemetry] is on: the
    appliance's own collector (OTLP/HTTP), as its traces endpoint and the standard
    OTEL_* environment; the engine continues the traceparent the gateway sends it.
    None when telemetry is off (the engine traces nothing)."""
    from urllib.parse import quote

    from appliance.config import traces_url

    if not telemetry.otlp_endpoint:
        return None
    env = {
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
        "OTEL_SERVICE_NAME": f"{telemetry.service_name}-{model.server}",
        "OTEL_RESOURCE_ATTRIBUTES": f"appliance.model={quote(model.name, safe='')}",
    }
    if telemetry.headers:
        env["OTEL_EXPORTER_OTLP_TRACES_HEADERS"] = ",".join(
            f"{name}={quote(value, safe='')}" for name, value in telemetry.headers.items()
        )
    return traces_url(telemetry), env
