"""What each view shows, as Rich renderables made from the admin API's answers
(appliance/status.py's Structs).

Pure functions, no Textual: the words carry the meaning (states, yes/no, a bar of
block characters with its numbers), colour only repeats it.
"""

from __future__ import annotations

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from appliance.status import DaemonStatus, GpusStatus, ModelStatus

GiB = 1024**3
STATE_STYLE = {
    "READY": "green",
    "STARTING": "yellow",
    "BACKOFF": "yellow",
    "SLEEPING": "cyan",
    "DRAINING": "magenta",
    "STOPPED": "dim",
    "FATAL": "bold red",
}


# --- small formats ------------------------------------------------------------------


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def bar(used: float, total: float, width: int = 20) -> str:
    """A meter readable without colour: '█' used, '░' free."""
    frac = 0.0 if total <= 0 else max(0.0, min(1.0, used / total))
    full = round(frac * width)
    return "█" * full + "░" * (width - full)


def state_text(state: str) -> Text:
    return Text(state, style=STATE_STYLE.get(state, ""))


def model_state(m: ModelStatus) -> str:
    """One word for a model: the best its replicas manage."""
    states = [r.state for r in m.replicas if not r.retiring]
    if not states:
        return "DRAINING" if m.replicas else "ZERO"
    for state in ("READY", "STARTING", "BACKOFF", "SLEEPING", "DRAINING", "STOPPED"):
        if state in states:
            return state
    return "FATAL"


def ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}ms" if value < 10_000 else f"{value / 1000:.1f}s"


def header(status: DaemonStatus | None, where: str) -> Text:
    if status is None:
        return Text.assemble(("appliance", "bold"), f"  connecting to {where}")
    state = "draining" if status.draining else ("ready" if status.ready else "starting")
    return Text.assemble(
        ("appliance", "bold"),
        f" {status.version} │ ",
        (state.upper(), "bold"),
        f" │ up {duration(status.uptime_s)} │ {status.listen} │ {short_where(where)}",
    )


def short_where(where: str, width: int = 24) -> str:
    if len(where) <= width:
        return where
    if where.startswith("unix:"):
        return "unix:…/" + where.rsplit("/", 1)[-1]
    return where[: width - 1] + "…"


# --- overview -------------------------------------------------------------------------


def overview(status: DaemonStatus, gpus: GpusStatus | None) -> RenderableType:
    parts: list[RenderableType] = []
    if gpus is None:
        parts.append(Text("GPUs: asking the daemon..."))
    elif gpus.gpus:
        parts.append(Text(f"GPUs ({gpus.source})", style="bold"))
        table = Table.grid(padding=(0, 1))
        for _ in range(5):
            table.add_column(no_wrap=True)
        for g in gpus.gpus:
            util = g.utilization_pct
            table.add_row(
                f"GPU{g.index}",
                _short_gpu_name(g.name),
                bar(g.used_bytes, g.total_bytes, 16),
                f"{g.used_bytes / GiB:5.1f}/{g.total_bytes / GiB:.0f} GiB",
                f"util {util:>3d}%" if util is not None else "util  n/a",
            )
            placed = ", ".join(f"{r.replica} {r.state}" for r in g.replicas)
            table.add_row("", Text(f"  └ {placed or 'no replicas'}", style="dim" if not placed else ""), "", "", "")
        parts.append(table)
    else:
        why = gpus.error or "no GPUs found"
        parts.append(Text.assemble(("No GPUs", "bold"), f" ({why})"))
    if gpus is not None:
        cpu = gpus.cpu
        users = ", ".join(f"{r.replica} {r.cores}" for r in cpu.replicas) or "none"
        parts.append(Text(""))
        parts.append(
            Text.assemble(("CPU engines", "bold"), f"  {bar(cpu.used, cpu.cores, 16)} {cpu.used}/{cpu.cores} cores")
        )
        parts.append(Text(f"  └ {users}"))
    parts.append(Text(""))
    parts.append(models_summary(status))
    return Group(*parts)


def _short_gpu_name(name: str) -> str:
    return name.removeprefix("NVIDIA ")[:18]


def models_summary(status: DaemonStatus) -> RenderableType:
    table = Table(box=None, padding=(0, 1), show_edge=False, header_style="bold")
    for col in ("MODEL", "STATE", "REPLICAS", "RPS", "QUEUE", "IN-FLIGHT"):
        table.add_column(col, no_wrap=True)
    for m in status.models:
        states = " ".join(r.state for r in m.replicas) or "-"
        table.add_row(
            m.name, state_text(model_state(m)), states[:24], f"{m.rps_10s:.1f}", str(m.queued), str(m.inflight)
        )
    if not status.models:
        return Text("No models configured.")
    return table


# --- models ---------------------------------------------------------------------------


MODEL_COLUMNS = ("MODEL", "STATE", "REPL", "RPS", "QUEUE", "INFL", "TTFT p50", "PIN")


def model_rows(status: DaemonStatus) -> list[tuple[str, tuple]]:
    """(row key, cells) for the models table: each model, then its replicas."""
    rows = []
    for m in status.models:
        count = f"{len(m.replicas)}/{m.max_replicas}"
        if m.override is not None:
            count += "!"
        rows.append(
            (
                f"m:{m.name}",
                (
                    Text(m.name, style="bold"),
                    state_text(model_state(m)),
                    count,
                    f"{m.rps_10s:.1f}",
                    str(m.queued),
                    str(m.inflight),
                    ms(m.ttft_p50_ms),
                    "yes" if m.pinned else "no",
                ),
            )
        )
        for r in m.replicas:
            name = f"  #{r.index}" + (f" pid {r.pid}" if r.pid else "")
            state = r.state + (" (out)" if r.retiring else "")
            rows.append((f"r:{m.name}:{r.index}", (name, state_text(state), "", "", "", str(r.inflight), "", "")))
    return rows


def model_detail(status: DaemonStatus, name: str | None) -> RenderableType:
    m = next((m for m in status.models if m.name == name), None)
    if m is None:
        return Text("No model selected.")
    how = (
        f"operator set {m.override} replicas"
        if m.override is not None
        else f"autoscaling {m.min_replicas}-{m.max_replicas}"
    )
    ttl = m.idle_ttl_s
    idle = f"idle {duration(m.idle_s)}" + (f" of {duration(ttl)}" if ttl else ", no TTL")
    lines = [
        Text.assemble(
            (m.name, "bold"),
            f"  {m.server}  {how}  pinned: {'yes' if m.pinned else 'no'}  {idle}",
        ),
        Text(
            f"rps {m.rps_10s:.2f} (10s) {m.rps_60s:.2f} (60s)  TTFT p50 "
            f"{ms(m.ttft_p50_ms)}  last cold start {duration(m.last_cold_start_s)}"
        ),
    ]
    if m.blocked:
        lines.append(Text(f"not served: {m.blocked}", style="red"))
    for r in m.replicas:
        where = f"port {r.port}" if r.port else (r.url or "")
        gpus = f" GPU {','.join(map(str, r.gpus))}" if r.gpus else ""
        line = Text.assemble(
            f"#{r.index} ",
            state_text(r.state),
            f" {where}{gpus} in-flight {r.inflight} restarts {r.restarts}",
        )
        if r.last_error:
            line.append(f"  last error: {r.last_error}", style="red")
        lines.append(line)
    lines.append(Text("Autoscaler:" if m.decisions else "Autoscaler: no decisions yet", style="bold"))
    for d in reversed(m.decisions[-4:]):
        ago = f"{duration((status.now - d.at).total_seconds())} ago"
        lines.append(Text(f" {ago:>9} {d.action:<5} {d.current}→{d.desired}  {d.reason}"))
    return Group(*lines)


# --- routes and usage ---------------------------------------------------------------------


def routes(status: DaemonStatus) -> RenderableType:
    if not status.routes:
        return Text("No routes configured.")
    table = Table(box=None, padding=(0, 1), header_style="bold", expand=True)
    for col in ("ROUTE", "MODEL", "TARGET", "REGULATED", "FALLBACKS (fired)"):
        table.add_column(col, overflow="fold")
    for r in status.routes:
        fallbacks = [f"{f} ({r.fired.get(f, 0)})" for f in r.fallbacks]
        model = r.model + (f" [{r.tag}]" if r.tag else "")
        table.add_row(r.name, model, r.target, "yes" if r.regulated else "no", ", ".join(fallbacks) or "none")
    return table


def usage(status: DaemonStatus) -> RenderableType:
    if not status.usage:
        return Text("No API keys configured.")
    table = Table(box=None, padding=(0, 1), header_style="bold", expand=True)
    for col in ("KEY", "REQUESTS", "PROMPT TOKENS", "COMPLETION TOKENS", "TOTAL"):
        table.add_column(col, justify="left" if col == "KEY" else "right")
    for u in status.usage:
        table.add_row(u.key, str(u.requests), str(u.prompt_tokens), str(u.completion_tokens), str(u.tokens))
    return table
