"""The capacity market under the traces bench/market.py runs (issue 17's "hidden set of
traces"): each test here is a fault one of those traces found, reduced to the few requests
that show it. Simulated GPUs and tests/fake_engine.py speaking as vLLM; no GPU needed."""

from __future__ import annotations

from appliance.fleet.replica import State

from .test_market import one_gpu_two_models, started


async def test_traffic_for_a_model_evicted_to_sleep_wakes_it_only_into_free_room_not_by_evicting_idle_others(
    tmp_path,
):
    """a served a request, then b's request put a to sleep for b. With no request for a held,
    the autoscaler's pass (a had traffic in the last 10 s) must not wake a by evicting b: two
    models taking turns on room for one evicted each other at every pass (each residency
    window) with no request asking, and a request for b then waited for b's wake."""
    sup, session = await started(one_gpu_two_models(tmp_path, host_ram_gib=100))
    try:
        [a] = sup.deployment("a").replicas
        with (await sup.deployment("a").acquire()).lease():
            pass
        b = await sup.deployment("b").acquire()
        assert a.state is State.SLEEPING and b.state is State.READY
        sup.tick()
        assert not b.retiring and b.state is State.READY
        assert a.state is State.SLEEPING and not a.waking
        assert [(e.replica, e.for_model) for e in sup.market.recent()] == [("a#0", "b")]

        sup.unload("b")  # its room is free once it stopped: the pass wakes a into it
        await b.stop()
        sup.tick()
        await a.wait_ready(30)
        assert [(e.replica, e.for_model) for e in sup.market.recent()] == [("a#0", "b")]
    finally:
        await sup.stop()
        await session.close()
