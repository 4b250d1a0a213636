"""How many replicas each model should have, decided once a tick from its signals.

Pure: ``Autoscaler.decide`` takes a model's inputs and policy and returns a
``Decision``; the supervisor carries it out. Scale up at once (the next tick);
scale down only after the desired count stayed lower for a stabilisation window
and a cooldown since the last change, one replica at a time. Idle models go to
zero after their idle TTL (or to sleep first, where the engine has a warm tier).
Every decision is logged with its inputs and kept in a short history.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import asdict, dataclass, field

log = logging.getLogger("appliance.autoscaler")


@dataclass(frozen=True)
class Policy:
    min_replicas: int
    max_replicas: int
    target_rps_per_replica: float
    idle_ttl_s: float  # 0: never idle to zero
    sleep_after_s: float = 0.0  # 0: no sleep tier
    stabilization_s: float = 30.0
    cooldown_s: float = 10.0


@dataclass(frozen=True)
class Inputs:
    now: float
    current: int  # replicas that exist (starting, ready, sleeping, backing off)
    ready: int
    sleeping: int
    rps_10s: float
    rps_60s: float
    inflight: int
    queued: int
    engine_waiting: float  # requests waiting inside the engines, summed
    idle_s: float  # since the last request arrived
    rps_2s: float = 0.0  # the fast signal: a step up shows here within a second
    unloaded: bool = False  # the operator unloaded it: zero until a request or a load
    pinned: bool = False
    override: int | None = None  # the operator's `appliance scale MODEL N`
    capacity: int = 1_000_000  # most replicas the placer or CPU budget can hold


@dataclass(frozen=True)
class Decision:
    model: str
    at: float
    current: int
    desired: int
    action: str  # up | down | hold | sleep | wake
    reason: str
    inputs: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


class Autoscaler:
    def __init__(self, history_len: int = 50) -> None:
        self.history: deque[Decision] = deque(maxlen=history_len)
        self._wanted: dict[str, deque[tuple[float, int]]] = {}
        self._last_change: dict[str, float] = {}
        self._last: dict[str, tuple[str, int, int]] = {}

    def decide(self, model: str, inp: Inputs, policy: Policy) -> Decision:
        desired, why = self._desired(inp, policy)
        window = self._wanted.setdefault(model, deque())
        window.append((inp.now, desired))
        while window and inp.now - window[0][0] > policy.stabilization_s:
            window.popleft()

        if inp.sleeping and (inp.queued or inp.rps_10s > 0) and inp.ready == 0:
            decision = Decision(
                model, inp.now, inp.current, max(desired, 1), "wake", f"traffic for a sleeping model ({why})"
            )
        elif desired > inp.current:
            decision = Decision(model, inp.now, inp.current, desired, "up", why)
        elif desired < inp.current:
            decision = self._down(model, inp, policy, window, desired, why)
        elif self._should_sleep(inp, policy):
            decision = Decision(
                model,
                inp.now,
                inp.current,
                desired,
                "sleep",
                f"idle {inp.idle_s:.0f}s >= sleep_after {policy.sleep_after_s:.0f}s",
            )
        else:
            decision = Decision(model, inp.now, inp.current, desired, "hold", why)
        if decision.action in ("up", "down"):
            self._last_change[model] = inp.now
        decision = Decision(**{**asdict(decision), "inputs": _inputs(inp)})
        self._record(decision)
        return decision

    @staticmethod
    def _desired(inp: Inputs, p: Policy) -> tuple[int, str]:
        if inp.override is not None:
            n = max(0, min(inp.override, p.max_replicas, inp.capacity))
            return n, f"operator set {inp.override} replicas"
        # Up on the fast 2 s rate, down on the 10 s one (and only after the
        # stabilisation window): quick to add capacity, slow to take it away.
        rps = max(inp.rps_10s, inp.rps_2s)
        need = math.ceil(rps / p.target_rps_per_replica) if p.target_rps_per_replica else 0
        why = f"{rps:.1f} rps / {p.target_rps_per_replica:g} per replica = {need}"
        if inp.ready and inp.engine_waiting >= inp.ready:
            need = max(need, inp.current + 1)
            why += f"; engines report {inp.engine_waiting:.0f} waiting"
        if inp.queued or inp.inflight:
            need = max(need, 1)
        idle = p.idle_ttl_s > 0 and inp.idle_s >= p.idle_ttl_s and not inp.inflight and not inp.queued
        # A running model keeps at least one replica until it is idle: only the idle
        # TTL takes the last one away, never a lull in the request rate.
        floor = max(p.min_replicas, 1 if inp.current else 0)
        if inp.unloaded and not inp.pinned:
            floor = 0
            why += "; unloaded (by the operator, or evicted for another model)"
        elif idle and not inp.pinned:
            floor = 0
            why += f"; idle {inp.idle_s:.0f}s >= {p.idle_ttl_s:.0f}s"
        elif inp.pinned:
            why += "; pinned"
        desired = max(need, floor)
        if desired > p.max_replicas:
            why += f"; capped at max_replicas {p.max_replicas}"
            desired = p.max_replicas
        if desired > inp.capacity:
            why += f"; capped at {inp.capacity} by available capacity"
            desired = inp.capacity
        return desired, why

    def _down(self, model, inp, p, window, desired, why) -> Decision:
        highest = max(d for _, d in window)
        if highest >= inp.current:
            return Decision(
                model,
                inp.now,
                inp.current,
                inp.current,
                "hold",
                f"{why}; waiting out the {p.stabilization_s:.0f}s stabilisation window",
            )
        since = inp.now - self._last_change.get(model, float("-inf"))
        if since < p.cooldown_s:
            return Decision(
                model, inp.now, inp.current, inp.current, "hold", f"{why}; cooldown {since:.0f}s < {p.cooldown_s:.0f}s"
            )
        return Decision(model, inp.now, inp.current, inp.current - 1, "down", f"{why}; one replica at a time")

    @staticmethod
    def _should_sleep(inp: Inputs, p: Policy) -> bool:
        return (
            p.sleep_after_s > 0
            and inp.ready > 0
            and inp.idle_s >= p.sleep_after_s
            and not inp.inflight
            and not inp.queued
            and not inp.pinned
        )

    def _record(self, d: Decision) -> None:
        key = (d.action, d.current, d.desired)
        changed = self._last.get(d.model) != key
        self._last[d.model] = key
        if d.action != "hold" or changed:
            # Holds repeat every tick: keep (and log) only the first of a run.
            self.history.append(d)
            level = logging.INFO if d.action != "hold" else logging.DEBUG
            log.log(level, "autoscale %s: %s %d -> %d: %s", d.model, d.action, d.current, d.desired, d.reason)

    def recent(self, model: str | None = None, n: int = 10) -> list[Decision]:
        items = [d for d in self.history if model is None or d.model == model]
        return items[-n:]


def _inputs(inp: Inputs) -> dict:
    out = asdict(inp)
    if out["capacity"] >= 1_000_000:
        out["capacity"] = None
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in out.items()}
