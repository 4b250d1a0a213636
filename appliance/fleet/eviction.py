"""Which idle replicas of other models to stop so that a replica of this one can start.

Pure and deterministic, like the placer and the autoscaler: the supervisor describes
every replica that holds the scarce thing (GPU memory, or the CPU engines' cores and
host RAM; appliance/fleet/capacity.py says who holds what) as a ``Holder``, says how
to tell whether the new replica fits once some holders are gone (``fits``), and gets
back a ``Plan``: the victims, or why there are none. The supervisor carries it out
(stops the victims, or puts them to sleep, and starts the new replica once they have).

Rules (issue 17):
  * only replicas of OTHER models, and only idle ones: no request in flight on the
    replica, none held in its model's queue;
  * never below a model's floor: a pinned model keeps its min_replicas, a model the
    operator scaled keeps that count (``Holder.keep``);
  * never a replica loaded less than its model's ``min_residency`` ago (anti-thrash);
  * never one of a model with a higher ``priority`` than the model asking;
  * order: lowest priority first, then replicas that serve nothing (backing off)
    before serving ones, then the least busy, then least recently used, then the newest;
  * ``preempt`` (fairness, appliance/fleet/fairness.py: a model whose requests have waited
    past ``[capacity] max_wait_before_preempt_s``): replicas with requests in flight or
    held may be chosen too; they drain (take no new request, finish those in flight)
    before they go. Every other rule holds: floors, residency, priority;
  * ``idle_for`` (headroom, appliance/fleet/headroom.py: room made before it is asked
    for): only replicas of models unused for at least that long;
  * replicas already leaving (draining, or evicted to sleep) come first, at no cost: the
    new replica only waits for them (of its own model too);
  * as few as needed: victims are taken in that order until the new replica fits,
    then any that turned out not to be needed are given back, most recently used first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from appliance.gpu.placement import Demand, Gpu, Placed, PlacementError, place


@dataclass(frozen=True)
class Holder:
    replica: str  # "a#0"
    model: str
    priority: int = 0
    last_used: float = 0.0  # the model's last request (monotonic seconds)
    loaded_at: float = 0.0  # when the replica became READY (0: never)
    min_residency_s: float = 0.0
    inflight: int = 0  # requests the replica is serving
    held: int = 0  # requests waiting in its model's queue
    keep: int = 0  # replicas of its model that must stay (pin, operator's count)
    serving: bool = True  # READY (False: backing off, nothing to lose)
    # Already on its way out (draining to stop, or evicted to sleep): not evicted again, and
    # a replica that needs its room (of any model) only waits for it.
    leaving: bool = False
    # What it holds: GPU memory on these GPUs, or CPU cores and host RAM.
    gpus: tuple[int, ...] = ()
    bytes_per_gpu: int = 0
    cores: int = 0
    host_bytes: int = 0


@dataclass(frozen=True)
class Plan:
    victims: tuple[Holder, ...] = ()
    # Holders that may not be evicted, each with the reason (for the 503 when none fits).
    kept: tuple[tuple[Holder, str], ...] = ()
    fits: bool = False  # the new replica fits once the victims are gone
    # It would not fit even with every replica of other models gone: too big for the box,
    # which the placer says better than a list of holders.
    never: bool = False
    # When it does not fit now but would once holders that are only busy (requests in
    # flight or held) or recently loaded (inside min_residency) may go: the seconds until
    # the soonest of them may (0: when a request ends). None: waiting does not help
    # (pinned floors, higher priorities).
    room_in: float | None = None

    def explain(self, what: str) -> str:
        """One line for an operator or a client: who holds ``what`` and why it stays."""
        if not self.kept:
            return f"{what} is not enough even with every idle replica of another model stopped"
        held = "; ".join(f"{h.replica} ({why})" for h, why in self.kept)
        return f"{what} is held by {held}"


def plan(
    model: str,
    priority: int,
    holders: Sequence[Holder],
    fits: Callable[[frozenset[str]], bool],
    now: float,
    preempt: bool = False,
    idle_for: float = 0.0,
) -> Plan:
    """The fewest idle replicas of other models whose stopping makes the new replica of
    ``model`` fit, by the module's rules; Plan(fits=False) with the reasons if none do."""
    if fits(frozenset()):
        return Plan(fits=True)
    if not fits(frozenset(h.replica for h in holders if h.model != model or h.leaving)):
        return Plan(never=True)
    per_model: dict[str, int] = {}
    for h in holders:
        if not h.leaving:
            per_model[h.model] = per_model.get(h.model, 0) + 1
    candidates, kept, later = [], [], []
    for h in holders:
        if h.model == model or h.leaving:
            continue
        why = _why_kept(h, priority, now, preempt, idle_for)
        (kept.append((h, why)) if why else candidates.append(h))
        if why and h.priority <= priority:
            later.append(h)  # busy or recently loaded: it may go later
    candidates.sort(
        key=lambda h: (h.priority, h.serving, h.inflight + h.held, h.last_used, -_index(h.replica), h.replica)
    )
    room = {m: n - next(h.keep for h in holders if h.model == m) for m, n in per_model.items()}
    # Those already on their way out cost nothing more: the new replica only waits for them.
    chosen: list[Holder] = [h for h in holders if h.leaving]
    for h in candidates:
        if fits(frozenset(c.replica for c in chosen)):
            break
        if room[h.model] <= 0:
            kept.append((h, _floor(h)))
            continue
        chosen.append(h)
        room[h.model] -= 1
    if not fits(frozenset(c.replica for c in chosen)):
        return Plan(kept=tuple(kept), room_in=_room_in(chosen, later, room, fits, now))
    for h in reversed(chosen[:-1]):  # the last one was needed: without it, it did not fit
        rest = frozenset(c.replica for c in chosen if c is not h)
        if fits(rest):
            chosen.remove(h)
    return Plan(victims=tuple(chosen), kept=tuple(kept), fits=True)


def _room_in(
    chosen: list[Holder],
    later: list[Holder],
    room: dict[str, int],
    fits: Callable[[frozenset[str]], bool],
    now: float,
) -> float | None:
    """Seconds until the holders that are only busy or recently loaded may go, if their
    going (within their models' floors, beside the idle ones ``chosen``) would make room;
    None if it would not."""
    free = dict(room)  # what the floors still allow once the chosen idle ones are gone
    going = list(chosen)
    for h in sorted(later, key=lambda h: _lapse(h, now)):
        if free[h.model] > 0:
            free[h.model] -= 1
            going.append(h)
    if not later or not fits(frozenset(h.replica for h in going)):
        return None
    return min(_lapse(h, now) for h in later if h in going)


def _lapse(h: Holder, now: float) -> float:
    """Seconds until h's residency ends (0 when only its requests hold it)."""
    return max(0.0, h.loaded_at + h.min_residency_s - now) if h.loaded_at else 0.0


def _why_kept(h: Holder, priority: int, now: float, preempt: bool = False, idle_for: float = 0.0) -> str | None:
    # (preempt: busy replicas may drain for a model whose requests have waited too long)
    if h.inflight and not preempt:
        return f"{h.inflight} request{'s' if h.inflight > 1 else ''} in flight"
    if h.held and (not preempt or not h.serving):  # (preempt: one starting for them stays)
        return f"{h.held} request{'s' if h.held > 1 else ''} of {h.model} waiting"
    if h.priority > priority:
        return f"priority {h.priority} is higher than {priority}"
    if h.loaded_at and now - h.loaded_at < h.min_residency_s:
        return f"loaded {now - h.loaded_at:.0f}s ago, min_residency {h.min_residency_s:.0f}s"
    if now - h.last_used < idle_for:
        return f"used {now - h.last_used:.0f}s ago"
    return None


def _floor(h: Holder) -> str:
    return f"{h.model} keeps {h.keep} replica{'s' if h.keep > 1 else ''} (pinned or set by the operator)"


def _index(replica: str) -> int:
    tail = replica.rpartition("#")[2]
    return int(tail) if tail.isdigit() else 0


# --- what "fits" means -----------------------------------------------------------------------


def gpu_fits(gpus: Sequence[Gpu], placed: Iterable[Placed], *demands: Demand) -> Callable[[frozenset[str]], bool]:
    """The new replicas' demands can be placed, as one set, once the named placed replicas
    are gone."""
    placed = list(placed)

    def fits(removed: frozenset[str]) -> bool:
        try:
            place(gpus, [p for p in placed if p.replica not in removed], list(demands))
        except PlacementError:
            return False
        return True

    return fits


def core_fits(free_cores: int, cores: dict[str, int], need: int) -> Callable[[frozenset[str]], bool]:
    """``need`` cores are free once the named replicas (holding ``cores``) are gone."""

    def fits(removed: frozenset[str]) -> bool:
        return free_cores + sum(cores.get(name, 0) for name in removed) >= need

    return fits
