"""From config and measured GPUs to a placement: the glue between the memory
model, the GPU probe and the placer, shared by the supervisor and `appliance plan`."""

from __future__ import annotations

from dataclasses import dataclass

from .config import Config, ModelConfig, kv_tokens, model_path, overhead_bytes, uses_gpus
from .gpu import GiB, Inventory
from .memory import Estimate, MeasuredMemory, ModelShapeError, estimate, estimate_gguf
from .placement import Assignment, Demand, Gpu, Placed, PlacementError, place

KV_DTYPE_BYTES = {"fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class PlanRow:
    replica: str
    model: str
    assignment: Assignment | None = None
    error: str | None = None
    estimate: Estimate | None = None

    def describe(self) -> str:
        if self.error:
            return f"{self.replica}: cannot place: {self.error}"
        a = self.assignment
        gpus = ",".join(str(g) for g in a.gpus)
        return (f"{self.replica}: GPU {gpus} (tp={a.tp}, {a.bytes_per_gpu / GiB:.1f} GiB/GPU, "
                f"memory fraction {a.memory_fraction:.2f}): {a.reason}; "
                f"{self.estimate.describe(a.tp) if self.estimate else ''}")


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


def demand_for(cfg: Config, model: ModelConfig, replica: str, gpu_count: int,
               measured: MeasuredMemory) -> tuple[Demand, Estimate]:
    path = model_path(cfg, model)
    if model.server == "llamacpp":  # a GGUF file, sized from its header, on exactly gpus.count GPUs
        est = estimate_gguf(path, model.context_length, model.cache_type_k, model.cache_type_v,
                            overhead_bytes(cfg, model), model.gpus.count)
    else:
        est = estimate(path, kv_tokens=kv_tokens(model), overhead_bytes=overhead_bytes(cfg, model),
                       gpu_count=gpu_count, kv_dtype_bytes=KV_DTYPE_BYTES.get(model.kv_cache_dtype),
                       fixed_tp=model.gpus.count or None)
    est = measured.correct(model.name, est)
    kind = None if model.gpus.type.lower() == "any" else model.gpus.type
    # llama.cpp allocates what it needs, not a fraction of the card: it reserves exactly that.
    return Demand(replica=replica, per_gpu_bytes=dict(est.per_gpu), gpu_kind=kind,
                  tp=model.gpus.count or None, exact=model.server == "llamacpp"), est


def plan(cfg: Config, inventory: Inventory, replicas: list[tuple[ModelConfig, str]],
         placed: list[Placed] | None = None, ours: set[int] | None = None,
         measured: MeasuredMemory | None = None) -> list[PlanRow]:
    """Place each replica in turn (one that cannot fit does not stop the others)."""
    measured = measured or MeasuredMemory()
    placed = list(placed or [])
    if inventory.cpu_only:
        why = f"no usable NVIDIA GPU ({inventory.error or 'none found'})"
        return [PlanRow(replica, model.name, error=why) for model, replica in replicas]
    gpus = gpus_from(inventory, ours or set())
    rows = []
    for model, replica in replicas:
        try:
            demand, est = demand_for(cfg, model, replica, len(gpus), measured)
        except (ModelShapeError, OSError) as exc:
            rows.append(PlanRow(replica, model.name, error=str(exc)))
            continue
        try:
            [assignment] = place(gpus, placed, [demand])
        except PlacementError as exc:
            rows.append(PlanRow(replica, model.name, error=str(exc), estimate=est))
            continue
        placed.append(Placed(replica=replica, gpus=assignment.gpus, bytes_per_gpu=assignment.bytes_per_gpu))
        rows.append(PlanRow(replica, model.name, assignment=assignment, estimate=est))
    return rows
