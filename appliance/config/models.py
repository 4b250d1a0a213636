"""[[models]]: what a model is served from and how ([models.gpus], [models.autoscaling],
[[models.adapters]]), the bundled model, and what follows from one model's settings
(its tasks, its KV cache, whether it needs GPUs)."""

from __future__ import annotations

from typing import Literal

import msgspec

from appliance.config.durations import Duration
from appliance.config.sections import _Section

EMBEDDED_MODEL_NAME = "smollm2-135m-instruct"
EMBEDDED_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_MODEL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
BUILTIN_PREFIX = "builtin:"
STORE_PREFIX = "store:"

ServerKind = Literal["llamacpp", "openai", "vllm", "sglang"]
GPU_SERVERS = ("vllm", "sglang")  # always on GPUs; llamacpp when [models.gpus] count >= 1
# llama.cpp's --cache-type-k/-v values (appliance/store/gguf.py knows their sizes).
CACHE_TYPES = ("f16", "bf16", "f32", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl")


class GpuRequest(_Section):
    # A GPU family ("H100", "A100", "L40S", ...) every GPU of a replica must be, or "any".
    type: str = "any"
    # GPUs per replica (the tensor-parallel size); 0 = the smallest count that fits.
    count: int = 0


class Autoscaling(_Section):
    metric: Literal["rps"] = "rps"
    min_replicas: int = 1
    max_replicas: int = 1
    target_rps_per_replica: float = 4.0
    # Idle this long (no requests, nothing in flight): go to zero replicas. "" = the
    # global [autoscaling] idle_ttl; "0s" = never. A pinned model never idles out.
    scale_to_zero_after: Duration = Duration("")
    # vLLM with sleep_mode: put idle replicas to sleep after this ("0s" = never),
    # then to zero after scale_to_zero_after.
    sleep_after: Duration = Duration("0s")
    # Not evicted for another model within this long of loading; "" = [autoscaling] min_residency.
    min_residency: Duration = Duration("")


class ModelConfig(_Section):
    name: str
    server: ServerKind = "llamacpp"
    # A GGUF path, a directory, builtin:<name> for the bundled model, or store:<name>
    # for a model imported into the store (`appliance models import`).
    source: str = ""
    # openai engine: a command template ({port}, {host}, {model_path}, {model_name},
    # {api_key_file}) to supervise, which must refuse requests without the replica's key
    # ($ENGINE_API_KEY, or the file {api_key_file}); or the URL of an external server
    # that is only health-checked.
    command: list[str] = msgspec.field(default_factory=list)
    url: str = ""
    # openai engine: ready when a GET of this path (e.g. "/health") answers 200. Empty:
    # /v1/models, then a 1-token completion (a 1-token chat completion from a server
    # without /v1/completions).
    health_path: str = ""
    # Extra engine arguments and environment, appended after the adapter's own.
    args: list[str] = msgspec.field(default_factory=list)
    env: dict[str, str] = msgspec.field(default_factory=dict)
    # llama.cpp: parallel decode slots and total context (shared by the slots: each
    # request gets context_length / parallel tokens, prompt and answer together; all of it
    # with args = ["--kv-unified"]: request_context), or the
    # context each request gets (then context_length = context_per_request x parallel).
    parallel: int = 4
    context_length: int = 8192
    context_per_request: int = 0
    threads: int = 0
    embeddings: bool = False
    # What the model is for: "chat" (chat, completions, responses, messages, infill),
    # "embed" (embeddings), "rerank" (rerank, score), "transcribe" (audio transcriptions
    # and translations: a Whisper-class model on vLLM). Empty: ["chat"], plus "embed"
    # with embeddings = true. Other endpoints get a 400 (appliance/gateway/capabilities.py).
    tasks: list[str] = msgspec.field(default_factory=list)
    # GPU engines: KV-cache budget in tokens (0 = context_length x parallel), its
    # dtype ("auto" = the model's), engine overhead override (0 = the engine's),
    # and vLLM's sleep mode (a warm tier: weights to host RAM, GPU memory freed).
    kv_cache_tokens: int = 0
    kv_cache_dtype: Literal["auto", "fp8", "fp8_e4m3", "fp8_e5m2", "bfloat16", "float16"] = "auto"
    gpu_overhead_gib: float = 0.0
    sleep_mode: bool = False
    # A budgeted API key's request that sets no max_tokens is reserved for, and
    # capped at, this many completion tokens per choice; 0 = context_length (the
    # most the engine generates on its own).
    default_max_tokens: int = 0
    # llama.cpp's KV-cache types (--cache-type-k/-v): f16, bf16, q8_0, q4_0, ... A
    # quantized V cache needs FlashAttention (on by default where the GPU has it).
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    # When capacity runs out, a model's request may evict idle replicas of models of
    # the same or a lower priority, never of a higher one.
    priority: int = 0
    tags: list[str] = msgspec.field(default_factory=list)
    gpus: GpuRequest = msgspec.field(default_factory=GpuRequest)
    autoscaling: Autoscaling = msgspec.field(default_factory=Autoscaling)
    # LoRA adapters served by this model's replicas, each under its own model name
    # ([[models.adapters]], appliance/fleet/lora.py).
    adapters: list[LoraAdapterConfig] = msgspec.field(default_factory=list)


# --- LoRA adapters ([[models.adapters]]) ---------------------------------------------


class LoraAdapterConfig(_Section):
    # The model name clients request for the base model with this adapter applied.
    name: str
    # store:NAME (an adapter imported with `appliance models import`), or a path: a
    # PEFT directory (adapter_config.json + weights) for vllm and sglang, a LoRA GGUF
    # file for llamacpp; relative paths are under paths.cache_dir/models.
    source: str
    # A path adapter's license (SPDX): one not in store.allowed_licenses is not served;
    # "" = undeclared. A store adapter's license is its record's, gated like weights.
    license: str = ""


# The engines that serve LoRA adapters (engines/: vllm --lora-modules, sglang
# --lora-paths, llama-server --lora with per-request selection).
LORA_SERVERS = ("llamacpp", "vllm", "sglang")


def embedded_default_model() -> ModelConfig:
    return ModelConfig(
        name=EMBEDDED_MODEL_NAME,
        server="llamacpp",
        source=BUILTIN_PREFIX + EMBEDDED_MODEL_NAME,
        parallel=4,
        context_length=8192,
    )


def request_context(m: ModelConfig) -> int:
    """The tokens one request may use, prompt and answer together: on llama.cpp a slot's
    share of the context, unless its args unify the slots' KV cache (then any one slot
    may fill the whole of it)."""
    if m.server != "llamacpp" or _kv_unified(m.args):
        return m.context_length
    return m.context_length // m.parallel


# llama-server's switch for one KV cache its slots share (off when --parallel is given,
# as the adapter does); the last of these in a model's args is the one it reads.
_KV_UNIFIED = {"--kv-unified": True, "-kvu": True, "--no-kv-unified": False, "-no-kvu": False}


def _kv_unified(args: list[str]) -> bool:
    said = [_KV_UNIFIED[a] for a in args if a in _KV_UNIFIED]
    return bool(said) and said[-1]


# What a model can be for (tasks = [...]); the gateway's endpoints each need one of them.
TASKS = ("chat", "embed", "rerank", "transcribe")


def tasks_of(model: ModelConfig) -> tuple[str, ...]:
    """A model's tasks: as configured, else chat (and embed with embeddings = true)."""
    if model.tasks:
        return tuple(model.tasks)
    return ("chat", "embed") if model.embeddings else ("chat",)


def kv_tokens(model: ModelConfig) -> int:
    return model.kv_cache_tokens or model.context_length * model.parallel


def uses_gpus(model: ModelConfig) -> bool:
    """Replicas of this model need GPUs from the placer: vLLM and SGLang always, a GGUF
    model on llama.cpp when it asks for GPUs ([models.gpus] count >= 1); else the CPU."""
    return model.server in GPU_SERVERS or (model.server == "llamacpp" and model.gpus.count >= 1)
