"""GPU replicas on a simulated inventory: placed before they start, launched with
their GPUs, their load read from the engine's metrics, put to sleep and woken.
The engine is tests/fake_engine.py speaking as vLLM or SGLang."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import aiohttp
import httpx
import pytest

from appliance.config import parse_config
from appliance.fleet.replica_state import State
from appliance.fleet.supervisor import Supervisor
from appliance.gpu.probe import GiB, SimulatedProbe

from .conftest import FAKE_ENGINE, PY, ROOT, engine_client, fake_engine_image, wait_until

DATA = Path(__file__).parent / "data"


def make_model(base: Path, name: str, weights_gib: float, heads: int = 32) -> Path:
    d = base / name
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({
        "num_hidden_layers": 32, "num_attention_heads": heads, "num_key_value_heads": 8,
        "head_dim": 128, "torch_dtype": "bfloat16"}))
    with open(d / "model.safetensors", "wb") as f:
        f.truncate(int(weights_gib * GiB))  # sparse: only the size matters
    return d


def gpu_config(tmp_path: Path, models: str) -> str:
    fake = f'["{PY}", "{FAKE_ENGINE}", "--as-engine", "vllm"]'
    fake_sglang = f'["{PY}", "{FAKE_ENGINE}", "--as-engine", "sglang"]'
    return (f'[paths]\nstate_dir = "{tmp_path}/state"\ncache_dir = "{tmp_path}/cache"\n'
            f'log_dir = "{tmp_path}/log"\n'
            f'[gpu]\ninventory = "{DATA / "inventory-8xh100.toml"}"\n'
            f"[engines.vllm]\ncommand = {fake}\noverhead_gib = 2\n"
            f"[engines.sglang]\ncommand = {fake_sglang}\noverhead_gib = 2\n"
            "[supervisor]\nhealth_interval_s = 0.2\n" + models)


@pytest.fixture
async def gpu_supervisor(tmp_path):
    small = make_model(tmp_path, "small", 14)
    big = make_model(tmp_path, "big", 130)
    cfg = parse_config(gpu_config(tmp_path, f"""
[[models]]
name = "small"
server = "vllm"
source = "{small}"
sleep_mode = true
kv_cache_tokens = 32768
[[models]]
name = "qwen"
server = "sglang"
source = "{small}"
kv_cache_tokens = 32768
[[models]]
name = "big"
server = "vllm"
source = "{big}"
[models.gpus]
count = 1
"""))
    session = aiohttp.ClientSession()
    sup = Supervisor(cfg, session)
    sup.start()
    yield sup
    await sup.stop()
    await session.close()


async def stats(replica) -> dict:
    async with replica.session.get(f"{replica.base_url}/fake/stats") as r:  # its socket, its key
        return await r.json()


async def test_replicas_are_placed_then_launched_on_their_gpus(gpu_supervisor):
    small = gpu_supervisor.deployment("small").replicas[0]
    qwen = gpu_supervisor.deployment("qwen").replicas[0]
    await small.wait_ready(30)
    await qwen.wait_ready(30)
    # 14 GiB + 4 GiB KV + 2 GiB overhead = 20 GiB: both fit in the 40 GiB left on
    # half-used GPU 0 (best fit), never on an empty card.
    assert small.slot.gpus == (0,) and qwen.slot.gpus == (0,)
    assert small.slot.memory_fraction == 0.25
    seen = await stats(small)
    assert seen["cuda_visible_devices"] == "0"
    assert ["--tensor-parallel-size", "1"] == seen["argv"][seen["argv"].index("--tensor-parallel-size"):][:2]
    assert "--enable-sleep-mode" in seen["argv"]
    assert (await stats(qwen))["argv"][2:4] == ["--model-path", str(small.cfg.models[0].source)]


async def test_a_replica_that_cannot_fit_is_fatal_saying_what_is_missing(gpu_supervisor):
    big = gpu_supervisor.deployment("big").replicas[0]
    await big._until(lambda: big.state is State.FATAL, 10)
    assert "cannot place on GPUs" in big.last_error and "big#0 needs" in big.last_error
    assert "largest free" in big.last_error


async def test_engine_load_is_read_from_its_metrics(gpu_supervisor):
    small = gpu_supervisor.deployment("small").replicas[0]
    qwen = gpu_supervisor.deployment("qwen").replicas[0]
    await small.wait_ready(30)
    await qwen.wait_ready(30)
    await small._until(lambda: small.load is not None and qwen.load is not None, 10)
    assert small.load.kv_cache_usage == 0.25 and small.load.prefix_cache_hit_rate == 0.25
    assert qwen.load.prefix_cache_hit_rate == 0.5
    assert small.snapshot().load.kv_cache_usage == 0.25


async def test_a_vllm_replica_sleeps_and_wakes(gpu_supervisor):
    small = gpu_supervisor.deployment("small").replicas[0]
    await small.wait_ready(30)
    await small.sleep(timeout=10)
    assert small.state is State.SLEEPING and (await stats(small))["sleeping"] is True
    assert (await stats(small))["sleep_level"] == 1
    assert gpu_supervisor.deployment("small").pick_ready() is None  # asleep: takes no requests
    await small.wake(timeout=10)
    assert small.state is State.READY and (await stats(small))["sleeping"] is False
    assert gpu_supervisor.deployment("small").pick_ready() is small


async def test_sleep_is_refused_where_the_engine_has_none(gpu_supervisor):
    qwen = gpu_supervisor.deployment("qwen").replicas[0]
    await qwen.wait_ready(30)
    with pytest.raises(Exception, match="sleep needs vllm"):
        await qwen.sleep()


def test_plan_shows_placements_and_reasons_without_starting_anything(tmp_path):
    small = make_model(tmp_path, "small", 14)
    big = make_model(tmp_path, "big", 130)
    cfg = tmp_path / "a.toml"
    cfg.write_text(gpu_config(tmp_path, f"""
[[models]]
name = "small"
server = "vllm"
source = "{small}"
kv_cache_tokens = 32768
[models.autoscaling]
min_replicas = 3
max_replicas = 3
[[models]]
name = "big"
server = "vllm"
source = "{big}"
[models.gpus]
count = 2
"""))
    out = subprocess.run([PY, "-m", "appliance.cli", "plan", "--config", str(cfg)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert "GPU 0  NVIDIA H100 80GB HBM3 (H100)  40.0/80.0 GiB used" in text
    assert "pid 4242 40.0 GiB" in text
    for i in range(3):
        assert f"small#{i}: GPU" in text
    assert "big#0: GPU" in text and "tp=2" in text
    data = json.loads(subprocess.run([PY, "-m", "appliance.cli", "plan", "--config", str(cfg), "--json"],
                                     cwd=ROOT, capture_output=True, text=True, timeout=60).stdout)
    rows = {r["replica"]: r for r in data["placements"]}
    assert all(r["error"] is None for r in rows.values())
    used = {}
    for r in rows.values():
        for g in r["gpus"]:
            used[g] = used.get(g, 0) + r["bytes_per_gpu"]
    free = {g["index"]: g["free_bytes"] for g in data["inventory"]["gpus"]}
    assert all(used[g] <= free[g] for g in used), (used, free)


def test_plan_on_a_machine_without_gpus_says_so(tmp_path):
    small = make_model(tmp_path, "small", 1)
    cfg = tmp_path / "a.toml"
    cfg.write_text(f'[[models]]\nname = "small"\nserver = "vllm"\nsource = "{small}"\n')
    out = subprocess.run([PY, "-m", "appliance.cli", "plan", "--config", str(cfg)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 3
    assert "No GPUs: NVML cannot start" in out.stdout
    assert "small#0: cannot place: no usable NVIDIA GPU" in out.stdout


def test_plan_with_an_inventory_of_no_gpus_says_which_file_lists_none(tmp_path):
    """It printed "No GPUs: None"."""
    small = make_model(tmp_path, "small", 1)
    cfg, inventory = tmp_path / "a.toml", tmp_path / "none.toml"
    inventory.write_text("# a CPU-only box\n")
    cfg.write_text(f'[[models]]\nname = "small"\nserver = "vllm"\nsource = "{small}"\n')
    out = subprocess.run([PY, "-m", "appliance.cli", "plan", "--config", str(cfg), "--inventory", str(inventory)],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 3
    assert f"No GPUs: simulated:{inventory} lists none" in out.stdout and "None" not in out.stdout

def test_the_daemon_reports_gpu_placement_in_status(daemons, tmp_path):
    small = make_model(tmp_path, "small", 14)
    text = gpu_config(tmp_path, "")
    extra = text.split("[supervisor]")[0].split("[gpu]", 1)[1]
    d = daemons.start(f'[[models]]\nname = "small"\nserver = "vllm"\nsource = "{small}"\n'
                      f"kv_cache_tokens = 32768\n", extra="[gpu]" + extra)
    replica = d.replicas("small")[0]
    assert replica["gpus"] == [0] and replica["memory_fraction"] == 0.25
    with d.client() as c:
        resp = c.post("/v1/chat/completions", json={"model": "small", "messages": [{"role": "user",
                                                                                   "content": "hi"}]})
    assert resp.status_code == 200
    wait_until(lambda: "appliance_engine_kv_cache_usage" in httpx.get(f"{d.url}/metrics").text, 10,
               what="engine load in /metrics")
    assert SimulatedProbe(DATA / "inventory-8xh100.toml").read().gpus[0].free_bytes == 40 * GiB


def _image_model(tmp_path: Path, images: Path) -> tuple[str, str]:
    """A vllm model with no [engines.vllm] command: it runs from the current image in images."""
    small = make_model(tmp_path, "small", 14)
    return (f'[[models]]\nname = "small"\nserver = "vllm"\nsource = "{small}"\nkv_cache_tokens = 32768\n',
            f'[gpu]\ninventory = "{DATA / "inventory-8xh100.toml"}"\n[images]\ndir = "{images}"\n')


def _status_text(d) -> str:
    return subprocess.run([PY, "-m", "appliance.cli", "status", "--config", str(d.config)],
                          capture_output=True, text=True, cwd=ROOT, timeout=30).stdout


def test_a_gpu_model_with_no_command_is_served_from_the_engines_current_image(daemons, tmp_path):
    fake_engine_image(tmp_path / "images", "vllm", "0.33.0-0123456789ab")
    models, extra = _image_model(tmp_path, tmp_path / "images")
    d = daemons.start(models, extra=extra)
    [replica] = d.replicas("small")
    assert replica["state"] == "READY" and replica["image"] == "0.33.0-0123456789ab"
    with d.client() as c:
        resp = c.post("/v1/chat/completions", json={"model": "small", "messages": [{"role": "user",
                                                                                   "content": "hi"}]})
    assert resp.status_code == 200 and resp.json()["choices"][0]["message"]["content"]
    # The image's bin/vllm (the fake: `--as-engine vllm`, then what it was given) ran with
    # vLLM's own argv: `serve MODEL_DIR --served-model-name small ...`.
    with engine_client(replica) as engine:
        argv = engine.get("/fake/stats").json()["argv"]
    assert argv[:4] == ["--as-engine", "vllm", "serve", str(tmp_path / "small")]
    assert argv[argv.index("--served-model-name") + 1] == "small"
    assert "image 0.33.0-0123456789ab" in _status_text(d)


def test_a_gpu_model_with_no_command_and_no_image_is_fatal_naming_the_fix(daemons, tmp_path):
    models, extra = _image_model(tmp_path, tmp_path / "images")
    d = daemons.start(models, extra=extra, wait=False)

    def fatal():
        try:
            return next((r for r in d.replicas("small") if r["state"] == "FATAL"), None)
        except httpx.HTTPError:
            return None

    replica = wait_until(fatal, 30, what="FATAL replica")
    assert replica["last_error"] == (f"no vllm engine image in {tmp_path / 'images' / 'vllm'}: run "
                                     "`appliance images build vllm` (or set engines.vllm.command)")
    assert replica["restarts"] == 0 and replica["pid"] is None  # FATAL at once: nothing ever ran
    status = _status_text(d)
    assert "FATAL" in status and "appliance images build vllm" in status
    with d.client() as c:
        resp = c.post("/v1/completions", json={"model": "small", "prompt": "hi", "max_tokens": 2})
    assert resp.status_code == 503 and "appliance images build vllm" in resp.json()["error"]["message"]

    # The fix: build the image, restart the replica; it comes up from the image.
    fake_engine_image(tmp_path / "images", "vllm", "0.33.0-0123456789ab")
    assert httpx.post(f"{d.url}/admin/models/small/replicas/0/restart", json={}, timeout=10).status_code == 200
    wait_until(lambda: d.replicas("small")[0]["state"] == "READY", 30, what="READY from the image")
    assert d.replicas("small")[0]["image"] == "0.33.0-0123456789ab"


class AttributingProbe:
    """The simulated 8x H100 inventory, plus NVML's view of our own replica: its
    engine PID uses 21 GiB on GPU 0 (what the real probe reports once it runs)."""

    def __init__(self) -> None:
        self.base = SimulatedProbe(DATA / "inventory-8xh100.toml").read()
        self.engine_pids: set[int] = set()

    def read(self):
        from dataclasses import replace

        from appliance.gpu.probe import GpuProcess

        gpus = list(self.base.gpus)
        extra = tuple(GpuProcess(pid=p, used_bytes=21 * GiB) for p in self.engine_pids)
        gpus[0] = replace(gpus[0], processes=gpus[0].processes + extra,
                          used_bytes=gpus[0].used_bytes + 21 * GiB * len(extra))
        return replace(self.base, gpus=tuple(gpus))


async def test_nvml_measured_memory_corrects_later_placements(tmp_path):
    from appliance.gpu.planning import plan

    small = make_model(tmp_path, "small", 14)
    cfg = parse_config(gpu_config(tmp_path, f'[[models]]\nname = "small"\nserver = "vllm"\n'
                                            f'source = "{small}"\nkv_cache_tokens = 32768\n'))
    probe = AttributingProbe()
    session = aiohttp.ClientSession()
    sup = Supervisor(cfg, session, probe=probe)
    original = sup.runner.spawn

    async def spawn_and_note(argv, env, log_path, redact="", cpus=frozenset(), own_dirs=(), own_reads=()):
        proc = await original(argv, env, log_path, redact, cpus, own_dirs, own_reads)
        probe.engine_pids.add(proc.pid)
        return proc

    sup.runner.spawn = spawn_and_note
    try:
        sup.start()
        replica = sup.deployment("small").replicas[0]
        await replica.wait_ready(30)
        estimated = sup.placements[0].assignment.bytes_per_gpu
        assert sup.measured.correct("small", sup.placements[0].estimate).per_gpu[1] == 21 * GiB
        # The next placement of this model uses the measured 21 GiB, not the estimate.
        [row] = plan(cfg, probe.read(), [(cfg.models[0], "small#1")], measured=sup.measured,
                     ours=probe.engine_pids)
        assert row.estimate.measured and row.estimate.per_gpu[1] == 21 * GiB
        assert row.assignment.bytes_per_gpu != estimated
    finally:
        await sup.stop()
        await session.close()
