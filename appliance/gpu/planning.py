"""From config and measured GPUs to a placement: the glue between the memory
model, the GPU probe and the placer, shared by the supervisor and `appliance plan`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from appliance.config import Config, ModelConfig, kv_tokens, overhead_bytes, uses_gpus
from appliance.gpu.memory import (
    MAX_NODES,
    Estimate,
    MeasuredMemory,
    ModelShapeError,
    NodeShape,
    estimate,
    estimate_gguf,
    read_shape,
    smallest_shape,
)
from appliance.gpu.placement import Assignment, Demand, Gpu, Placed, PlacementError, free_bytes, kind_key, place
from appliance.gpu.probe import GiB, Inventory, kinds_match
from appliance.store.weights import model_path

KV_DTYPE_BYTES = {"fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class PlanRow:
    replica: str
    model: str
    assignment: Assignment | None = None
    error: str | None = None
    estimate: Estimate | None = None
    # Set when the model cannot fit on this box's GPUs at any tensor-parallel size.
    beyond: Beyond | None = None

    def describe(self) -> str:
        a = self.assignment
        if self.error or a is None:
            return f"{self.replica}: cannot place: {self.error}"
        gpus = ",".join(str(g) for g in a.gpus)
        return (
            f"{self.replica}: GPU {gpus} (tp={a.tp}, {a.bytes_per_gpu / GiB:.1f} GiB/GPU, "
            f"memory fraction {a.memory_fraction:.2f}): {a.reason}; "
            f"{self.estimate.describe(a.tp) if self.estimate else ''}"
        )


@dataclass(frozen=True)
class NodeSpec:
    """What one machine of a multi-node deployment is assumed to have: all alike."""

    gpus: int
    gpu_bytes: int
    kind: str = "GPU"
    source: str = "this box"

    def describe(self) -> str:
        return f"{self.gpus}x {self.kind} {self.gpu_bytes / GiB:.1f} GiB ({self.source})"


@dataclass(frozen=True)
class Beyond:
    """A model too large for this box: the smallest multi-node shape that holds it (None:
    not even MAX_NODES machines), and the machines it assumes."""

    node: NodeSpec
    shape: NodeShape | None

    def describe(self, model: str) -> str:
        if self.shape is None:
            return (
                f"it cannot fit on this box at any tensor-parallel size, nor on up to "
                f"{MAX_NODES} nodes of {self.node.describe()}"
            )
        return (
            f"it cannot fit on this box at any tensor-parallel size; the smallest shape that holds "
            f"it is {self.shape.describe()}, on nodes of {self.node.describe()}: `appliance export "
            f"{model} --to vllm-multinode|sglang-multinode|kserve|llm-d` renders it"
        )

    def as_dict(self) -> dict:
        shape = self.shape
        return {
            "assumed_node": {
                "gpus": self.node.gpus,
                "gpu_bytes": self.node.gpu_bytes,
                "kind": self.node.kind,
                "source": self.node.source,
            },
            "shape": None
            if shape is None
            else {
                "nodes": shape.nodes,
                "gpus_per_node": shape.gpus_per_node,
                "tp": shape.tp,
                "pp": shape.pp,
                "bytes_per_gpu": shape.bytes_per_gpu,
            },
        }


def node_spec(
    inventory: Inventory, model: ModelConfig, gpus: int | None = None, gpu_gib: float | None = None
) -> NodeSpec | None:
    """The machine a multi-node shape assumes: this box's largest group of GPUs of one kind and
    size that the model may use, with the operator's overrides; None when there is nothing to
    go by (no GPUs here and no overrides)."""
    wanted = model.gpus.type if kind_key(model.gpus.type) else None
    groups: dict[tuple[str, int], int] = {}
    for g in inventory.gpus:
        if kinds_match(wanted, g.kind):
            groups[(g.kind, g.total_bytes)] = groups.get((g.kind, g.total_bytes), 0) + 1
    here = max(groups.items(), key=lambda item: item[1] * item[0][1], default=None)
    if here is None and not (gpus and gpu_gib):
        return None
    kind, total = here[0] if here else (wanted or "GPU", 0)
    count = here[1] if here else 0
    given = [f"{flag} {value:g}" for flag, value in (("--gpus-per-node", gpus), ("--gpu-memory", gpu_gib)) if value]
    return NodeSpec(
        gpus=gpus or count,
        gpu_bytes=int(gpu_gib * GiB) if gpu_gib else total,
        kind=kind,
        source=", ".join(given) or "this box",
    )


def beyond_box(cfg: Config, model: ModelConfig, est: Estimate, box: NodeSpec, node: NodeSpec) -> Beyond | None:
    """None when some tensor-parallel size fits the model on `box` (this machine, every GPU
    free); else the smallest shape over machines like `node`. A GGUF model (llama.cpp) has
    no multi-node engine to hand it to: None."""
    if model.server == "llamacpp" or any(tp <= box.gpus and need <= box.gpu_bytes for tp, need in est.per_gpu.items()):
        return None
    shape = read_shape(_weights(cfg, model))
    return Beyond(node, smallest_shape(shape, est, node.gpus, node.gpu_bytes, fixed_tp=model.gpus.count or None))


def _weights(cfg: Config, model: ModelConfig) -> Path:
    """The weights the memory model sizes; a model without a source has none to size."""
    path = model_path(cfg, model)
    if path is None:
        raise ModelShapeError(f"model '{model.name}' has no source: no weights to size")
    return path


def gpu_models(cfg: Config) -> list[ModelConfig]:
    return [m for m in cfg.models if uses_gpus(m)]


def gpus_from(inventory: Inventory, ours: set[int]) -> list[Gpu]:
    """The placer's view: memory used by anything that is not one of our replicas
    (foreign processes, and whatever NVML cannot attribute) counts as used."""
    out = []
    for g in inventory.gpus:
        foreign = max(0, g.used_bytes - g.used_by(ours))
        out.append(Gpu(index=g.index, kind=g.kind, total_bytes=g.total_bytes, foreign_bytes=foreign))
    return out


def estimate_for(cfg: Config, model: ModelConfig, gpu_count: int) -> Estimate:
    """The memory model's estimate for one replica of a configured model."""
    path = _weights(cfg, model)
    if model.server == "llamacpp":  # a GGUF file, sized from its header, on exactly gpus.count GPUs
        return estimate_gguf(
            path,
            model.context_length,
            model.cache_type_k,
            model.cache_type_v,
            overhead_bytes(cfg, model),
            model.gpus.count,
        )
    return estimate(
        path,
        kv_tokens=kv_tokens(model),
        overhead_bytes=overhead_bytes(cfg, model),
        gpu_count=gpu_count,
        kv_dtype_bytes=KV_DTYPE_BYTES.get(model.kv_cache_dtype),
        fixed_tp=model.gpus.count or None,
    )


def demand_for(
    cfg: Config, model: ModelConfig, replica: str, gpu_count: int, measured: MeasuredMemory
) -> tuple[Demand, Estimate]:
    est = measured.correct(model.name, estimate_for(cfg, model, gpu_count))
    # llama.cpp allocates what it needs, not a fraction of the card: it reserves exactly that.
    return Demand(
        replica=replica,
        per_gpu_bytes=dict(est.per_gpu),
        gpu_kind=model.gpus.type,
        tp=model.gpus.count or None,
        exact=model.server == "llamacpp",
    ), est


def plan(
    cfg: Config,
    inventory: Inventory,
    replicas: list[tuple[ModelConfig, str]],
    placed: list[Placed] | None = None,
    ours: set[int] | None = None,
    measured: MeasuredMemory | None = None,
    gpus_per_node: int | None = None,
    gpu_gib: float | None = None,
) -> list[PlanRow]:
    """Place the replicas as one set (the placer packs them together: largest first, with
    an exact search behind it), so a set that fits in some order is placed whatever order
    the config lists it in. When the whole set cannot fit, as many as possible: one by one
    both largest first and in the listed order, keeping whichever places more (never worse
    than one by one). Replicas in ``placed`` never move. One that cannot fit on this box at
    any tensor-parallel size, even with every GPU free, names the smallest multi-node shape
    that would hold it, on machines like this one unless gpus_per_node / gpu_gib say
    otherwise. Rows come back in the order asked."""
    measured = measured or MeasuredMemory()
    placed = list(placed or [])
    if inventory.cpu_only:
        why = f"no usable NVIDIA GPU ({inventory.error or 'none found'})"
        return [PlanRow(replica, model.name, error=why) for model, replica in replicas]
    gpus = gpus_from(inventory, ours or set())
    rows: dict[str, PlanRow] = {}
    sized: list[tuple[ModelConfig, Demand, Estimate]] = []
    for model, replica in replicas:
        try:
            demand, est = demand_for(cfg, model, replica, len(gpus), measured)
        except (ModelShapeError, OSError) as exc:
            rows[replica] = PlanRow(replica, model.name, error=str(exc))
            continue
        sized.append((model, demand, est))
    try:
        together = place(gpus, placed, [d for _, d, _ in sized])
    except PlacementError:
        largest_first = _one_by_one(gpus, placed, sorted(sized, key=lambda s: _largest_first(s[1])))
        listed = _one_by_one(gpus, placed, sized)
        chosen = max(listed, largest_first, key=lambda result: sum(a is not None for a, _ in result.values()))
    else:
        chosen = {d.replica: (a, None) for (_, d, _), a in zip(sized, together, strict=True)}
    for model, demand, est in sized:
        assignment, error = chosen[demand.replica]
        if assignment is not None:
            rows[demand.replica] = PlanRow(demand.replica, model.name, assignment=assignment, estimate=est)
            continue
        box = node_spec(inventory, model)
        node = node_spec(inventory, model, gpus_per_node, gpu_gib)
        beyond = beyond_box(cfg, model, est, box, node) if box is not None and node is not None else None
        hint = knobs_that_fit(model, est, free_bytes(gpus, placed))
        why = f"{error}; {hint}" if hint else str(error)
        why = f"{why}; {beyond.describe(model.name)}" if beyond else why
        rows[demand.replica] = PlanRow(demand.replica, model.name, error=why, estimate=est, beyond=beyond)
    return [rows[replica] for _, replica in replicas]


def _largest_first(d: Demand) -> tuple:
    """Most memory in all first (at the smallest size it may take), then the name."""
    tp = d.tp or min(d.per_gpu_bytes)
    return (-d.per_gpu_bytes[tp] * tp, d.replica)


def _one_by_one(
    gpus: list[Gpu], placed: list[Placed], sized: list[tuple[ModelConfig, Demand, Estimate]]
) -> dict[str, tuple[Assignment | None, PlacementError | None]]:
    """Each demand in turn on what the earlier ones left (one that cannot fit is skipped)."""
    placed = list(placed)
    out: dict[str, tuple[Assignment | None, PlacementError | None]] = {}
    for _, demand, _ in sized:
        try:
            [assignment] = place(gpus, placed, [demand])
        except PlacementError as exc:
            out[demand.replica] = (None, exc)
            continue
        placed.append(Placed(replica=demand.replica, gpus=assignment.gpus, bytes_per_gpu=assignment.bytes_per_gpu))
        out[demand.replica] = (assignment, None)
    return out


def knobs_that_fit(model: ModelConfig, est: Estimate, free: dict[int, int]) -> str:
    """The config changes that would make one replica fit the most free memory there is
    (free: bytes per GPU), with the numbers: fewer KV-cache tokens, or a KV cache half the
    size. "" when the KV cache is not what is in the way (the weights alone do not fit)."""
    llamacpp = model.server == "llamacpp"
    tokens = model.context_length if llamacpp else kv_tokens(model)
    if not tokens or not est.kv_cache or not free:
        return ""
    per_token = est.kv_cache / tokens
    roomiest = sorted(free.values(), reverse=True)
    for tp in sorted(est.per_gpu):
        if tp > len(roomiest):
            break
        over = (est.per_gpu[tp] - roomiest[tp - 1]) * tp  # KV bytes to shed, over all tp GPUs
        fitting = int((est.kv_cache - over) / per_token) // 256 * 256
        if over <= 0 or fitting < 256:
            continue
        where = f"{_gib(roomiest[tp - 1])} GiB free on {'a GPU' if tp == 1 else f'each of {tp} GPUs'}"
        if llamacpp:
            knobs = [f"context_length = {fitting} (now {tokens})"]
            if over <= est.kv_cache / 2 and (model.cache_type_k, model.cache_type_v) == ("f16", "f16"):
                knobs.append('cache_type_k = cache_type_v = "q8_0" (half the KV cache)')
        else:
            field = "kv_cache_tokens" if model.kv_cache_tokens else "context_length"
            now = model.kv_cache_tokens or model.context_length
            value = fitting if model.kv_cache_tokens else max(fitting // max(model.parallel, 1), 256)
            knobs = [f"{field} = {value} (now {now})"]
            if over <= est.kv_cache / 2 and model.kv_cache_dtype in ("auto", "bfloat16", "float16"):
                knobs.append('kv_cache_dtype = "fp8" (half the KV cache)')
        return f"to fit in {where}, set {' or '.join(knobs)}"
    return ""


def _gib(n: float) -> str:
    return f"{n / GiB:.1f}"
