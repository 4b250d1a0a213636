"""How much GPU memory one replica of a model needs, per GPU, at each
tensor-parallel size:

    per GPU = weights / tp + KV-cache budget / tp + engine overhead

- weights: the bytes of the model's weight files (safetensors, bin, pt);
- KV cache: tokens x layers x KV heads x head size x 2 (K and V) x dtype bytes,
  with the shape read from the model's config.json;
- overhead: CUDA context, activations, CUDA graphs; per engine, from config.

Tensor-parallel sizes offered are those that divide the attention heads (and the
KV heads) and are at most the number of GPUs. Once a replica is running, NVML's
per-process memory replaces the estimate for later placements of that model.

A GGUF model on llama.cpp (``estimate_gguf``) is sized from its file's header
instead (appliance/store/gguf.py): the tensors' bytes, a KV cache of ``context_length``
tokens (llama-server's --ctx-size is the total its slots share) at the chosen
--cache-type-k/-v, and the compute buffers llama.cpp allocates for a 512-token
micro-batch, on top of the engine's overhead (CUDA context, cuBLAS).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

GiB = 1024**3
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
DTYPE_BYTES = {
    "float32": 4,
    "float": 4,
    "fp32": 4,
    "bfloat16": 2,
    "float16": 2,
    "half": 2,
    "bf16": 2,
    "fp16": 2,
    "fp8": 1,
    "fp8_e4m3": 1,
    "fp8_e5m2": 1,
    "int8": 1,
}


class ModelShapeError(Exception):
    """The model's files do not say enough to size it; the message says what is missing."""


@dataclass(frozen=True)
class ModelShape:
    layers: int
    attention_heads: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int

    def kv_bytes_per_token(self, kv_dtype_bytes: int | None = None) -> int:
        per = kv_dtype_bytes or self.dtype_bytes
        return self.layers * self.kv_heads * self.head_dim * 2 * per


def read_shape(model_dir: Path) -> ModelShape:
    path = model_dir / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelShapeError(f"{path} not found: cannot size the KV cache") from None
    except ValueError as exc:
        raise ModelShapeError(f"{path}: not valid JSON ({exc})") from None
    cfg = cfg.get("text_config", cfg)  # multimodal configs nest the language model
    try:
        layers = int(cfg["num_hidden_layers"])
        heads = int(cfg["num_attention_heads"])
    except (KeyError, TypeError, ValueError):
        raise ModelShapeError(f"{path}: needs num_hidden_layers and num_attention_heads") from None
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or int(cfg.get("hidden_size", 0)) // heads)
    if head_dim <= 0:
        raise ModelShapeError(f"{path}: needs head_dim or hidden_size")
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16").replace("torch.", "")
    return ModelShape(layers, heads, kv_heads, head_dim, DTYPE_BYTES.get(dtype, 2))


def weight_bytes(model_dir: Path) -> int:
    """Bytes of the weight files (links followed: a hub snapshot is links to blobs)."""
    total = sum(p.stat().st_size for p in model_dir.rglob("*") if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    if total == 0:
        raise ModelShapeError(f"{model_dir}: no weight files ({', '.join(WEIGHT_SUFFIXES)})")
    return total


def tp_sizes(shape: ModelShape, gpu_count: int) -> list[int]:
    """Tensor-parallel sizes the engines accept for this model on up to gpu_count GPUs."""
    return [
        tp
        for tp in (1, 2, 4, 8, 16)
        if tp <= gpu_count
        and shape.attention_heads % tp == 0
        and (shape.kv_heads % tp == 0 or tp % shape.kv_heads == 0)
    ]


def per_gpu_bytes(weights: int, kv_cache: int, overhead: int, gpus: int) -> int:
    """Each GPU's share when the model is split over `gpus` GPUs (tensor and pipeline
    stages alike): its slice of the weights and of the KV cache, plus the engine's overhead."""
    return math.ceil(weights / gpus) + math.ceil(kv_cache / gpus) + overhead


@dataclass(frozen=True)
class Estimate:
    weights: int
    kv_cache: int
    overhead: int
    per_gpu: dict[int, int]  # tp -> bytes on each GPU
    measured: bool = False

    def describe(self, tp: int) -> str:
        src = "measured" if self.measured else "estimated"
        return (
            f"{src} {self.per_gpu[tp] / GiB:.1f} GiB/GPU at tp={tp} "
            f"(weights {self.weights / GiB:.1f} GiB + KV {self.kv_cache / GiB:.1f} GiB "
            f"over {tp} GPU(s) + overhead {self.overhead / GiB:.1f} GiB)"
        )


def estimate(
    model_dir: Path,
    kv_tokens: int,
    overhead_bytes: int,
    gpu_count: int,
    kv_dtype_bytes: int | None = None,
    fixed_tp: int | None = None,
) -> Estimate:
    shape = read_shape(model_dir)
    weights = weight_bytes(model_dir)
    kv = kv_tokens * shape.kv_bytes_per_token(kv_dtype_bytes)
    sizes = [fixed_tp] if fixed_tp else tp_sizes(shape, max(gpu_count, 1))
    if not sizes:
        raise ModelShapeError(
            f"{model_dir}: no tensor-parallel size up to {gpu_count} divides {shape.attention_heads} attention heads"
        )
    per_gpu = {tp: per_gpu_bytes(weights, kv, overhead_bytes, tp) for tp in sizes}
    return Estimate(weights=weights, kv_cache=kv, overhead=overhead_bytes, per_gpu=per_gpu)


# llama.cpp's default micro-batch (--ubatch-size): its compute buffers scale with it.
LLAMACPP_UBATCH = 512


def estimate_gguf(
    path: Path, context_length: int, cache_type_k: str, cache_type_v: str, overhead_bytes: int, gpus: int
) -> Estimate:
    """Per-GPU bytes of a llama.cpp replica with every layer offloaded to ``gpus`` GPUs
    (--split-mode layer: each holds its share of the layers and their KV cache).

    On an H200 with CUDA 13, NVML's figure per replica was 0.58 GiB + weights + KV +
    these compute buffers, within 2.2%, for 3.4 MiB to 0.7 GiB of weights and 4k to
    128k tokens of context (docs/gpu.md):
      - logits and activations of a micro-batch: 512 x 4 bytes x (vocab + 4 x max(ff, embd));
      - a quantized K or V cache: one layer's K and V dequantized to f16 for attention.
    """
    from appliance.store.gguf import CACHE_TYPE_BYTES, GgufError, read_shape

    try:
        shape = read_shape(path)
    except GgufError as exc:
        raise ModelShapeError(f"{path}: {exc}") from None
    tokens = -(-context_length // 256) * 256  # llama.cpp pads the context to 256 cells
    kv = math.ceil(tokens * shape.kv_bytes_per_token(cache_type_k, cache_type_v))
    compute = LLAMACPP_UBATCH * 4 * (shape.vocab + 4 * max(shape.feed_forward, shape.embedding))
    if CACHE_TYPE_BYTES[cache_type_k] < 2 or CACHE_TYPE_BYTES[cache_type_v] < 2:
        compute += tokens * max(shape.kv_heads) * (shape.key_length + shape.value_length) * 2
    weights = shape.tensor_bytes
    overhead = overhead_bytes + compute
    per_gpu = {gpus: math.ceil(weights / gpus) + math.ceil(kv / gpus) + overhead}
    return Estimate(weights=weights, kv_cache=kv, overhead=overhead, per_gpu=per_gpu)


class MeasuredMemory:
    """Per-GPU bytes that running replicas actually used, by (model, tp), from NVML.
    Later placements of the same model use the measured figure."""

    def __init__(self) -> None:
        self._by_model: dict[tuple[str, int], int] = {}

    def observe(self, model: str, tp: int, bytes_per_gpu: int) -> None:
        if bytes_per_gpu > 0:
            self._by_model[(model, tp)] = bytes_per_gpu

    def correct(self, model: str, est: Estimate) -> Estimate:
        measured = {tp: self._by_model[(model, tp)] for tp in est.per_gpu if (model, tp) in self._by_model}
        if not measured:
            return est
        return Estimate(est.weights, est.kv_cache, est.overhead, {**est.per_gpu, **measured}, measured=True)


# --- beyond one box ------------------------------------------------------------

MAX_NODES = 64


@dataclass(frozen=True)
class NodeShape:
    """One replica of a model over `nodes` machines of `gpus_per_node` GPUs each: `pp`
    pipeline stages of `tp` GPUs (a stage never spans two machines), `bytes_per_gpu` each."""

    nodes: int
    gpus_per_node: int
    tp: int
    pp: int
    bytes_per_gpu: int

    @property
    def gpus(self) -> int:
        return self.tp * self.pp

    def describe(self) -> str:
        nodes = f"{self.nodes} node{'s' if self.nodes > 1 else ''}"
        return (
            f"{nodes} x {self.gpus_per_node} GPUs (tp={self.tp} x pp={self.pp}), {self.bytes_per_gpu / GiB:.1f} GiB/GPU"
        )


def smallest_shape(
    shape: ModelShape,
    est: Estimate,
    gpus_per_node: int,
    gpu_bytes: int,
    *,
    fixed_tp: int | None = None,
    nodes: int | None = None,
    max_nodes: int = MAX_NODES,
) -> NodeShape | None:
    """The fewest machines of `gpus_per_node` GPUs of `gpu_bytes` each that hold one replica,
    by the same memory model as one box (weights + KV budget over the GPUs, plus overhead on
    each), or exactly `nodes` of them; None when none does. On one machine: the smallest
    tensor-parallel size that fits, as the placer picks. Across machines: whole machines,
    the largest tensor-parallel size on each (the fewest pipeline stages, which cost
    latency), the stages spread evenly (vLLM's and SGLang's multi-node layout)."""
    sizes = [tp for tp in ([fixed_tp] if fixed_tp else tp_sizes(shape, gpus_per_node)) if tp <= gpus_per_node]
    for n in [nodes] if nodes else range(1, max_nodes + 1):
        found = (_one_machine(est, sizes, gpu_bytes) if n == 1 else None) or _whole_machines(
            shape, est, sizes, n, gpus_per_node, gpu_bytes
        )
        if found is not None:
            return found
    return None


def _one_machine(est: Estimate, sizes: list[int], gpu_bytes: int) -> NodeShape | None:
    """One tensor-parallel group, the smallest that fits."""
    for tp in sorted(sizes):
        need = per_gpu_bytes(est.weights, est.kv_cache, est.overhead, tp)
        if need <= gpu_bytes:
            return NodeShape(1, tp, tp, 1, need)
    return None


def _whole_machines(
    shape: ModelShape, est: Estimate, sizes: list[int], nodes: int, gpus_per_node: int, gpu_bytes: int
) -> NodeShape | None:
    """Pipeline stages of the largest tensor-parallel size that fits, filling every machine."""
    for tp in sorted(sizes, reverse=True):
        pp = nodes * (gpus_per_node // tp)
        need = per_gpu_bytes(est.weights, est.kv_cache, est.overhead, tp * pp)
        if 1 < pp <= shape.layers and need <= gpu_bytes:
            return NodeShape(nodes, tp * pp // nodes, tp, pp, need)
    return None
