"""KServe: one LLMInferenceService (serving.kserve.io/v1alpha2, the stored version), with a
`worker` section when a replica spans several pods (one pod per pipeline stage, on a
LeaderWorkerSet underneath). KServe's own template starts vLLM with the model's directory,
its name, the port and the parallel sizes; the export adds the memory model's budget and the
model's own arguments. LoRA adapters named in the model's args become `model.lora`."""

from __future__ import annotations

from typing import Any

from appliance.export import kube
from appliance.export.engine_args import sizing_args, split_lora
from appliance.export.source import ExportError, Options, Rendered, Source

API_VERSION = "serving.kserve.io/v1alpha2"


def render(src: Source, opts: Options) -> Rendered:
    if src.engine.engine != "vllm":
        raise ExportError(
            f"model '{src.model.name}' runs on {src.engine.engine}: KServe's LLMInferenceService "
            "starts vLLM; export it with --to llm-d or --to sglang-multinode"
        )
    name = kube.object_name(src.model.name)
    w = kube.weights(src, opts)
    adapters, args = split_lora("vllm", src.model.args)
    args = [*sizing_args(src), *args]
    model: dict[str, Any] = {"uri": w.uri, "name": src.model.name}
    if adapters:
        model["lora"] = {"adapters": [{"name": n, "uri": f"pvc://{w.claim}/lora/{n}"} for n, _ in adapters]}
    parallelism = {"tensor": src.shape.tp}
    if src.shape.pp > 1:
        parallelism["pipeline"] = src.shape.pp
    spec = {
        "model": model,
        "replicas": kube.replicas(src, opts),
        "parallelism": parallelism,
        # KServe's managed route and gateway, and llm-d's prefix-aware scheduler in front.
        "router": {"route": {}, "gateway": {}, "scheduler": {}},
        "template": _pod(src, opts, args, name),
    }
    if src.shape.pp > 1:
        spec["worker"] = _pod(src, opts, args, name)
    service = {
        "apiVersion": API_VERSION,
        "kind": "LLMInferenceService",
        "metadata": kube.metadata(src, opts, name, sizing=True),
        "spec": spec,
    }
    header = kube.notes(src, opts, w, "KServe (LLMInferenceService)", f"<status.url of llminferenceservice/{name}>/v1")
    if adapters:
        header.append(
            "LoRA adapters: copy "
            + ", ".join(f"{path} to {w.claim}:lora/{n}" for n, path in adapters)
            + " (the store does not verify adapters)."
        )
    text = kube.dump(header, [service, *kube.verify_objects(src, opts, name, w)])
    return Rendered(files={f"{name}.yaml": text, "SHA256SUMS": src.manifest.sha256sums()}, main=f"{name}.yaml")


def _pod(src: Source, opts: Options, args: list[str], name: str) -> dict:
    return {"affinity": kube.affinity(src), "containers": [kube.container(src, opts, "main", args, name)]}
