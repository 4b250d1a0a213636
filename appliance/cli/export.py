"""`appliance export MODEL --to TARGET`: a model's deployment for vLLM's or SGLang's own
multi-node, KServe or llm-d, printed or written (appliance/export/ renders it)."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import click

from appliance.cli.options import CONFIG_HELP, load, read_inventory
from appliance.export import TARGETS

if TYPE_CHECKING:
    from appliance.export.source import Rendered


@click.command()
@click.argument("model")
@click.option("--to", "target", type=click.Choice(TARGETS), required=True, help="What runs it.")
@click.option(
    "-o",
    "--output",
    metavar="FILE|DIR",
    help="Write the document to FILE, or every file (scripts, manifest, README) into DIR "
    "(an existing directory, or a path ending in /). Default: print the document.",
)
@click.option(
    "--nodes",
    type=click.IntRange(1, 64),
    metavar="N",
    help="Exactly N nodes (default: the fewest that hold the model).",
)
@click.option(
    "--gpus-per-node", type=click.IntRange(1, 64), metavar="N", help="GPUs on each node (default: this box's)."
)
@click.option(
    "--gpu-memory",
    "gpu_gib",
    type=click.FloatRange(1, 4096),
    metavar="GIB",
    help="GiB per GPU on each node (default: this box's).",
)
@click.option("--inventory", metavar="FILE", help="A simulated GPU inventory instead of this machine's GPUs.")
@click.option(
    "--head-address",
    metavar="ADDR",
    help="Multi-node: the head node's address on the private network (the API listens there).",
)
@click.option(
    "--interface",
    metavar="IFACE",
    help="Multi-node: the private network's interface on every node (NCCL and Gloo stay on it).",
)
@click.option(
    "--rendezvous-port",
    type=click.IntRange(1, 65535),
    default=29500,
    show_default=True,
    help="Multi-node: the port where the nodes meet the head.",
)
@click.option(
    "--port",
    "api_port",
    type=click.IntRange(1, 65535),
    default=8000,
    show_default=True,
    help="The OpenAI API's port on the head (or in the pod).",
)
@click.option(
    "--weights-dir",
    metavar="PATH",
    help="Multi-node: where the weights are on every node (default: the same path as here).",
)
@click.option(
    "--pvc",
    default="appliance-models",
    show_default=True,
    metavar="CLAIM[/PATH]",
    help="Kubernetes: the PersistentVolumeClaim holding the weights under PATH (default: the "
    "store name) and LoRA adapters under lora/NAME.",
)
@click.option(
    "--oci",
    metavar="REF@sha256:DIGEST",
    help="Kubernetes: the weights as an OCI artifact named by digest (air-gapped registries).",
)
@click.option(
    "--image",
    metavar="REF",
    help="Kubernetes: the engine's image (default: the public one at the "
    "pinned version; pass your mirror's REF@sha256:DIGEST).",
)
@click.option("--namespace", metavar="NS", help="Kubernetes: the objects' namespace.")
@click.option(
    "--replicas",
    type=click.IntRange(1, 1000),
    metavar="N",
    help="Kubernetes: replicas (default: the model's autoscaling.min_replicas, at least 1).",
)
@click.option("--config", "config", metavar="FILE", help=CONFIG_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print JSON: each file's name, mode and text (or path, with -o).")
def export(
    model: str,
    target: str,
    output: str | None,
    nodes: int | None,
    gpus_per_node: int | None,
    gpu_gib: float | None,
    inventory: str | None,
    config: str | None,
    as_json: bool,
    **options,
) -> None:
    """Render MODEL's deployment beyond this box, from its config, the store's manifest of its weights
    and the pinned engine: per-node scripts (vllm-multinode, sglang-multinode), an LLMInferenceService
    (kserve), or model servers and their InferencePool (llm-d). The appliance never runs them itself:
    it fronts them (server = "openai", url = ...) with its routes, keys and audit."""
    from appliance.export import render
    from appliance.export.source import ExportError, Options, gather

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg = load(config)
    try:
        src = gather(
            cfg, model, read_inventory(cfg, inventory), nodes=nodes, gpus_per_node=gpus_per_node, gpu_gib=gpu_gib
        )
        rendered = render(target, src, Options(**options))
    except ExportError as exc:
        raise click.ClickException(str(exc)) from None
    if output is None:
        if as_json:
            files = [
                {"name": name, "executable": name in rendered.executable, "text": text}
                for name, text in rendered.files.items()
            ]
            click.echo(json.dumps({"model": model, "to": target, "main": rendered.main, "files": files}, indent=2))
        else:
            click.echo(rendered.document, nl=False)
        return
    try:
        written = write(rendered, Path(output), as_dir=output.endswith("/"))
    except OSError as exc:
        raise click.ClickException(f"cannot write {exc.filename or output}: {exc.strerror}") from None
    if as_json:
        click.echo(json.dumps({"model": model, "to": target, "written": [str(p) for p in written]}, indent=2))
    else:
        click.echo(f"wrote {', '.join(str(p) for p in written)}", err=True)


def write(rendered: Rendered, out: Path, as_dir: bool = False) -> list[Path]:
    """Every file into a directory, or the document into a file; each one replaced whole
    (written aside, then renamed), so no half-written file is ever visible."""
    if as_dir or out.is_dir():
        out.mkdir(parents=True, exist_ok=True)
        targets = {out / name: (text, name in rendered.executable) for name, text in rendered.files.items()}
    else:
        targets = {out: (rendered.document, rendered.main in rendered.executable)}
    for path, (text, executable) in targets.items():
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.chmod(tmp, 0o755 if executable else 0o644)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return list(targets)
