"""`appliance export`: hand a model's deployment to what runs beyond one box (vLLM's or
SGLang's own multi-node, KServe, llm-d), from the same config, the store's manifest and
the pinned engine. One renderer per target, each a pure function of `Source` and `Options`
to documents; `source.gather` is the one part that reads the box. The appliance itself never
schedules across nodes (docs/beyond-one-box.md)."""

from __future__ import annotations

from collections.abc import Callable

from . import kserve, llmd, multinode
from .source import ExportError, Options, Rendered, Source, gather

RENDERERS: dict[str, Callable[[Source, Options], Rendered]] = {
    "vllm-multinode": multinode.render,
    "sglang-multinode": multinode.render,
    "kserve": kserve.render,
    "llm-d": llmd.render,
}
TARGETS = tuple(RENDERERS)


def render(target: str, src: Source, opts: Options) -> Rendered:
    engine = target.removesuffix("-multinode")
    if target.endswith("-multinode") and engine != src.engine.engine:
        raise ExportError(f"model '{src.model.name}' runs on {src.engine.engine} (server = "
                          f"\"{src.model.server}\"): export it with --to {src.engine.engine}-multinode")
    return RENDERERS[target](src, opts)


__all__ = ["TARGETS", "ExportError", "Options", "Rendered", "Source", "gather", "render"]
