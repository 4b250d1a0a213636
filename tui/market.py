"""The capacity market's panel (issue 17): per GPU what each replica holds (reserved by the
placer, used as NVML measures it), what sleeps in host RAM, and the recent evictions (what,
for whom, why). The words are appliance/status.market_lines', the ones `appliance plan`
prints with a daemon running; the panel only adds emphasis."""

from __future__ import annotations

from rich.console import Group, RenderableType
from rich.text import Text

from appliance.status import GpusStatus, market_lines

TITLES = ("GPU ", "Asleep in host RAM", "Recent evictions")


def panel(gpus: GpusStatus) -> RenderableType:
    lines = [Text("Capacity market", style="bold")]
    for line in market_lines(gpus):
        style = "bold" if line.startswith(TITLES) else ("dim" if line.strip() in ("none", "no replicas") else "")
        lines.append(Text(line, style=style))
    return Group(*lines)
