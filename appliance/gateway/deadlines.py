"""Deadlines on a request's task: the body's read (api/body.py), the wait for an
engine stream's head (gateway/proxy.py) and each send of an answer to its client
(``sends``: gateway/relay.py, a worker's relay), without a loop timer per request.

A deadline cancels the task that set it when it falls due, as ``asyncio.timeout``'s
does, and the code that waited turns that cancel into its own timeout error. Deadlines
of one length fall due in the order they were set, so they wait in one queue per
length, behind one loop timer for its head (as the relay's client watches do):
scheduling and cancelling a uvloop timer cost ~1.8 µs, ``asyncio.timeout``'s context
manager ~4.5 µs, a queue entry ~0.3 µs. A deadline that ended is passed over when it
falls due, and dropped sooner when it reaches the queue's head as a later one is set;
behind one still waiting (a client trickling its body, an engine that never sends a
stream's head: up to upstream.read_timeout_s), ended ones are dropped from anywhere in
the queue once it holds COMPACT_AT and twice those still waiting (an ended deadline keeps
no task; the queue stays within twice its waiting deadlines, or COMPACT_AT).

    deadline = deadlines.start(seconds)
    try:
        return await work
    except asyncio.CancelledError:
        if deadline.passed():  # this deadline's cancel, no one else's
            raise OurTimeout(...) from None
        raise
    finally:
        deadline.end()
"""

from __future__ import annotations

import asyncio
from collections import deque

# Queued deadlines (one length's) past which the ended ones are dropped from the whole
# queue, not only its head: one pass over it per that many set, a fraction of a µs each.
COMPACT_AT = 1024


class Deadline:
    """One task's deadline, from ``start`` until ``end``."""

    __slots__ = ("at", "cancelling", "expired", "pending", "task")

    def __init__(self, task: asyncio.Task, at: float) -> None:
        self.task: asyncio.Task | None = task  # None once ended: a queued one keeps no task alive
        self.at = at
        self.cancelling = task.cancelling()  # cancels requested before: not ours
        self.pending = True  # until end(): a deadline due then cancels its task
        self.expired = False  # it fell due and cancelled its task; not yet taken back

    def passed(self) -> bool:
        """In an ``except CancelledError``: whether the cancel being raised is this
        deadline's alone (then it is taken back, and the caller raises its timeout),
        not the task's being cancelled by someone else as well."""
        if not self.expired or self.task is None:
            return False
        self.expired = False
        return self.task.uncancel() <= self.cancelling

    def end(self) -> None:
        """The wait is over: the deadline no longer applies. A cancel of its that the
        work swallowed is taken back, as asyncio.timeout takes it back on exit."""
        self.pending = False
        if self.expired and self.task is not None:
            self.expired = False
            self.task.uncancel()
        self.task = None


class _Queue:
    """The deadlines of one length on one loop, in the order they fall due."""

    __slots__ = ("compact_at", "due", "length", "loop", "timer")

    def __init__(self, loop: asyncio.AbstractEventLoop, length: float) -> None:
        self.loop, self.length = loop, length
        self.due: deque[Deadline] = deque()
        self.timer: asyncio.TimerHandle | None = None
        self.compact_at = COMPACT_AT

    def add(self, task: asyncio.Task) -> Deadline:
        due = self.due
        while due and not due[0].pending:  # ended ones at the head: the queue stays short
            due.popleft()
        if len(due) >= self.compact_at:  # ended ones behind one still waiting: dropped too
            self.due = due = deque(d for d in due if d.pending)
            self.compact_at = max(COMPACT_AT, 2 * len(due))
        deadline = Deadline(task, self.loop.time() + self.length)
        due.append(deadline)
        if self.timer is None:
            self.timer = self.loop.call_at(deadline.at, self._fire)
        return deadline

    def _fire(self) -> None:
        self.timer = None
        due = self.due
        # The loop's timers are in milliseconds: one due within the next is due now.
        now = self.loop.time() + 0.001
        try:
            while due and due[0].at <= now:
                deadline = due.popleft()
                if deadline.pending and deadline.task is not None:
                    deadline.expired = True
                    deadline.task.cancel()
        finally:
            if due:
                self.timer = self.loop.call_at(due[0].at, self._fire)


class _Queues(dict[float, _Queue]):
    """The running loop's queues, by length (a new loop, in tests and at startup, gets its own)."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None) -> None:
        super().__init__()
        self.loop = loop

    def __missing__(self, length: float) -> _Queue:
        assert self.loop is not None, "a loop's queues"
        queue = self[length] = _Queue(self.loop, length)
        return queue


_queues = _Queues(None)


SWEEP_S = 1.0  # how often the loop's send deadlines are looked at


class Sends(Deadline):
    """A deadline on each send of one answer (a stream's many). The relay counts its
    sends, ``n += 1`` before one and again after (odd: one is under way): no clock
    read, no timer and no queue entry per piece. The loop's sweep, once a second while
    any answer is open, notes each one's count and when it saw it change; one whose
    send is the same for ``seconds`` (its client has taken nothing: it stopped reading)
    has its task cancelled, ``seconds`` to ``seconds`` + SWEEP_S after that send began.
    ``passed`` and ``end`` as any deadline's; ``end`` also leaves the sweep."""

    __slots__ = ("n", "seconds", "seen", "seen_at", "sweep")

    def __init__(self, task: asyncio.Task, seconds: float, sweep: _Sweep) -> None:
        super().__init__(task, 0.0)
        self.seconds, self.sweep = seconds, sweep
        self.n = 0  # sends begun and ended: odd while one is under way
        self.seen, self.seen_at = 0, 0.0  # the count the sweep last saw change, and when

    def end(self) -> None:
        super().end()
        self.sweep.discard(self)


class _Sweep(set[Sends]):
    """The open answers' send deadlines of one loop, looked at every SWEEP_S while any is open."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.loop = loop
        self.timer: asyncio.TimerHandle | None = None

    def watch(self, sends: Sends) -> None:
        sends.seen_at = self.loop.time()
        self.add(sends)
        if self.timer is None:
            self.timer = self.loop.call_later(SWEEP_S, self._fire)

    def _fire(self) -> None:
        self.timer = None
        now = self.loop.time()
        for sends in list(self):
            n = sends.n
            if n != sends.seen or not n & 1:  # sent since, or not sending: not stuck
                sends.seen, sends.seen_at = n, now
            elif now - sends.seen_at >= sends.seconds:
                self.discard(sends)
                if sends.pending and sends.task is not None:
                    sends.expired = True
                    sends.task.cancel()
        if self:
            self.timer = self.loop.call_later(SWEEP_S, self._fire)


_sweep: _Sweep | None = None


def sends(seconds: float) -> Sends:
    """A send deadline of ``seconds`` on the running task's answer (see Sends)."""
    global _sweep
    task = asyncio.current_task()
    assert task is not None, "a deadline on a task"
    loop = task.get_loop()
    if _sweep is None or _sweep.loop is not loop:  # a new loop (tests, startup) gets its own
        _sweep = _Sweep(loop)
    deadline = Sends(task, seconds, _sweep)
    _sweep.watch(deadline)
    return deadline


def start(seconds: float) -> Deadline:
    """A deadline ``seconds`` from now on the running task (see the module's use)."""
    global _queues
    task = asyncio.current_task()
    assert task is not None, "a deadline on a task"
    loop = task.get_loop()
    if _queues.loop is not loop:
        _queues = _Queues(loop)
    return _queues[seconds].add(task)
