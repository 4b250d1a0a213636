"""GPU placement: which GPUs each new engine replica (vLLM, SGLang) goes on.

Pure and deterministic: no NVML, no asyncio, no clock. The caller measures the
GPUs, lists the replicas already there and the replicas to add, and gets back
one ``Assignment`` per new replica, or a ``PlacementError`` that says what is
missing.

Memory model
    free(GPU) = total - foreign - sum(bytes_per_gpu of awake Placed on it)
                - what earlier assignments of the same call took,  never below 0.
    A sleeping replica's GPU memory is free; its weights are in host RAM.

Reservation
    An engine is told a fraction of the card (vLLM ``--gpu-memory-utilization``,
    SGLang ``--mem-fraction-static``), rounded UP to 0.01, and takes that
    fraction of the total. So a replica reserves ``ceil(fraction * total)`` bytes,
    not its raw need: ``Assignment.bytes_per_gpu`` is that reservation, and the
    value to record in ``Placed.bytes_per_gpu`` once it runs. An engine that takes
    what it needs and no more (llama.cpp: ``Demand.exact``) reserves its need.

Rules
    * Existing ``Placed`` replicas never move and are never changed.
    * A tensor-parallel group is on GPUs of one kind and one memory size (one
      fraction then means the same bytes on each card).
    * TP size: the fixed one, or else the smallest listed size that fits.
    * Objective: as few GPUs in use as possible (a GPU is in use when an awake
      replica, placed or new, is on it; a sleeping one does not count).
      Heuristic: best-fit decreasing (largest demands first; each takes the
      group that opens the fewest idle GPUs, then leaves the least free
      memory, then has the lowest indices). It runs under 6 strategies (3
      orders of the demands x idle GPUs by least or by most room) and keeps the
      one using the fewest GPUs, stopping early at a proven lower bound.
    * Only if every strategy fails, a branch and bound over all legal
      placements (capped at SEARCH_STEPS nodes) looks for one; it may give a
      replica a larger TP size than the smallest that fits on its own.
    * All or nothing: if any demand cannot be placed, ``place`` raises
      PlacementError (naming the first demand greedy could not fit) and
      assigns nothing.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

GiB = 1024**3

__all__ = [
    "GiB",
    "Gpu",
    "Placed",
    "Demand",
    "Assignment",
    "PlacementError",
    "place",
    "free_bytes",
    "gpus_in_use",
    "fraction_percent",
    "reserved_bytes",
    "kind_key",
]


@dataclass(frozen=True)
class Gpu:
    index: int
    kind: str  # normalized type, e.g. "H100"; compared case-insensitively
    total_bytes: int
    foreign_bytes: int = 0  # used by processes that are not our replicas


@dataclass(frozen=True)
class Placed:
    """A replica already running (or starting): it never moves."""

    replica: str
    gpus: tuple[int, ...]
    bytes_per_gpu: int
    sleeping: bool = False  # vLLM sleep level 1: GPU memory free, weights in host RAM
    host_bytes: int = 0  # host RAM held while sleeping


@dataclass(frozen=True)
class Demand:
    """A replica to place."""

    replica: str  # e.g. "llama-8b#1"
    per_gpu_bytes: dict[int, int]  # TP size -> bytes needed on EACH GPU at that size
    gpu_kind: str | None = None  # None or "any": any kind; else every GPU must be this kind
    tp: int | None = None  # fixed TP size, or None: the smallest listed size that fits
    exact: bool = False  # reserves its need, not a whole-percent fraction of the card

    def reserve(self, need: int, total: int) -> int:
        return min(need, total) if self.exact else reserved_bytes(need, total)


@dataclass(frozen=True)
class Assignment:
    replica: str
    gpus: tuple[int, ...]  # ascending
    tp: int
    bytes_per_gpu: int  # reserved on each GPU: ceil(memory_fraction * total)
    memory_fraction: float  # need / total rounded UP to 0.01
    reason: str  # why these GPUs, one sentence


class PlacementError(Exception):
    """A demand does not fit; the message names it, its need and the largest free blocks."""

    def __init__(self, message: str, replica: str | None = None) -> None:
        super().__init__(message)
        self.replica = replica


# --------------------------------------------------------------------------- helpers


def _gib(n: int) -> str:
    """Bytes as GiB with one decimal."""
    return f"{n / GiB:.1f}"


def kind_key(kind: str | None) -> str | None:
    """The one normaliser of a GPU kind (a model's ``gpus.type``, a GPU's kind): casefolded;
    None, "" or "any" (any case) -> None, meaning any kind."""
    if kind is None:
        return None
    k = kind.strip().casefold()
    return None if k in ("", "any") else k


def fraction_percent(need: int, total: int) -> int:
    """need / total in whole percent, rounded up (may exceed 100)."""
    return -(-need * 100 // total)


def reserved_bytes(need: int, total: int) -> int:
    """Bytes an engine takes when told fraction_percent(need, total) of the card."""
    return -(-fraction_percent(need, total) * total // 100)


def free_bytes(gpus: Iterable[Gpu], placed: Iterable[Placed] = ()) -> dict[int, int]:
    """Free memory per GPU index before any new placement (see the module doc)."""
    free = {g.index: g.total_bytes - g.foreign_bytes for g in gpus}
    for p in placed:
        if not p.sleeping:
            for i in p.gpus:
                free[i] -= p.bytes_per_gpu
    return {i: max(0, f) for i, f in free.items()}


def gpus_in_use(placed: Iterable[Placed], assignments: Iterable[Assignment] = ()) -> set[int]:
    """GPUs with an awake placed replica or a new assignment on them."""
    used = {i for p in placed if not p.sleeping for i in p.gpus}
    used.update(i for a in assignments for i in a.gpus)
    return used


def _validate(gpus: Sequence[Gpu], placed: Sequence[Placed], demands: Sequence[Demand]) -> None:
    indices = [g.index for g in gpus]
    if len(set(indices)) != len(indices):
        raise ValueError(f"duplicate GPU index in {sorted(indices)}")
    for g in gpus:
        if g.total_bytes <= 0 or g.foreign_bytes < 0:
            raise ValueError(f"GPU {g.index}: total_bytes must be > 0 and foreign_bytes >= 0")
    known = set(indices)
    names: set[str] = set()
    for p in placed:
        if p.replica in names:
            raise ValueError(f"replica {p.replica} listed twice")
        names.add(p.replica)
        if not p.gpus or len(set(p.gpus)) != len(p.gpus) or not set(p.gpus) <= known:
            raise ValueError(f"placed replica {p.replica} is on unknown or repeated GPUs {p.gpus}")
        if p.bytes_per_gpu < 0 or p.host_bytes < 0:
            raise ValueError(f"placed replica {p.replica}: negative bytes")
    for d in demands:
        if d.replica in names:
            raise ValueError(f"replica {d.replica} listed twice")
        names.add(d.replica)
        if not d.per_gpu_bytes:
            raise ValueError(f"demand {d.replica} lists no tensor-parallel size")
        for tp, need in d.per_gpu_bytes.items():
            if not isinstance(tp, int) or tp < 1 or need <= 0:
                raise ValueError(f"demand {d.replica}: bad size {tp} -> {need} bytes")
        if d.tp is not None and d.tp not in d.per_gpu_bytes:
            raise ValueError(f"demand {d.replica}: fixed tp={d.tp} is not in per_gpu_bytes")


def _sizes(d: Demand) -> list[int]:
    return [d.tp] if d.tp is not None else sorted(d.per_gpu_bytes)


def _order_total(d: Demand) -> tuple:
    tp = _sizes(d)[0]
    need = d.per_gpu_bytes[tp]
    return (-need * tp, -need, d.replica)


def _order_per_gpu(d: Demand) -> tuple:
    tp = _sizes(d)[0]
    need = d.per_gpu_bytes[tp]
    return (-need, -need * tp, d.replica)


def _order_tp(d: Demand) -> tuple:
    tp = _sizes(d)[0]
    need = d.per_gpu_bytes[tp]
    return (-tp, -need, d.replica)


# (order of the demands, roomiest idle GPU first?): the first is plain best-fit
# decreasing; the others repair its typical misses (see the module doc).
_STRATEGIES = tuple((o, roomy) for roomy in (False, True) for o in (_order_total, _order_per_gpu, _order_tp))

# A group of interchangeable-for-TP GPUs: (kind key, total bytes) -> ascending indices.
_Groups = dict[tuple[str, int], list[int]]


def _best_choice(d: Demand, groups: _Groups, free: dict[int, int], used: set[int], roomy: bool):
    """The best (tp, indices, reserved, pct, tried) for d now, or None."""
    want = kind_key(d.gpu_kind)
    tried: list[int] = []
    for tp in _sizes(d):
        need = d.per_gpu_bytes[tp]
        best = None
        for (kind, total), idxs in groups.items():
            if (want is not None and kind != want) or len(idxs) < tp:
                continue
            pct = fraction_percent(need, total)
            if pct > 100:
                continue
            r = d.reserve(need, total)
            # Rank: GPUs in use first, by least left (best fit); then idle
            # GPUs, by least left, or by most left under the roomy policy.
            sign = -1 if roomy else 1
            ranked = sorted(
                (False, free[i] - r, i) if i in used else (True, sign * (free[i] - r), i) for i in idxs if free[i] >= r
            )
            if len(ranked) < tp:
                continue
            top = ranked[:tp]
            key = (sum(c[0] for c in top), sum(c[1] for c in top), tuple(sorted(c[2] for c in top)))
            chosen = [(is_new, free[i] - r, i) for is_new, _, i in top]
            if best is None or key < best[0]:
                best = (key, tp, r, pct, chosen)
        if best is not None:
            _, tp, r, pct, chosen = best
            return tp, chosen, r, pct, tried
        tried.append(tp)
    return None


def _reason(tp: int, chosen, tried: list[int], sizes: list[int], how: str = "best fit") -> str:
    chosen = sorted(chosen, key=lambda c: c[2])
    parts = [f"{_gib(left)} GiB free on GPU {i}" for _, left, i in chosen]
    new = [i for is_new, _, i in chosen if is_new]
    text = f"{how}: "
    if len(sizes) > 1 or tried:
        text += f"tp={tp}"
        if tried and how == "best fit":
            text += f" (tp={', '.join(map(str, tried))} {'does' if len(tried) == 1 else 'do'} not fit)"
        elif tried:
            text += f" (tp={', '.join(map(str, tried))} leaves no room for the others)"
        text += ", "
    text += "leaves " + ", ".join(parts)
    if not new:
        text += "; GPU already in use" if tp == 1 else "; GPUs already in use"
    elif len(new) == len(chosen):
        text += "; opens an idle GPU" if tp == 1 else f"; opens {len(new)} idle GPUs"
    else:
        text += f"; opens {len(new)} idle GPU{'s' if len(new) > 1 else ''}"
    return text


def _explain(d: Demand, gpus: Sequence[Gpu], groups: _Groups, free: dict[int, int], before: int = 0) -> str:
    want = kind_key(d.gpu_kind)
    eligible = sorted(g.index for g in gpus if want is None or kind_key(g.kind) == want)
    of_kind = f" of kind {d.gpu_kind}" if want is not None else ""
    needs = []
    for tp in _sizes(d):
        need = d.per_gpu_bytes[tp]
        totals = [t for (k, t), idxs in groups.items() if (want is None or k == want) and len(idxs) >= tp]
        shown = min((d.reserve(need, t) for t in totals if fraction_percent(need, t) <= 100), default=need)
        needs.append(f"{_gib(shown)} GiB on {tp} GPU{'s' if tp > 1 else ''}")
    head = f"{d.replica} needs " + " or ".join(needs) + of_kind
    if not eligible:
        kinds = ", ".join(sorted({g.kind for g in gpus})) or "none"
        return f"{head}; no GPU of that kind (GPUs: {kinds})"
    top = sorted(eligible, key=lambda i: (-free[i], i))[: max(_sizes(d))]
    blocks = ", ".join(f"{_gib(free[i])} GiB on GPU {i}" for i in top)
    after = ""
    if before:
        after = f" once {before} larger new replica{'s are' if before > 1 else ' is'} placed"
    return f"{head}; largest free{after}: {blocks}"


def _run(order, roomy, gpus, groups, placed, demands):
    free = free_bytes(gpus, placed)
    used = gpus_in_use(placed)
    out: dict[str, Assignment] = {}
    for d in sorted(demands, key=order):
        choice = _best_choice(d, groups, free, used, roomy)
        if choice is None:
            raise PlacementError(_explain(d, gpus, groups, free, len(out)), d.replica)
        tp, chosen, r, pct, tried = choice
        idxs = tuple(sorted(c[2] for c in chosen))
        for i in idxs:
            free[i] -= r
            used.add(i)
        out[d.replica] = Assignment(d.replica, idxs, tp, r, pct / 100, _reason(tp, chosen, tried, _sizes(d)))
    return [out[d.replica] for d in demands], len(used)


SEARCH_STEPS = 5_000


def _search(gpus, groups, placed, demands, bound, steps=None):
    """Exact branch and bound over every legal placement (any listed TP size),
    capped at ``steps`` nodes. Returns (assignments, n_used, exhausted) for the
    fewest-GPU complete placement found, or (None, None, exhausted)."""
    free = free_bytes(gpus, placed)
    used = gpus_in_use(placed)
    order = sorted(demands, key=_order_total)
    best: list = [None, len(gpus) + 1]
    left = [SEARCH_STEPS if steps is None else steps]
    path: list = []

    def options(d: Demand):
        want = kind_key(d.gpu_kind)
        out = []
        for tp in _sizes(d):
            need = d.per_gpu_bytes[tp]
            for (kind, total), idxs in groups.items():
                if (want is not None and kind != want) or len(idxs) < tp:
                    continue
                if fraction_percent(need, total) > 100:
                    continue
                r = d.reserve(need, total)
                fit = [i for i in idxs if free[i] >= r]
                # Idle GPUs with equal free memory are interchangeable: only
                # combinations taking the lowest-indexed ones of each class.
                rank: dict[int, int] = {}
                seen: dict[int, int] = {}
                for i in fit:
                    if i not in used:
                        rank[i] = seen.get(free[i], 0)
                        seen[free[i]] = rank[i] + 1
                for combo in itertools.combinations(fit, tp):
                    taken: dict[int, int] = {}
                    canonical = True
                    for i in combo:
                        if i in rank:
                            if rank[i] != taken.get(free[i], 0):
                                canonical = False
                                break
                            taken[free[i]] = rank[i] + 1
                    if canonical:
                        new = sum(i not in used for i in combo)
                        out.append((tp, new, sum(free[i] - r for i in combo), combo, r))
        out.sort()  # smallest TP, fewest idle GPUs opened, best fit, lowest indices
        return out

    def dfs(k: int) -> None:
        if len(used) >= best[1] or left[0] <= 0:
            return
        left[0] -= 1
        if k == len(order):
            best[0], best[1] = list(path), len(used)
            return
        d = order[k]
        for tp, new, _, combo, r in options(d):
            if len(used) + new >= best[1]:
                continue
            opened = [i for i in combo if i not in used]
            for i in combo:
                free[i] -= r
            used.update(opened)
            path.append((d, tp, r, [(i in opened, free[i], i) for i in combo]))
            dfs(k + 1)
            path.pop()
            used.difference_update(opened)
            for i in combo:
                free[i] += r
            if best[1] <= bound or left[0] <= 0:
                return

    dfs(0)
    exhausted = left[0] > 0
    if best[0] is None:
        return None, None, exhausted
    out = {}
    for d, tp, r, chosen in best[0]:
        smaller = [t for t in _sizes(d) if t < tp]
        out[d.replica] = Assignment(
            d.replica,
            tuple(sorted(c[2] for c in chosen)),
            tp,
            r,
            fraction_percent(d.per_gpu_bytes[tp], _by_index(gpus)[chosen[0][2]].total_bytes) / 100,
            _reason(tp, chosen, smaller, _sizes(d), "found by search"),
        )
    return [out[d.replica] for d in demands], best[1], exhausted


def _by_index(gpus: Iterable[Gpu]) -> dict[int, Gpu]:
    return {g.index: g for g in gpus}


def _lower_bound(gpus: Sequence[Gpu], placed: Sequence[Placed], demands: Sequence[Demand]) -> int:
    """A number of GPUs in use that no placement of the demands can go below."""
    free = free_bytes(gpus, placed)
    used = gpus_in_use(placed)
    need = sum(min(d.per_gpu_bytes[tp] * tp for tp in _sizes(d)) for d in demands)
    widest = max((min(_sizes(d)) for d in demands), default=0)
    room = sum(free[i] for i in used)
    count = len(used)
    for f in sorted((free[i] for i in free if i not in used), reverse=True):
        if room >= need and count >= widest:
            break
        room += f
        count += 1
    return count


def place(
    gpus: Sequence[Gpu],
    placed: Sequence[Placed] = (),
    demands: Sequence[Demand] = (),
    host_free_bytes: int | None = None,
) -> list[Assignment]:
    """Assign every demand to GPUs; one Assignment per demand, in the demands' order.

    ``host_free_bytes``: when given, the host RAM budget for sleeping replicas'
    weights in total (what sleeping replicas already hold plus what is still
    available). Their GPU memory counts as free only if their weights fit in it:
    sum(host_bytes of sleeping Placed) must be <= host_free_bytes, else
    PlacementError.

    Raises PlacementError (nothing assigned) when a demand does not fit, and
    ValueError for malformed input (unknown GPU, duplicate replica, bad sizes).
    """
    gpus = list(gpus)
    placed = list(placed)
    demands = list(demands)
    _validate(gpus, placed, demands)
    if host_free_bytes is not None:
        held = sum(p.host_bytes for p in placed if p.sleeping)
        if held > host_free_bytes:
            raise PlacementError(
                f"sleeping replicas need {_gib(held)} GiB of host RAM; "
                f"only {_gib(max(0, host_free_bytes))} GiB available"
            )
    groups: _Groups = {}
    for g in sorted(gpus, key=lambda g: g.index):
        groups.setdefault((kind_key(g.kind) or "", g.total_bytes), []).append(g.index)

    bound = _lower_bound(gpus, placed, demands)
    best = None
    first_error: PlacementError | None = None
    for order, roomy in _STRATEGIES:
        try:
            result, n_used = _run(order, roomy, gpus, groups, placed, demands)
        except PlacementError as e:
            first_error = first_error or e
            continue
        if best is None or n_used < best[1]:
            best = (result, n_used)
        if n_used <= bound:
            break  # provably optimal: no strategy can do better
    if best is None:
        # Greedy found nothing; a bounded exact search may still (it may pick
        # a larger TP size than the smallest that fits on its own).
        assert first_error is not None
        result, _, exhausted = _search(gpus, groups, placed, demands, bound)
        if result is not None:
            return result
        if not exhausted:
            raise PlacementError(f"{first_error} (search gave up after {SEARCH_STEPS} steps)", first_error.replica)
        raise first_error
    return best[0]
