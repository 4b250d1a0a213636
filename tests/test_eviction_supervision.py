"""Demand-driven eviction in the daemon: a request for a model that has no room stops
idle replicas of other models (least recently used first) and is answered; replicas
in use, pinned or just loaded stay, and the 503 says who holds the room and why.

GGUF models on a simulated GPU smaller than two of them, and on a CPU core budget for
one, served by tests/fake_engine.py speaking as llama-server; and the real llama-server
on the CPU with three tiny models on a budget for two."""

from __future__ import annotations

import os
import re
from pathlib import Path

import httpx
import pytest

from . import make_tiny_gguf
from .conftest import FAKE_ENGINE, PY, engine_client, pid_alive, wait_until


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    make_tiny_gguf.main([str(path)])
    return path


def fake_llama_server(tmp_path: Path) -> Path:
    """A llama-server stand-in: the fake engine, accepting llama-server's argv."""
    script = tmp_path / "fake-llama-server"
    script.write_text(f'#!/bin/sh\nexec "{PY}" "{FAKE_ENGINE}" --as-engine llamacpp "$@"\n')
    script.chmod(0o755)
    return script


def one_small_gpu(tmp_path: Path) -> Path:
    """One GPU with room for one tiny GGUF replica (~0.6 GiB), not two."""
    inv = tmp_path / "one-gpu.toml"
    inv.write_text('[[gpu]]\nname = "NVIDIA H100 80GB HBM3"\nmemory_gib = 1.0\ncount = 1\n')
    return inv


def gguf_model(name: str, source: Path, gpus: int = 1, extra: str = "", threads: int = 2) -> str:
    gpu = f"[models.gpus]\ncount = {gpus}\n" if gpus else ""
    return (f'[[models]]\nname = "{name}"\nsource = "{source}"\ncontext_length = 4096\nparallel = 2\n'
            f"threads = {threads}\n{extra}{gpu}")


def gpu_daemon(daemons, tmp_path: Path, tiny: Path, a_extra: str = "", residency: str = "0s",
               b_at_boot: bool = False):
    """a starts at boot; b starts at zero (or, b_at_boot, tries at boot and finds no room)."""
    extra = (f'[gpu]\ninventory = "{one_small_gpu(tmp_path)}"\n'
             f'[engines.llamacpp]\ncuda_binary = "{fake_llama_server(tmp_path)}"\n'
             f'[autoscaling]\nmin_residency = "{residency}"\n')
    b = gguf_model("b", tiny) + ("" if b_at_boot else "[models.autoscaling]\nmin_replicas = 0\n")
    d = daemons.start(gguf_model("a", tiny, extra=a_extra) + b, extra=extra, wait=not b_at_boot)
    wait_until(lambda: [r["state"] for r in live(d, "a")] == ["READY"], 30, what="a READY")
    return d


def chat(d, model: str, timeout: float = 30) -> httpx.Response:
    return httpx.post(f"{d.url}/v1/chat/completions", timeout=timeout,
                      json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})


def live(d, model: str) -> list[dict]:
    try:
        return [r for r in d.replicas(model) if r["state"] not in ("FATAL", "STOPPED")]
    except httpx.HTTPError:
        return []


def evictions(d) -> dict[tuple[str, str], float]:
    text = httpx.get(f"{d.url}/metrics", timeout=5).text
    return {(m, r): float(v) for m, r, v in
            re.findall(r'appliance_evictions_total\{model="([^"]+)",reason="([^"]+)"\} (\S+)', text)}


def test_a_request_for_a_model_with_no_room_on_the_gpu_evicts_the_idle_one_and_is_answered(daemons, tmp_path,
                                                                                           tiny):
    d = gpu_daemon(daemons, tmp_path, tiny, b_at_boot=True)
    [a] = live(d, "a")
    assert a["state"] == "READY" and a["gpus"] == [0]
    # b did not fit at boot (nothing is evicted for a model's floor): it waits for the room a
    # holds, saying so, with no FATAL replica in its place (and the daemon is ready).
    assert d.replicas("b") == []
    [b] = [m for m in d.status()["models"] if m["name"] == "b"]
    assert b["waiting_for_room"].startswith("waiting for room held by other models: b#0 needs")
    assert httpx.get(f"{d.url}/readyz", timeout=5).status_code == 200

    resp = chat(d, "b")
    assert resp.status_code == 200, resp.text
    [b] = live(d, "b")
    assert b["state"] == "READY" and b["gpus"] == [0]
    stats = engine_client(b).get("/fake/stats").json()
    assert stats["cuda_visible_devices"] == "GPU-sim-0000"  # by UUID
    assert "--n-gpu-layers" in stats["argv"]
    wait_until(lambda: not live(d, "a"), 15, what="a's replica stopped")
    assert evictions(d) == {("a", "request"): 1.0}
    assert re.search(r"evicting a#0 for b \(request\): idle \d+s, least recently used", d.log_text())

    # And back: a's next request evicts b (min_residency is 0 here), a stays at zero meanwhile.
    assert chat(d, "a").status_code == 200
    wait_until(lambda: not live(d, "b"), 15, what="b's replica stopped")
    assert evictions(d) == {("a", "request"): 1.0, ("b", "request"): 1.0}


def test_a_replica_with_a_request_in_flight_is_not_evicted_the_request_for_another_model_waits_for_it(
        daemons, tmp_path, tiny):
    """Room held by a busy replica comes when its request ends: b's request is held (not
    503'd), a is evicted only once idle, and b is answered."""
    d = gpu_daemon(daemons, tmp_path, tiny, a_extra='args = ["--latency", "4", "--latency-from", "2"]\n')
    import threading
    import time

    finished = {}

    def slow() -> None:
        finished["status"] = chat(d, "a").status_code
        finished["at"] = time.monotonic()

    t = threading.Thread(target=slow)
    t.start()
    wait_until(lambda: any(r["inflight"] for r in d.replicas("a")), 10, what="a request in flight on a")
    resp = chat(d, "b")
    answered = time.monotonic()
    t.join()
    assert finished["status"] == 200  # a's request was served to its end
    assert resp.status_code == 200, resp.text
    assert answered >= finished["at"] - 0.5  # b was answered only after a's request ended
    assert evictions(d) == {("a", "request"): 1.0}
    assert re.search(r"cannot start b: no room: GPU memory is held by a#0 \(1 request in flight\)", d.log_text())


def test_a_model_inside_its_residency_window_is_not_evicted(daemons, tmp_path, tiny):
    d = gpu_daemon(daemons, tmp_path, tiny, residency="1h")
    resp = chat(d, "b")
    assert resp.status_code == 503
    assert re.search(r"a#0 \(loaded \d+s ago, min_residency 3600s\)", resp.json()["error"]["message"])
    # `appliance load` says the same instead of reporting a success that started nothing.
    load = httpx.post(f"{d.url}/admin/models/b/load", json={}, timeout=10)
    assert load.status_code == 503 and "min_residency 3600s" in load.json()["error"]["message"]
    # Every refusal is in the log at INFO with its reason (an expected outcome, not a fault),
    # the request's once per reason, not once per request.
    assert chat(d, "b").status_code == 503
    text = d.log_text()
    assert re.search(r"INFO appliance\.\w+(?: \[req \w+\])?: cannot start b: no room: .*min_residency 3600s", text)
    refused = re.findall(r"(\w+) appliance\.api.*: refused POST /v1/chat/completions: 503 no_capacity: "
                         r"Model 'b' has no ready replica.*min_residency 3600s", text)
    assert refused == ["INFO"]
    assert re.search(r"INFO appliance\.\w+: operator load b: refused: .*min_residency 3600s", text)
    assert not re.search(r"WARNING .*(cannot start b|refused)", text)
    assert [r["state"] for r in live(d, "a")] == ["READY"]


def test_a_pinned_model_is_not_evicted_below_its_pin(daemons, tmp_path, tiny):
    d = gpu_daemon(daemons, tmp_path, tiny)
    assert httpx.post(f"{d.url}/admin/models/a/pin", json={}, timeout=10).status_code == 200
    resp = chat(d, "b")
    assert resp.status_code == 503
    assert "a keeps 1 replica (pinned or set by the operator)" in resp.json()["error"]["message"]
    assert evictions(d) == {}


def cpu_daemon(daemons, tmp_path: Path, tiny: Path, binary: Path, names=("a", "b"), cores: int = 2,
               threads: int = 2):
    extra = (f'[engines.llamacpp]\nbinary = "{binary}"\n'
             f'[cpu]\ncores = {cores}\n[autoscaling]\nmin_residency = "0s"\n')
    models = "".join(gguf_model(n, tiny, gpus=0, threads=threads) for n in names)
    return daemons.start(models, extra=extra)


def test_on_the_cpu_core_budget_a_request_evicts_the_idle_model_and_load_says_when_it_cannot(daemons, tmp_path,
                                                                                           tiny):
    d = cpu_daemon(daemons, tmp_path, tiny, fake_llama_server(tmp_path))
    # At boot the budget holds: 2 cores, 2 per replica: a starts, b waits for a request.
    assert [r["state"] for r in live(d, "a")] == ["READY"] and live(d, "b") == []
    assert httpx.get(f"{d.url}/admin/status", timeout=5).status_code == 200
    resp = chat(d, "b")
    assert resp.status_code == 200, resp.text
    wait_until(lambda: not live(d, "a"), 15, what="a's replica stopped")
    assert evictions(d) == {("a", "request"): 1.0}
    # The operator's load is demand too: it evicts b for a.
    load = httpx.post(f"{d.url}/admin/models/a/load", json={}, timeout=10)
    assert load.status_code == 200
    wait_until(lambda: [r["state"] for r in live(d, "a")] == ["READY"], 15, what="a loaded")
    assert evictions(d)[("b", "load")] == 1.0


def test_real_llama_cpp_three_models_on_a_budget_for_two_each_answer_in_turn(daemons, tmp_path, tiny):
    from appliance.dist.images import default_llama_server

    binary = Path(default_llama_server())
    if not binary.exists():
        pytest.skip("llama-server is not built (./install.sh)")
    # One core each, two cores: a and b start at boot, c waits for its first request.
    d = cpu_daemon(daemons, tmp_path, tiny, binary, names=("a", "b", "c"), cores=2, threads=1)
    assert live(d, "c") == []
    evicted = []
    for model in ("c", "a", "b", "c"):
        before = evictions(d)
        resp = chat(d, model, timeout=60)
        assert resp.status_code == 200, resp.text
        assert resp.json()["choices"][0]["message"]["content"] is not None
        evicted += [m for m, n in evictions(d).items() if n > before.get(m, 0)]
    # Each found no room and evicted the least recently used other model.
    assert [m for m, _ in evicted] == ["a", "b", "c", "a"]


def test_a_scale_up_under_load_evicts_an_idle_model_for_the_extra_replica(daemons, tmp_path, tiny):
    binary = fake_llama_server(tmp_path)
    extra = (f'[engines.llamacpp]\nbinary = "{binary}"\n'
             '[cpu]\ncores = 4\n[autoscaling]\nmin_residency = "0s"\ninterval_s = 0.2\n')
    busy = gguf_model("a", tiny, gpus=0, extra='args = ["--latency", "2", "--latency-from", "2"]\n') + (
        "[models.autoscaling]\nmax_replicas = 2\ntarget_rps_per_replica = 0.5\n")
    d = daemons.start(busy + gguf_model("b", tiny, gpus=0), extra=extra)
    assert len(live(d, "a")) == 1 and len(live(d, "b")) == 1  # 2 + 2 cores: the budget is full
    import threading

    threads = [threading.Thread(target=chat, args=(d, "a")) for _ in range(6)]
    for t in threads:
        t.start()
    wait_until(lambda: len([r for r in live(d, "a") if r["state"] == "READY"]) == 2, 30,
               what="a scaled up to 2 replicas")
    for t in threads:
        t.join()
    assert evictions(d) == {("b", "scale_up"): 1.0}
    assert live(d, "b") == []


def _engine_threads_and_cpus(pid: int) -> tuple[int, set[int]]:
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    threads = int(argv[argv.index(b"--threads") + 1])
    allowed = next(line.split(":")[1].strip() for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                   if line.startswith("Cpus_allowed_list"))
    cpus = set()
    for part in allowed.split(","):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return threads, cpus


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_cpu_replicas_run_the_threads_they_are_budgeted_each_bound_to_its_own_cores(daemons, tmp_path, tiny):
    """[cpu] cores = 2, two models of one thread each: each replica runs --threads 1 on a core
    of its own. (Before, a replica counted as its budget but ran threads or every core.)"""
    binary = fake_llama_server(tmp_path)
    d = cpu_daemon(daemons, tmp_path, tiny, binary, names=("a", "b"), cores=2, threads=1)
    wait_until(lambda: all(r["state"] == "READY" for m in "ab" for r in live(d, m)), 30, what="a and b READY")
    seen = [_engine_threads_and_cpus(live(d, m)[0]["pid"]) for m in "ab"]
    assert [threads for threads, _ in seen] == [1, 1]
    assert all(len(cpus) == 1 for _, cpus in seen) and seen[0][1] != seen[1][1]
    budget = httpx.get(f"{d.url}/admin/gpus", timeout=10).json()["cpu"]
    assert sorted(u["cpus"][0] for u in budget["replicas"]) == sorted(min(c) for _, c in seen)


def test_a_cpu_replica_without_threads_runs_one_per_budgeted_core_not_one_per_machine_core(daemons, tmp_path, tiny):
    binary = fake_llama_server(tmp_path)
    d = cpu_daemon(daemons, tmp_path, tiny, binary, names=("a",), cores=1, threads=0)
    wait_until(lambda: [r["state"] for r in live(d, "a")] == ["READY"], 30, what="a READY")
    threads, cpus = _engine_threads_and_cpus(live(d, "a")[0]["pid"])
    assert threads == 1 and len(cpus) == 1


def test_a_daemon_killed_mid_eviction_restarts_to_a_consistent_state(daemons, tmp_path, tiny):
    """SIGKILL while a (ignoring SIGTERM: its stop takes stop_grace_s) drains for b: no engine
    outlives the daemon, and the restarted daemon holds a at its floor and b at zero, nothing
    overcommitted; b's next request evicts a and is answered."""
    import contextlib
    import signal
    import threading

    d = gpu_daemon(daemons, tmp_path, tiny, a_extra='args = ["--ignore-sigterm"]\n')
    [a] = live(d, "a")
    def held_request() -> None:
        with contextlib.suppress(httpx.HTTPError):  # the daemon is killed under it
            chat(d, "b", 10)

    threading.Thread(target=held_request, daemon=True).start()
    wait_until(lambda: any(r["retiring"] for r in d.replicas("a")), 15, what="a evicted (draining)")
    pids = {r["pid"] for m in "ab" for r in d.replicas(m) if r["pid"]}
    d.terminate(signal.SIGKILL)
    wait_until(lambda: not any(pid_alive(p) for p in pids), 15, what="the engines gone with the daemon")

    again = gpu_daemon(daemons, tmp_path, tiny, a_extra='args = ["--ignore-sigterm"]\n')
    assert [r["state"] for r in live(again, "a")] == ["READY"] and live(again, "b") == []
    gpus = httpx.get(f"{again.url}/admin/gpus", timeout=10).json()
    [gpu] = gpus["gpus"]
    assert [r["replica"] for r in gpu["replicas"] if r["state"] != "STOPPED"] == ["a#0"]
    assert a["pid"] not in {r["pid"] for r in live(again, "a")}
    assert chat(again, "b").status_code == 200
