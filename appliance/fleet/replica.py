"""One engine replica, owned by one asyncio task.

The owner task is the only code that changes the replica's state, through
``_transition``, which logs and publishes every change. Callers ask
(``wait_ready``, ``stop``); they never check-then-act on the state.

    STOPPED -> STARTING -> READY -> DRAINING -> STOPPED
                  |          |
                  v          v
               BACKOFF <-----+        (crash, failed start, failed health)
                  |
                  v
                FATAL                 (too many crashes within the window; at once when
                                       there is nothing to launch, e.g. no engine image)
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import enum
import logging
import signal
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import aiohttp

from appliance.config import Config, ModelConfig
from appliance.fleet.engine_access import EngineAccess, engine_environment, engine_session, open_access
from appliance.fleet.process import ProcessHandle, ProcessRunner, resident_bytes
from appliance.status import ReplicaLoad, ReplicaStatus
from appliance.store.weights import model_path
from engines import CannotLaunch, EngineAdapter, EngineLoad, GpuSlot, Lora, ProbeFailed
from engines.base import SleepingEngine

log = logging.getLogger("appliance.replica")

# A replica failing its readiness probe for longer than this says why (status and log).
STARTING_QUIET_S = 10.0


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


def _load_status(load: EngineLoad | None) -> ReplicaLoad | None:
    if load is None:
        return None
    return ReplicaLoad(
        running=load.running,
        waiting=load.waiting,
        kv_cache_usage=load.kv_cache_usage,
        prefix_cache_hit_rate=load.prefix_cache_hit_rate,
    )


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


class _External:
    """Stands in for the process of an engine the appliance does not supervise."""

    pid = 0

    def __init__(self) -> None:
        self._done = asyncio.get_running_loop().create_future()
        self.wrote = asyncio.Event()  # (its output is not ours to read: never set)

    async def wait(self) -> int:
        return await asyncio.shield(self._done)  # a cancelled waiter must not cancel the exit

    def signal_group(self, sig: int) -> None:
        if not self._done.done():
            self._done.set_result(0)

    def tail(self, lines: int) -> list[str]:
        return []


class _Crash(Exception):
    def __init__(self, reason: str, counted: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.counted = counted  # an operator's restart is no crash: no backoff, no FATAL


Listener = Callable[["Replica", Transition], None]


class Replica:
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

    # --- what callers may ask ---------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            # A fresh context: the replica outlives the request that may have started
            # it, and must not log under that request's id.
            self._task = asyncio.create_task(self._own(), name=f"replica-{self.name}", context=contextvars.Context())

    async def wait_ready(self, timeout: float) -> None:
        deadline = self.clock.monotonic() + timeout
        while self.state is not State.READY:
            if self.state is State.FATAL:
                raise ReplicaUnavailable(f"{self.name} is FATAL: {self.last_error}")
            if self._stop.is_set() or self._task is None:
                raise ReplicaUnavailable(f"{self.name} is stopped")
            if self._task.done():
                raise ReplicaUnavailable(f"{self.name}'s owner task ended: {self._task_error()}")
            remaining = deadline - self.clock.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{self.name} not ready after {timeout:.0f}s ({self.state.value})")
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=min(remaining, 1.0))

    def _task_error(self) -> str:
        exc = self._task.exception() if self._task and not self._task.cancelled() else None
        return repr(exc) if exc else "no error"

    async def stop(self, drain_timeout: float = 0.0) -> None:
        """Drain in-flight requests (bounded), stop the engine, end the owner task."""
        self._drain_timeout = drain_timeout
        self._stop.set()
        if self._task is not None:
            await self._task

    def stop_now_if_idle(self) -> bool:
        """Begin the stop now, in the caller's step, when the engine has nothing to finish:
        READY or asleep, no request in flight. Its process group gets SIGTERM here instead
        of a loop turn or more later from the owner task (under load, tens of milliseconds
        on the path of the request the room is freed for); the owner task then sees the
        exit as the stop it asked for (``_stop`` is set first) and finishes it as ``stop``
        does. Only for a replica that takes no new request (retiring), whose callers lease
        it in the step they pick it (appliance/gateway/proxy.py), so none can be lost in
        between. Whether it did."""
        if self.inflight or self.state not in (State.READY, State.SLEEPING) or self._proc is None:
            return False
        self._stop.set()
        self._signalled = self.told_to_stop = True
        self._proc.signal_group(signal.SIGTERM)
        return True

    async def sleep(self, timeout: float = 120.0) -> None:
        """Put a READY replica to sleep (vLLM level 1): GPU memory freed, weights in host RAM."""
        if not getattr(self.adapter, "can_sleep", False) or not self.model.sleep_mode:
            raise ReplicaUnavailable(f"{self.name}: sleep needs vllm with sleep_mode = true")
        self._want_sleep = True
        self._poke.set()
        await self._until(lambda: self.state in (State.SLEEPING, State.FATAL, State.STOPPED), timeout)

    def restart(self) -> None:
        """Stop the engine and start it again (an operator's action, not a crash).
        A FATAL replica gets a fresh start with its crash history cleared."""
        if self.state is State.FATAL and self._task is not None and self._task.done():
            self._crash_times.clear()
            self.cannot_start = None
            self._task = None
            self._transition(State.STOPPED, "restart requested by the operator")
            self.start()
            return
        self._want_restart = True
        self._poke.set()

    async def wake(self, timeout: float = 300.0) -> None:
        self._want_sleep = False
        self._poke.set()
        await self.wait_ready(timeout)

    async def _until(self, done, timeout: float) -> None:
        deadline = self.clock.monotonic() + timeout
        while not done():
            remaining = deadline - self.clock.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{self.name} still {self.state.value} after {timeout:.0f}s")
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=min(remaining, 1.0))

    @contextlib.contextmanager
    def lease(self):
        """Count a request against this replica while it runs (drain waits for it)."""
        self.inflight += 1
        self._idle.clear()
        try:
            yield self
        finally:
            self.inflight -= 1
            if self.inflight == 0:
                self._idle.set()
                if self.on_idle is not None:
                    self.on_idle()

    def snapshot(self) -> ReplicaStatus:
        return ReplicaStatus(
            replica=self.name,
            index=self.index,
            state=self.state.value,
            engine=self.model.server,
            pid=self.pid or None,
            port=self.port or None,
            url=self.address or None,
            supervised=self.supervised,
            inflight=self.inflight,
            retiring=self.retiring,
            restarts=self.restarts,
            gpus=list(self.slot.gpus) if self.slot else None,
            memory_fraction=self.slot.memory_fraction if self.slot else None,
            cpus=sorted(self.cpus),
            rss_bytes=resident_bytes(self.pid) if self.pid else None,
            uptime_s=round(self.clock.monotonic() - self.ready_since, 1) if self.state is State.READY else None,
            image=self.image or None,
            load=_load_status(self.load),
            last_error=self.last_error or None,
            log_file=str(self.log_path) if self.supervised else None,
            log_tail=list(self.fatal_log_tail) if self.state is State.FATAL else [],
        )

    # --- the owner task -----------------------------------------------------------

    _drain_timeout = 0.0
    _signalled = False  # SIGTERM sent to the current process by stop_now_if_idle

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
            self.listener(self, event)

    async def _own(self) -> None:
        if self.cannot_start:
            self.last_error = self.cannot_start
            self._transition(State.FATAL, self.cannot_start)
            return
        try:
            while not self._stop.is_set():
                try:
                    await self._run_once()
                except CannotLaunch as exc:
                    # Nothing to run until the operator acts (builds the image, fixes the
                    # store files, then the replica restarts): FATAL now, not a crash loop.
                    await self._kill_now()
                    self._proc, self.pid = None, 0
                    self.port, self.base_url = 0, ""
                    self.last_error = str(exc)
                    await self._fatal(self.last_error)
                    return
                except _Crash as crash:
                    if self._stop.is_set():
                        break
                    if not crash.counted:
                        self._proc, self.pid = None, 0
                        self._transition(State.BACKOFF, crash.reason)
                        continue
                    if not await self._after_crash(crash.reason):
                        return  # FATAL: stays until stopped
            await self._shutdown("stop requested")
        except asyncio.CancelledError:
            await asyncio.shield(self._kill_now())
            self._transition(State.STOPPED, "owner task cancelled")
            raise
        except Exception as exc:
            # A bug, not an engine failure: never leave an engine running unowned.
            log.exception("replica %s: owner task failed", self.name)
            await self._kill_now()
            self.last_error = f"internal error: {exc!r}"
            await self._fatal(self.last_error)
        finally:
            await self._release_access()

    async def _run_once(self) -> None:
        await self._release_access()  # the last start's secret, session and directory
        if self.supervised:
            try:
                self.access = open_access()
            except OSError as exc:
                raise _Crash(f"cannot make the engine's private directory: {exc}") from None
            self.session = engine_session(self.cfg.upstream.max_connections_per_replica, self.access, self.unix_socket)
        self.port = self.port_allocator() if self.supervised and not self.unix_socket else 0
        self.base_url = self.adapter.base_url(self.model, self.HOST, self.port)
        self._transition(State.STARTING, f"starting on {self.address}")
        if self.preflight is not None:
            outcome = await self._race(self.preflight())
            if outcome == "stopped":
                return
            if outcome == "done" and self._last_result:
                raise CannotLaunch(str(self._last_result))  # the preflight refused: its reason
        self.loading_since = self.clock.monotonic()  # the engine's own start begins (after the preflight)
        self._proc = await self._spawn()
        self.pid = self._proc.pid
        await self._until_ready()
        if self._stop.is_set():
            return
        self._transition(State.READY, "answered a 1-token completion")
        self._crash_times_trim()
        await self._watch()

    async def _spawn(self) -> ProcessHandle:
        if not self.supervised:
            return _External()
        assert self.access is not None, "opened by _run_once for a supervised replica"
        weights = model_path(self.cfg, self.model)
        spec = self.adapter.launch(
            self.cfg,
            self.model,
            weights,
            self.HOST,
            self.port,
            self.slot,
            self.access,
            cpus=self.cpus,
            loras=self.loras,
        )
        self.image = spec.image
        try:
            for name, text in spec.files.items():
                self.access.private_file(name, text)
            env = engine_environment(spec.env, Path(self.cfg.paths.cache_dir) / "engine-home", self.access)
            return await self.runner.spawn(spec.argv, env, self.log_path, redact=self.access.secret, cpus=self.cpus)
        except OSError as exc:
            raise _Crash(str(exc)) from None

    async def _fatal(self, reason: str) -> None:
        """FATAL, its secret and session released first: FATAL is where the owner
        task ends, and an operator's restart may follow at once."""
        await self._release_access()
        self._transition(State.FATAL, reason)

    async def _release_access(self) -> None:
        """Close the session to the last engine process and remove its secret: the
        next start gets new ones."""
        if not self.supervised:
            return
        if self.session is not None:
            await self.session.close()  # kept: the proxy sees it closed and retries elsewhere
        if self.access is not None:
            self.access.close()
            self.access = None

    async def _until_ready(self) -> None:
        """Probe until the engine answers; a crash if it exits or takes too long."""
        sv = self.cfg.supervisor
        deadline = self.clock.monotonic() + sv.startup_timeout_s
        last = "no answer yet"
        while not self._stop.is_set():
            remaining = deadline - self.clock.monotonic()
            if remaining <= 0:
                await self._kill_now()
                raise _Crash(f"not ready within {sv.startup_timeout_s:.0f}s: {last}")
            if self._proc is not None:
                self._proc.wrote.clear()  # output from here on cuts the wait before the next probe
            probe = self.adapter.probe_ready(
                self._engine_session(), self.base_url, self.model, timeout=min(remaining, 30.0)
            )
            outcome = await self._race(probe)
            if outcome == "done":
                if self._said_starting:
                    self.last_error, self._said_starting = "", 0.0  # it was the start's, now answered
                return
            if outcome == "exited":
                raise _Crash(self._exit_reason("exited while starting"))
            if isinstance(outcome, ProbeFailed):
                last = str(outcome)
                self._still_starting(sv.startup_timeout_s - remaining, last)
            # Poll often from the spawn on: a refused connection costs nothing, and a request
            # held for this replica waits for exactly this loop to notice it is up. Each wait
            # is at most a twentieth of the start so far (2 ms at first, 20 ms from 0.4 s),
            # so noticing late adds at most 5% to a fast start; a long load (a 70B model) is
            # polled less. Engines log as they become ready (llama-server "listening", vLLM
            # and SGLang "Application startup complete"), so output ends the wait at once.
            elapsed = sv.startup_timeout_s - (deadline - self.clock.monotonic())
            await self._race(self._until_output(min(0.02, max(0.002, elapsed / 20)) if elapsed < 30 else 0.25))

    async def _until_output(self, seconds: float) -> None:
        """Wait seconds, or less: until the engine writes output (a supervised one's)."""
        if self._proc is None or not self.supervised:
            return await self.clock.sleep(seconds)
        napped = asyncio.ensure_future(self.clock.sleep(seconds))
        wrote = asyncio.ensure_future(self._proc.wrote.wait())
        try:
            await asyncio.wait((napped, wrote), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in (napped, wrote):
                waiter.cancel()

    _said_starting = 0.0  # seconds into the start when last_error last told why it is not ready

    def _still_starting(self, elapsed: float, why: str) -> None:
        """A start's refused connections for its first seconds are normal; after that the
        replica says why it is not ready yet, in its status now and in the log each minute
        (an external server that never answers the probe would otherwise wait silently)."""
        if elapsed < STARTING_QUIET_S:
            return
        self.last_error = f"not ready after {elapsed:.0f}s: {why}"
        if not self._said_starting or elapsed - self._said_starting >= 60:
            self._said_starting = elapsed
            log.warning("replica %s still STARTING after %.0fs: %s", self.name, elapsed, why)

    async def _watch(self) -> None:
        """While READY or SLEEPING: notice an exit or a run of failed health
        checks, and carry out sleep and wake requests."""
        sv = self.cfg.supervisor
        failures = 0
        while not self._stop.is_set():
            if self._want_restart:
                self._want_restart = False
                # Drain first: no new requests, in-flight ones finish (bounded).
                self._transition(State.DRAINING, f"restart requested; {self.inflight} in flight")
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._idle.wait(), timeout=self.cfg.server.drain_timeout_s)
                await self._terminate()
                raise _Crash("restart requested by the operator", counted=False)
            if self._want_sleep != (self.state is State.SLEEPING):
                await self._sleep_or_wake()
                continue
            outcome = await self._race(self.clock.sleep(sv.health_interval_s), poke=True)
            if outcome == "exited":
                raise _Crash(self._exit_reason("exited"))
            if outcome in ("stopped", "poked"):
                continue
            probe = self.adapter.probe_health(self._engine_session(), self.base_url, timeout=sv.health_interval_s)
            outcome = await self._race(probe)
            if outcome == "exited":
                raise _Crash(self._exit_reason("exited"))
            if isinstance(outcome, ProbeFailed):
                failures += 1
                self.last_error = str(outcome)
                if failures >= sv.health_failures_before_restart:
                    await self._kill_now()
                    raise _Crash(f"unhealthy: {failures} failed health checks, last: {outcome}")
            else:
                failures = 0
                self.load = self._last_result if isinstance(self._last_result, EngineLoad) else None

    async def _sleep_or_wake(self) -> None:
        timeout = self.cfg.supervisor.startup_timeout_s
        adapter = self.adapter
        assert isinstance(adapter, SleepingEngine), "sleep() asks only a can_sleep adapter"
        if self._want_sleep:
            if self.inflight:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._idle.wait(), timeout=self.cfg.server.drain_timeout_s)
            outcome = await self._race(adapter.sleep(self._engine_session(), self.base_url, timeout))
            new, reason = State.SLEEPING, "asleep: weights in host RAM, GPU memory freed"
        else:
            self.loading_since = self.clock.monotonic()
            outcome = await self._race(adapter.wake(self._engine_session(), self.base_url, timeout))
            if outcome == "done":
                probe = self.adapter.probe_ready(self._engine_session(), self.base_url, self.model, timeout=timeout)
                outcome = await self._race(probe)
            new, reason = State.READY, "woken: answered a 1-token completion"
        if outcome == "exited":
            raise _Crash(self._exit_reason("exited"))
        if isinstance(outcome, ProbeFailed):
            await self._kill_now()
            raise _Crash(f"{'sleep' if self._want_sleep else 'wake'} failed: {outcome}")
        if outcome == "done":
            self._transition(new, reason)

    _last_result: object = None

    def _engine_session(self) -> aiohttp.ClientSession:
        assert self.session is not None, "made by _run_once (supervised) or given (external)"
        return self.session

    async def _race(self, coro, poke: bool = False) -> object:
        """Run coro against the process exiting, a stop request and (if poke) a
        sleep/wake request.

        Returns "done" (its result in _last_result), "exited", "stopped", "poked",
        or the ProbeFailed coro raised."""
        work = asyncio.ensure_future(coro)
        exited = asyncio.ensure_future(self._proc.wait()) if self._proc else None
        stopped = asyncio.ensure_future(self._stop.wait())
        poked = None
        if poke:
            self._poke.clear()
            poked = asyncio.ensure_future(self._poke.wait())
        waiters = [w for w in (work, exited, stopped, poked) if w is not None]
        try:
            done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                if not w.done():
                    # (a probe told to stop may still end in its own timeout's error: read it
                    # then, else asyncio logs "Task exception was never retrieved")
                    w.add_done_callback(_read_outcome)
                    w.cancel()
            for w in (work, stopped, poked):
                with contextlib.suppress(BaseException):
                    if w is not None and w.cancelled():
                        await w
        # Read even when another waiter wins with it (else: "exception never retrieved").
        exc = work.exception() if work.done() and not work.cancelled() else None
        # An exit outranks whatever finished with it: a probe that passed just
        # before the engine died must not mark a dead replica READY.
        if exited is not None and exited in done:
            self._exit_code = exited.result()
            return "exited"
        if work in done:
            if isinstance(exc, ProbeFailed):
                return exc
            if exc is not None:
                raise exc
            self._last_result = work.result()
            return "done"
        if poked is not None and poked in done:
            return "poked"
        return "stopped"

    _exit_code: int | None = None

    def _exit_reason(self, what: str) -> str:
        code = self._exit_code
        if code is None:
            how = ""
        elif code < 0:
            how = f" (killed by {signal.Signals(-code).name})"
        else:
            how = f" (exit code {code})"
        return f"engine {what}{how}"

    def _crash_times_trim(self) -> None:
        window = self.cfg.supervisor.crash_window_s
        now = self.clock.monotonic()
        while self._crash_times and now - self._crash_times[0] > window:
            self._crash_times.popleft()

    async def _after_crash(self, reason: str) -> bool:
        """BACKOFF then try again (True), or FATAL (False) after too many crashes."""
        sv = self.cfg.supervisor
        self.last_error = reason
        tail = self._proc.tail(20) if self._proc else []
        self._proc, self.pid = None, 0
        self._crash_times.append(self.clock.monotonic())
        self._crash_times_trim()
        if self.supervised and len(self._crash_times) > sv.max_crashes:
            self.fatal_log_tail = tail
            await self._fatal(f"{len(self._crash_times)} crashes within {sv.crash_window_s:.0f}s; last: {reason}")
            for line in tail[-5:]:
                log.error("replica %s log: %s", self.name, line)
            return False
        delay = min(sv.backoff_max_s, sv.backoff_initial_s * 2 ** (len(self._crash_times) - 1))
        self.restarts += 1
        self._transition(State.BACKOFF, f"{reason}; restarting in {delay:.1f}s")
        await self._race(self.clock.sleep(delay))
        return True

    async def _shutdown(self, reason: str) -> None:
        if self.state is State.READY and self.inflight:
            self._transition(State.DRAINING, f"{reason}; waiting for {self.inflight} in-flight")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout=self._drain_timeout)
        elif self.state not in (State.STOPPED, State.FATAL):
            self._transition(State.DRAINING, reason)
        await self._terminate()
        self._transition(State.STOPPED, reason)

    async def _terminate(self) -> None:
        """SIGTERM the engine's process group, SIGKILL it after the grace period."""
        proc = self._proc
        if proc is None:
            return
        if not self._signalled:  # (stop_now_if_idle sent it already: once is enough)
            proc.signal_group(signal.SIGTERM)
        self._signalled = False
        try:
            await asyncio.wait_for(proc.wait(), timeout=self.cfg.supervisor.stop_grace_s)
        except TimeoutError:
            log.warning(
                "replica %s ignored SIGTERM for %.0fs; sending SIGKILL", self.name, self.cfg.supervisor.stop_grace_s
            )
            await self._kill_now()
        self._proc, self.pid = None, 0

    async def _kill_now(self) -> None:
        proc = self._proc
        if proc is None:
            return
        proc.signal_group(signal.SIGKILL)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(proc.wait(), timeout=10)


def _read_outcome(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()
