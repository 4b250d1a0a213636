"""What every export starts from: the model's config, the store's manifest of its weights,
the pinned engine and the shape the memory model gives it. `gather` is the only part of
the export that reads anything (config, store, images, GPUs); the renderers are pure."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from appliance.config import GPU_SERVERS, STORE_PREFIX, Config, ModelConfig, kv_tokens
from appliance.dist.images import GPU_ENTRY_POINTS, ImageError, current_dir, definition, images_dir
from appliance.gpu.memory import MAX_NODES, Estimate, ModelShapeError, NodeShape, read_shape, smallest_shape
from appliance.gpu.planning import NodeSpec, estimate_for, node_spec
from appliance.gpu.probe import GiB, Inventory
from appliance.store.store import Store, StoreError

_UNSAFE_PATH = re.compile(r"[\x00-\x1f\x7f\\]")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class ExportError(Exception):
    """Why this model cannot be exported as asked, and the fix; one line for the operator."""


@dataclass(frozen=True)
class WeightFile:
    path: str  # relative to the model's directory
    sha256: str
    size: int


@dataclass(frozen=True)
class Manifest:
    """The store's record of a model's weights: the files every node must hold, byte for byte."""

    name: str
    revision: str
    license: str
    files: tuple[WeightFile, ...]

    def __post_init__(self) -> None:
        # Each path becomes a line of SHA256SUMS inside a shell script and a ConfigMap: a
        # newline (or any control character) would end the line, and could end the script's
        # here-document. No model file is legitimately named so.
        for f in self.files:
            if _UNSAFE_PATH.search(f.path) or not _HEX64.match(f.sha256):
                raise ExportError(
                    f"model '{self.name}': refusing to export the file name {f.path!r} "
                    "(control characters or backslashes); rename it and re-import the model"
                )

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def sha256sums(self) -> str:
        """The manifest in `sha256sum -c` format."""
        return "".join(f"{f.sha256}  {f.path}\n" for f in self.files)


@dataclass(frozen=True)
class EnginePin:
    engine: str  # vllm | sglang
    version: str  # images/<engine>/image.toml: what every node must run
    command: tuple[str, ...]  # the engine server's argv prefix on a node
    image_tag: str = ""  # the built image (<version>-<hash>) the command runs from, if any
    python: str = ""  # the image's interpreter, to check the version on a node

    @property
    def label(self) -> str:
        return f"{'vLLM' if self.engine == 'vllm' else 'SGLang'} {self.version}"


@dataclass(frozen=True)
class Source:
    model: ModelConfig
    manifest: Manifest
    engine: EnginePin
    weights_dir: Path  # where the weights are on this box (the store's snapshot)
    estimate: Estimate
    node: NodeSpec  # the machines the shape assumes
    shape: NodeShape

    @property
    def kv_tokens(self) -> int:
        return kv_tokens(self.model)

    def memory_line(self) -> str:
        e, s = self.estimate, self.shape
        return (
            f"{size(s.bytes_per_gpu)} per GPU: weights {size(e.weights)} and KV cache {size(e.kv_cache)} "
            f"({self.kv_tokens} tokens) over {s.gpus} GPU(s), plus {size(e.overhead)} engine overhead; "
            f"nodes assumed: {self.node.describe()}"
        )


def size(n: int) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{n / 1024**2:.1f} MiB"


def gather(
    cfg: Config,
    name: str,
    inventory: Inventory,
    *,
    nodes: int | None = None,
    gpus_per_node: int | None = None,
    gpu_gib: float | None = None,
) -> Source:
    model = cfg.model(name)
    if model is None:
        known = ", ".join(m.name for m in cfg.models if m.server in GPU_SERVERS) or "none"
        raise ExportError(f"no model {name!r} in {cfg.origin} (GPU models: {known})")
    if model.server not in GPU_SERVERS:
        raise ExportError(
            f"model '{name}' runs on {model.server}; only vllm and sglang models are "
            'exported (server = "vllm" or "sglang")'
        )
    if not model.source.startswith(STORE_PREFIX):
        raise ExportError(
            f"model '{name}': its weights ({model.source}) are not in the verified store, so "
            "there is no manifest to hand on: `appliance models import DIR --name NAME`, "
            'then source = "store:NAME"'
        )
    store_name = model.source[len(STORE_PREFIX) :]
    manifest, weights = _manifest(cfg, store_name)
    node = node_spec(inventory, model, gpus_per_node, gpu_gib)
    if node is None or not node.gpu_bytes:
        raise ExportError("no GPUs on this box to size the nodes after: give --gpus-per-node N and --gpu-memory GIB")
    try:
        est = estimate_for(cfg, model, node.gpus)
        shape = smallest_shape(
            read_shape(weights), est, node.gpus, node.gpu_bytes, fixed_tp=model.gpus.count or None, nodes=nodes
        )
    except ModelShapeError as exc:
        raise ExportError(f"model '{name}': {exc}") from None
    if shape is None:
        where = f"{nodes} node(s)" if nodes else f"up to {MAX_NODES} nodes"
        raise ExportError(
            f"model '{name}' does not fit on {where} of {node.describe()}"
            + (f" with gpus.count = {model.gpus.count}" if model.gpus.count else "")
        )
    return Source(
        model=model,
        manifest=manifest,
        engine=engine_pin(cfg, model.server),
        weights_dir=weights,
        estimate=est,
        node=node,
        shape=shape,
    )


def _manifest(cfg: Config, store_name: str) -> tuple[Manifest, Path]:
    """The model's manifest, once its files pass the same check as before serving."""
    store = Store.from_config(cfg)
    try:
        reason = store.admission(store_name)
        if reason:
            raise ExportError(reason)
        record = store.need(store_name)
    except StoreError as exc:
        raise ExportError(str(exc)) from None
    finally:
        store.close()
    files = tuple(WeightFile(f["path"], f["sha256"], f["size"]) for f in record.files)
    return Manifest(record.name, record.revision, record.license, files), store.model_path(record)


def engine_pin(cfg: Config, engine: str) -> EnginePin:
    """The engine version every node must run, and how a node starts it: [engines.<engine>]
    command, else the built image's entry point (the same path on every node)."""
    try:
        version = definition(engine).version
    except ImageError as exc:
        raise ExportError(str(exc)) from None
    configured = getattr(cfg.engines, engine).command
    if configured:
        return EnginePin(engine, version, tuple(configured))
    exe, args = GPU_ENTRY_POINTS[engine]
    current = current_dir(engine, cfg)
    folder = current if current is not None else images_dir(cfg) / engine / "current"
    return EnginePin(
        engine,
        version,
        (str(folder / exe), *args),
        image_tag=current.name if current else "",
        python=str(folder / "bin" / "python"),
    )


_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSW|API_?KEY|CREDENTIAL|PRIVATE", re.IGNORECASE)


def split_env(model: ModelConfig) -> tuple[dict[str, str], list[str]]:
    """The model's extra engine environment, less what looks like a secret: an export is
    handed around, so those are only named, for the operator to provide on the nodes."""
    for name in model.env:
        if not _ENV_NAME.match(name):
            raise ExportError(
                f"model '{model.name}': env name {name!r} is not an environment variable name "
                "(letters, digits, _; not starting with a digit)"
            )
    public = {k: v for k, v in model.env.items() if not SECRET_NAME.search(k)}
    return public, sorted(set(model.env) - set(public))


@dataclass(frozen=True)
class Options:
    """The operator's choices an export cannot take from the config (CLI flags)."""

    head_address: str | None = None  # multi-node: the head's address on the private network
    rendezvous_port: int = 29500  # multi-node: where the nodes find the head
    api_port: int = 8000  # the OpenAI API on the head (on a pod)
    interface: str | None = None  # multi-node: the private network's interface on every node
    weights_dir: str | None = None  # multi-node: where the weights are on the nodes (default: as here)
    pvc: str = "appliance-models"  # Kubernetes: CLAIM[/PATH] holding the weights (and LoRA adapters)
    oci: str | None = None  # Kubernetes: the weights as an OCI artifact, REF@sha256:DIGEST
    image: str | None = None  # Kubernetes: the engine's container image
    namespace: str | None = None  # Kubernetes
    replicas: int | None = None  # default: the model's autoscaling.min_replicas (at least 1)


@dataclass(frozen=True)
class Rendered:
    """An export: its files by name, which of them are executable, and the one that says it all
    (printed, or written by -o FILE)."""

    files: dict[str, str]
    main: str
    executable: frozenset[str] = frozenset()

    @property
    def document(self) -> str:
        return self.files[self.main]
