"""When one box is not enough: `appliance plan` names the smallest multi-node shape from the
same memory model, and a model exported to a cluster and fronted by the appliance
(server = "openai", url = ...) keeps its routes, keys, budgets, regulated rule and audit."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
from pathlib import Path

import httpx
import pytest

from appliance.gpu.memory import GiB, estimate, per_gpu_bytes, read_shape, smallest_shape

from .conftest import FAKE_ENGINE, PY, ROOT, free_port, wait_until
from .test_export import INVENTORY, MODELS, config_text, hf_dir
from .test_routes import provider, recorder  # noqa: F401  (the module fixture)

H100 = 80 * GiB


def sparse_model(path: Path, weights: int, layers: int = 126, heads: int = 128, kv_heads: int = 8) -> Path:
    """A model directory the memory model can size: its config and a sparse weights file."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "head_dim": 128, "torch_dtype": "bfloat16"}))
    with open(path / "model.safetensors", "wb") as f:
        f.truncate(weights)
    return path


def need(est, gpus: int) -> int:
    """The memory model, restated: weights and KV cache split over the GPUs, overhead on each."""
    return -(-est.weights // gpus) + -(-est.kv_cache // gpus) + est.overhead


# --- the shape -----------------------------------------------------------------------------------

def test_a_model_too_large_for_8x80_gib_gets_the_fewest_nodes_that_hold_it(tmp_path):
    est = estimate(sparse_model(tmp_path / "m", 810 * 10**9), kv_tokens=65536, overhead_bytes=3 * GiB,
                   gpu_count=8)
    shape = smallest_shape(read_shape(tmp_path / "m"), est, 8, H100)
    assert need(est, 8) > H100                       # not on the box at any tensor-parallel size
    assert (shape.nodes, shape.gpus_per_node, shape.tp, shape.pp) == (2, 8, 8, 2)
    assert shape.bytes_per_gpu == need(est, 16) == per_gpu_bytes(est.weights, est.kv_cache, est.overhead, 16)
    assert shape.bytes_per_gpu <= H100


def test_heads_that_forbid_a_whole_node_tensor_group_get_more_stages_per_node(tmp_path):
    # 28 attention heads: tensor-parallel 1, 2 or 4, never 8; two 4-GPU stages fill a node.
    est = estimate(sparse_model(tmp_path / "m", 700 * GiB, layers=80, heads=28, kv_heads=4),
                   kv_tokens=8192, overhead_bytes=2 * GiB, gpu_count=8)
    shape = smallest_shape(read_shape(tmp_path / "m"), est, 8, H100)
    assert (shape.nodes, shape.gpus_per_node, shape.tp, shape.pp) == (2, 8, 4, 4)
    assert need(est, 8) > H100 >= shape.bytes_per_gpu == need(est, 16)


def test_a_fixed_tensor_parallel_size_is_kept_and_a_shape_needs_enough_layers(tmp_path):
    model = sparse_model(tmp_path / "m", 810 * 10**9, layers=3)
    est = estimate(model, kv_tokens=8192, overhead_bytes=2 * GiB, gpu_count=8, fixed_tp=4)
    # Three layers: at most three pipeline stages, and 3 x 4 GPUs do not hold 810 GB.
    assert smallest_shape(read_shape(model), est, 8, H100, fixed_tp=4) is None
    more = sparse_model(tmp_path / "n", 810 * 10**9, layers=64)
    shape = smallest_shape(read_shape(more), estimate(more, kv_tokens=8192, overhead_bytes=2 * GiB,
                                                      gpu_count=8, fixed_tp=4), 8, H100, fixed_tp=4)
    assert shape.tp == 4 and shape.pp == 4 and shape.nodes == 2


def test_on_one_node_the_shape_is_the_smallest_tensor_group_that_fits_as_on_the_box(tmp_path):
    est = estimate(sparse_model(tmp_path / "m", 100 * GiB, layers=80, heads=64),
                   kv_tokens=8192, overhead_bytes=2 * GiB, gpu_count=8)
    shape = smallest_shape(read_shape(tmp_path / "m"), est, 8, H100)
    assert (shape.nodes, shape.tp, shape.pp) == (1, 2, 1) and need(est, 1) > H100


# --- appliance plan ------------------------------------------------------------------------------

def plan(tmp_path: Path, models: str, *args: str) -> subprocess.CompletedProcess:
    cfg = tmp_path / "appliance.toml"
    cfg.write_text(f'[paths]\nstate_dir = "{tmp_path}/state"\ncache_dir = "{tmp_path}/cache"\n' + models)
    return subprocess.run([PY, "-m", "appliance.cli", "plan", "--config", str(cfg), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_plan_names_the_smallest_multi_node_shape_for_a_model_too_large_for_the_box(tmp_path):
    huge = sparse_model(tmp_path / "huge", 810 * 10**9)
    small = sparse_model(tmp_path / "small", 16 * GiB, layers=32, heads=32)
    models = (f'[[models]]\nname = "llama-405b"\nserver = "vllm"\nsource = "{huge}"\n'
              f'[[models]]\nname = "llama-8b"\nserver = "vllm"\nsource = "{small}"\n')
    inventory = tmp_path / "box.toml"
    inventory.write_text('[[gpu]]\nname = "NVIDIA H100 80GB HBM3"\nmemory_gib = 80\ncount = 8\n')
    out = plan(tmp_path, models, "--inventory", str(inventory))
    assert out.returncode == 3, out.stderr
    [line] = [x for x in out.stdout.splitlines() if x.startswith("llama-405b#0")]
    assert ("cannot fit on this box at any tensor-parallel size; the smallest shape that holds it is "
            "2 nodes x 8 GPUs (tp=8 x pp=2)") in line
    assert "on nodes of 8x H100 80.0 GiB (this box)" in line and "appliance export llama-405b" in line
    data = json.loads(plan(tmp_path, models, "--inventory", str(inventory), "--json").stdout)
    rows = {r["model"]: r for r in data["placements"]}
    beyond = rows["llama-405b"]["beyond_this_box"]
    assert beyond["assumed_node"] == {"gpus": 8, "gpu_bytes": H100, "kind": "H100", "source": "this box"}
    assert {k: beyond["shape"][k] for k in ("nodes", "gpus_per_node", "tp", "pp")} == \
        {"nodes": 2, "gpus_per_node": 8, "tp": 8, "pp": 2}
    assert beyond["shape"]["bytes_per_gpu"] <= H100
    assert rows["llama-8b"]["beyond_this_box"] is None and rows["llama-8b"]["gpus"] == [0]
    # Nodes unlike this box: the operator says what they have, and the plan says so.
    bigger = plan(tmp_path, models, "--inventory", str(inventory), "--gpu-memory", "141", "--json")
    shape = {r["model"]: r for r in json.loads(bigger.stdout)["placements"]}["llama-405b"]["beyond_this_box"]
    assert shape["shape"]["nodes"] == 1 and shape["assumed_node"]["source"] == "--gpu-memory 141"


def test_a_model_that_fits_an_empty_box_gets_no_multi_node_advice_when_the_box_is_busy(tmp_path):
    # 8x H100 with GPUs 0 and 1 half used by others: a 120 GiB model fits an empty box at tp=2.
    model = sparse_model(tmp_path / "m", 120 * GiB, layers=32, heads=32)
    models = f'[[models]]\nname = "m"\nserver = "vllm"\nsource = "{model}"\n[models.gpus]\ncount = 2\n'
    busy = tmp_path / "busy.toml"
    busy.write_text(INVENTORY.read_text() + "".join(
        f"[[process]]\ngpu = {g}\npid = {5000 + g}\nused_gib = 60\n" for g in range(2, 8)))
    out = plan(tmp_path, models, "--inventory", str(busy), "--json")
    [row] = json.loads(out.stdout)["placements"]
    assert row["error"] and "needs" in row["error"] and row["beyond_this_box"] is None


# --- the appliance in front of an exported deployment -------------------------------------------

@pytest.fixture
def cluster(tmp_path):
    """An exported head node, started from its own script: the weights checked against the
    store's manifest, then the engine (tests/fake_engine.py speaking as vLLM) run with the
    rendered argv, on loopback."""
    from appliance.store.sources import incoming_from
    from appliance.store.store import Store

    [incoming] = incoming_from(hf_dir(tmp_path / "src"), name="org/small", license="Apache-2.0")
    Store(tmp_path / "cache").add(incoming)
    fake = [PY, str(FAKE_ENGINE), "--as-engine", "vllm"]
    cfg = tmp_path / "cluster.toml"
    cfg.write_text(config_text(tmp_path, MODELS, vllm=fake))
    port = free_port()
    out = subprocess.run([PY, "-m", "appliance.cli", "export", "Small-Chat", "--to", "vllm-multinode",
                          "--nodes", "2", "--head-address", "127.0.0.1", "--port", str(port),
                          "--config", str(cfg), "-o", f"{tmp_path}/export/"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    head = subprocess.Popen(["sh", str(tmp_path / "export" / "node-0.sh")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert head.poll() is None, "the head node's script exited"
        try:
            return httpx.get(f"{url}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(up, 20, what="the exported head node")
    yield head, url, (tmp_path / "export" / "README.md").read_text()
    if head.poll() is None:
        head.send_signal(signal.SIGKILL)
        head.wait()


def test_an_exported_model_fronted_by_the_appliance_keeps_its_route_policy(daemons, cluster, recorder, tmp_path):
    head, url, readme = cluster
    # The README's own front-door snippet, verbatim.
    front = readme.split("```toml\n", 1)[1].split("```", 1)[0]
    assert f'url = "{url}/v1"' in front
    routes = ('[[routes]]\nname = "claims"\nmodel = "claims"\ntarget = "Small-Chat"\nregulated = true\n\n'
              '[[routes]]\nname = "general"\nmodel = "general"\ntarget = "Small-Chat"\nregulated = false\n'
              'fallbacks = ["cloud"]\n\n')
    extra = ("[keys]\nrequired = true\n\n[audit]\nflush_interval_s = 0.2\n\n"
             "[queue]\ntimeout_s = 2\n\n" + provider(recorder, tmp_path) + routes)
    daemon = daemons.start(front, extra=extra, supervisor="health_failures_before_restart = 1")
    key = subprocess.run([PY, "-m", "appliance.cli", "keys", "create", "--name", "claims-app", "--route",
                          "claims", "--route", "general", "--budget-tokens", "150", "--budget-period", "day",
                          "--config", str(daemon.config)], capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert key.returncode == 0, key.stderr
    auth = {"Authorization": f"Bearer {key.stdout.strip()}"}

    def chat(model: str, headers: dict | None = auth) -> httpx.Response:
        with daemon.client() as c:
            return c.post("/v1/chat/completions", headers=headers,
                          json={"model": model, "max_tokens": 8,
                                "messages": [{"role": "user", "content": "hi"}]})

    assert chat("claims", headers=None).status_code == 401          # keys, as before
    served = chat("claims")
    assert served.status_code == 200, served.text
    assert httpx.get(f"{url}/fake/stats").json()["last_body"]["model"] == "Small-Chat"  # served as itself
    before = recorder.requests()
    head.send_signal(signal.SIGKILL)                                 # the cluster goes down
    head.wait()
    down = chat("claims")
    assert down.status_code in (502, 503), down.text                 # regulated: never the provider
    assert recorder.requests() == before
    assert chat("general").status_code == 200                        # permitted: fails over as configured
    assert recorder.requests() == before + 1
    for _ in range(10):                                              # the key's token budget still holds
        resp = chat("general")
        if resp.status_code == 429:
            break
        assert resp.status_code == 200, resp.text
    assert resp.json()["error"]["code"] == "budget_exceeded"
    db = Path(daemon.config.read_text().split('state_dir = "', 1)[1].split('"', 1)[0]) / "appliance.db"

    def audit() -> list[tuple]:
        with sqlite3.connect(db) as conn:
            return conn.execute("SELECT route, status, fallback_reason FROM audit ORDER BY rowid").fetchall()

    def refusal_recorded() -> list[tuple]:
        rows = audit()
        return rows if any(status == 429 for _, status, _ in rows) else []

    rows = wait_until(refusal_recorded, 10, what="the audit rows")
    assert ("claims", 200, None) in rows
    assert any(route == "claims" and status in (502, 503) for route, status, _ in rows)
    assert any(route == "general" and status == 200 and reason for route, status, reason in rows)
    assert ("general", 429, None) in rows                            # refused, and recorded


def test_a_regulated_route_to_an_exported_model_may_not_fall_back_to_a_commercial_provider(tmp_path, recorder):
    cfg = tmp_path / "front.toml"
    cfg.write_text(provider(recorder, tmp_path)
                   + '[[models]]\nname = "big"\nserver = "openai"\nurl = "http://10.1.0.1:8000/v1"\n\n'
                   + '[[routes]]\nname = "claims"\nmodel = "claims"\ntarget = "big"\nregulated = true\n'
                   + 'fallbacks = ["cloud"]\n')
    out = subprocess.run([PY, "-m", "appliance.cli", "serve", "--config", str(cfg)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "route 'claims' is regulated: it may not fall back to the commercial provider 'cloud'" in out.stderr


def test_the_design_doc_s_config_loads_and_its_commands_exist():
    import re

    from appliance.config import parse_config

    doc = (ROOT / "docs" / "beyond-one-box.md").read_text()
    [snippet] = re.findall(r"```toml\n(.+?)```", doc, flags=re.S)
    assert parse_config(snippet, origin="docs/beyond-one-box.md").models[0].server == "openai"
    usage = subprocess.run([PY, "-m", "appliance.cli", "export", "--help"], capture_output=True, text=True,
                           cwd=ROOT, timeout=30).stdout
    lines = re.findall(r"^appliance export .*$", doc, flags=re.M)
    assert len(lines) == 3
    for flag in {f for line in lines for f in re.findall(r"(--[a-z-]+)", line)}:
        assert flag in usage, flag
