"""The capacity market: replicas placed as a set (issue 17, point 1), the capacity
budgets' one owner (issue 16, point 3), and what the market shows an operator.

Simulated GPU inventories and tests/fake_engine.py speaking as vLLM; no GPU needed."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import aiohttp

from appliance.config import parse_config
from appliance.fleet.supervisor import Supervisor

from .conftest import PY, ROOT
from .test_gpu_supervision import DATA, gpu_config, make_model


def two_gpus(tmp_path: Path) -> Path:
    inv = tmp_path / "two-gpus.toml"
    inv.write_text('[[gpu]]\nname = "NVIDIA H100 80GB HBM3"\nmemory_gib = 80\ncount = 2\n')
    return inv


def vllm_model(tmp_path: Path, name: str, weights_gib: float) -> str:
    source = make_model(tmp_path, name, weights_gib)
    return (f'[[models]]\nname = "{name}"\nserver = "vllm"\nsource = "{source}"\nkv_cache_tokens = 1024\n'
            "[models.gpus]\ncount = 1\n")


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
