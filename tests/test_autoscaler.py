"""The autoscaler's decisions, the rate windows and the persisted operator state,
with an injected clock: no engines, no waiting."""

from __future__ import annotations

import pytest

from appliance.fleet.autoscaler import Autoscaler, Inputs, Policy, parse_duration
from appliance.fleet.rates import RateWindow
from appliance.state.decisions import StateStore

POLICY = Policy(min_replicas=1, max_replicas=4, target_rps_per_replica=10, idle_ttl_s=300,
                stabilization_s=30, cooldown_s=10)


def inputs(**kw) -> Inputs:
    base = dict(now=1000.0, current=1, ready=1, sleeping=0, rps_10s=0.0, rps_60s=0.0, inflight=0,
                queued=0, engine_waiting=0.0, idle_s=0.0)
    return Inputs(**{**base, **kw})


def test_scale_up_happens_on_the_next_tick_to_ceil_rps_over_target():
    a = Autoscaler()
    d = a.decide("m", inputs(rps_10s=25), POLICY)
    assert (d.action, d.desired) == ("up", 3)
    assert "25.0 rps / 10 per replica = 3" in d.reason
    assert d.inputs["rps_10s"] == 25


def test_scale_up_is_capped_by_max_replicas_and_capacity():
    a = Autoscaler()
    assert a.decide("m", inputs(rps_10s=100), POLICY).desired == 4
    d = a.decide("n", inputs(rps_10s=100, capacity=2), POLICY)
    assert d.desired == 2 and "available capacity" in d.reason


def test_engine_waiting_requests_raise_the_count():
    d = Autoscaler().decide("m", inputs(rps_10s=5, engine_waiting=3), POLICY)
    assert (d.action, d.desired) == ("up", 2) and "waiting" in d.reason


def test_scale_down_waits_for_the_stabilisation_window_then_goes_one_at_a_time():
    a = Autoscaler()
    t = 1000.0
    a.decide("m", inputs(now=t, current=3, ready=3, rps_10s=30), POLICY)  # hold at 3
    actions = []
    for step in range(1, 80):
        d = a.decide("m", inputs(now=t + step, current=3, ready=3, rps_10s=5), POLICY)
        actions.append((step, d.action, d.desired))
        if d.action == "down":
            break
    step, action, desired = actions[-1]
    assert action == "down" and desired == 2
    assert step > 30  # not before the window has passed
    # right after, the cooldown holds the next step down
    d = a.decide("m", inputs(now=t + step + 1, current=2, ready=2, rps_10s=5), POLICY)
    assert d.action == "hold" and "cooldown" in d.reason


def test_an_idle_model_goes_to_zero_after_its_ttl_unless_pinned():
    a = Autoscaler()
    busy = a.decide("m", inputs(idle_s=299), POLICY)
    assert busy.desired == 1
    for i in range(40):
        d = a.decide("m", inputs(now=2000 + i, idle_s=400 + i), POLICY)
        if d.action == "down":
            break
    assert d.action == "down" and d.desired == 0 and "idle" in d.reason
    pinned = Autoscaler().decide("p", inputs(idle_s=10_000, pinned=True), POLICY)
    assert pinned.desired == 1 and "pinned" in pinned.reason


def test_in_flight_or_queued_work_is_never_idle():
    d = Autoscaler().decide("m", inputs(idle_s=10_000, inflight=1), POLICY)
    assert d.desired == 1
    d = Autoscaler().decide("m", inputs(current=0, ready=0, idle_s=10_000, queued=2), POLICY)
    assert (d.action, d.desired) == ("up", 1)


def test_the_operator_override_wins_within_bounds():
    a = Autoscaler()
    d = a.decide("m", inputs(override=3, rps_10s=100), POLICY)
    assert (d.action, d.desired) == ("up", 3) and "operator" in d.reason
    assert a.decide("n", inputs(override=9), POLICY).desired == 4


def test_idle_vllm_replicas_sleep_before_they_go_to_zero():
    policy = Policy(1, 2, 10, idle_ttl_s=600, sleep_after_s=60)
    a = Autoscaler()
    assert a.decide("m", inputs(idle_s=30), policy).action == "hold"
    assert a.decide("m", inputs(idle_s=90), policy).action == "sleep"
    d = a.decide("m", inputs(ready=0, sleeping=1, queued=1, idle_s=0), policy)
    assert d.action == "wake"


def test_history_keeps_changes_and_only_the_first_hold_of_a_run():
    a = Autoscaler()
    for i in range(5):
        a.decide("m", inputs(now=1000 + i), POLICY)
    a.decide("m", inputs(now=1010, rps_10s=25), POLICY)
    actions = [d.action for d in a.recent("m")]
    assert actions == ["hold", "up"]


def test_rate_window_counts_per_second_buckets():
    now = [100.0]
    w = RateWindow(60, clock=lambda: now[0])
    for _ in range(50):
        w.record()
    now[0] = 105.5
    for _ in range(50):
        w.record()
    assert w.count(10) == 100 and w.rate(10) == 10.0
    now[0] = 112.0
    assert w.count(10) == 50  # the first second fell out of the 10 s window
    assert w.count(60) == 100
    now[0] = 500.0
    assert w.count(60) == 0 and w.idle_for() == pytest.approx(394.5)


def test_operator_state_survives_reopening_the_database(tmp_path):
    db = tmp_path / "state.db"
    s = StateStore(db)
    s.set_override("m", 3)
    s.set_pinned("m", True)
    s.set_pinned("n", True)
    s.close()
    again = StateStore(db)
    assert again.control("m").override == 3 and again.control("m").pinned
    assert again.control("n").override is None and again.control("x").pinned is False
    again.set_override("m", None)
    assert again.control("m").override is None and again.control("m").pinned


@pytest.mark.parametrize(("text", "seconds"), [("90s", 90), ("5m", 300), ("1h", 3600), ("0", 0),
                                               ("0s", 0), ("250ms", 0.25), (12, 12)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


def test_a_bad_duration_names_the_field():
    with pytest.raises(ValueError, match="idle_ttl: 'soon' is not a duration"):
        parse_duration("soon", "idle_ttl")


def test_a_lull_never_takes_the_last_replica_only_the_idle_ttl_does():
    policy = Policy(min_replicas=0, max_replicas=2, target_rps_per_replica=10, idle_ttl_s=0)
    a = Autoscaler()
    for i in range(100):
        d = a.decide("m", inputs(now=1000 + i, idle_s=i), policy)
        assert d.desired == 1
    at_zero = a.decide("z", inputs(current=0, ready=0), policy)
    assert (at_zero.action, at_zero.desired) == ("hold", 0)


def test_a_step_up_shows_in_the_fast_rate_before_the_10s_window_catches_up():
    d = Autoscaler().decide("m", inputs(rps_10s=6, rps_2s=38), POLICY)
    assert (d.action, d.desired) == ("up", 4)
    assert "38.0 rps" in d.reason
