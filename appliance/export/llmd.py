"""llm-d: the model servers (a Deployment, or a LeaderWorkerSet when a replica spans several
pods, one per pipeline stage) and the InferencePool (inference.networking.k8s.io/v1) that
selects their leaders for llm-d's prefix-aware scheduler (its endpoint picker)."""

from __future__ import annotations

from appliance.export import kube
from appliance.export.engine_args import parallel_args, server_args, sizing_args, split_lora, with_lora
from appliance.export.source import Options, Rendered, Source

EPP_PORT = 9002  # the endpoint picker's gRPC port (llm-d's inference scheduler)
LWS_API = "leaderworkerset.x-k8s.io/v1"
POOL_API = "inference.networking.k8s.io/v1"


def render(src: Source, opts: Options) -> Rendered:
    name = kube.object_name(src.model.name)
    w = kube.weights(src, opts)
    serving = {"llm-d.ai/inferenceServing": "true", "llm-d.ai/model": name, "llm-d.ai/role": "decode"}
    workload = _workload(src, opts, name, w, serving)
    pool = {
        "apiVersion": POOL_API,
        "kind": "InferencePool",
        "metadata": kube.metadata(src, opts, name),
        "spec": {
            "selector": {"matchLabels": serving},
            "targetPorts": [{"number": opts.api_port}],
            "endpointPickerRef": {"name": f"{name}-epp", "port": {"number": EPP_PORT}, "failureMode": "FailClose"},
        },
    }
    header = kube.notes(src, opts, w, "llm-d", "http://<your Gateway's address>/v1")
    header.append(
        f"Scheduler: install llm-d's inference scheduler (the endpoint picker) as the Service "
        f"{name}-epp on port {EPP_PORT} for the InferencePool {name}, and route your Gateway to the "
        "pool with an HTTPRoute; FailClose: no endpoint picker, no traffic."
    )
    text = kube.dump(header, [workload, pool, *kube.verify_objects(src, opts, name, w)])
    return Rendered(files={f"{name}.yaml": text, "SHA256SUMS": src.manifest.sha256sums()}, main=f"{name}.yaml")


def _workload(src: Source, opts: Options, name: str, w: kube.Weights, serving: dict) -> dict:
    engine, pods = src.engine.engine, src.shape.pp
    adapters, extra = split_lora(engine, src.model.args)
    extra = with_lora(engine, extra, [(n, f"{w.lora_dir}/{n}") for n, _ in adapters])
    volumes = [w.volume, {"name": "dshm", "emptyDir": {"medium": "Memory"}}]
    if adapters and w.oci:  # weights from OCI; the adapters still come from the claim
        volumes.append({"name": "lora", "persistentVolumeClaim": {"claimName": w.claim, "readOnly": True}})

    def pod(rank: int | str) -> dict:
        leader = str(rank) == "0"
        api = ("0.0.0.0", opts.api_port) if leader else (None, None)
        args = [
            *server_args(src, w.model_dir, *api),
            *parallel_args(src, pods, rank, "$(LWS_LEADER_ADDRESS)", opts.rendezvous_port),
            *sizing_args(src),
            *extra,
        ]
        c = kube.container(src, opts, engine, args, name, command=kube.ENTRY_POINTS[engine])
        c["volumeMounts"] = [
            {"name": "model", "mountPath": kube.MOUNT, "readOnly": True},
            {"name": "dshm", "mountPath": "/dev/shm"},
        ]
        if adapters and w.oci:
            c["volumeMounts"].append({"name": "lora", "mountPath": w.lora_dir, "subPath": "lora", "readOnly": True})
        if leader:
            c |= _probes(opts.api_port)
        return {
            "automountServiceAccountToken": False,
            "affinity": kube.affinity(src),
            "terminationGracePeriodSeconds": 60,
            "containers": [c],
            "volumes": volumes,
        }

    meta = kube.metadata(src, opts, name, {"llm-d.ai/model": name}, sizing=True)
    if pods == 1:
        return {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": meta,
            "spec": {
                "replicas": kube.replicas(src, opts),
                "selector": {"matchLabels": serving},
                "template": {"metadata": {"labels": serving}, "spec": pod(0)},
            },
        }
    worker_labels = {"llm-d.ai/model": name, "llm-d.ai/role": "worker"}
    return {
        "apiVersion": LWS_API,
        "kind": "LeaderWorkerSet",
        "metadata": meta,
        "spec": {
            "replicas": kube.replicas(src, opts),
            "startupPolicy": "LeaderCreated",
            "leaderWorkerTemplate": {
                "size": pods,
                "restartPolicy": "RecreateGroupOnPodRestart",
                "leaderTemplate": {"metadata": {"labels": serving}, "spec": pod(0)},
                "workerTemplate": {"metadata": {"labels": worker_labels}, "spec": pod("$(LWS_WORKER_INDEX)")},
            },
        },
    }


def _probes(port: int) -> dict:
    """Ready once the engine answers /health; loading a large model may take most of an hour."""
    http = {"path": "/health", "port": port}
    return {
        "ports": [{"containerPort": port, "name": "http", "protocol": "TCP"}],
        "startupProbe": {"httpGet": http, "periodSeconds": 10, "failureThreshold": 360},
        "readinessProbe": {"httpGet": http, "periodSeconds": 5, "failureThreshold": 3},
        "livenessProbe": {"httpGet": http, "periodSeconds": 10, "failureThreshold": 6},
    }
