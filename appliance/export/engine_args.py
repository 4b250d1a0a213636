"""The engines' command-line flags for an exported deployment, one function per concern
(the server, the parallel layout, the memory budget). Every flag is one the pinned engine
accepts: tests parse these argvs with images/<engine>/flags-<version>.txt."""

from __future__ import annotations

import json
import math
from pathlib import PurePosixPath

from appliance.export.source import Source
from appliance.gpu.placement import fraction_percent
from engines.base import OFFLINE_ENV


def server_args(src: Source, model_dir: str, host: str | None, port: int | None) -> list[str]:
    """Which weights, under which name, and where the OpenAI API listens (None: a worker
    node, which serves no API)."""
    name = src.model.name
    argv = [model_dir] if src.engine.engine == "vllm" else ["--model-path", model_dir]
    argv += ["--served-model-name", name]
    if host is not None:
        argv += ["--host", host]
    if port is not None:
        argv += ["--port", str(port)]
    return argv


def parallel_args(src: Source, nnodes: int, rank: int | str, head: str, rendezvous_port: int) -> list[str]:
    """The tensor x pipeline layout and, over several nodes, how each finds the head
    (vLLM's multiprocessing backend: no Ray; SGLang's own rendezvous)."""
    s = src.shape
    if src.engine.engine == "vllm":
        argv = ["--tensor-parallel-size", str(s.tp), "--pipeline-parallel-size", str(s.pp)]
        if nnodes > 1:
            argv += [
                "--distributed-executor-backend",
                "mp",
                "--nnodes",
                str(nnodes),
                "--node-rank",
                str(rank),
                "--master-addr",
                head,
                "--master-port",
                str(rendezvous_port),
            ]
            if str(rank) != "0":
                argv.append("--headless")
        return argv
    argv = ["--tp-size", str(s.tp), "--pp-size", str(s.pp)]
    if nnodes > 1:
        argv += ["--nnodes", str(nnodes), "--node-rank", str(rank), "--dist-init-addr", f"{head}:{rendezvous_port}"]
    return argv


def sizing_args(src: Source) -> list[str]:
    """The memory model's budget, as the engine takes it: vLLM's KV cache in bytes per GPU
    (whatever the card's size), SGLang's static fraction of the assumed card and its KV pool
    in tokens; context, concurrency and prefix caching as on the box."""
    m, s = src.model, src.shape
    if src.engine.engine == "vllm":
        argv = [
            "--kv-cache-memory-bytes",
            str(math.ceil(src.estimate.kv_cache / s.gpus)),
            "--max-model-len",
            str(m.context_length),
            "--max-num-seqs",
            str(m.parallel),
            "--enable-prefix-caching",
        ]
        if m.kv_cache_dtype != "auto":
            argv += ["--kv-cache-dtype", m.kv_cache_dtype]
        return argv
    fraction = fraction_percent(s.bytes_per_gpu, src.node.gpu_bytes) / 100
    argv = [
        "--mem-fraction-static",
        f"{fraction:.2f}",
        "--max-total-tokens",
        str(src.kv_tokens),
        "--context-length",
        str(m.context_length),
        "--max-running-requests",
        str(m.parallel),
        "--enable-metrics",
    ]
    if m.kv_cache_dtype not in ("auto", "bfloat16", "float16"):
        argv += ["--kv-cache-dtype", m.kv_cache_dtype]
    return argv


ENGINE_ENV = {"vllm": {"VLLM_NO_USAGE_STATS": "1"}, "sglang": {"SGLANG_DISABLE_REQUEST_LOGGING": "1"}}


def engine_env(src: Source) -> dict[str, str]:
    """Offline and without telemetry, as on the box."""
    return {**OFFLINE_ENV, **ENGINE_ENV[src.engine.engine]}


LORA_FLAGS = {"vllm": "--lora-modules", "sglang": "--lora-paths"}


def split_lora(engine: str, args: list[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """The LoRA adapters a model's extra args name (NAME=PATH, or vLLM's JSON form), and the
    args without that flag and its values."""
    flag = LORA_FLAGS[engine]
    adapters: list[tuple[str, str]] = []
    rest: list[str] = []
    taking = False
    for arg in args:
        if arg == flag:
            taking = True
            continue
        if arg.startswith(flag + "="):
            taking, arg = True, arg[len(flag) + 1 :]
        elif arg.startswith("--"):
            taking = False
        if taking:
            adapters.append(_adapter(arg))
        else:
            rest.append(arg)
    return adapters, rest


def _adapter(value: str) -> tuple[str, str]:
    if value.startswith("{"):
        spec = json.loads(value)
        return str(spec["name"]), str(spec["path"])
    if "=" in value:
        name, path = value.split("=", 1)
        return name, path
    return PurePosixPath(value).name, value


def with_lora(engine: str, args: list[str], adapters: list[tuple[str, str]]) -> list[str]:
    """args naming these adapters (at their paths where the engine runs)."""
    if not adapters:
        return args
    enable = [] if "--enable-lora" in args else ["--enable-lora"]
    return [*args, *enable, LORA_FLAGS[engine], *(f"{name}={path}" for name, path in adapters)]
