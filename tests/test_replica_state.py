"""The replica state machine with an injected clock, process runner and engine
probes: every transition, without spawning anything."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from appliance.config import parse_config
from appliance.fleet.replica import Replica
from appliance.fleet.replica_state import ReplicaUnavailable, State
from engines import LaunchSpec, ProbeFailed


class FakeClock:
    """Virtual time: sleeping advances it at once (and yields to the loop)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds
        await asyncio.sleep(0)


class FakeProcess:
    _next_pid = 100

    def __init__(self, output: list[str]) -> None:
        FakeProcess._next_pid += 1
        self.pid = FakeProcess._next_pid
        self.exited = asyncio.get_running_loop().create_future()
        self.signals: list[int] = []
        self.output = output
        self.ignore_sigterm = False
        self.wrote = asyncio.Event()

    async def wait(self) -> int:
        return await asyncio.shield(self.exited)

    def exit(self, code: int) -> None:
        if not self.exited.done():
            self.exited.set_result(code)

    def signal_group(self, sig: int) -> None:
        self.signals.append(sig)
        if sig == 15 and self.ignore_sigterm:
            return
        self.exit(-sig)

    def tail(self, lines: int) -> list[str]:
        return self.output[-lines:]


class FakeRunner:
    def __init__(self) -> None:
        self.processes: list[FakeProcess] = []
        self.fail_spawn: str | None = None
        self.output: list[str] = []
        self.ignore_sigterm = False

    async def spawn(
        self, argv, env, log_path: Path, redact: str = "", cpus=frozenset(), own_dirs=(), own_reads=()
    ) -> FakeProcess:
        if self.fail_spawn:
            raise OSError(self.fail_spawn)
        proc = FakeProcess(list(self.output))
        proc.ignore_sigterm = self.ignore_sigterm
        self.processes.append(proc)
        return proc


class ScriptedAdapter:
    """Readiness answers come from a list: True = ready, a string = ProbeFailed(reason)."""

    name = "scripted"
    unix_socket = False

    def __init__(self, ready: list[bool | str] | None = None, supervised: bool = True) -> None:
        self.ready_answers = list(ready or [True])
        self.health_ok = True
        self._supervised = supervised

    def supervised(self, model) -> bool:
        return self._supervised

    def launch(self, cfg, model, weights, host, port, slot, access, cpus=frozenset(), loras=()) -> LaunchSpec:
        return LaunchSpec(argv=["engine", "--port", str(port)])

    def base_url(self, model, host, port) -> str:
        return f"http://{host}:{port}"

    async def probe_ready(self, session, base_url, model, timeout) -> None:
        answer = self.ready_answers.pop(0) if len(self.ready_answers) > 1 else self.ready_answers[0]
        if answer is not True:
            raise ProbeFailed(str(answer))

    async def probe_health(self, session, base_url, timeout) -> None:
        if not self.health_ok:
            raise ProbeFailed("health says no")


CONFIG = """
[supervisor]
startup_timeout_s = 10
backoff_initial_s = 1
backoff_max_s = 8
max_crashes = 3
crash_window_s = 100
health_interval_s = 1
health_failures_before_restart = 2
stop_grace_s = 5
[[models]]
name = "m"
server = "openai"
command = ["engine", "{port}"]
"""


# What an external engine's replica is given (the daemon's shared aiohttp session): the
# scripted adapter never uses it, a supervised replica makes its own.
SHARED_SESSION = object()


def make(tmp_path, adapter=None, runner=None, clock=None):
    cfg = parse_config(CONFIG)
    transitions: list[tuple[State, State]] = []
    runner = runner or FakeRunner()
    replica = Replica(cfg=cfg, model=cfg.models[0], index=0, adapter=adapter or ScriptedAdapter(),
                      runner=runner, session=SHARED_SESSION, log_dir=tmp_path, clock=clock or FakeClock(),
                      port_allocator=iter(range(20000, 20100)).__next__,
                      listener=lambda r, t: transitions.append((t.old, t.new)))
    return replica, runner, transitions


async def settle(predicate, rounds: int = 2000) -> None:
    for _ in range(rounds):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError("state never reached")


async def test_start_probe_ready_then_stop(tmp_path):
    replica, runner, transitions = make(tmp_path, ScriptedAdapter(["loading", "loading", True]))
    replica.start()
    await replica.wait_ready(timeout=5)
    assert replica.state is State.READY
    assert replica.port == 20000 and replica.pid == runner.processes[0].pid
    await replica.stop()
    assert transitions == [(State.STOPPED, State.STARTING), (State.STARTING, State.READY),
                           (State.READY, State.DRAINING), (State.DRAINING, State.STOPPED)]
    assert runner.processes[0].signals == [15]


async def test_crash_backs_off_exponentially_then_restarts_on_a_new_port(tmp_path):
    clock = FakeClock()
    replica, runner, transitions = make(tmp_path, clock=clock)
    replica.start()
    await replica.wait_ready(timeout=5)
    runner.processes[0].exit(1)
    await settle(lambda: len(runner.processes) == 2 and replica.state is State.READY)
    assert (State.READY, State.BACKOFF) in transitions
    assert replica.restarts == 1 and "exit code 1" in replica.last_error
    assert replica.port == 20001
    t0 = clock.now
    runner.processes[1].exit(1)
    await settle(lambda: len(runner.processes) == 3 and replica.state is State.READY)
    # second crash within the window: 2 s backoff (1 s, then doubled)
    assert clock.now - t0 >= 2
    await replica.stop()


async def test_too_many_crashes_in_the_window_is_fatal_with_the_log_tail(tmp_path):
    runner = FakeRunner()
    runner.output = ["loading weights", "RuntimeError: CUDA out of memory"]
    replica, runner, transitions = make(tmp_path, runner=runner)
    replica.start()
    for n in range(4):
        await settle(lambda: len(runner.processes) == n + 1 and replica.state is State.READY)
        runner.processes[n].exit(9)
    await settle(lambda: replica.state is State.FATAL)
    assert replica.fatal_log_tail[-1] == "RuntimeError: CUDA out of memory"
    assert replica.snapshot().log_tail == replica.fatal_log_tail
    with pytest.raises(ReplicaUnavailable, match="FATAL"):
        await replica.wait_ready(timeout=1)
    await replica.stop()
    assert replica.state is State.FATAL  # stopping does not hide why it died


async def test_crashes_outside_the_window_do_not_accumulate(tmp_path):
    clock = FakeClock()
    replica, runner, _ = make(tmp_path, clock=clock)
    replica.start()
    for n in range(6):
        await settle(lambda: len(runner.processes) == n + 1 and replica.state is State.READY)
        clock.now += 500  # longer than crash_window_s between crashes
        runner.processes[n].exit(1)
    await settle(lambda: len(runner.processes) == 7 and replica.state is State.READY)
    assert replica.state is State.READY
    await replica.stop()


async def test_a_spawn_failure_is_a_crash_with_the_reason(tmp_path):
    runner = FakeRunner()
    runner.fail_spawn = "engine program not found or not executable: engine"
    replica, runner, _ = make(tmp_path, runner=runner)
    replica.start()
    await settle(lambda: replica.state is State.FATAL)
    assert "not found" in replica.last_error
    await replica.stop()


async def test_not_ready_within_the_startup_timeout_kills_and_retries(tmp_path):
    replica, runner, transitions = make(tmp_path, ScriptedAdapter(["still loading"]))
    replica.start()
    await settle(lambda: len(runner.processes) >= 2, rounds=50_000)
    assert "not ready within 10s: still loading" in replica.last_error
    assert runner.processes[0].signals == [9]
    await replica.stop()


async def test_failed_health_checks_restart_a_ready_replica(tmp_path):
    adapter = ScriptedAdapter()
    replica, runner, transitions = make(tmp_path, adapter)
    replica.start()
    await replica.wait_ready(timeout=5)
    adapter.health_ok = False
    await settle(lambda: replica.state is State.BACKOFF)
    assert "2 failed health checks" in replica.last_error
    assert runner.processes[0].signals == [9]
    adapter.health_ok = True
    await settle(lambda: replica.state is State.READY)
    await replica.stop()


async def test_stop_waits_for_in_flight_requests_to_drain(tmp_path):
    replica, runner, transitions = make(tmp_path)
    replica.start()
    await replica.wait_ready(timeout=5)
    with replica.lease():
        stopping = asyncio.create_task(replica.stop(drain_timeout=30))
        await settle(lambda: replica.state is State.DRAINING)
        assert runner.processes[0].signals == []  # still serving the lease
    await stopping
    assert replica.state is State.STOPPED and runner.processes[0].signals == [15]


async def test_sigkill_follows_sigterm_after_the_grace_period(tmp_path):
    runner = FakeRunner()
    runner.ignore_sigterm = True
    replica, runner, _ = make(tmp_path, runner=runner)
    replica.start()
    await replica.wait_ready(timeout=5)
    replica.cfg.supervisor.stop_grace_s = 0.05
    await replica.stop()
    assert runner.processes[0].signals == [15, 9]
    assert replica.state is State.STOPPED


async def test_an_external_engine_is_never_spawned_nor_fatal(tmp_path):
    adapter = ScriptedAdapter(supervised=False)
    replica, runner, _ = make(tmp_path, adapter)
    replica.start()
    await replica.wait_ready(timeout=5)
    assert runner.processes == [] and replica.pid == 0
    adapter.health_ok = False
    adapter.ready_answers = ["down"]
    await settle(lambda: replica.restarts >= 5, rounds=20000)
    assert replica.state is not State.FATAL
    await replica.stop()


async def test_an_operator_restart_drains_then_restarts_without_counting_a_crash(tmp_path):
    replica, runner, transitions = make(tmp_path)
    replica.start()
    await replica.wait_ready(timeout=5)
    with replica.lease():
        replica.restart()
        await settle(lambda: replica.state is State.DRAINING)
        assert runner.processes[0].signals == []  # the lease is still being served
    await settle(lambda: len(runner.processes) == 2 and replica.state is State.READY)
    assert runner.processes[0].signals == [15]
    assert replica.restarts == 0 and not replica._crash_times
    await replica.stop()


async def test_a_fatal_replica_restarts_on_the_operators_request(tmp_path):
    runner = FakeRunner()
    runner.fail_spawn = "no such engine"
    replica, runner, _ = make(tmp_path, runner=runner)
    replica.start()
    await settle(lambda: replica.state is State.FATAL)
    runner.fail_spawn = None
    replica.restart()
    await replica.wait_ready(timeout=5)
    assert replica.state is State.READY
    await replica.stop()


class StillClock(FakeClock):
    """Time that never passes: a wait on it ends only by something else happening."""

    async def sleep(self, seconds: float) -> None:
        await asyncio.Event().wait()


async def test_a_starting_engine_that_writes_output_is_probed_again_at_once_not_at_the_next_poll(tmp_path):
    """Engines log as they become ready (llama-server's "listening"): the readiness probe
    after a refused one runs when the engine writes, not only when the poll's wait ends."""
    adapter = ScriptedAdapter(["loading", True])
    replica, runner, _ = make(tmp_path, adapter, clock=StillClock())
    replica.start()
    await settle(lambda: runner.processes and len(adapter.ready_answers) == 1)  # "loading" answered
    for _ in range(50):
        await asyncio.sleep(0)  # (the poll's wait never ends: time stands still)
    assert replica.state is State.STARTING
    runner.processes[0].wrote.set()
    await settle(lambda: replica.state is State.READY)
    await replica.stop()


class RefusedWhenExiting(ScriptedAdapter):
    """A vLLM-like engine whose health check, sleep or wake, once the test holds it, stays in
    flight until the test ends it with what an engine that is exiting answers: a refused
    connection."""

    can_sleep = True

    def __init__(self) -> None:
        super().__init__()
        self.hold: set[str] = set()  # the calls that wait for ``refuse``
        self.in_flight = ""  # the held call waiting now
        self.refuse = asyncio.Event()

    async def _answer(self, call: str) -> None:
        if call in self.hold:
            self.in_flight = call
            await self.refuse.wait()
            raise ProbeFailed(f"{call}: Cannot connect to host 127.0.0.1: Connect call failed (Connection refused)")

    async def probe_health(self, session, base_url, timeout) -> None:
        await self._answer("health")

    async def sleep(self, session, base_url, timeout) -> None:
        await self._answer("sleep")

    async def wake(self, session, base_url, timeout) -> None:
        await self._answer("wake")


async def _stopped_idle_while_in_flight(adapter: RefusedWhenExiting, replica: Replica, runner: FakeRunner,
                                        call: str) -> None:
    """Hold call in flight; then, in one step, the replica is stopped idle (its engine gets
    SIGTERM at once: stop_now_if_idle) and the engine, exiting, refuses call. The exit itself
    is seen later (as a real process's is): once the owner task has begun the stop."""
    adapter.hold.add(call)
    await settle(lambda: adapter.in_flight == call)
    assert replica.stop_now_if_idle()
    adapter.refuse.set()
    await settle(lambda: replica.state is State.DRAINING)
    runner.processes[0].exit(-15)
    await replica.stop()


def _killed_by_the_stop_alone(replica: Replica, runner: FakeRunner, transitions) -> None:
    assert replica.state is State.STOPPED and transitions[-1] == (State.DRAINING, State.STOPPED)
    assert replica.last_error == "" and replica.restarts == 0
    assert runner.processes[0].signals == [15]  # the stop's SIGTERM, no SIGKILL


async def test_a_health_check_refused_in_the_step_a_stop_was_asked_is_the_stop_not_an_error(tmp_path):
    """The engine of a replica stopped idle gets SIGTERM in the caller's step; a health check
    in flight then is refused, and the owner task may see that failure in the same step as the
    stop. The stop it asked for wins: no last_error (a stop is not an error), no crash."""
    adapter = RefusedWhenExiting()
    runner = FakeRunner()
    runner.ignore_sigterm = True  # (exits when the test says: after the refusal)
    replica, runner, transitions = make(tmp_path, adapter, runner)
    replica.start()
    await replica.wait_ready(timeout=5)
    await _stopped_idle_while_in_flight(adapter, replica, runner, "health")
    _killed_by_the_stop_alone(replica, runner, transitions)


async def test_a_sleep_refused_in_the_step_a_stop_was_asked_is_the_stop_not_a_failed_sleep(tmp_path):
    """The same race while the replica goes to sleep: the engine, told to stop, refuses the
    sleep. A failed sleep kills the engine (SIGKILL); a sleep cut short by the stop asked for
    is the stop, which ends the engine by its SIGTERM."""
    adapter = RefusedWhenExiting()
    runner = FakeRunner()
    runner.ignore_sigterm = True
    replica, runner, transitions = make(tmp_path, adapter, runner)
    replica.model.sleep_mode = True
    replica.start()
    await replica.wait_ready(timeout=5)
    asleep = asyncio.create_task(replica.sleep(timeout=5))
    await _stopped_idle_while_in_flight(adapter, replica, runner, "sleep")
    await asleep  # (returns: the replica stopped)
    _killed_by_the_stop_alone(replica, runner, transitions)
    assert State.SLEEPING not in {new for _, new in transitions}


async def test_a_wake_refused_in_the_step_a_stop_was_asked_is_the_stop_not_a_failed_wake(tmp_path):
    """The same race while a sleeping replica wakes: the stop wins over the refused wake."""
    adapter = RefusedWhenExiting()
    runner = FakeRunner()
    runner.ignore_sigterm = True
    replica, runner, transitions = make(tmp_path, adapter, runner)
    replica.model.sleep_mode = True
    replica.start()
    await replica.wait_ready(timeout=5)
    await replica.sleep(timeout=5)
    assert replica.state is State.SLEEPING
    woken = asyncio.create_task(replica.wake(timeout=5))
    await _stopped_idle_while_in_flight(adapter, replica, runner, "wake")
    with pytest.raises(ReplicaUnavailable, match="stopped"):
        await woken
    _killed_by_the_stop_alone(replica, runner, transitions)


class GatedClock(FakeClock):
    """Virtual time whose waits, once the test closes the gate, end only when it opens it."""

    def __init__(self) -> None:
        super().__init__()
        self.gate: asyncio.Event | None = None
        self.waiting = 0

    async def sleep(self, seconds: float) -> None:
        if self.gate is None:
            return await super().sleep(seconds)
        self.waiting += 1
        await self.gate.wait()
        self.waiting -= 1
        self.now += seconds


async def test_a_health_check_begun_in_the_step_a_stop_was_asked_is_the_stop_not_an_error(tmp_path):
    """The wait between health checks ends in the same step as the stop: the check that
    follows reaches an engine already told to exit, which refuses it. That refusal is the
    stop too: no last_error, no crash."""
    clock = GatedClock()
    adapter = RefusedWhenExiting()
    runner = FakeRunner()
    runner.ignore_sigterm = True
    replica, runner, transitions = make(tmp_path, adapter, runner, clock)
    replica.start()
    await replica.wait_ready(timeout=5)
    clock.gate = asyncio.Event()
    await settle(lambda: clock.waiting == 1)  # the owner task waits for its next health check
    adapter.hold.add("health")
    adapter.refuse.set()  # (what the engine answers once it was told to exit)
    clock.gate.set()
    assert replica.stop_now_if_idle()
    await settle(lambda: replica.state is State.DRAINING)
    runner.processes[0].exit(-15)
    await replica.stop()
    _killed_by_the_stop_alone(replica, runner, transitions)
