"""One replica's state: the states and their transitions, the fields its owner task and its
callers share, and ``_transition``, the only code that changes the state.

    STOPPED -> STARTING -> READY -> DRAINING -> STOPPED
                  |          |
                  v          v
               BACKOFF <-----+        (crash, failed start, failed health)
                  |
                  v
                FATAL                 (too many crashes within the window; at once when
                                       there is nothing to launch, e.g. no engine image)

The replica's layers, each a class on the one below: ``ReplicaState`` here; its engine
process (appliance/fleet/replica_engine.py: launch, probes, sleep and wake, stop); its
owner task's loop (replica_owner.py); what callers may ask (replica.py: ``Replica``).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, cast

import aiohttp

from appliance.config import Config, ModelConfig
from appliance.fleet.engine_access import EngineAccess
from appliance.fleet.process import ProcessHandle, ProcessRunner
from engines import EngineAdapter, EngineLoad, GpuSlot, Lora

if TYPE_CHECKING:
    from appliance.fleet.replica import Replica

log = logging.getLogger("appliance.replica")


class State(enum.Enum):
    STOPPED = "STOPPED"
    STARTING = "STARTING"
    READY = "READY"
    SLEEPING = "SLEEPING"
    DRAINING = "DRAINING"
    BACKOFF = "BACKOFF"
    FATAL = "FATAL"


class Clock(Protocol):
    def monotonic(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class RealClock:
    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Transition:
    at: float
    old: State
    new: State
    reason: str


class ReplicaUnavailable(Exception):
    """The replica cannot become ready (FATAL or stopped); the message says why."""


class Crash(Exception):
    """The engine failed (exited, failed its probes) or was restarted: the owner task
    backs off and starts it again, or gives up (FATAL)."""

    def __init__(self, reason: str, counted: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.counted = counted  # an operator's restart is no crash: no backoff, no FATAL


Listener = Callable[["Replica", Transition], None]


class ReplicaState:
    """A replica's fields, and its state's one door (``_transition``)."""

    HOST = "127.0.0.1"

    timeout = None  # the proxy's default timeouts (a provider has its own)

    def __init__(
        self,
        *,
        cfg: Config,
        model: ModelConfig,
        index: int,
        adapter: EngineAdapter,
        runner: ProcessRunner,
        session: aiohttp.ClientSession,
        log_dir: Path,
        clock: Clock | None = None,
        port_allocator: Callable[[], int] = free_port,
        listener: Listener | None = None,
    ) -> None:
        self.cfg = cfg
        self.model = model
        self.loras: tuple[Lora, ...] = ()  # the LoRA adapters it serves (appliance/fleet/lora.py)
        self.index = index
        self.adapter = adapter
        self.runner = runner
        self.log_path = log_dir / f"{model.name.replace('/', '_')}-{index}.log"
        self.supervised = adapter.supervised(model)
        # How the proxy and the probes reach the engine: a supervised replica's own
        # session, made at each start with that start's secret; an external engine's
        # is the shared one.
        self.session: aiohttp.ClientSession | None = None if self.supervised else session
        self.access: EngineAccess | None = None
        self.unix_socket = self.supervised and adapter.unix_socket
        self.clock = clock or RealClock()
        self.port_allocator = port_allocator
        self.listener = listener

        self.state = State.STOPPED
        self.history: deque[Transition] = deque(maxlen=32)
        self.port = 0
        self.base_url = ""
        self.pid = 0
        self.restarts = 0
        self.last_error = ""
        self.fatal_log_tail: list[str] = []
        self.inflight = 0
        self.ready_since = 0.0
        # When the engine's own start or wake began (after any wait for room): READY minus
        # this is what the engine took, the rest of a held request's wait is the daemon's.
        self.loading_since = 0.0
        self.load: EngineLoad | None = None
        # GPU engines: where the placer put this replica; kept across restarts so a
        # crashed replica comes back on the same GPUs.
        self.slot: GpuSlot | None = None
        # CPU engines: the cores the supervisor gave this replica out of the CPU budget; it
        # runs one thread per core, bound to them. Kept across restarts, like slot.
        self.cpus: frozenset[int] = frozenset()
        self.image = ""  # the engine image (<version>-<hash>) of the last launch, if any
        self.cannot_start: str | None = None
        # Awaited before each engine start; a reason means: do not start, FATAL with it
        # (a store model whose files failed verification).
        self.preflight: Callable[[], Awaitable[str | None]] | None = None
        self.retiring = False  # taken out of service: drains, then stops
        # Its engine was sent SIGTERM idle (stop_now_if_idle): it serves nothing from then on,
        # only exits.
        self.told_to_stop = False
        # Evicted to sleep for another model: takes no new request (its GPU memory is wanted)
        # while it goes to sleep; the supervisor clears it once it has left READY.
        self.evicted = False
        # A wake is on its way to it (the supervisor's): its GPU memory is spoken for, though
        # it still sleeps, so nothing else is placed in it meanwhile.
        self.waking = False
        # Called when its last request in flight ends (the supervisor: an idle replica may
        # now be evicted for requests held for room).
        self.on_idle: Callable[[], None] | None = None
        self._want_sleep = False
        self._want_restart = False

        self._crash_times: deque[float] = deque()
        self._proc: ProcessHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._poke = asyncio.Event()
        self._changed = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def name(self) -> str:
        return f"{self.model.name}#{self.index}"

    @property
    def address(self) -> str:
        """Where the engine listens: its URL, or unix:<socket> (vLLM)."""
        if self.unix_socket and self.access is not None:
            return f"unix:{self.access.socket}"
        return self.base_url

    def _transition(self, new: State, reason: str) -> None:
        old = self.state
        if old is new:
            return
        self.state = new
        event = Transition(self.clock.monotonic(), old, new, reason)
        self.history.append(event)
        # A crash or a give-up is a WARNING; an operator's restart (no crash) is not.
        operator = reason.startswith("restart requested by the operator")
        level = logging.WARNING if new in (State.BACKOFF, State.FATAL) and not operator else logging.INFO
        log.log(level, "replica %s %s -> %s: %s", self.name, old.value, new.value, reason)
        if new is State.READY:
            self.ready_since = event.at
        self._changed.set()
        if self.listener is not None:
            self.listener(cast("Replica", self), event)  # (only a Replica is made)
