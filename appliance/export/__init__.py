"""`appliance export`: hand a model's deployment to what runs beyond one box (vLLM's or
SGLang's own multi-node, KServe, llm-d), from the same config, the store's manifest and
the pinned engine. One renderer per target, each a pure function of `source.Source` and
`source.Options` to documents; `source.gather` is the one part that reads the box. The
appliance itself never schedules across nodes (docs/beyond-one-box.md).

Nothing is imported until an export runs: every `appliance` command loads this package."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from appliance.export.source import Options, Rendered, Source

TARGETS = ("vllm-multinode", "sglang-multinode", "kserve", "llm-d")


def render(target: str, src: Source, opts: Options) -> Rendered:
    from appliance.export import kserve, llmd, multinode
    from appliance.export.source import ExportError

    if target.endswith("-multinode"):
        engine = target.removesuffix("-multinode")
        if engine != src.engine.engine:
            raise ExportError(
                f"model '{src.model.name}' runs on {src.engine.engine} (server = "
                f'"{src.model.server}"): export it with --to {src.engine.engine}-multinode'
            )
        return multinode.render(src, opts)
    return {"kserve": kserve.render, "llm-d": llmd.render}[target](src, opts)
