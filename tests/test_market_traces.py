"""The capacity market under the traces bench/market.py runs (issue 17's "hidden set of
traces"): each test here is a fault one of those traces found, reduced to the few requests
that show it. Simulated GPUs and tests/fake_engine.py speaking as vLLM; no GPU needed."""

from __future__ import annotations

import asyncio

from appliance.fleet.replica_state import State

from .test_gpu_supervision import DATA, gpu_config
from .test_market import one_gpu_two_models, started, vllm_model


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


async def test_a_probe_that_ends_in_its_own_error_as_it_is_told_to_stop_is_not_reported_as_never_retrieved(
    tmp_path,
):
    """A readiness or health probe racing the engine's exit, a stop or a poke is cancelled
    when another wins; one whose own timeout fired in the same turn ends with ProbeFailed
    instead of being cancelled, and nobody read it: asyncio logged "Task exception was never
    retrieved" with the probe's traceback (seen under load in bench/market.py
    --engine llamacpp)."""
    import gc

    from engines.base import ProbeFailed

    sup, session = await started(one_gpu_two_models(tmp_path, host_ram_gib=100))
    loop = asyncio.get_running_loop()
    unretrieved: list[dict] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: unretrieved.append(context))
    try:
        [a] = sup.deployment("a").replicas

        async def probe() -> None:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                raise ProbeFailed("GET /metrics failed: TimeoutError") from None

        racing = asyncio.ensure_future(a._race(probe(), poke=True))
        await asyncio.sleep(0.01)
        a._poke.set()
        assert await racing == "poked"
        for _ in range(3):
            await asyncio.sleep(0)
        del racing
        gc.collect()
        assert [c for c in unretrieved if "never retrieved" in c.get("message", "")] == []
    finally:
        loop.set_exception_handler(previous)
        await sup.stop()
        await session.close()


async def test_room_that_comes_goes_to_the_model_whose_requests_waited_longest_not_the_first_in_the_config(tmp_path):
    """One GPU held by a inside its residency; a request for c, then one for b, are held.
    When a's residency lapses the room goes to c, whose request waited longer: it went to
    the model listed first (b), so with many models on little room the last ones listed
    waited out every other model's turn and their requests timed out (bench/market.py
    --models 8 --gpus 1 --residency 30: models in config order, m7 last)."""
    inv = tmp_path / "one-gpu.toml"
    inv.write_text('[[gpu]]\nname = "NVIDIA H100 80GB HBM3"\nmemory_gib = 80\ncount = 1\n')
    at_zero = "[models.autoscaling]\nmin_replicas = 0\n"
    models = vllm_model(tmp_path, "a", 40) + "".join(vllm_model(tmp_path, n, 40) + at_zero for n in "bc")
    text = gpu_config(tmp_path, models).replace(str(DATA / "inventory-8xh100.toml"), str(inv))
    sup, session = await started(text + '[autoscaling]\nmin_residency = "2s"\n[capacity]\nhost_ram_gib = 100\n')
    try:
        c = asyncio.ensure_future(sup.deployment("c").acquire())
        while not sup.deployment("c").waiters:
            await asyncio.sleep(0.01)
        b = asyncio.ensure_future(sup.deployment("b").acquire())
        while not sup.deployment("b").waiters:
            await asyncio.sleep(0.01)
        done, _ = await asyncio.wait([b, c], return_when=asyncio.FIRST_COMPLETED)
        assert done == {c}
        assert [(e.replica, e.for_model) for e in sup.market.recent()] == [("a#0", "c")]
        b.cancel()
    finally:
        await sup.stop()
        await session.close()
