"""The capacity market: replicas placed as a set (issue 17, point 1), the capacity
budgets' one owner (issue 16, point 3), and what the market shows an operator.

Simulated GPU inventories and tests/fake_engine.py speaking as vLLM; no GPU needed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
from pathlib import Path

import aiohttp
import pytest

from appliance.config import parse_config
from appliance.fleet.replica_state import State
from appliance.fleet.supervisor import Supervisor
from appliance.gpu.probe import GiB

from . import make_tiny_gguf
from .conftest import PY, ROOT, pid_alive
from .test_eviction_supervision import fake_llama_server, gguf_model
from .test_gpu_supervision import DATA, gpu_config, make_model


def two_gpus(tmp_path: Path) -> Path:
    inv = tmp_path / "two-gpus.toml"
    inv.write_text('[[gpu]]\nname = "NVIDIA H100 80GB HBM3"\nmemory_gib = 80\ncount = 2\n')
    return inv


def vllm_model(tmp_path: Path, name: str, weights_gib: float, extra: str = "") -> str:
    source = make_model(tmp_path, name, weights_gib)
    return (f'[[models]]\nname = "{name}"\nserver = "vllm"\nsource = "{source}"\nkv_cache_tokens = 1024\n'
            f"{extra}[models.gpus]\ncount = 1\n")


def worst_order_set(tmp_path: Path) -> str:
    """Two 29.6 GiB and two 49.6 GiB replicas on two 80 GiB GPUs: they fit only as one large
    and one small per GPU. Listed small first, placed one by one (best fit), both small ones
    share GPU 0 and the second large one finds no room."""
    models = "".join(vllm_model(tmp_path, n, w) for n, w in (("c1", 27), ("c2", 27), ("b1", 47), ("b2", 47)))
    return gpu_config(tmp_path, models).replace(str(DATA / "inventory-8xh100.toml"), str(two_gpus(tmp_path)))


def test_plan_places_a_packable_set_listed_in_the_worst_order(tmp_path):
    cfg = tmp_path / "a.toml"
    cfg.write_text(worst_order_set(tmp_path))
    out = subprocess.run([PY, "-m", "appliance.cli", "plan", "--config", str(cfg), "--json"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = {r["replica"]: r for r in json.loads(out.stdout)["placements"]}
    assert [rows[n]["error"] for n in ("c1#0", "c2#0", "b1#0", "b2#0")] == [None] * 4
    # one large and one small per GPU
    assert sorted(rows[f"b{i}#0"]["gpus"][0] for i in (1, 2)) == [0, 1]
    assert sorted(rows[f"c{i}#0"]["gpus"][0] for i in (1, 2)) == [0, 1]


async def test_at_boot_a_packable_set_listed_in_the_worst_order_is_placed_and_starts(tmp_path):
    cfg = parse_config(worst_order_set(tmp_path))
    session = aiohttp.ClientSession()
    sup = Supervisor(cfg, session)
    try:
        sup.start()
        replicas = [sup.deployment(n).replicas[0] for n in ("c1", "c2", "b1", "b2")]
        for r in replicas:
            await r.wait_ready(30)
        per_gpu: dict[int, int] = {}
        for r in replicas:
            assert len(r.slot.gpus) == 1
            per_gpu[r.slot.gpus[0]] = per_gpu.get(r.slot.gpus[0], 0) + r.slot.bytes_per_gpu
        assert sorted(per_gpu) == [0, 1] and all(used <= 80 * 1024**3 for used in per_gpu.values())
    finally:
        await sup.stop()
        await session.close()


def test_when_the_whole_set_cannot_fit_plan_places_no_fewer_than_one_by_one(tmp_path):
    """Five replicas where four fit: the set is refused as a whole, the fallback still places
    four (largest first), one more than one by one in the listed order."""
    from appliance.gpu.planning import plan
    from appliance.gpu.probe import SimulatedProbe

    text = worst_order_set(tmp_path) + vllm_model(tmp_path, "b3", 47)
    cfg = parse_config(text)
    inventory = SimulatedProbe(str(two_gpus(tmp_path))).read()
    rows = plan(cfg, inventory, [(m, f"{m.name}#0") for m in cfg.models])
    assert [r.replica for r in rows] == ["c1#0", "c2#0", "b1#0", "b2#0", "b3#0"]
    assert sum(r.assignment is not None for r in rows) == 4
    [refused] = [r for r in rows if r.error]
    assert "needs 49.6 GiB" in refused.error


# --- the sleep tier (issue 17, point 3) -----------------------------------------------------


def one_gpu_two_models(tmp_path: Path, host_ram_gib: float, residency: str = "0s", sleeps: bool = True) -> str:
    """One 80 GiB GPU with room for one of a and b (each ~42 GiB), a at boot, b at zero."""
    inv = tmp_path / "one-gpu.toml"
    inv.write_text('[[gpu]]\nname = "NVIDIA H100 80GB HBM3"\nmemory_gib = 80\ncount = 1\n')
    a = vllm_model(tmp_path, "a", 40, extra="sleep_mode = true\n" if sleeps else "")
    b = vllm_model(tmp_path, "b", 40) + "[models.autoscaling]\nmin_replicas = 0\n"
    text = gpu_config(tmp_path, a + b).replace(str(DATA / "inventory-8xh100.toml"), str(inv))
    return text + f'[autoscaling]\nmin_residency = "{residency}"\n[capacity]\nhost_ram_gib = {host_ram_gib}\n'


async def started(text: str) -> tuple[Supervisor, aiohttp.ClientSession]:
    session = aiohttp.ClientSession()
    sup = Supervisor(parse_config(text), session)
    sup.start()
    await sup.deployment("a").replicas[0].wait_ready(30)
    return sup, session


async def test_an_idle_vllm_replica_is_evicted_to_sleep_in_host_ram_and_woken_in_place_for_its_next_request(
    tmp_path,
):
    sup, session = await started(one_gpu_two_models(tmp_path, host_ram_gib=100))
    try:
        [a] = sup.deployment("a").replicas
        pid = a.pid
        b = await sup.deployment("b").acquire()
        assert b.state is State.READY and b.slot.gpus == (0,)
        assert a.state is State.SLEEPING and not a.retiring  # evicted to sleep, not stopped
        [evicted] = sup.market.recent()
        assert (evicted.replica, evicted.to, evicted.for_model, evicted.trigger) == (
            "a#0", "sleep", "b", "request")
        budget = sup.cpu_budget()
        assert [s.replica for s in budget.sleeping] == ["a#0"]
        assert budget.host_ram_used_bytes == budget.sleeping[0].host_bytes >= 40 * GiB

        # a's next request: its GPU is held by b (idle): b goes (no sleep mode: stopped), a wakes
        # where it slept, the same engine process (no cold start).
        again = await sup.deployment("a").acquire()
        assert again is a and a.state is State.READY and a.pid == pid
        assert [(e.replica, e.to) for e in sup.market.recent()] == [("b#0", "stop"), ("a#0", "sleep")]
        assert ("a", "evict") in sup.market.waits.series and ("b", "evict") in sup.market.waits.series
    finally:
        await sup.stop()
        await session.close()


async def test_an_idle_vllm_replica_whose_weights_do_not_fit_in_host_ram_is_stopped_not_slept(tmp_path):
    sup, session = await started(one_gpu_two_models(tmp_path, host_ram_gib=30))
    try:
        [a] = sup.deployment("a").replicas
        b = await sup.deployment("b").acquire()
        assert b.state is State.READY
        assert a.retiring  # stopped: 40 GiB of weights do not fit in 30 GiB of host RAM
        assert [(e.replica, e.to) for e in sup.market.recent()] == [("a#0", "stop")]
        assert sup.cpu_budget().sleeping == []
    finally:
        await sup.stop()
        await session.close()


# --- the CPU budget ------------------------------------------------------------------------------


async def test_the_cpu_budget_defaults_to_the_cpus_the_daemon_may_run_on_not_the_machines_count(
    tmp_path, monkeypatch
):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2})
    monkeypatch.setattr("os.cpu_count", lambda: 64)
    cfg = parse_config(gpu_config(tmp_path, ""))
    session = aiohttp.ClientSession()
    try:
        assert Supervisor(cfg, session).cpu_budget().cores == 3
    finally:
        await session.close()


# --- host RAM -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    make_tiny_gguf.main([str(path)])
    return path


def cpu_models(tmp_path: Path, tiny: Path, names: str, host_ram_gib: float, cores: int = 4) -> str:
    models = "".join(gguf_model(n, tiny, gpus=0, threads=1) for n in names)
    return (gpu_config(tmp_path, models) + f'[engines.llamacpp]\nbinary = "{fake_llama_server(tmp_path)}"\n'
            f'[cpu]\ncores = {cores}\n[autoscaling]\nmin_residency = "0s"\n'
            f"[capacity]\nhost_ram_gib = {host_ram_gib}\n")


async def test_cpu_replicas_are_budgeted_by_host_ram_and_a_request_evicts_for_it(tmp_path, tiny):
    """Cores for four, host RAM for one tiny model (~14 MiB): b stays at zero at boot, and
    its request evicts a (it is idle) instead of overcommitting the RAM."""
    session = aiohttp.ClientSession()
    sup = Supervisor(parse_config(cpu_models(tmp_path, tiny, "ab", host_ram_gib=0.02)), session)
    try:
        sup.start()
        [a] = sup.deployment("a").replicas
        await a.wait_ready(30)
        assert sup.deployment("b").replicas == []
        [waiting] = [m.waiting_for_room for m in sup.status() if m.name == "b"]  # (its floor, at boot)
        assert waiting is not None and "b needs 1 of the CPU engines' 4 cores and " in waiting
        assert waiting.endswith("held by a#0")
        budget = sup.cpu_budget()
        assert budget.host_ram_bytes == int(0.02 * GiB) and budget.host_ram_used_bytes > 0
        b = await sup.deployment("b").acquire()
        assert b.state is State.READY and a.retiring
        [evicted] = sup.market.recent()
        assert (evicted.replica, evicted.to, evicted.for_model) == ("a#0", "stop", "b")
    finally:
        await sup.stop()
        await session.close()


async def test_a_sleeping_replica_holds_host_ram_and_is_evicted_to_stopped_for_a_cpu_replica(tmp_path, tiny):
    """a sleeps with its 40 GiB of weights in host RAM; a budget of 40 GiB + 10 MiB leaves
    no room for c on the CPU (~14 MiB): c's request stops the sleeping a."""
    text = one_gpu_two_models(tmp_path, host_ram_gib=40.01).replace(
        "[autoscaling]", gguf_model("c", tiny, gpus=0, threads=1)
        + "[models.autoscaling]\nmin_replicas = 0\n"
        + f'[engines.llamacpp]\nbinary = "{fake_llama_server(tmp_path)}"\n[autoscaling]')
    sup, session = await started(text)
    try:
        [a] = sup.deployment("a").replicas
        await a.sleep(timeout=10)
        assert sup.cpu_budget().host_ram_used_bytes >= 40 * GiB
        c = await sup.deployment("c").acquire()
        assert c.state is State.READY and a.retiring
        [evicted] = sup.market.recent()
        assert (evicted.replica, evicted.to, evicted.for_model) == ("a#0", "stop", "c")
    finally:
        await sup.stop()
        await session.close()


def slow_to_exit_cpu_models(tmp_path: Path, tiny: Path, host_ram_gib: float) -> str:
    """a and b on a budget of one core; a's engine takes the whole stop grace (30 s) to exit:
    it ignores SIGTERM."""
    text = cpu_models(tmp_path, tiny, "", host_ram_gib=host_ram_gib, cores=1)
    a = gguf_model("a", tiny, gpus=0, threads=1, extra='args = ["--ignore-sigterm"]\n')
    b = gguf_model("b", tiny, gpus=0, threads=1) + "[models.autoscaling]\nmin_replicas = 0\n"
    text = text.replace("[supervisor]\n", "[supervisor]\nstop_grace_s = 30\n", 1)
    return text.replace("[engines.llamacpp]", a + b + "[engines.llamacpp]")


async def test_a_cpu_replica_evicting_for_cores_starts_while_its_idle_victim_still_exits(tmp_path, tiny):
    """Cores are time-shared: b's engine starts beside a's exiting one (a got SIGTERM in the
    eviction's step, idle) instead of after its exit; b is answered while a still exits."""
    session = aiohttp.ClientSession()
    sup = Supervisor(parse_config(slow_to_exit_cpu_models(tmp_path, tiny, host_ram_gib=1)), session)
    try:
        sup.start()
        [a] = sup.deployment("a").replicas
        await a.wait_ready(30)
        pid = a.pid
        b = await asyncio.wait_for(sup.deployment("b").acquire(), 40)
        assert pid_alive(pid), "b waited for a's exit"
        assert b.state is State.READY and a.told_to_stop
        assert b.cpus == a.cpus  # the core a frees, shared only while a exits
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)  # (not 30 s of grace at the end)
        await sup.stop()
        await session.close()


async def test_a_cpu_replica_that_needs_its_victims_host_ram_waits_for_their_exit(tmp_path, tiny):
    """Host RAM is not time-shared: with room in it for one tiny model (~14 MiB), b's engine
    starts only once a's has exited (SIGKILL after a short grace)."""
    session = aiohttp.ClientSession()
    text = slow_to_exit_cpu_models(tmp_path, tiny, host_ram_gib=0.02).replace("stop_grace_s = 30", "stop_grace_s = 1")
    sup = Supervisor(parse_config(text), session)
    try:
        sup.start()
        [a] = sup.deployment("a").replicas
        await a.wait_ready(30)
        pid = a.pid
        b = await asyncio.wait_for(sup.deployment("b").acquire(), 25)
        assert b.state is State.READY and not pid_alive(pid)
        assert b.loading_since >= a.history[-1].at  # spawned after a STOPPED
    finally:
        await sup.stop()
        await session.close()


# --- waiting for room, residency, thrash ------------------------------------------------------


async def test_a_request_finding_room_inside_another_models_residency_is_held_until_it_ends_and_answered(tmp_path):
    sup, session = await started(one_gpu_two_models(tmp_path, host_ram_gib=100, residency="2s", sleeps=False))
    try:
        [a] = sup.deployment("a").replicas
        b = await sup.deployment("b").acquire()  # held (not 503): a was loaded less than 2 s ago
        assert b.state is State.READY and a.retiring
        assert sup.clock.monotonic() - a.ready_since >= 2.0  # evicted only once its window ended
    finally:
        await sup.stop()
        await session.close()


async def test_a_residency_beyond_the_queue_timeout_answers_503_at_once_naming_the_holder(tmp_path):
    from appliance.errors import NoCapacity

    sup, session = await started(one_gpu_two_models(tmp_path, host_ram_gib=100, residency="1h", sleeps=False))
    try:
        with pytest.raises(NoCapacity, match=r"a#0 \(loaded \d+s ago, min_residency 3600s\)"):
            await sup.deployment("b").acquire()
    finally:
        await sup.stop()
        await session.close()


async def test_two_models_alternating_on_room_for_one_swap_no_faster_than_their_residency(tmp_path):
    residency = 1.0
    sup, session = await started(one_gpu_two_models(tmp_path, host_ram_gib=100, residency="1s", sleeps=False))
    try:
        for model in "babab":
            replica = await sup.deployment(model).acquire()
            with replica.lease():
                pass
        at = sorted(e.at.timestamp() for e in sup.market.recent())
        assert len(at) == 5
        # Each eviction waited for the model it evicted to have been loaded for its residency.
        assert all(later - earlier >= residency - 0.05 for earlier, later in zip(at, at[1:], strict=False))
    finally:
        await sup.stop()
        await session.close()


async def test_load_does_not_report_success_while_the_room_is_still_held_and_says_when_to_retry(tmp_path):
    from appliance.errors import NoCapacity

    sup, session = await started(one_gpu_two_models(tmp_path, host_ram_gib=100, residency="30s", sleeps=False))
    try:
        with pytest.raises(NoCapacity, match=r"a#0 \(loaded \d+s ago, min_residency 30s\)") as raised:
            sup.load("b")
        assert 1 <= raised.value.retry_after <= 30
        assert sup.deployment("b").replicas == []  # nothing started, nothing evicted
        assert sup.market.recent() == []
    finally:
        await sup.stop()
        await session.close()


def test_a_replica_that_cannot_be_placed_is_told_the_knobs_that_would_fit_with_the_numbers(tmp_path):
    from appliance.gpu.planning import plan
    from appliance.gpu.probe import SimulatedProbe

    inv = tmp_path / "one-gpu.toml"
    inv.write_text('[[gpu]]\nname = "NVIDIA L40S"\nmemory_gib = 48\ncount = 1\n')
    # 40 GiB of weights with a KV cache that takes it past 48 GiB: fewer tokens, or fp8, fit.
    text = vllm_model(tmp_path, "big", 40).replace("kv_cache_tokens = 1024", "kv_cache_tokens = 400000")
    cfg = parse_config(text)
    [row] = plan(cfg, SimulatedProbe(str(inv)).read(), [(cfg.models[0], "big#0")])
    assert row.error is not None and "to fit in" in row.error, row.error
    assert "kv_cache_tokens = " in row.error and "(now 400000)" in row.error, row.error
    # The number named fits: planned with it, the replica is placed.
    fitting = int(row.error.split("kv_cache_tokens = ")[1].split(" ")[0])
    again = parse_config(text.replace("kv_cache_tokens = 400000", f"kv_cache_tokens = {fitting}"))
    [placed] = plan(again, SimulatedProbe(str(inv)).read(), [(again.models[0], "big#0")])
    assert placed.error is None, placed.error


def four_at_zero_and_z(tmp_path: Path, z_at_boot: bool) -> str:
    """c1, c2 (29.6 GiB) and b1, b2 (49.6 GiB) at zero on two 80 GiB GPUs: they fit only as
    one large and one small per GPU. z (62.4 GiB on each GPU) holds both at boot if asked."""
    zero = "[models.autoscaling]\nmin_replicas = 0\n"
    z = make_model(tmp_path, "z", 120)
    models = (f'[[models]]\nname = "z"\nserver = "vllm"\nsource = "{z}"\nkv_cache_tokens = 1024\n'
              f"[models.gpus]\ncount = 2\n{'' if z_at_boot else zero}")
    models += "".join(vllm_model(tmp_path, n, w) + zero for n, w in (("c1", 27), ("c2", 27), ("b1", 47), ("b2", 47)))
    text = gpu_config(tmp_path, models).replace(str(DATA / "inventory-8xh100.toml"), str(two_gpus(tmp_path)))
    return text + '[autoscaling]\nmin_residency = "2s"\n'


def one_large_and_one_small_per_gpu(replicas) -> bool:
    return sorted((r.slot.gpus[0], r.model.name[0]) for r in replicas) == [(0, "b"), (0, "c"), (1, "b"), (1, "c")]


async def test_requests_for_several_models_at_zero_arriving_at_once_are_placed_as_one_set(tmp_path):
    """Started one by one in the order asked (c1, c2, b1, b2), the two small ones share a GPU
    and b2 finds no room (held until one of them may be evicted); as one set, all four fit."""
    import asyncio

    session = aiohttp.ClientSession()
    sup = Supervisor(parse_config(four_at_zero_and_z(tmp_path, z_at_boot=False)), session)
    try:
        sup.start()
        names = ("c1", "c2", "b1", "b2")
        replicas = await asyncio.wait_for(asyncio.gather(*(sup.deployment(n).acquire() for n in names)), 60)
        assert all(r.state is State.READY for r in replicas)
        assert sup.market.recent() == []  # nothing evicted: each started where the set put it
        assert one_large_and_one_small_per_gpu(replicas)
    finally:
        await sup.stop()
        await session.close()


async def test_several_models_held_for_room_at_once_are_placed_as_one_set_evicting_only_for_the_set(tmp_path):
    """z holds both GPUs inside its residency while requests for c1, c2, b1 and b2 wait.
    When z may go, the four are placed together and z is the only eviction."""
    import asyncio

    session = aiohttp.ClientSession()
    sup = Supervisor(parse_config(four_at_zero_and_z(tmp_path, z_at_boot=True)), session)
    try:
        sup.start()
        await sup.deployment("z").replicas[0].wait_ready(30)
        names = ("c1", "c2", "b1", "b2")
        replicas = await asyncio.wait_for(asyncio.gather(*(sup.deployment(n).acquire() for n in names)), 60)
        assert all(r.state is State.READY for r in replicas)
        assert [e.replica for e in sup.market.recent()] == ["z#0"]
        assert one_large_and_one_small_per_gpu(replicas)
    finally:
        await sup.stop()
        await session.close()


# --- one view of the market (issue 17, point 4) -------------------------------------------------


async def test_the_market_view_shows_what_each_gpu_holds_what_sleeps_and_each_eviction(tmp_path):
    """What /admin/gpus answers, in the words `appliance plan` and the TUI's overview use."""
    from rich.console import Console

    from appliance.api.admin_views import gpu_view
    from appliance.status import market_lines
    from tui.market import panel

    sup, session = await started(one_gpu_two_models(tmp_path, host_ram_gib=100))
    try:
        await sup.deployment("b").acquire()
        lines = market_lines(gpu_view(sup))
        assert lines[0].startswith("GPU 0  NVIDIA H100 80GB HBM3")
        assert any(line.startswith("  b#0 READY: reserved 42.") for line in lines), lines
        asleep = lines.index(next(line for line in lines if line.startswith("Asleep in host RAM (4")))
        assert lines[asleep + 1].startswith("  a#0: 4") and lines[asleep + 1].endswith("wakes on GPU 0"), lines
        evicted = lines[lines.index("Recent evictions (newest first):") + 1]
        assert "a#0 put to sleep for b (request): idle" in evicted, lines
        console = Console(width=200, record=True)
        console.print(panel(gpu_view(sup)))
        assert evicted.strip() in console.export_text()
    finally:
        await sup.stop()
        await session.close()


def test_plan_with_a_daemon_running_shows_its_market_too(daemons, tmp_path):
    from .test_eviction_supervision import chat, gpu_daemon

    tiny = tmp_path / "tiny.gguf"
    make_tiny_gguf.main([str(tiny)])
    d = gpu_daemon(daemons, tmp_path, tiny)
    assert chat(d, "b").status_code == 200  # a (idle) stopped for b
    text = subprocess.run([PY, "-m", "appliance.cli", "plan", "--config", str(d.config)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60).stdout
    assert "Now, in the running daemon (its capacity market):" in text, text
    assert "b#0 READY: reserved" in text and "a#0 stopped for b (request): idle" in text, text
    out = subprocess.run([PY, "-m", "appliance.cli", "plan", "--config", str(d.config), "--json"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60).stdout
    market = json.loads(out)["market"]
    assert [(e["replica"], e["to"], e["for_model"]) for e in market["evictions"]] == [("a#0", "stop", "b")]


@pytest.mark.parametrize("held_by", ["a request in flight", "a residency"])
async def test_a_request_held_for_room_goes_when_the_room_comes_not_at_a_poll(tmp_path, monkeypatch, held_by):
    """The held request is told when a's request ends or its residency lapses: with the
    held requests' own periodic look switched off, it is still answered."""
    import asyncio

    monkeypatch.setattr("appliance.fleet.hold.ROOM_POLL_S", 3600.0)
    residency = "1s" if held_by == "a residency" else "0s"
    sup, session = await started(one_gpu_two_models(tmp_path, host_ram_gib=100, residency=residency, sleeps=False))
    try:
        [a] = sup.deployment("a").replicas
        if held_by == "a request in flight":
            with a.lease():
                held = asyncio.ensure_future(sup.deployment("b").acquire())
                await asyncio.sleep(0.3)
                assert not held.done() and sup.deployment("b").no_room  # a holds the GPU: b waits
        else:
            held = asyncio.ensure_future(sup.deployment("b").acquire())
        b = await asyncio.wait_for(held, 60)
        assert b.state is State.READY and a.retiring
        assert sup.clock.monotonic() - a.ready_since >= 1.0 or held_by != "a residency"
    finally:
        await sup.stop()
        await session.close()


async def test_a_replica_evicted_to_sleep_takes_no_new_request_on_its_way_and_one_that_comes_wakes_it_after(
    tmp_path,
):
    """a takes 1 s to sleep for b: a request for a meanwhile does not go to a (it would hold
    the memory b waits for); it is held, and a wakes for it once it has slept."""
    import asyncio

    text = one_gpu_two_models(tmp_path, host_ram_gib=100).replace(
        '"--as-engine", "vllm"]', '"--as-engine", "vllm", "--sleep-delay", "1"]')
    sup, session = await started(text)
    try:
        [a] = sup.deployment("a").replicas
        for_b = asyncio.ensure_future(sup.deployment("b").acquire())
        await asyncio.sleep(0.3)
        assert a.state is State.READY and sup.deployment("a").pick_ready() is None  # on its way to sleep
        for_a = asyncio.ensure_future(sup.deployment("a").acquire())
        b = await asyncio.wait_for(for_b, 60)
        assert b.state is State.READY
        assert await asyncio.wait_for(for_a, 60) is a and a.state is State.READY  # woke again for it
    finally:
        await sup.stop()
        await session.close()


async def test_a_gpu_view_reads_proc_once_whatever_the_number_of_replicas(tmp_path, monkeypatch):
    # It is read on the event loop for every placement and every set of victims tried: once
    # per replica made looks for room stall the loop for seconds on a busy host.
    from appliance.fleet import process

    sup, session = await started(one_gpu_two_models(tmp_path, host_ram_gib=100))
    try:
        await sup.deployment("b").acquire()  # a sleeps (still placed), b runs
        assert len([r for r in sup.replicas() if r.slot is not None and r.pid]) == 2
        reads = []
        listdir = process.os.listdir
        monkeypatch.setattr(process.os, "listdir", lambda path: reads.append(path) or listdir(path))
        sup.capacity.gpu_view()
        assert reads == ["/proc"]
    finally:
        await sup.stop()
        await session.close()


async def test_a_loads_eviction_plan_and_placement_read_proc_once_in_their_turn(tmp_path, monkeypatch):
    # Both ask for the GPU view in the step that decides the load, on its request's path.
    from appliance.fleet import process

    sup, session = await started(one_gpu_two_models(tmp_path, host_ram_gib=100))
    try:
        reads = []
        listdir = process.os.listdir
        monkeypatch.setattr(process.os, "listdir", lambda path: reads.append(path) or listdir(path))
        sup.on_demand(sup.deployment("b"))  # a is evicted (to sleep) and b placed, in this step
        assert [e.replica for e in sup.market.recent()] == ["a#0"] and len(sup.deployment("b").replicas) == 1
        assert reads == ["/proc"]
        await asyncio.sleep(0)
        sup.capacity.gpu_view()  # a later turn reads it again
        assert reads == ["/proc", "/proc"]
    finally:
        await sup.stop()
        await session.close()


async def test_a_replica_on_its_way_to_wake_holds_its_gpu_memory_so_no_other_wakes_into_it(tmp_path):
    # a's wake waits for b to go to sleep; b's own next request, meanwhile, found a's memory
    # "free" (a still SLEEPING) and woke b into it: two replicas awake on room for one.
    inv = tmp_path / "one-gpu.toml"
    inv.write_text('[[gpu]]\nname = "NVIDIA H100 80GB HBM3"\nmemory_gib = 80\ncount = 1\n')
    a = vllm_model(tmp_path, "a", 40, extra="sleep_mode = true\n")
    b = vllm_model(tmp_path, "b", 40, extra="sleep_mode = true\n") + "[models.autoscaling]\nmin_replicas = 0\n"
    text = gpu_config(tmp_path, a + b).replace(str(DATA / "inventory-8xh100.toml"), str(inv))
    text = text.replace('"vllm"]', '"vllm", "--sleep-delay", "0.3"]', 1)
    sup, session = await started(text + '[autoscaling]\nmin_residency = "0s"\n[capacity]\nhost_ram_gib = 100\n')
    awake_at_once = []
    sup.add_listener(lambda r, e: awake_at_once.append(sum(x.state is State.READY for x in sup.replicas())))
    try:
        [a0] = sup.deployment("a").replicas
        with (await sup.deployment("b").acquire()).lease():
            pass  # a sleeps, b runs
        for_a = asyncio.ensure_future(sup.deployment("a").acquire())  # b to sleep, then a wakes
        while not a0.waking:
            await asyncio.sleep(0.001)
        for_b = asyncio.ensure_future(sup.deployment("b").acquire())
        with (await for_a).lease():
            await asyncio.sleep(0.05)
        assert (await for_b).state is State.READY
        assert max(awake_at_once) == 1
    finally:
        await sup.stop()
        await session.close()


# --- freeing room: the victims' stop on the path of the request (issue 17) -------------------


def two_idle_models_and_one_for_both_gpus(tmp_path: Path) -> str:
    """a and b (~42 GiB each) at boot, one per 80 GiB GPU; c at zero needs both GPUs."""
    a, b = vllm_model(tmp_path, "a", 40), vllm_model(tmp_path, "b", 40)
    c = vllm_model(tmp_path, "c", 80, extra="[models.autoscaling]\nmin_replicas = 0\n").replace(
        "count = 1", "count = 2"
    )
    text = gpu_config(tmp_path, a + b + c).replace(str(DATA / "inventory-8xh100.toml"), str(two_gpus(tmp_path)))
    return text + '[autoscaling]\nmin_residency = "0s"\n'


async def test_idle_victims_of_one_load_are_all_signalled_in_the_step_that_evicts_them(tmp_path):
    """Idle victims have nothing to drain: each engine gets its SIGTERM in the eviction's own
    step (not a loop turn or more later from its owner task), so the victims of one load stop
    in parallel and the first byte of their stop is not queued behind other work."""
    session = aiohttp.ClientSession()
    sup = Supervisor(parse_config(two_idle_models_and_one_for_both_gpus(tmp_path)), session)
    try:
        sup.start()
        a, b = (sup.deployment(m).replicas[0] for m in "ab")
        await a.wait_ready(30)
        await b.wait_ready(30)
        assert {a.slot.gpus, b.slot.gpus} == {(0,), (1,)}
        signalled: list[tuple[str, int]] = []
        for r in (a, b):
            send = r._proc.signal_group
            r._proc.signal_group = lambda sig, r=r, send=send: (signalled.append((r.name, sig)), send(sig))[1]
        evict_all = sup.room.evict_all
        seen_when_decided: list[list[tuple[str, int]]] = []

        def observed(*args, **kwargs):
            victims = evict_all(*args, **kwargs)
            seen_when_decided.append(list(signalled))  # before this step yields to the loop
            return victims

        sup.room.evict_all = observed
        c = await sup.deployment("c").acquire()
        assert c.state is State.READY and c.slot.gpus == (0, 1)
        assert sorted(e.replica for e in sup.market.recent()) == ["a#0", "b#0"]
        assert sorted(seen_when_decided[0]) == [("a#0", signal.SIGTERM), ("b#0", signal.SIGTERM)]
        assert sorted(signalled) == sorted(seen_when_decided[0])  # once each, never again by the owner
        assert a.state is State.STOPPED and b.state is State.STOPPED
        assert [t.new for t in a.history][-2:] == [State.DRAINING, State.STOPPED]
        assert a.restarts == 0 and not a.last_error  # its exit was the stop it was asked for, no crash
    finally:
        await sup.stop()
        await session.close()


async def test_a_model_whose_floor_finds_no_room_waits_for_it_not_fatal_and_starts_when_room_comes(tmp_path):
    """b's min_replicas is 1 but a holds the one GPU: nothing is evicted for a floor, so b waits.
    An operator sees it waiting for room (status, `appliance status`), not a FATAL replica that
    only an operator's restart would clear; the daemon is ready; each autoscaler pass tries
    again and b starts once a goes."""
    text = one_gpu_two_models(tmp_path, host_ram_gib=100, sleeps=False).replace(
        "[models.autoscaling]\nmin_replicas = 0\n", ""
    )
    session = aiohttp.ClientSession()
    sup = Supervisor(parse_config(text), session)
    try:
        sup.start()
        [a] = sup.deployment("a").replicas
        await a.wait_ready(30)
        for _ in range(3):
            sup.tick()
        assert sup.deployment("b").replicas == []
        [b] = [m for m in sup.status() if m.name == "b"]
        assert b.waiting_for_room is not None and "b#0 needs" in b.waiting_for_room
        assert b.waiting_for_room.startswith("waiting for room held by other models")
        assert sup.ready  # a model waiting for room does not hold the daemon's readiness
        assert [m.waiting_for_room for m in sup.status() if m.name == "a"] == [None]

        sup.unload("a")
        await sup._drains["a#0"]
        sup.tick()
        [b0] = sup.deployment("b").replicas
        await b0.wait_ready(30)
        assert [m.waiting_for_room for m in sup.status() if m.name == "b"] == [None]
    finally:
        await sup.stop()
        await session.close()


async def test_a_model_too_big_for_the_box_whatever_goes_is_still_fatal_saying_why(tmp_path):
    text = one_gpu_two_models(tmp_path, host_ram_gib=100, sleeps=False) + vllm_model(tmp_path, "huge", 90)
    session = aiohttp.ClientSession()
    sup = Supervisor(parse_config(text), session)
    try:
        sup.start()
        await sup.deployment("a").replicas[0].wait_ready(30)
        [huge] = sup.deployment("huge").replicas
        await huge._until(lambda: huge.state is State.FATAL, 10)
        assert huge.last_error.startswith("cannot place on GPUs: huge#0 needs")
    finally:
        await sup.stop()
        await session.close()
