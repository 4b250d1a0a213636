"""A replica's owner task: the loop that starts its engine, watches it while READY or
SLEEPING, backs off and restarts it after a crash (FATAL after too many), and stops it.
It is the only code that changes the replica's state (through ``_transition``,
appliance/fleet/replica_state.py); callers ask (appliance/fleet/replica.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from appliance.fleet.engine_access import engine_session, open_access
from appliance.fleet.replica_engine import EngineProcess
from appliance.fleet.replica_state import Crash, State
from engines import CannotLaunch, EngineLoad, ProbeFailed

log = logging.getLogger("appliance.replica")


class OwnerTask(EngineProcess):
    """The owner task's loop (``_own``, started by ``Replica.start``)."""

    _drain_timeout = 0.0  # set by Replica.stop

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
                except Crash as crash:
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
                raise Crash(f"cannot make the engine's private directory: {exc}") from None
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
                raise Crash("restart requested by the operator", counted=False)
            if self._want_sleep != (self.state is State.SLEEPING):
                await self._sleep_or_wake()
                continue
            outcome = await self._race(self.clock.sleep(sv.health_interval_s), poke=True)
            if outcome == "exited":
                raise Crash(self._exit_reason("exited"))
            if outcome in ("stopped", "poked"):
                continue
            probe = self.adapter.probe_health(self._engine_session(), self.base_url, timeout=sv.health_interval_s)
            outcome = await self._race(probe)
            if outcome == "exited":
                raise Crash(self._exit_reason("exited"))
            if outcome == "stopped":
                continue  # (no answer: neither a failure nor the engine's load)
            if isinstance(outcome, ProbeFailed):
                failures += 1
                self.last_error = str(outcome)
                if failures >= sv.health_failures_before_restart:
                    await self._kill_now()
                    raise Crash(f"unhealthy: {failures} failed health checks, last: {outcome}")
            else:
                failures = 0
                self.load = self._last_result if isinstance(self._last_result, EngineLoad) else None

    async def _fatal(self, reason: str) -> None:
        """FATAL, its secret and session released first: FATAL is where the owner
        task ends, and an operator's restart may follow at once."""
        await self._release_access()
        self._transition(State.FATAL, reason)

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
            # The give-up in last_error too: status shows that no restart is coming, and why.
            self.last_error = (
                f"gave up after {len(self._crash_times)} crashes within {sv.crash_window_s:.0f}s "
                f"(supervisor.max_crashes = {sv.max_crashes}); last: {reason}"
            )
            await self._fatal(self.last_error)
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
