"""The eviction decision (appliance/fleet/eviction.py), pure: which idle replicas of other
models are stopped so that a replica of this one fits, and why the others stay."""

from __future__ import annotations

from appliance.fleet.eviction import Holder, core_fits, gpu_fits, plan
from appliance.gpu.placement import Demand, GiB, Gpu, Placed

NOW = 1000.0
ONE_GPU = [Gpu(0, "H100", 80 * GiB)]


def holder(replica: str, last_used: float = 0.0, **kw) -> Holder:
    return Holder(replica=replica, model=replica.split("#")[0], last_used=last_used, **kw)


def gpu_case(*holders: Holder, need_gib: float = 40, gpus=ONE_GPU):
    placed = [Placed(h.replica, h.gpus or (0,), h.bytes_per_gpu or 40 * GiB) for h in holders]
    return gpu_fits(gpus, placed, Demand("new#next", {1: int(need_gib * GiB)}))


def test_the_least_recently_used_idle_replica_of_another_model_goes():
    a, b = holder("a#0", last_used=100), holder("b#0", last_used=900)
    p = plan("new", 0, [b, a], gpu_case(a, b), NOW)
    assert p.fits and p.victims == (a,)


def test_nothing_goes_when_there_is_room():
    a = holder("a#0")
    p = plan("new", 0, [a], gpu_case(a, need_gib=30), NOW)
    assert p.fits and p.victims == ()


def test_a_replica_serving_or_whose_model_has_requests_waiting_stays():
    busy, waiting = holder("a#0", inflight=2), holder("b#0", held=1)
    p = plan("new", 0, [busy, waiting], gpu_case(busy, waiting), NOW)
    assert not p.fits and p.victims == ()
    assert p.explain("GPU memory") == ("GPU memory is held by a#0 (2 requests in flight); "
                                       "b#0 (1 request of b waiting)")


def test_a_pinned_model_keeps_its_floor_and_gives_up_only_what_is_above_it():
    a0 = holder("a#0", keep=1, last_used=1)
    assert not plan("new", 0, [a0], gpu_case(a0, need_gib=60), NOW).fits
    a0, a1 = (holder(f"a#{i}", keep=1, bytes_per_gpu=20 * GiB, last_used=1) for i in (0, 1))
    p = plan("new", 0, [a0, a1], gpu_case(a0, a1, need_gib=60), NOW)
    assert p.fits and p.victims == (a1,)  # the newest replica goes, one stays
    p = plan("new", 0, [a0, a1], gpu_case(a0, a1, need_gib=80), NOW)
    assert not p.fits
    assert "a keeps 1 replica (pinned or set by the operator)" in p.explain("GPU memory")


def test_a_replica_inside_its_residency_window_stays():
    fresh = holder("a#0", loaded_at=NOW - 5, min_residency_s=30)
    p = plan("new", 0, [fresh], gpu_case(fresh, need_gib=60), NOW)
    assert not p.fits and "a#0 (loaded 5s ago, min_residency 30s)" in p.explain("GPU memory")
    settled = holder("a#0", loaded_at=NOW - 31, min_residency_s=30)
    assert plan("new", 0, [settled], gpu_case(settled, need_gib=60), NOW).victims == (settled,)


def test_a_lower_priority_model_never_evicts_a_higher_one_and_lower_ones_go_first():
    high = holder("high#0", priority=5, last_used=1)
    assert not plan("new", 0, [high], gpu_case(high, need_gib=60), NOW).fits
    assert plan("new", 5, [high], gpu_case(high, need_gib=60), NOW).victims == (high,)
    # Both idle; the lower priority goes first even though it was used more recently.
    low = holder("low#0", priority=-1, last_used=999)
    mid = holder("mid#0", priority=0, last_used=1)
    assert plan("new", 0, [mid, low], gpu_case(mid, low), NOW).victims == (low,)


def test_replicas_of_the_model_asking_are_never_victims():
    own = holder("new#0", last_used=1)
    assert not plan("new", 0, [own], gpu_case(own, need_gib=60), NOW).fits


def test_only_the_victims_needed_go():
    # Two GPUs; the LRU replica is on GPU 1, but the new replica needs a whole card and
    # the next in line frees one: after pruning, only what made it fit goes.
    gpus = [Gpu(0, "H100", 80 * GiB), Gpu(1, "H100", 80 * GiB)]
    a = holder("a#0", last_used=1, gpus=(1,), bytes_per_gpu=10 * GiB)
    b = holder("b#0", last_used=2, gpus=(0,), bytes_per_gpu=70 * GiB)
    c = holder("c#0", last_used=3, gpus=(1,), bytes_per_gpu=60 * GiB)
    p = plan("new", 0, [a, b, c], gpu_case(a, b, c, need_gib=75, gpus=gpus), NOW)
    assert p.fits and p.victims == (b,)


def test_backing_off_replicas_go_before_serving_ones():
    serving = holder("a#0", last_used=1)
    crashed = holder("b#0", last_used=500, serving=False)
    assert plan("new", 0, [serving, crashed], gpu_case(serving, crashed), NOW).victims == (crashed,)


def test_cpu_cores_are_freed_the_same_way():
    a, b = holder("a#0", last_used=10, cores=2), holder("b#0", last_used=20, cores=2)
    fits = core_fits(0, {"a#0": 2, "b#0": 2}, 2)
    assert plan("new", 0, [a, b], fits, NOW).victims == (a,)
    fits = core_fits(0, {"a#0": 2, "b#0": 2}, 4)
    assert plan("new", 0, [a, b], fits, NOW).victims == (a, b)
    busy = holder("a#0", cores=2, inflight=1)
    p = plan("new", 0, [busy], core_fits(0, {"a#0": 2}, 2), NOW)
    assert not p.fits and p.explain("the CPU engines' budget of 2 cores") == (
        "the CPU engines' budget of 2 cores is held by a#0 (1 request in flight)")


def test_nothing_is_evicted_for_a_replica_that_could_never_fit():
    a, b = holder("a#0", last_used=1), holder("b#0", last_used=2)
    p = plan("huge", 0, [a, b], gpu_case(a, b, need_gib=90), NOW)
    assert p.never and not p.fits and p.victims == ()


def test_room_held_only_for_now_says_when_it_may_come_and_room_held_for_good_says_none():
    busy = holder("a#0", inflight=1)
    assert plan("new", 0, [busy], gpu_case(busy, need_gib=60), NOW).room_in == 0.0  # when its request ends
    fresh = holder("a#0", loaded_at=NOW - 5, min_residency_s=30)
    assert plan("new", 0, [fresh], gpu_case(fresh, need_gib=60), NOW).room_in == 25.0
    pinned = holder("a#0", keep=1)
    assert plan("new", 0, [pinned], gpu_case(pinned, need_gib=60), NOW).room_in is None
    high = holder("high#0", priority=5, inflight=1)
    assert plan("new", 0, [high], gpu_case(high, need_gib=60), NOW).room_in is None
    # Room needs both: the busy one and a pinned one that never goes: waiting cannot help.
    a, b = holder("a#0", inflight=1), holder("b#0", keep=1)
    assert plan("new", 0, [a, b], gpu_case(a, b, need_gib=80), NOW).room_in is None


# --- fairness: preempt (appliance/fleet/fairness.py) and headroom (appliance/fleet/headroom.py) ---


def test_preempt_takes_the_least_busy_busy_replica_a_plain_plan_keeps():
    busier, busy = holder("a#0", inflight=3, held=2), holder("b#0", inflight=1)
    assert not plan("new", 0, [busier, busy], gpu_case(busier, busy), NOW).fits
    p = plan("new", 0, [busier, busy], gpu_case(busier, busy), NOW, preempt=True)
    assert p.fits and p.victims == (busy,)


def test_preempt_never_takes_a_pinned_floor_a_resident_replica_or_a_higher_priority():
    pinned = holder("a#0", inflight=1, keep=1)
    resident = holder("b#0", inflight=1, loaded_at=NOW - 5, min_residency_s=30)
    higher = holder("c#0", inflight=1, priority=2)
    reasons = {pinned: "a#0 (a keeps 1 replica (pinned or set by the operator))",
               resident: "b#0 (loaded 5s ago, min_residency 30s)", higher: "c#0 (priority 2 is higher than 1)"}
    for h, why in reasons.items():
        p = plan("new", 1, [h], gpu_case(h, need_gib=60), NOW, preempt=True)
        assert not p.fits and p.victims == ()
        assert why in p.explain("GPU memory")


def test_headroom_takes_only_replicas_unused_for_at_least_idle_for():
    recent, old = holder("a#0", last_used=NOW - 5), holder("b#0", last_used=NOW - 50)
    p = plan("new", 0, [recent, old], gpu_case(recent, old), NOW, idle_for=30)
    assert p.fits and p.victims == (old,)
    p = plan("new", 0, [recent], gpu_case(recent, need_gib=60), NOW, idle_for=30)
    assert not p.fits and "a#0 (used 5s ago)" in p.explain("GPU memory")


def test_a_replica_already_leaving_is_only_waited_for_even_of_the_model_asking():
    # a#0 drains (its model's requests took by another's fairness): a's next replica needs
    # exactly its room, which comes when it has stopped; nothing else goes for it.
    leaving, idle = holder("a#0", leaving=True, inflight=1), holder("b#0", last_used=1)
    p = plan("a", 0, [leaving, idle], gpu_case(leaving, idle), NOW)
    assert p.fits and p.victims == (leaving,)


def test_preempt_never_takes_a_replica_still_starting_for_its_models_waiting_requests():
    # (with min_residency 0, two starved models would otherwise take each other's starts in turn)
    starting = holder("a#0", held=3, serving=False, loaded_at=NOW, min_residency_s=0)
    p = plan("new", 0, [starting], gpu_case(starting, need_gib=60), NOW, preempt=True)
    assert not p.fits and "a#0 (3 requests of a waiting)" in p.explain("GPU memory")
