"""The admin API's typed surface: what it answers (the daemon's status, the GPUs and
the CPU budget, a replica's log tail) and the operator actions it takes.

One definition, used on both sides: the admin handlers return these Structs (Litestar
encodes them and generates their part of /openapi.json from them), ``appliance status
--json`` and the TUI decode the answers into them, and ``/metrics`` reads its label
values from them. Times are ISO-8601 timestamps (UTC), durations are seconds (``*_s``).

Adding a field: one line in its Struct, with a default (so that a CLI or TUI older than
the daemon still decodes the answer), and one where it is filled in: a model's in
``Supervisor.status``, a replica's in ``Replica.snapshot``, the daemon's and the GPUs'
in ``appliance/api/admin_views.py``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Literal
from urllib.parse import quote

import msgspec

# --- the operator's actions: one vocabulary for the admin API, the CLI and the TUI -------


class ModelAction(StrEnum):
    """POST /admin/models/{model}/{action}; `appliance ACTION MODEL`."""

    LOAD = "load"
    UNLOAD = "unload"
    PIN = "pin"
    UNPIN = "unpin"


class ReplicaAction(StrEnum):
    """POST /admin/models/{model}/replicas/{index}/{action}."""

    RESTART = "restart"
    DRAIN = "drain"


SCALE = "scale"  # POST /admin/models/{model}/scale, with a ScaleBody: `appliance scale MODEL N|auto`


def model_path(model: str, *rest: object) -> str:
    """/admin/models/{model}/{rest...}: the model's name as one segment, its "/" (an
    ORG/NAME model) sent as %2F (appliance/api/admin_paths.py reads it back whole)."""
    return "/".join(("/admin/models", quote(model, safe=""), *map(str, rest)))


# What each action does: the CLI commands' help.
MODEL_ACTION_HELP = {
    ModelAction.LOAD: "Pre-warm MODEL: start a replica now, as if a request had arrived (stopping idle "
    "replicas of other models if there is no room; an error saying who holds it if none may go).",
    ModelAction.UNLOAD: "Drain MODEL's replicas down to zero; its next request starts it again.",
    ModelAction.PIN: "Keep MODEL at min_replicas however idle it is (kept across restarts).",
    ModelAction.UNPIN: "Let MODEL idle to zero again.",
}


class ScaleBody(msgspec.Struct, forbid_unknown_fields=True):
    """A model's replica count, kept across restarts; null hands it back to the autoscaler."""

    replicas: Annotated[int, msgspec.Meta(ge=0)] | None


class ActionBody(msgspec.Struct, forbid_unknown_fields=True):
    """The other actions say nothing: their body is {} (still JSON, see admin_access)."""


# --- a replica ----------------------------------------------------------------------------


class ReplicaLoad(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What the engine's own /metrics says about its load (absent: it does not say)."""

    running: float | None = None
    waiting: float | None = None
    kv_cache_usage: float | None = None
    prefix_cache_hit_rate: float | None = None


class ReplicaStatus(msgspec.Struct, kw_only=True):
    """One engine replica; also the answer to a replica action."""

    replica: str  # MODEL#INDEX
    index: int
    state: str  # STOPPED, STARTING, READY, SLEEPING, DRAINING, BACKOFF, FATAL
    engine: str | None = None  # llamacpp, vllm, sglang, openai
    pid: int | None = None
    port: int | None = None
    url: str | None = None
    supervised: bool = True  # False: an external engine (server = "openai" with url)
    inflight: int = 0
    retiring: bool = False
    restarts: int = 0
    gpus: list[int] | None = None
    memory_fraction: float | None = None
    cpus: list[int] = []  # the cores a CPU replica is bound to
    rss_bytes: int | None = None  # host memory its engine process holds (resident)
    uptime_s: float | None = None  # since it last became READY
    image: str | None = None
    load: ReplicaLoad | None = None
    last_error: str | None = None
    log_file: str | None = None
    log_tail: list[str] = []  # the last log lines of a FATAL replica
    # In the answer to an operator's restart or drain: what the daemon does, in words.
    said: str | None = None


class Decision(msgspec.Struct, kw_only=True):
    """One of the autoscaler's decisions, with the inputs it was made from."""

    model: str
    at: datetime
    current: int
    desired: int
    action: str  # up | down | hold | sleep | wake
    reason: str
    inputs: dict[str, float | bool | None] = {}  # an int is a number too


# --- a model deployment -----------------------------------------------------------------


class ModelStatus(msgspec.Struct, kw_only=True):
    """One model deployment; also the answer to a model action or a scale."""

    name: str
    server: str
    source: str | None = None
    ready: bool = False
    pinned: bool = False
    override: int | None = None  # the operator's replica count; None: autoscaling
    rps_10s: float = 0.0
    rps_60s: float = 0.0
    inflight: int = 0
    queued: int = 0
    idle_s: float = 0.0
    idle_ttl_s: float = 0.0
    last_cold_start_s: float | None = None
    min_replicas: int = 0
    max_replicas: int = 0
    blocked: str | None = None  # why a store model is not served
    # Why a replica it wants (its floor, or one for requests held) has not started: the room
    # it needs is held by other models (the capacity market, appliance/fleet/eviction.py).
    waiting_for_room: str | None = None
    ttft_p50_ms: float | None = None
    replicas: list[ReplicaStatus] = []
    decisions: list[Decision] = []
    prefix_routing: dict[str, int] = {}  # outcome (hit, miss, load_guard) -> choices made
    # Its LoRA adapters (model names of their own) -> why one is not served ("": served).
    adapters: dict[str, str] = {}
    # In the answer to an operator action: what the daemon does, and why (clamped, waiting
    # for capacity held by X, ...), in words.
    said: str | None = None


# --- routes and keys --------------------------------------------------------------------


class RouteStatus(msgspec.Struct, kw_only=True):
    name: str
    model: str
    tag: str = ""
    target: str
    regulated: bool = True
    fallbacks: list[str] = []
    fired: dict[str, int] = {}  # fallback -> times it took a request


class KeyUsage(msgspec.Struct, kw_only=True):
    """One API key's traffic since the daemon started."""

    key: str
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    tokens: int = 0


class Eviction(msgspec.Struct, kw_only=True):
    """A replica the capacity market evicted: what, for whom, why, to sleep or stopped."""

    replica: str  # "a#0"
    model: str
    to: str  # "sleep" (weights to host RAM) or "stop"
    for_model: str  # the model that needed the room
    trigger: str  # what asked for the room: request, load, scale_up, fairness, headroom
    why: str
    at: datetime


# --- the daemon -------------------------------------------------------------------------


class Paths(msgspec.Struct, kw_only=True):
    state: str
    cache: str
    logs: str


class DaemonStatus(msgspec.Struct, kw_only=True):
    """GET /admin/status: the whole daemon."""

    version: str
    config: str
    started: datetime
    now: datetime  # when this status was taken
    uptime_s: float
    draining: bool = False
    ready: bool = False
    # Engines start under their seccomp sandbox (appliance/fleet/sandbox.py); False: this
    # kernel takes no filter, and they start without it (logged at start).
    engines_sandboxed: bool = False
    # Engines start under their Landlock ruleset (appliance/fleet/landlock.py): they cannot
    # open the state directory, the admin token, provider keys nor other replicas' keys;
    # False: this kernel has no Landlock, and they start without it (logged at start).
    engines_landlocked: bool = False
    listen: str
    paths: Paths
    models: list[ModelStatus] = []
    routes: list[RouteStatus] = []
    usage: list[KeyUsage] = []
    evictions: list[Eviction] = []


# --- GPUs and the CPU budget --------------------------------------------------------------


class PlacedReplica(msgspec.Struct, kw_only=True):
    """A replica on a GPU."""

    replica: str
    state: str
    memory_fraction: float | None = None
    reserved_bytes: int | None = None  # what the placer reserved for it on this GPU
    used_bytes: int | None = None  # what its engine's processes use there (NVML), once running


class GpuStatus(msgspec.Struct, kw_only=True):
    index: int
    name: str
    kind: str
    total_bytes: int
    used_bytes: int
    utilization_pct: int | None = None
    replicas: list[PlacedReplica] = []


class CpuHolder(msgspec.Struct, kw_only=True):
    """A CPU replica and the cores it holds."""

    replica: str
    cores: int
    cpus: list[int] = []
    host_bytes: int | None = None  # host RAM it is budgeted (its weights and KV cache)
    state: str


class SleepingReplica(msgspec.Struct, kw_only=True):
    """A sleeping vLLM replica: its weights in host RAM, its GPU memory freed."""

    replica: str
    host_bytes: int | None = None
    gpus: list[int] = []


class CpuBudget(msgspec.Struct, kw_only=True):
    """The CPU engines' cores, and host RAM (CPU replicas and sleeping GPU replicas)."""

    cores: int
    used: int
    replicas: list[CpuHolder] = []
    host_ram_bytes: int = 0
    host_ram_used_bytes: int = 0
    sleeping: list[SleepingReplica] = []


class GpusStatus(msgspec.Struct, kw_only=True):
    """GET /admin/gpus: each GPU with the replicas on it, and the CPU engines' budget."""

    source: str  # nvml, or the simulated inventory's file
    error: str | None = None
    gpus: list[GpuStatus] = []
    cpu: CpuBudget
    evictions: list[Eviction] = []  # the latest, newest first


class DaemonLog(msgspec.Struct, kw_only=True):
    """GET /admin/log: the last lines of the daemon's own log (what `appliance logs` shows)."""

    source: str  # server.log_file, or the journalctl command that read the journal
    lines: list[str] = []


class ReplicaLog(msgspec.Struct, kw_only=True):
    """GET /admin/models/{model}/replicas/{index}/log: the last lines of its engine log."""

    replica: str
    file: str
    lines: list[str] = []


class Readiness(msgspec.Struct, kw_only=True, omit_defaults=True):
    """GET /readyz. ``models`` only to a caller with a key or the admin credential once
    keys are required."""

    status: Literal["ready", "starting", "draining"]
    models: dict[str, bool] | None = None


def at_wall_clock(monotonic_at: float, monotonic_now: float, wall_now: float) -> datetime:
    """A moment the daemon measured on its monotonic clock, as a UTC timestamp."""
    return datetime.fromtimestamp(wall_now - (monotonic_now - monotonic_at), UTC)


def market_lines(gpus: GpusStatus) -> list[str]:
    """The capacity market in words, one line each (`appliance plan` with a daemon running,
    the TUI's overview): per GPU what each replica holds (reserved by the placer, and used
    as NVML measures it once its engine runs), what sleeps in host RAM, and the recent
    evictions: what, for whom, why."""
    gib = 1024**3
    lines = []
    for g in gpus.gpus:
        lines.append(f"GPU {g.index}  {g.name}  {g.used_bytes / gib:.1f}/{g.total_bytes / gib:.1f} GiB used")
        for r in g.replicas:
            held = f"reserved {r.reserved_bytes / gib:.1f} GiB" if r.reserved_bytes else "reserved -"
            used = f", uses {r.used_bytes / gib:.1f} GiB (NVML)" if r.used_bytes else ""
            lines.append(f"  {r.replica} {r.state}: {held}{used}")
        if not g.replicas:
            lines.append("  no replicas")
    cpu = gpus.cpu
    budget = f" of {cpu.host_ram_bytes / gib:.1f} GiB host RAM" if cpu.host_ram_bytes else ""
    lines.append(f"Asleep in host RAM ({cpu.host_ram_used_bytes / gib:.1f}{budget} in use):")
    for s in cpu.sleeping:
        on = f", wakes on GPU {','.join(map(str, s.gpus))}" if s.gpus else ""
        lines.append(f"  {s.replica}: {(s.host_bytes or 0) / gib:.1f} GiB{on}")
    if not cpu.sleeping:
        lines.append("  none")
    lines.append("Recent evictions (newest first):")
    for e in gpus.evictions:
        done = "put to sleep" if e.to == "sleep" else "stopped"
        lines.append(f"  {e.at:%H:%M:%S} {e.replica} {done} for {e.for_model} ({e.trigger}): {e.why}")
    if not gpus.evictions:
        lines.append("  none")
    return lines


# --- a config reload (appliance/api/reload.py) ----------------------------------------------


class ReloadBody(msgspec.Struct, forbid_unknown_fields=True):
    """POST /admin/reload: wait for the replicas of changed models to be replaced
    (else the answer comes once the new config is live and the rolls have started)."""

    wait: bool = False


class ReloadReport(msgspec.Struct, kw_only=True):
    """What a reload changed: the answer to POST /admin/reload and `appliance reload`."""

    config: str  # the file read
    added: list[str] = []  # models started
    removed: list[str] = []  # models draining: no new request, stopped once theirs end
    removing: dict[str, int] = {}  # removed model -> its requests (in flight or held) at the reload
    changed: dict[str, list[str]] = {}  # model -> its changed settings
    rolling: list[str] = []  # models whose replicas are being replaced (engine settings changed)
    rolled: dict[str, str] = {}  # model -> how its roll ended (when the caller waited for it)
    failed: dict[str, str] = {}  # model -> why it could not be added (the rest was applied)
    policy: list[str] = []  # routes, providers and live settings changed: swapped at once
    seconds: float = 0.0  # from the request to the new config live (rolls included when waited for)

    @property
    def said(self) -> str:
        """In the words of the operator actions' answers (the TUI shows them)."""
        return f"config reloaded: {self.summary()}"

    def removal(self, name: str) -> str:
        """A removed model's state when the reload answered, in the present tense: its
        replicas drain, and stop once the requests it had then end."""
        running = self.removing.get(name, 0)
        if not running:
            return "removed: stopping (no request to finish)"
        return f"removed: draining, stops when its {running} request{'s end' if running > 1 else ' ends'}"

    def summary(self) -> str:
        rolls = len(self.rolling) + len(self.rolled)
        if not (self.added or self.removed or self.changed or rolls or self.failed or self.policy):
            # Said plainly: a reload after an edit that did not take (a file saved elsewhere,
            # an editor's swap file) would otherwise read as five zeros to be added up.
            return "nothing changed (the file says what the daemon runs already)"
        return (
            f"{len(self.added)} models added, {len(self.removed)} removed, {rolls} rolled, "
            f"{len(self.changed) - rolls} changed live, {len(self.policy)} policy changes"
        )
