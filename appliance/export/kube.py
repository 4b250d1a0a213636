"""What the Kubernetes exports (KServe, llm-d) share: object names, where the weights come
from (a PVC, or an OCI artifact named by digest for air-gapped clusters), the engine
container, GPU resources and node affinity from the memory model, and the one-off Job that
checks the weights on the cluster against the store's manifest."""

from __future__ import annotations

import hashlib
import math
import re
import textwrap
from dataclasses import dataclass
from typing import Any

import yaml

from appliance.export.engine_args import engine_env
from appliance.export.source import ExportError, Options, Source, size, split_env

MiB = 1024**2
MOUNT = "/mnt/models"
# The engines' public images at the pinned version; mirror them and pass --image REF@sha256:...
PUBLIC_IMAGES = {"vllm": "docker.io/vllm/vllm-openai:v{version}", "sglang": "docker.io/lmsysorg/sglang:v{version}"}
ENTRY_POINTS = {"vllm": ["vllm", "serve"], "sglang": ["python3", "-m", "sglang.launch_server"]}
# GPU Feature Discovery's label: each GPU's memory in MiB.
GPU_MEMORY_LABEL = "nvidia.com/gpu.memory"
ANNOTATION = "appliance.export"

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_CLAIM = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_SUBPATH = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")
_DIGEST_REF = re.compile(
    r"^[a-z0-9]+([._-][a-z0-9]+)*(:[0-9]{1,5})?(/[a-z0-9]+([._-]+[a-z0-9]+)*)+"
    r"@sha256:[0-9a-f]{64}$"
)
_IMAGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@-]{0,254}$")


def object_name(model: str, limit: int = 40) -> str:
    """A DNS label for the model's objects; a name that had to change keeps a short hash of
    the original so two models never collide."""
    clean = re.sub(r"[^a-z0-9-]+", "-", model.lower()).strip("-") or "model"
    if clean == model and len(clean) <= limit:
        return clean
    digest = hashlib.sha256(model.encode()).hexdigest()[:6]
    return f"{clean[: limit - 7].rstrip('-')}-{digest}"


@dataclass(frozen=True)
class Weights:
    """Where the weights are on the cluster, as KServe names them (uri) and as a pod mounts them."""

    uri: str
    volume: dict
    model_dir: str  # the model's directory inside a pod
    claim: str  # the PVC that holds LoRA adapters (under lora/<name>)
    pvc_path: str = ""  # the weights' directory in the claim ("" for OCI)
    oci: bool = False  # the weights are an OCI artifact (named by digest)

    @property
    def lora_dir(self) -> str:
        """Where a pod finds the claim's lora/ (mounted on its own beside an OCI artifact)."""
        return "/mnt/lora" if self.oci else f"{MOUNT}/lora"


def weights(src: Source, opts: Options) -> Weights:
    claim, _, path = opts.pvc.partition("/")
    path = path.strip("/") or src.manifest.name
    if not _CLAIM.match(claim):
        raise ExportError(
            f"--pvc {opts.pvc!r}: CLAIM must be a PersistentVolumeClaim name (lowercase letters, digits, '-', '.')"
        )
    if not _SUBPATH.match(path) or ".." in path.split("/"):
        raise ExportError(f"--pvc {opts.pvc!r}: PATH must be a relative path inside the claim")
    if opts.oci:
        ref = opts.oci.removeprefix("oci://")
        if not _DIGEST_REF.match(ref):
            raise ExportError(
                f"--oci {opts.oci!r}: name the artifact by digest (REGISTRY/REPO@sha256:<64 hex>): "
                "a tag can change under you"
            )
        # KServe's modelcar layout: the files under /models in the artifact.
        return Weights(
            uri=f"oci://{ref}",
            volume={"name": "model", "image": {"reference": ref, "pullPolicy": "IfNotPresent"}},
            model_dir=f"{MOUNT}/models",
            claim=claim,
            oci=True,
        )
    return Weights(
        uri=f"pvc://{claim}/{path}",
        volume={"name": "model", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}},
        model_dir=f"{MOUNT}/{path}",
        claim=claim,
        pvc_path=path,
    )


def image(src: Source, opts: Options) -> str:
    ref = opts.image or PUBLIC_IMAGES[src.engine.engine].format(version=src.engine.version)
    if not _IMAGE.match(ref):
        raise ExportError(f"--image {ref!r} is not an image reference")
    return ref


def namespace(opts: Options) -> dict:
    if opts.namespace is None:
        return {}
    if not _DNS_LABEL.match(opts.namespace):
        raise ExportError(f"--namespace {opts.namespace!r} is not a Kubernetes namespace name")
    return {"namespace": opts.namespace}


def replicas(src: Source, opts: Options) -> int:
    return opts.replicas or max(src.model.autoscaling.min_replicas, 1)


def metadata(src: Source, opts: Options, name: str, labels: dict | None = None, *, sizing: bool = False) -> dict:
    """Name, namespace, labels, and where the object came from (with sizing: the engine, the
    shape and the memory model's figures too)."""
    notes = {
        f"{ANNOTATION}/model": src.model.name,
        f"{ANNOTATION}/weights": f"{src.manifest.name}@{src.manifest.revision}",
    }
    if sizing:
        notes |= {
            f"{ANNOTATION}/engine": src.engine.label,
            f"{ANNOTATION}/shape": f"tp={src.shape.tp} x pp={src.shape.pp}",
            f"{ANNOTATION}/memory": src.memory_line(),
        }
    return {"name": name, **namespace(opts), **({"labels": labels} if labels else {}), "annotations": notes}


def container(
    src: Source, opts: Options, name: str, args: list[str], base: str, *, command: list[str] | None = None
) -> dict:
    """The engine's container: its image, argv, environment (secrets from a Secret), one pod's
    GPUs (a pipeline stage: tp of them), least privilege."""
    env, secrets = split_env(src.model)
    gpus = str(src.shape.tp)
    out: dict[str, Any] = {"name": name, "image": image(src, opts)}
    if command:
        out["command"] = command
    out |= {
        "args": args,
        "env": [{"name": k, "value": v} for k, v in {**engine_env(src), **env}.items()]
        + [{"name": s, "valueFrom": {"secretKeyRef": {"name": f"{base}-engine-secrets", "key": s}}} for s in secrets],
        "resources": {"limits": {"nvidia.com/gpu": gpus}, "requests": {"nvidia.com/gpu": gpus}},
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    return out


def affinity(src: Source) -> dict:
    """Only nodes whose GPUs hold what the memory model says one GPU needs."""
    need_mib = math.ceil(src.shape.bytes_per_gpu / MiB)
    term = {"matchExpressions": [{"key": GPU_MEMORY_LABEL, "operator": "Gt", "values": [str(need_mib - 1)]}]}
    return {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [term]}}}


def verify_objects(src: Source, opts: Options, base: str, w: Weights) -> list[dict]:
    """A ConfigMap with the store's manifest and a Job that checks the cluster's copy of the
    weights against it (run it after copying; it fails on any difference)."""
    sums = f"{base}-sha256sums"
    configmap = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(src, opts, sums),
        "data": {"SHA256SUMS": src.manifest.sha256sums()},
    }
    check = {
        "name": "verify",
        "image": image(src, opts),
        "command": ["sha256sum", "--quiet", "--strict", "-c", "/etc/appliance/SHA256SUMS"],
        "workingDir": w.model_dir,
        "volumeMounts": [
            {"name": "model", "mountPath": MOUNT, "readOnly": True},
            {"name": "sha256sums", "mountPath": "/etc/appliance", "readOnly": True},
        ],
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata(src, opts, f"{base}-verify-weights"),
        "spec": {
            "backoffLimit": 0,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "automountServiceAccountToken": False,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": 65534,
                        "runAsGroup": 65534,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [check],
                    "volumes": [w.volume, {"name": "sha256sums", "configMap": {"name": sums}}],
                }
            },
        },
    }
    return [configmap, job]


def notes(src: Source, opts: Options, w: Weights, target: str, front_url: str) -> list[str]:
    """The header every Kubernetes export starts with: what it is, and what the operator does."""
    m, s = src.model, src.shape
    ref = image(src, opts)
    secrets = split_env(m)[1]
    where = (
        f"the OCI artifact {w.uri.removeprefix('oci://')} (the files under /models)"
        if w.oci
        else f"PVC {w.claim}, directory {w.pvc_path}"
    )
    out = [
        f"{m.name} for {target}: {src.engine.label}, {s.pp} pod(s) of {s.tp} GPU(s) per replica "
        f"(tp={s.tp} x pp={s.pp}). Written by `appliance export`.",
        f"Memory: {src.memory_line()}.",
        f"Weights: {src.manifest.name} revision {src.manifest.revision} ({len(src.manifest.files)} files, "
        f"{size(src.manifest.total_bytes)}, license {src.manifest.license}) from {where}; put them "
        f"there from this box ({src.weights_dir}), then run the Job {object_name(m.name)}-verify-weights: it checks "
        "them against the store's manifest (the ConfigMap) and fails on any difference.",
        f"Image: {ref}"
        + (
            ""
            if "@sha256:" in ref
            else f": a tag; mirror it into your registry and pass --image REF@sha256:DIGEST "
            f"(it must run {src.engine.label})"
        )
        + ".",
        f"Scheduling: pods go only to nodes labelled {GPU_MEMORY_LABEL} (NVIDIA GPU Feature Discovery) "
        f"with at least {math.ceil(s.bytes_per_gpu / MiB)} MiB per GPU.",
    ]
    if s.pp > 1:
        out.append(
            "The pods of one replica exchange tensors unencrypted and unauthenticated (NCCL): keep "
            "them on a private network; a NetworkPolicy admitting only the replica's own pods helps."
        )
    if secrets:
        out.append(
            f"Secrets: the engine's {', '.join(secrets)} come from the Secret "
            f"{object_name(m.name)}-engine-secrets, which you create; an export never copies a secret."
        )
    out.append(
        f'Front it with the appliance: [[models]] name = "{m.name}", server = "openai", url = '
        f'"{front_url}"; every route, key, budget, regulated rule and audit row stays on the box.'
    )
    return out


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the manifest) as literal blocks, as a person would write them; no
    anchors and aliases for repeated values."""

    def ignore_aliases(self, data) -> bool:
        return True


_Dumper.add_representer(
    str,
    lambda dumper, value: dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None),
)


def dump(header: list[str], docs: list[dict]) -> str:
    """The header as comments, then the objects as YAML documents."""
    lines = []
    for paragraph in header:
        lines += textwrap.wrap(paragraph, 98, break_long_words=False, break_on_hyphens=False) + [""]
    head = "".join(f"# {line}\n" if line else "#\n" for line in lines[:-1])
    return head + "".join("---\n" + yaml.dump(d, Dumper=_Dumper, sort_keys=False, width=1000) for d in docs)
