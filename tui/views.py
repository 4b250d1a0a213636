"""What each view shows, as Rich renderables made from the admin API's answers
(appliance/status.py's Structs).

Pure functions, no Textual: the words carry the meaning (states, yes/no, a bar of
block characters with its numbers), colour only repeats it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from appliance.status import DaemonStatus, GpusStatus, ModelStatus, RouteStatus
from tui import market

T = TypeVar("T")

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


# --- sorting and filtering the tables ---------------------------------------------------


@dataclass(frozen=True)
class Column:
    """A sortable column: its title, and the value its rows sort by (numbers sort highest first)."""

    title: str
    value: Callable[[Any], Any]
    numeric: bool = False


@dataclass(frozen=True)
class Order:
    """How the operator arranged a table: a sort column (None: the daemon's order), and a filter."""

    column: int | None = None
    reverse: bool = False
    filter: str = ""

    def next_column(self, count: int) -> Order:
        """htop's way: step to the next column; after the last, back to the daemon's order."""
        column = 0 if self.column is None else self.column + 1
        return Order(None if column >= count else column, False, self.filter)


def arrange(items: Sequence[T], columns: Sequence[Column], order: Order, words: Callable[[T], str]) -> list[T]:
    """The rows the filter keeps (every word of it found, any case), in the chosen order."""
    wanted = order.filter.lower().split()
    kept = [item for item in items if all(w in words(item).lower() for w in wanted)]
    if order.column is None:
        return kept
    column = columns[order.column]

    def key(item: T) -> tuple[bool, Any]:
        value = column.value(item)
        return (value is None, value if value is not None else 0)

    descending = column.numeric != order.reverse
    present = sorted((i for i in kept if column.value(i) is not None), key=key, reverse=descending)
    return present + [i for i in kept if column.value(i) is None]  # unknown values last, either way


def titles(columns: Sequence[Column], order: Order) -> list[str]:
    """Column titles, the sorted one marked ▼ (highest first) or ▲."""
    marks = {}
    if order.column is not None:
        marks[order.column] = " ▼" if columns[order.column].numeric != order.reverse else " ▲"
    return [c.title + marks.get(i, "") for i, c in enumerate(columns)]


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
        parts.append(cpu_only(gpus.error))
    if gpus is not None:
        parts.append(Text(""))
        parts.extend(cpu_budget(gpus))
    parts.append(Text(""))
    parts.append(models_summary(status))
    if gpus is not None:
        parts.extend([Text(""), market.panel(gpus)])
    return Group(*parts)


# NVML's failures as an operator reads them (install.sh says the same: "CPU-only mode").
NVML_WORDS = {
    "LibraryNotFound": "the NVIDIA driver is not installed",
    "DriverNotLoaded": "the NVIDIA driver is not loaded",
    "NoPermission": "no permission to open the NVIDIA devices",
}


def cpu_only(error: str | None) -> Text:
    """The line that replaces the GPU table when there is none: why, in words."""
    why = next((words for code, words in NVML_WORDS.items() if error and code in error), error or "none found")
    return Text.assemble(("CPU-only", "bold"), f": no NVIDIA GPU ({why})")


def cpu_budget(gpus: GpusStatus) -> list[Text]:
    """The CPU engines' cores and host RAM; budgets beyond the machine stand out, in words."""
    cpu = gpus.cpu
    over = cpu.used > cpu.cores
    cores = Text.assemble(
        ("CPU engines", "bold"),
        f"  {bar(cpu.used, cpu.cores, 16)} ",
        (f"{cpu.used}/{cpu.cores} cores", "bold reverse red" if over else ""),
    )
    lines = [cores]
    if over:
        lines.append(
            Text(
                f"  WARNING over-committed: {cpu.used} cores budgeted, the machine has {cpu.cores}",
                style="bold red",
            )
        )
    if cpu.host_ram_bytes and cpu.host_ram_used_bytes > cpu.host_ram_bytes:
        lines.append(
            Text(
                f"  WARNING over-committed: {cpu.host_ram_used_bytes / GiB:.1f} GiB host RAM budgeted, "
                f"the machine has {cpu.host_ram_bytes / GiB:.1f} GiB",
                style="bold red",
            )
        )
    users = ", ".join(f"{r.replica} {r.cores}" for r in cpu.replicas) or "none"
    lines.append(Text(f"  └ {users}"))
    return lines


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


MODEL_COLUMNS = (
    Column("MODEL", lambda m: m.name),
    Column("STATE", model_state),
    Column("REPL", lambda m: len(m.replicas), numeric=True),
    Column("RPS", lambda m: m.rps_10s, numeric=True),
    Column("QUEUE", lambda m: m.queued, numeric=True),
    Column("INFL", lambda m: m.inflight, numeric=True),
    Column("TTFT p50", lambda m: m.ttft_p50_ms, numeric=True),
    Column("PIN", lambda m: m.pinned),
)


def _model_words(m: ModelStatus) -> str:
    return " ".join([m.name, m.server, model_state(m), *(f"#{r.index} {r.state}" for r in m.replicas)])


def model_rows(status: DaemonStatus, order: Order = Order()) -> list[tuple[str, tuple]]:
    """(row key, cells) for the models table: each model, then its replicas (they move with it)."""
    rows: list[tuple[str, tuple]] = []
    for m in arrange(status.models, MODEL_COLUMNS, order, _model_words):
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


def gpu_memory(gpus: GpusStatus | None) -> dict[str, int]:
    """Each GPU replica's memory as NVML measured it, summed over its GPUs."""
    used: dict[str, int] = {}
    for g in gpus.gpus if gpus is not None else []:
        for p in g.replicas:
            if p.used_bytes:
                used[p.replica] = used.get(p.replica, 0) + p.used_bytes
    return used


def model_detail(status: DaemonStatus, name: str | None, gpus: GpusStatus | None = None) -> RenderableType:
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
    if m.waiting_for_room:
        lines.append(Text(m.waiting_for_room, style="yellow"))
    measured = gpu_memory(gpus)
    for r in m.replicas:
        where = f"port {r.port}" if r.port else (r.url or "")
        placement = f" GPU {','.join(map(str, r.gpus))}" if r.gpus else (f" {len(r.cpus)} cores" if r.cpus else "")
        # What `appliance ps` shows, where the daemon measured it.
        extra = "".join(
            part
            for part in (
                f" GPU mem {measured[r.replica] / GiB:.1f} GiB" if r.replica in measured else "",
                f" mem {r.rss_bytes / 2**20:.0f} MiB" if r.rss_bytes else "",
                f" up {duration(r.uptime_s)}" if r.uptime_s is not None else "",
                f" image {r.image}" if r.image else "",
            )
        )
        line = Text.assemble(
            f"#{r.index} ",
            state_text(r.state),
            f" {where}{placement} in-flight {r.inflight} restarts {r.restarts}{extra}",
        )
        if r.last_error:
            line.append(f"  last error: {r.last_error}", style="red")
        lines.append(line)
        if r.state == "FATAL":  # the daemon gave up: nothing happens until the operator acts
            lines.append(
                Text(
                    f"  no restart is coming: fix the cause (its log: 4 then ] to #{r.index}), "
                    f"then press r on #{r.index} in this table to restart it",
                    style="yellow",
                )
            )
    lines.append(Text("Autoscaler:" if m.decisions else "Autoscaler: no decisions yet", style="bold"))
    for d in reversed(m.decisions[-4:]):
        ago = f"{duration((status.now - d.at).total_seconds())} ago"
        lines.append(Text(f" {ago:>9} {d.action:<5} {d.current}→{d.desired}  {d.reason}"))
    return Group(*lines)


# --- routes and usage ---------------------------------------------------------------------


ROUTE_COLUMNS = (
    Column("ROUTE", lambda r: r.name),
    Column("MODEL", lambda r: (r.model, r.tag)),
    Column("TARGET", lambda r: r.target),
    Column("REGULATED", lambda r: r.regulated),
    Column("FALLBACKS (fired)", lambda r: sum(r.fired.values()), numeric=True),
)
USAGE_COLUMNS = (
    Column("KEY", lambda u: u.key),
    Column("REQUESTS", lambda u: u.requests, numeric=True),
    Column("PROMPT TOKENS", lambda u: u.prompt_tokens, numeric=True),
    Column("COMPLETION TOKENS", lambda u: u.completion_tokens, numeric=True),
    Column("TOTAL", lambda u: u.tokens, numeric=True),
)


def _route_words(r: RouteStatus) -> str:
    return " ".join([r.name, r.model, r.tag, r.target, *r.fallbacks, "regulated" if r.regulated else ""])


def empty_note(kind: str, none: str, total: int, shown: int, order: Order) -> Text:
    """What a table says when it shows no row: nothing configured, or nothing matches
    (the filter as typed, never read as markup)."""
    if not total:
        return Text(none)
    if not shown:
        return Text(f"No {kind} match the filter '{order.filter}' (Esc clears it).")
    return Text("")


def route_rows(status: DaemonStatus, order: Order = Order()) -> list[tuple[str, tuple]]:
    """(row key, cells) for the routes table."""
    rows = []
    for r in arrange(status.routes, ROUTE_COLUMNS, order, _route_words):
        fallbacks = ", ".join(f"{f} ({r.fired.get(f, 0)})" for f in r.fallbacks) or "none"
        model = r.model + (f" [{r.tag}]" if r.tag else "")
        rows.append((f"route:{r.name}", (r.name, model, r.target, "yes" if r.regulated else "no", fallbacks)))
    return rows


def usage_rows(status: DaemonStatus, order: Order = Order()) -> list[tuple[str, tuple]]:
    """(row key, cells) for the usage table: one API key each, its counts right-aligned."""
    rows = []
    for u in arrange(status.usage, USAGE_COLUMNS, order, lambda u: u.key):
        counts = (u.requests, u.prompt_tokens, u.completion_tokens, u.tokens)
        rows.append((f"key:{u.key}", (u.key, *(Text(str(n), justify="right") for n in counts))))
    return rows
