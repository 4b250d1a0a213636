"""What each view shows, as Rich renderables made from the admin API's JSON.

Pure functions, no Textual: the words carry the meaning (states, yes/no, a bar of
block characters with its numbers), colour only repeats it.
"""

from __future__ import annotations

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

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


def model_state(m: dict) -> str:
    """One word for a model: the best its replicas manage."""
    states = [r["state"] for r in m.get("replicas", []) if not r.get("retiring")]
    if not states:
        return "DRAINING" if m.get("replicas") else "ZERO"
    for state in ("READY", "STARTING", "BACKOFF", "SLEEPING", "DRAINING", "STOPPED"):
        if state in states:
            return state
    return "FATAL"


def ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}ms" if value < 10_000 else f"{value / 1000:.1f}s"


def header(status: dict | None, where: str) -> Text:
    if status is None:
        return Text.assemble(("appliance", "bold"), f"  connecting to {where}")
    state = "draining" if status.get("draining") else ("ready" if status.get("ready") else "starting")
    return Text.assemble(
        ("appliance", "bold"),
        f" {status.get('version', '?')} │ ",
        (state.upper(), "bold"),
        f" │ up {duration(status.get('uptime_s'))} │ {status.get('listen', '?')} │ {short_where(where)}",
    )


def short_where(where: str, width: int = 24) -> str:
    if len(where) <= width:
        return where
    if where.startswith("unix:"):
        return "unix:…/" + where.rsplit("/", 1)[-1]
    return where[: width - 1] + "…"


# --- overview -------------------------------------------------------------------------


def overview(status: dict, gpus: dict | None) -> RenderableType:
    parts: list[RenderableType] = []
    if gpus is None:
        parts.append(Text("GPUs: asking the daemon..."))
    elif gpus.get("gpus"):
        parts.append(Text(f"GPUs ({gpus.get('source', '?')})", style="bold"))
        table = Table.grid(padding=(0, 1))
        for _ in range(5):
            table.add_column(no_wrap=True)
        for g in gpus["gpus"]:
            used, total = g.get("used_bytes", 0), g.get("total_bytes", 0)
            util = g.get("utilization_pct")
            table.add_row(
                f"GPU{g['index']}",
                _short_gpu_name(g.get("name", "")),
                bar(used, total, 16),
                f"{used / GiB:5.1f}/{total / GiB:.0f} GiB",
                f"util {util:>3d}%" if util is not None else "util  n/a",
            )
            placed = ", ".join(f"{r['replica']} {r['state']}" for r in g.get("replicas", []))
            table.add_row("", Text(f"  └ {placed or 'no replicas'}", style="dim" if not placed else ""), "", "", "")
        parts.append(table)
    else:
        why = gpus.get("error") or "no GPUs found"
        parts.append(Text.assemble(("No GPUs", "bold"), f" ({why})"))
    if gpus is not None:
        cpu = gpus.get("cpu") or {}
        cores, used = cpu.get("cores", 0), cpu.get("used", 0)
        users = ", ".join(f"{r['replica']} {r['cores']}" for r in cpu.get("replicas", [])) or "none"
        parts.append(Text(""))
        parts.append(Text.assemble(("CPU engines", "bold"), f"  {bar(used, cores, 16)} {used}/{cores} cores"))
        parts.append(Text(f"  └ {users}"))
    parts.append(Text(""))
    parts.append(models_summary(status))
    return Group(*parts)


def _short_gpu_name(name: str) -> str:
    return name.removeprefix("NVIDIA ")[:18]


def models_summary(status: dict) -> RenderableType:
    table = Table(box=None, padding=(0, 1), show_edge=False, header_style="bold")
    for col in ("MODEL", "STATE", "REPLICAS", "RPS", "QUEUE", "IN-FLIGHT"):
        table.add_column(col, no_wrap=True)
    models = status.get("models", [])
    for m in models:
        states = " ".join(r["state"] for r in m.get("replicas", [])) or "-"
        table.add_row(
            m["name"],
            state_text(model_state(m)),
            states[:24],
            f"{m.get('rps_10s', 0):.1f}",
            str(m.get("queued", 0)),
            str(m.get("inflight", 0)),
        )
    if not models:
        return Text("No models configured.")
    return table


# --- models ---------------------------------------------------------------------------


MODEL_COLUMNS = ("MODEL", "STATE", "REPL", "RPS", "QUEUE", "INFL", "TTFT p50", "PIN")


def model_rows(status: dict) -> list[tuple[str, tuple]]:
    """(row key, cells) for the models table: each model, then its replicas."""
    rows = []
    for m in status.get("models", []):
        replicas = m.get("replicas", [])
        count = f"{len(replicas)}/{m.get('max_replicas', '?')}"
        if m.get("override") is not None:
            count += "!"
        rows.append(
            (
                f"m:{m['name']}",
                (
                    Text(m["name"], style="bold"),
                    state_text(model_state(m)),
                    count,
                    f"{m.get('rps_10s', 0):.1f}",
                    str(m.get("queued", 0)),
                    str(m.get("inflight", 0)),
                    ms(m.get("ttft_p50_ms")),
                    "yes" if m.get("pinned") else "no",
                ),
            )
        )
        for r in replicas:
            name = f"  #{r['index']}" + (f" pid {r['pid']}" if r.get("pid") else "")
            state = r["state"] + (" (out)" if r.get("retiring") else "")
            rows.append(
                (
                    f"r:{m['name']}:{r['index']}",
                    (name, state_text(state), "", "", "", str(r.get("inflight", 0)), "", ""),
                )
            )
    return rows


def model_detail(status: dict, name: str | None) -> RenderableType:
    m = next((m for m in status.get("models", []) if m["name"] == name), None)
    if m is None:
        return Text("No model selected.")
    how = (
        f"operator set {m['override']} replicas"
        if m.get("override") is not None
        else f"autoscaling {m.get('min_replicas', 0)}-{m.get('max_replicas', '?')}"
    )
    ttl = m.get("idle_ttl_s") or 0
    idle = f"idle {duration(m.get('idle_s'))}" + (f" of {duration(ttl)}" if ttl else ", no TTL")
    lines = [
        Text.assemble(
            (m["name"], "bold"),
            f"  {m.get('server', '?')}  {how}  pinned: {'yes' if m.get('pinned') else 'no'}  {idle}",
        ),
        Text(
            f"rps {m.get('rps_10s', 0):.2f} (10s) {m.get('rps_60s', 0):.2f} (60s)  TTFT p50 "
            f"{ms(m.get('ttft_p50_ms'))}  last cold start {duration(m.get('last_cold_start_s'))}"
        ),
    ]
    if m.get("blocked"):
        lines.append(Text(f"not served: {m['blocked']}", style="red"))
    for r in m.get("replicas", []):
        where = f"port {r['port']}" if r.get("port") else (r.get("url") or "")
        gpus = f" GPU {','.join(map(str, r['gpus']))}" if r.get("gpus") else ""
        line = Text.assemble(
            f"#{r['index']} ",
            state_text(r["state"]),
            f" {where}{gpus} in-flight {r.get('inflight', 0)} restarts {r.get('restarts', 0)}",
        )
        if r.get("last_error"):
            line.append(f"  last error: {r['last_error']}", style="red")
        lines.append(line)
    decisions = m.get("decisions") or []
    now = status.get("monotonic")
    lines.append(Text("Autoscaler:" if decisions else "Autoscaler: no decisions yet", style="bold"))
    for d in reversed(decisions[-4:]):
        ago = f"{duration(now - d['at'])} ago" if now is not None else ""
        lines.append(Text(f" {ago:>9} {d['action']:<5} {d['current']}→{d['desired']}  {d['reason']}"))
    return Group(*lines)


# --- routes and usage ---------------------------------------------------------------------


def routes(status: dict) -> RenderableType:
    items = status.get("routes")
    if not items:
        return Text("No routes configured.")
    if isinstance(items, dict):
        items = [{"name": k, **v} for k, v in items.items()]
    table = Table(box=None, padding=(0, 1), header_style="bold", expand=True)
    for col in ("ROUTE", "MODEL", "TARGET", "REGULATED", "FALLBACKS (fired)"):
        table.add_column(col, overflow="fold")
    for r in items:
        fired = r.get("fired") or r.get("fallbacks_fired") or {}
        fallbacks = []
        for f in r.get("fallbacks", []):
            if isinstance(f, dict):
                name = f.get("name") or f.get("provider") or f.get("model") or "?"
                count = f.get("fired", f.get("count", 0))
            else:
                name, count = f, fired.get(f, 0) if isinstance(fired, dict) else 0
            fallbacks.append(f"{name} ({count})")
        model = r.get("model", "")
        if r.get("tag"):
            model += f" [{r['tag']}]"
        table.add_row(
            r.get("name", "?"),
            model,
            r.get("target", ""),
            "yes" if r.get("regulated", True) else "no",
            ", ".join(fallbacks) or "none",
        )
    return table


def usage(status: dict) -> RenderableType:
    items = status.get("usage")
    if not items:
        return Text("No API keys configured.")
    if isinstance(items, dict):
        items = [{"key": k, **v} for k, v in items.items()]
    table = Table(box=None, padding=(0, 1), header_style="bold", expand=True)
    for col in ("KEY", "REQUESTS", "PROMPT TOKENS", "COMPLETION TOKENS", "TOTAL"):
        table.add_column(col, justify="left" if col == "KEY" else "right")
    for u in items:
        prompt, completion = u.get("prompt_tokens", 0), u.get("completion_tokens", 0)
        table.add_row(
            str(u.get("key") or u.get("name") or "?"),
            str(u.get("requests", 0)),
            str(prompt),
            str(completion),
            str(u.get("tokens", prompt + completion)),
        )
    return table
