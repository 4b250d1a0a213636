"""vLLM and SGLang over several machines, without Kubernetes: one start script per node
(head and workers), each checking the weights against the store's manifest and the engine
against the pinned version before it starts, and a README that says it all.

The engine traffic between the nodes (NCCL, torch.distributed, the rendezvous) is neither
encrypted nor authenticated: the README and every script say so, and name the private
network interface when the operator gives one."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

from appliance.export.engine_args import engine_env, parallel_args, server_args, sizing_args
from appliance.export.source import ExportError, Options, Rendered, Source, size, split_env

# A hostname or an IPv4/IPv6 address: what --master-addr and --dist-init-addr take.
_ADDRESS = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,252})$|^[0-9A-Fa-f:.]{2,45}$")
_INTERFACE = re.compile(r"^[A-Za-z0-9_.:-]{1,15}$")


@dataclass(frozen=True)
class NodeLaunch:
    rank: int
    argv: tuple[str, ...]
    env: dict[str, str]

    @property
    def role(self) -> str:
        return "head" if self.rank == 0 else "worker"


def launches(src: Source, opts: Options) -> list[NodeLaunch]:
    """Each node's engine command and environment."""
    head = _checked(opts)
    weights = opts.weights_dir or str(src.weights_dir)
    if not weights.startswith("/"):
        raise ExportError(f"--weights-dir {weights!r}: give an absolute path (where the weights are on every node)")
    n, gpus = src.shape.nodes, src.shape.gpus_per_node
    env = {**engine_env(src), "CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in range(gpus))}
    if opts.interface:
        # The engines' own traffic stays on the private network's interface.
        env |= {"NCCL_SOCKET_IFNAME": opts.interface, "GLOO_SOCKET_IFNAME": opts.interface}
    env |= split_env(src.model)[0]
    out = []
    for rank in range(n):
        api = (head, opts.api_port) if rank == 0 else (None, None)
        argv = [
            *src.engine.command,
            *server_args(src, weights, *api),
            *parallel_args(src, n, rank, head, opts.rendezvous_port),
            *sizing_args(src),
            *src.model.args,
        ]
        out.append(NodeLaunch(rank, tuple(argv), dict(env)))
    return out


def _checked(opts: Options) -> str:
    if not opts.head_address:
        raise ExportError(
            "give --head-address ADDR: the head node's address on the private network "
            "(the API listens there, the other nodes meet there)"
        )
    if not _ADDRESS.match(opts.head_address):
        raise ExportError(f"--head-address {opts.head_address!r} is not a hostname or an IP address")
    if opts.interface and not _INTERFACE.match(opts.interface):
        raise ExportError(f"--interface {opts.interface!r} is not a network interface name")
    return opts.head_address


def render(src: Source, opts: Options) -> Rendered:
    nodes = launches(src, opts)
    weights = opts.weights_dir or str(src.weights_dir)
    files = {f"node-{node.rank}.sh": _script(src, node, weights) for node in nodes}
    files["SHA256SUMS"] = src.manifest.sha256sums()
    files["README.md"] = _readme(src, opts, nodes, weights)
    return Rendered(files=files, main="README.md", executable=frozenset(f for f in files if f.endswith(".sh")))


def _script(src: Source, node: NodeLaunch, weights: str) -> str:
    s = src.shape
    lines = [
        "#!/bin/sh",
        f"# {src.model.name}: node {node.rank} of {s.nodes} ({node.role}), {src.engine.label}, "
        f"tp={s.tp} x pp={s.pp}. Written by `appliance export`; README.md says how to run it.",
        "# The engines talk to each other unencrypted and unauthenticated: a private network only.",
        "set -eu",
        "",
        "# The weights, byte for byte as the appliance's store verified them (SKIP_WEIGHTS_CHECK=1 skips).",
        'if [ "${SKIP_WEIGHTS_CHECK:-}" != 1 ]; then',
        f"    cd {shlex.quote(weights)}",
        "    sha256sum --quiet --strict -c - <<'SHA256SUMS'",
        src.manifest.sha256sums().rstrip("\n"),
        "SHA256SUMS",
        "    cd /",
        "fi",
        "",
    ]
    if src.engine.python:
        check = 'import importlib.metadata as m; print(m.version("%s"))' % src.engine.engine
        lines += [
            f"# The engine: {src.engine.label} on every node (mixed versions fail in obscure ways).",
            f"found=$({shlex.quote(src.engine.python)} -c {shlex.quote(check)})",
            f'[ "$found" = {shlex.quote(src.engine.version)} ] || {{ echo "{src.engine.engine} is $found here, '
            f'the export needs {src.engine.version}" >&2; exit 1; }}',
            "",
        ]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in node.env.items()]
    lines += ["exec " + shlex.join(node.argv), ""]
    return "\n".join(lines)


def _readme(src: Source, opts: Options, nodes: list[NodeLaunch], weights: str) -> str:
    m, s, e = src.model, src.shape, src.engine
    head = opts.head_address
    nodes_text = f"{s.nodes} nodes" if s.nodes > 1 else "one node"
    secrets = split_env(m)[1]
    out = [
        f"# {m.name} on {nodes_text}: {e.label}, tp={s.tp} x pp={s.pp}",
        "",
        f"Rendered by `appliance export {m.name} --to {e.engine}-multinode` from the model's config, the "
        f"store's manifest of its weights ({src.manifest.name}, revision {src.manifest.revision}, "
        f"license {src.manifest.license}) and the pinned engine ({e.label}"
        + (f", image {e.image_tag}" if e.image_tag else "")
        + ").",
        "",
        f"Shape: {s.describe()}. Memory: {src.memory_line()}.",
        "",
        f"Files: this README, {', '.join(f'`node-{n.rank}.sh`' for n in nodes)} and `SHA256SUMS` "
        f"(`appliance export {m.name} --to {e.engine}-multinode ... -o DIR/` writes them all).",
        "",
        "## Network: private only",
        "",
        "The engine processes exchange tensors (NCCL) and coordination (torch.distributed, the "
        f"rendezvous on {head}:{opts.rendezvous_port}) in the clear, without authentication: anyone "
        "who reaches those ports can disturb or read the model's work. Run every node on a private "
        "network that nothing else shares, and firewall it from everything else"
        + (
            f"; the scripts keep NCCL and Gloo on interface {opts.interface}."
            if opts.interface
            else "; `--interface IFACE` pins NCCL and Gloo to that network's interface."
        )
        + f" Only the head serves the OpenAI API, on {head}:{opts.api_port}, for the appliance that "
        "fronts it (below): it has no keys of its own.",
        "",
        "## Weights",
        "",
        f"Every node needs the same {len(src.manifest.files)} files ({size(src.manifest.total_bytes)}) "
        f"at `{weights}`: copy them from this box (`rsync -a --copy-links {src.weights_dir}/ "
        f"NODE:{weights}/`, or share them read-only). Each script checks them against `SHA256SUMS`, "
        "the store's manifest, before it starts the engine, and refuses to start on any difference.",
        "",
        "## Engine",
        "",
        f"Every node runs {e.label}: "
        + (
            "the same command as this box (`[engines." + e.engine + "] command`)."
            if not e.python
            else f"its image at the same path as here (`appliance images build {e.engine}` on each node, or the "
            "`./install.sh --offline` bundle); the scripts check the version."
        ),
        "",
    ]
    if secrets:
        out += [
            f"Left out of the scripts because they look like secrets: {', '.join(secrets)}. Set them "
            "in the environment of each node yourself.",
            "",
        ]
    for node in nodes:
        what = f"serves the API on {head}:{opts.api_port}" if node.rank == 0 else "joins the head"
        out += [
            f"## Node {node.rank} ({node.role}): {what}",
            "",
            f"`node-{node.rank}.sh` runs, after the checks:",
            "",
            "```sh",
            _command(node),
            "```",
            "",
        ]
    out += [
        "Start the head first, then the workers; the API answers once every node has joined and the "
        "weights are loaded.",
        "",
        "## Front it with the appliance",
        "",
        "Keep this box as the door: in its config, replace the model's entry with one that points at the "
        "head. Every route, key, budget, regulated rule and audit row stays as it is; the model keeps its "
        "name, so routes that target it need no change.",
        "",
        "```toml",
        "[[models]]",
        f'name = "{m.name}"',
        'server = "openai"',
        f'url = "http://{head}:{opts.api_port}/v1"',
        "```",
        "",
    ]
    return "\n".join(out)


def _command(node: NodeLaunch) -> str:
    """The environment and argv, one flag and its value per line."""
    parts = [f"{k}={shlex.quote(v)}" for k, v in node.env.items()]
    words: list[str] = []
    for arg in node.argv:
        if arg.startswith("--") or not words:
            words.append(shlex.quote(arg))
        else:
            words[-1] += " " + shlex.quote(arg)
    return " \\\n    ".join(parts + words)
