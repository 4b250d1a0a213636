"""Fairness between models on too little room (appliance/fleet/fairness.py) and headroom made
ahead of demand (appliance/fleet/headroom.py), with the real supervisor and fake vLLM engines
on a simulated GPU with room for one of two models (issue 17)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest

from appliance.errors import ApplianceError, NoCapacity
from appliance.fleet.replica_state import State

from .test_market import one_gpu_two_models, started


def room_for_one(tmp_path, residency: str, bound: float, queue_timeout: float = 20, headroom: float = 0) -> str:
    """a at boot, b at zero, room for one of them; [capacity] is the config's last table."""
    text = one_gpu_two_models(tmp_path, host_ram_gib=100, residency=residency, sleeps=False)
    return (
        f"{text}max_wait_before_preempt_s = {bound}\nheadroom_idle_s = {headroom}\n"
        f"[queue]\ntimeout_s = {queue_timeout}\n"
    )


async def keep_busy(sup, model: str, seconds: float, answered: Counter, failed: list) -> None:
    """One client that always has a request of ``model`` in flight (0.2 s each) or waiting."""
    loop = asyncio.get_running_loop()
    until = loop.time() + seconds
    while loop.time() < until:
        try:
            replica = await sup.deployment(model).acquire()
        except ApplianceError as exc:
            failed.append(f"{model}: {exc}")
            continue
        with replica.lease():
            await asyncio.sleep(0.2)
        answered[model] += 1


async def test_two_busy_models_on_room_for_one_both_get_answered_and_none_fails(tmp_path):
    # a always has a request in flight for longer than b's queue timeout: plain eviction never
    # takes it, and before fairness b's requests waited until their queue timed out (503).
    sup, session = await started(room_for_one(tmp_path, residency="1s", bound=0.5, queue_timeout=8))
    try:
        answered: Counter = Counter()
        failed: list[str] = []
        await asyncio.gather(*(keep_busy(sup, m, 12, answered, failed) for m in "aabb"))
        assert failed == []
        assert answered["a"] > 0 and answered["b"] > 0
        swaps = [(e.model, e.trigger, e.to) for e in reversed(sup.market.recent())]
        # b took a's room, then a took it back: each drained (stopped once its requests ended).
        assert swaps[:2] == [("a", "fairness", "stop"), ("b", "fairness", "stop")]
        assert "b's requests waited" in sup.market.recent()[-1].why
    finally:
        await sup.stop()
        await session.close()


async def test_fairness_waits_for_the_busy_models_residency_before_it_drains_it(tmp_path):
    sup, session = await started(room_for_one(tmp_path, residency="3s", bound=0.2))
    try:
        [a] = sup.deployment("a").replicas
        answered: Counter = Counter()
        failed: list[str] = []
        busy = asyncio.gather(*(keep_busy(sup, "a", 5, answered, failed) for _ in range(2)))
        b = await sup.deployment("b").acquire()
        assert b.state is State.READY and a.retiring
        [evicted] = sup.market.recent()
        assert (evicted.model, evicted.trigger) == ("a", "fairness")
        # not before a had been loaded for its min_residency (anti-thrash holds under fairness)
        loaded_at = time.time() - (sup.clock.monotonic() - a.ready_since)
        assert evicted.at.timestamp() - loaded_at >= 3 - 0.05
        await busy
        assert failed == []
    finally:
        await sup.stop()
        await session.close()


async def test_a_pinned_busy_model_is_never_preempted(tmp_path):
    text = room_for_one(tmp_path, residency="0s", bound=0.2, queue_timeout=2)
    sup, session = await started(text)
    try:
        sup.pin("a", True)
        answered: Counter = Counter()
        failed: list[str] = []
        busy = asyncio.gather(*(keep_busy(sup, "a", 3, answered, failed) for _ in range(2)))
        with pytest.raises(NoCapacity, match=r"no room: GPU memory is held by a#0"):
            await sup.deployment("b").acquire()
        await busy
        assert failed == [] and sup.market.recent() == []
    finally:
        await sup.stop()
        await session.close()


async def test_headroom_stops_a_long_unused_model_for_one_just_asked_for_so_its_next_start_frees_nothing(
    tmp_path,
):
    # b's first request finds a inside its residency (beyond b's queue timeout): 503 at once.
    sup, session = await started(room_for_one(tmp_path, residency="3s", bound=0, queue_timeout=0.5, headroom=0.3))
    try:
        [a] = sup.deployment("a").replicas
        with pytest.raises(ApplianceError):
            await sup.deployment("b").acquire()
        sup.tick()
        assert sup.market.recent() == []  # a is still inside its residency
        await asyncio.sleep(3.1)
        sup.tick()  # a unused since boot, b asked for since: room is made for b before it asks again
        assert [(e.model, e.trigger, e.for_model) for e in sup.market.recent()] == [("a", "headroom", "b")]
        if (stopping := sup._drains.get("a#0")) is not None:
            await stopping  # stopped in the background
        sup.cfg.queue.timeout_s = 60  # (short above only to answer the first request at once)
        b = await sup.deployment("b").acquire()
        assert b.state is State.READY
        assert ("b", "cold") in sup.market.waits.series and ("b", "evict") not in sup.market.waits.series
        sup.tick()  # a is not asked for: b stays
        assert len(sup.market.recent()) == 1
    finally:
        await sup.stop()
        await session.close()


async def test_headroom_is_off_by_default(tmp_path):
    sup, session = await started(room_for_one(tmp_path, residency="0s", bound=0, queue_timeout=0.5))
    try:
        assert sup.cfg.capacity.headroom_idle_s == 0
        sup.pin("a", True)
        with pytest.raises(NoCapacity):
            await sup.deployment("b").acquire()  # b asked for, a unused since boot
        sup.pin("a", False)
        sup.tick()
        assert sup.market.recent() == []
    finally:
        await sup.stop()
        await session.close()


async def test_a_request_for_a_model_whose_replica_is_being_evicted_waits_and_is_answered_not_503(tmp_path):
    # Its own replica, still stopping, is room that comes back (eviction.Holder.leaving).
    sup, session = await started(room_for_one(tmp_path, residency="0s", bound=0))
    try:
        [a0] = sup.deployment("a").replicas
        for_b = asyncio.ensure_future(sup.deployment("b").acquire())
        while not a0.retiring:
            await asyncio.sleep(0.001)
        for_a = asyncio.ensure_future(sup.deployment("a").acquire())  # while a#0 stops
        b = await for_b
        with b.lease():
            await asyncio.sleep(0.05)
        a = await for_a
        assert a.state is State.READY and a is not a0
        assert [(e.model, e.for_model) for e in reversed(sup.market.recent())] == [("a", "b"), ("b", "a")]
    finally:
        await sup.stop()
        await session.close()


async def test_a_reload_that_sets_max_wait_before_preempt_s_applies_to_requests_already_held(tmp_path):
    """[capacity] settings change live: with preemption off (0) b's request waits behind a,
    which always has a request in flight; a reload that sets the bound (no restart) lets the
    held request take a's room, drained. Before, the reload was refused as restart-only."""
    from types import SimpleNamespace

    from appliance.api.reload import Reloader
    from appliance.config import parse_config

    text = room_for_one(tmp_path, residency="0s", bound=0, queue_timeout=60)
    sup, session = await started(text)
    try:
        answered: Counter = Counter()
        failed: list[str] = []
        busy = asyncio.gather(*(keep_busy(sup, "a", 4, answered, failed) for _ in range(2)))
        held = asyncio.ensure_future(sup.deployment("b").acquire())
        await asyncio.sleep(1.0)
        assert not held.done() and sup.market.recent() == []  # waits: preemption is off

        new = parse_config(text.replace("max_wait_before_preempt_s = 0\n", "max_wait_before_preempt_s = 0.2\n"))
        rt = SimpleNamespace(
            cfg=sup.cfg, draining=False, adopt=lambda *a: None, openapi=None, supervisor=sup, providers={},
            tenancy=None,
        )
        report = await Reloader(rt, lambda: new).reload()
        assert "capacity.max_wait_before_preempt_s changed" in report.policy
        assert sup.cfg.capacity.max_wait_before_preempt_s == 0.2

        b = await asyncio.wait_for(held, 30)
        assert b.state is State.READY
        assert [(e.model, e.trigger) for e in sup.market.recent()] == [("a", "fairness")]
        await busy
        assert failed == []
    finally:
        await sup.stop()
        await session.close()
