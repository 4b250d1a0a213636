"""A replica's engine process: launched (its access, its files, its environment), probed
until ready, put to sleep and woken, stopped (SIGTERM, then SIGKILL), each wait raced
against the process exiting and a stop request (``_race``). The owner task
(appliance/fleet/replica_owner.py) calls these; a failure is a ``Crash``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from pathlib import Path

import aiohttp

from appliance.fleet.engine_access import engine_environment
from appliance.fleet.landlock import ENGINE_HOMES, named_paths, store_reads
from appliance.fleet.process import ProcessHandle
from appliance.fleet.replica_state import Crash, ReplicaState, State
from appliance.store.weights import model_path
from engines import ProbeFailed
from engines.base import SleepingEngine

log = logging.getLogger("appliance.replica")

# A replica failing its readiness probe for longer than this says why (status and log).
STARTING_QUIET_S = 10.0


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


class EngineProcess(ReplicaState):
    """The engine process of a replica (the owner task's tools)."""

    _signalled = False  # SIGTERM sent to the current process by stop_now_if_idle

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
            # Its own HOME (compile caches, Hugging Face's modules cache of trust_remote_code
            # code), kept across its restarts and from every other replica (landlock.py).
            home = Path(self.cfg.paths.cache_dir) / ENGINE_HOMES / self.log_path.stem
            env = engine_environment(spec.env, home, self.access)
            own = (self.access.dir, home)  # allowed even where the daemon's secrets are kept from engines
            # What it serves, read back from the store that keeps every model from engines:
            # its weights, its adapters and the files its command names (an mmproj), as
            # they are now (a model imported later is not its).
            served = (weights, *(lora.path for lora in self.loras), *named_paths(spec.argv))
            reads = store_reads(self.cfg, served)
            return await self.runner.spawn(
                spec.argv,
                env,
                self.log_path,
                redact=self.access.secret,
                cpus=self.cpus,
                own_dirs=own,
                own_reads=tuple(reads),
            )
        except OSError as exc:
            raise Crash(str(exc)) from None

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
                raise Crash(f"not ready within {sv.startup_timeout_s:.0f}s: {last}")
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
                raise Crash(self._exit_reason("exited while starting"))
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
            raise Crash(self._exit_reason("exited"))
        if isinstance(outcome, ProbeFailed):
            await self._kill_now()
            raise Crash(f"{'sleep' if self._want_sleep else 'wake'} failed: {outcome}")
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
        or the ProbeFailed coro raised. A stop asked for outranks that failure."""
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
                # Seen once a stop was asked (whether or not the stop's own waiter has woken
                # yet): stop_now_if_idle SIGTERMs the engine in its caller's step, and an engine
                # that is exiting refuses the probe, sleep or wake in flight. The stop asked for
                # is what happened: not an error to record, nor a failed sleep to SIGKILL for.
                return "stopped" if self._stop.is_set() else exc
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
