"""vLLM and SGLang adapters: argv and env exactly as expected, every flag in the
pinned engine's own flag list, and each engine's metrics in one shape."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance.config import parse_config
from appliance.fleet.engine_access import EngineAccess
from appliance.store.weights import model_path
from engines import CannotLaunch, GpuSlot, adapter_for
from engines.metrics import parse_llamacpp, parse_sglang, parse_vllm

from .conftest import fake_engine_image

ROOT = Path(__file__).resolve().parent.parent


def pinned_flags(engine: str) -> set[str]:
    files = sorted((ROOT / "images" / engine).glob("flags-*.txt"))
    assert len(files) == 1, f"exactly one pinned flag list for {engine}, found {files}"
    return {line.strip() for line in files[0].read_text().splitlines()
            if line.strip() and not line.startswith("#")}


CFG = parse_config("""
[paths]
cache_dir = "/var/cache/appliance"
[engines.vllm]
command = ["/opt/appliance/engines/vllm/bin/vllm", "serve"]
[engines.sglang]
command = ["/opt/appliance/engines/sglang/bin/python", "-m", "sglang.launch_server"]
[[models]]
name = "llama-8b"
server = "vllm"
source = "/srv/models/llama-8b"
context_length = 16384
parallel = 32
sleep_mode = true
kv_cache_dtype = "fp8"
[[models]]
name = "qwen-32b"
server = "sglang"
source = "/srv/models/qwen-32b"
""")
SLOT = GpuSlot(gpus=(2, 3), memory_fraction=0.45)
ACCESS = EngineAccess(secret="s3cr3t-" + "0" * 57, dir=Path("/run/appliance/engines/r7"))


def test_vllm_argv_and_env():
    spec = adapter_for("vllm").launch(CFG, CFG.models[0], model_path(CFG, CFG.models[0]), "127.0.0.1", 9100, SLOT, ACCESS)
    assert spec.argv == [
        "/opt/appliance/engines/vllm/bin/vllm", "serve", "/srv/models/llama-8b",
        "--served-model-name", "llama-8b", "--uds", "/run/appliance/engines/r7/engine.sock",
        "--tensor-parallel-size", "2", "--gpu-memory-utilization", "0.45",
        "--max-model-len", "16384", "--max-num-seqs", "32", "--enable-prefix-caching",
        "--middleware", "appliance_engine_guard.EngineKeyGuard",
        "--kv-cache-dtype", "fp8", "--enable-sleep-mode",
    ]
    assert spec.env["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert spec.env["HF_HUB_OFFLINE"] == "1" and spec.env["HF_HUB_CACHE"] == "/var/cache/appliance/hf/hub"
    assert "HF_HOME" not in spec.env  # its default, under the replica's own HOME: no code shared between engines
    assert spec.env["VLLM_SERVER_DEV_MODE"] == "1"
    # The key by environment (never argv); the socket is what keeps the rest of vLLM private.
    assert spec.env["VLLM_API_KEY"] == ACCESS.secret and spec.files == {}
    # ... and the guard that wants it on every path, not only /v1, alone on vLLM's import path.
    assert spec.env["PYTHONPATH"] == str(ROOT / "engines" / "vllm_guard")


def test_vllm_loads_the_engine_key_guard_from_a_directory_holding_only_it():
    spec = adapter_for("vllm").launch(CFG, CFG.models[0], model_path(CFG, CFG.models[0]), "127.0.0.1", 9100, SLOT, ACCESS)
    module, _, cls = spec.argv[spec.argv.index("--middleware") + 1].rpartition(".")
    guard_dir = Path(spec.env["PYTHONPATH"])
    assert sorted(p.name for p in guard_dir.iterdir() if p.name != "__pycache__") == [f"{module}.py"]
    text = (guard_dir / f"{module}.py").read_text()
    assert f"class {cls}:" in text


def test_a_models_own_pythonpath_comes_after_the_guard():
    cfg = parse_config(
        '[engines.vllm]\ncommand = ["/opt/vllm/bin/vllm", "serve"]\n'
        '[[models]]\nname = "m"\nserver = "vllm"\nsource = "/srv/models/m"\n'
        'env = { PYTHONPATH = "/srv/plugins" }\n'
    )
    spec = adapter_for("vllm").launch(cfg, cfg.models[0], model_path(cfg, cfg.models[0]), "127.0.0.1", 9100, SLOT, ACCESS)
    assert spec.env["PYTHONPATH"].split(":") == [str(ROOT / "engines" / "vllm_guard"), "/srv/plugins"]


def test_the_replica_key_is_never_on_an_engine_command_line():
    cfg = parse_config('[[models]]\nname = "gguf"\nsource = "/srv/models/m.gguf"\n'
                       '[[models]]\nname = "own"\nserver = "openai"\n'
                       'command = ["srv", "--port", "{port}", "--key-file", "{api_key_file}"]\n'
                       'env = { ENGINE_API_KEY = "operator-set" }\n')
    llama = adapter_for("llamacpp").launch(cfg, cfg.models[0], model_path(cfg, cfg.models[0]), "127.0.0.1", 9100, None, ACCESS)
    own = adapter_for("openai").launch(cfg, cfg.models[1], model_path(cfg, cfg.models[1]), "127.0.0.1", 9100, None, ACCESS)
    specs = [llama, own] + [adapter_for(e).launch(CFG, CFG.models[m], model_path(CFG, CFG.models[m]), "127.0.0.1", 9100, SLOT, ACCESS)
                            for e, m in (("vllm", 0), ("sglang", 1))]
    for spec in specs:
        assert not any(ACCESS.secret in a for a in spec.argv), spec.argv
    assert llama.argv[llama.argv.index("--api-key-file") + 1] == str(ACCESS.key_file)
    assert "--no-slots" in llama.argv and "--api-key" not in llama.argv
    assert own.argv == ["srv", "--port", "9100", "--key-file", str(ACCESS.key_file)]
    assert own.env["ENGINE_API_KEY"] == ACCESS.secret  # the model's env cannot replace it


def test_sglang_argv_and_env():
    spec = adapter_for("sglang").launch(CFG, CFG.models[1], model_path(CFG, CFG.models[1]), "127.0.0.1", 9200, SLOT, ACCESS)
    assert spec.argv == [
        "/opt/appliance/engines/sglang/bin/python", "-m", "sglang.launch_server",
        "--model-path", "/srv/models/qwen-32b", "--served-model-name", "qwen-32b",
        "--host", "127.0.0.1", "--port", "9200", "--tp-size", "2", "--mem-fraction-static", "0.45",
        "--context-length", "8192", "--max-running-requests", "4", "--enable-metrics",
        "--config", "/run/appliance/engines/r7/sglang.yaml",
    ]
    assert spec.env["CUDA_VISIBLE_DEVICES"] == "2,3" and spec.env["HF_HUB_OFFLINE"] == "1"
    # SGLang reads its key from --api-key only: it goes in the config file the replica writes 0600.
    assert json.loads(spec.files["sglang.yaml"]) == {"api-key": ACCESS.secret}


@pytest.mark.parametrize(("engine", "model"), [("vllm", 0), ("sglang", 1)])
def test_every_flag_the_adapter_emits_exists_in_the_pinned_engine(engine, model):
    spec = adapter_for(engine).launch(CFG, CFG.models[model], model_path(CFG, CFG.models[model]), "127.0.0.1", 9100, SLOT, ACCESS)
    emitted = {a for a in spec.argv if a.startswith("--")}
    assert emitted - pinned_flags(engine) == set()


def test_a_configured_command_is_what_runs_and_names_no_image():
    # (CFG sets [engines.*] command: an operator's own environment wins over the images.)
    assert adapter_for("vllm").launch(CFG, CFG.models[0], model_path(CFG, CFG.models[0]), "127.0.0.1", 9100, SLOT, ACCESS).image == ""
    assert adapter_for("sglang").launch(CFG, CFG.models[1], model_path(CFG, CFG.models[1]), "127.0.0.1", 9100, SLOT, ACCESS).image == ""


def _image_config(images: Path):
    return parse_config(f"""
[images]
dir = "{images}"
[[models]]
name = "llama-8b"
server = "vllm"
source = "/srv/models/llama-8b"
[[models]]
name = "qwen-32b"
server = "sglang"
source = "/srv/models/qwen-32b"
""")


def test_with_no_command_configured_gpu_engines_run_from_their_current_image(tmp_path):
    cfg = _image_config(tmp_path)
    assert cfg.engines.vllm.command == [] and cfg.engines.sglang.command == []
    vllm = fake_engine_image(tmp_path, "vllm", "0.33.0-aaaaaaaaaaaa")
    sglang = fake_engine_image(tmp_path, "sglang", "0.5.23-bbbbbbbbbbbb")
    spec = adapter_for("vllm").launch(cfg, cfg.models[0], model_path(cfg, cfg.models[0]), "127.0.0.1", 9100, SLOT, ACCESS)
    assert spec.argv[:3] == [str(vllm / "bin" / "vllm"), "serve", "/srv/models/llama-8b"]
    assert spec.image == "0.33.0-aaaaaaaaaaaa"
    spec = adapter_for("sglang").launch(cfg, cfg.models[1], model_path(cfg, cfg.models[1]), "127.0.0.1", 9100, SLOT, ACCESS)
    assert spec.argv[:5] == [str(sglang / "bin" / "python"), "-m", "sglang.launch_server",
                             "--model-path", "/srv/models/qwen-32b"]
    assert spec.image == "0.5.23-bbbbbbbbbbbb"
    # A rollback moves `current`: the next launch runs (and names) the other image.
    older = fake_engine_image(tmp_path, "vllm", "0.32.0-cccccccccccc")
    spec = adapter_for("vllm").launch(cfg, cfg.models[0], model_path(cfg, cfg.models[0]), "127.0.0.1", 9100, SLOT, ACCESS)
    assert spec.image == "0.32.0-cccccccccccc" and spec.argv[0] == str(older / "bin" / "vllm")


@pytest.mark.parametrize(("engine", "model"), [("vllm", 0), ("sglang", 1)])
def test_with_no_image_and_no_command_a_gpu_engine_cannot_launch_and_says_the_fix(tmp_path, engine, model):
    cfg = _image_config(tmp_path / "images")
    with pytest.raises(CannotLaunch) as info:
        adapter_for(engine).launch(cfg, cfg.models[model], model_path(cfg, cfg.models[model]), "127.0.0.1", 9100, SLOT, ACCESS)
    message = str(info.value)
    assert f"run `appliance images build {engine}`" in message and f"engines.{engine}.command" in message
    assert str(tmp_path / "images" / engine) in message and "\n" not in message
    # An interrupted build (a folder, `current`, no image.json) is no image either.
    (tmp_path / "images" / engine / "0.1-x" / "bin").mkdir(parents=True)
    (tmp_path / "images" / engine / "current").symlink_to("0.1-x")
    with pytest.raises(CannotLaunch, match=f"appliance images build {engine}"):
        adapter_for(engine).launch(cfg, cfg.models[model], model_path(cfg, cfg.models[model]), "127.0.0.1", 9100, SLOT, ACCESS)


def test_a_gpu_engine_without_a_slot_is_refused():
    with pytest.raises(ValueError, match="needs GPUs from the placer"):
        adapter_for("vllm").launch(CFG, CFG.models[0], model_path(CFG, CFG.models[0]), "127.0.0.1", 9100, None, ACCESS)


VLLM_METRICS = """\
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="llama-8b"} 3.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="llama-8b"} 2.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{model_name="llama-8b"} 0.42
# TYPE vllm:prefix_cache_queries counter
vllm:prefix_cache_queries_total{model_name="llama-8b"} 1000.0
# TYPE vllm:prefix_cache_hits counter
vllm:prefix_cache_hits_total{model_name="llama-8b"} 750.0
"""
SGLANG_METRICS = """\
sglang:num_running_reqs{model_name="qwen"} 5.0
sglang:num_queue_reqs{model_name="qwen"} 1.0
sglang:token_usage{model_name="qwen"} 0.3
sglang:cache_hit_rate{model_name="qwen"} 0.6
"""
LLAMACPP_METRICS = """\
# TYPE llamacpp:prompt_tokens_total counter
llamacpp:prompt_tokens_total 300
# TYPE llamacpp:prompt_tokens_cached_total counter
llamacpp:prompt_tokens_cached_total 100
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 2
# TYPE llamacpp:requests_deferred gauge
llamacpp:requests_deferred 1
"""


def test_each_engines_metrics_read_into_one_shape():
    v = parse_vllm(VLLM_METRICS)
    assert (v.running, v.waiting, v.kv_cache_usage, v.prefix_cache_hit_rate) == (3, 2, 0.42, 0.75)
    s = parse_sglang(SGLANG_METRICS)
    assert (s.running, s.waiting, s.kv_cache_usage, s.prefix_cache_hit_rate) == (5, 1, 0.3, 0.6)
    c = parse_llamacpp(LLAMACPP_METRICS)
    assert (c.running, c.waiting, c.kv_cache_usage, c.prefix_cache_hit_rate) == (2, 1, None, 0.25)


def test_older_vllm_metric_names_are_read_too():
    v = parse_vllm('vllm:gpu_cache_usage_perc{m="x"} 0.5\nvllm:gpu_prefix_cache_hit_rate{m="x"} 0.2\n')
    assert v.kv_cache_usage == 0.5 and v.prefix_cache_hit_rate == 0.2


LLAMA_CFG = parse_config("""
[engines.llamacpp]
binary = "/opt/appliance/venv/bin/llama-server"
cuda_binary = "/opt/appliance/venv/images/llamacpp-cuda/current/bin/llama-server"
[[models]]
name = "qwen-gguf"
source = "/srv/models/qwen.gguf"
context_length = 32768
parallel = 8
cache_type_k = "q8_0"
cache_type_v = "q8_0"
[models.gpus]
count = 1
[[models]]
name = "cpu-gguf"
source = "/srv/models/small.gguf"
threads = 4
""")


def _flag(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_llamacpp_on_one_gpu_runs_the_cuda_build_with_every_layer_on_that_gpu_by_uuid():
    slot = GpuSlot(gpus=(3,), memory_fraction=0.05, uuids=("GPU-3a1e",))
    spec = adapter_for("llamacpp").launch(LLAMA_CFG, LLAMA_CFG.models[0], model_path(LLAMA_CFG, LLAMA_CFG.models[0]), "127.0.0.1", 9200, slot, ACCESS)
    argv = spec.argv
    assert argv[0] == "/opt/appliance/venv/images/llamacpp-cuda/current/bin/llama-server"
    assert _flag(argv, "--n-gpu-layers") == "all" and _flag(argv, "--split-mode") == "none"
    assert _flag(argv, "--fit") == "off"  # the placer sized it: llama.cpp must not shrink the context
    assert _flag(argv, "--ctx-size") == "32768" and _flag(argv, "--parallel") == "8"
    assert _flag(argv, "--cache-type-k") == "q8_0" and _flag(argv, "--cache-type-v") == "q8_0"
    assert _flag(argv, "--threads") == "2"
    assert spec.env["CUDA_VISIBLE_DEVICES"] == "GPU-3a1e" and spec.env["LLAMA_OFFLINE"] == "1"


def test_llamacpp_over_two_gpus_splits_by_layer():
    slot = GpuSlot(gpus=(2, 5), memory_fraction=0.3, uuids=("GPU-b", "GPU-c"))
    spec = adapter_for("llamacpp").launch(LLAMA_CFG, LLAMA_CFG.models[0], model_path(LLAMA_CFG, LLAMA_CFG.models[0]), "127.0.0.1", 9200, slot, ACCESS)
    assert _flag(spec.argv, "--split-mode") == "layer"
    assert spec.env["CUDA_VISIBLE_DEVICES"] == "GPU-b,GPU-c"
    # Where the probe knows no UUIDs (an inventory without them), the indices.
    spec = adapter_for("llamacpp").launch(LLAMA_CFG, LLAMA_CFG.models[0], model_path(LLAMA_CFG, LLAMA_CFG.models[0]), "127.0.0.1", 9200,
                                          GpuSlot(gpus=(2, 5), memory_fraction=0.3), ACCESS)
    assert spec.env["CUDA_VISIBLE_DEVICES"] == "2,5"


def test_llamacpp_on_the_cpu_is_as_before():
    spec = adapter_for("llamacpp").launch(LLAMA_CFG, LLAMA_CFG.models[1], model_path(LLAMA_CFG, LLAMA_CFG.models[1]), "127.0.0.1", 9201, None, ACCESS)
    assert spec.argv[0] == "/opt/appliance/venv/bin/llama-server"
    assert "--n-gpu-layers" not in spec.argv and "--cache-type-k" not in spec.argv
    assert _flag(spec.argv, "--threads") == "4"
    assert "CUDA_VISIBLE_DEVICES" not in spec.env


def test_llamacpp_on_the_cpu_runs_one_thread_per_core_it_was_given():
    model = LLAMA_CFG.models[1]
    spec = adapter_for("llamacpp").launch(LLAMA_CFG, model, model_path(LLAMA_CFG, model), "127.0.0.1", 9201, None,
                                          ACCESS, cpus=frozenset({2, 3}))
    assert _flag(spec.argv, "--threads") == "2"


def test_llamacpp_on_gpus_without_a_cuda_build_cannot_launch_and_names_the_fix(tmp_path):
    cfg = parse_config(f'[images]\ndir = "{tmp_path}"\n[[models]]\nname = "m"\nsource = "/srv/m.gguf"\n'
                       "[models.gpus]\ncount = 1\n")
    with pytest.raises(CannotLaunch, match=r"no llamacpp-cuda engine image in .*: run `appliance images build "
                                           r"llamacpp-cuda` \(it needs the CUDA toolkit: nvcc\).*remove "
                                           r"\[models.gpus\] to serve this model on the CPU"):
        adapter_for("llamacpp").launch(cfg, cfg.models[0], model_path(cfg, cfg.models[0]), "127.0.0.1", 9202, GpuSlot((0,), 0.1), ACCESS)


def test_every_llamacpp_gpu_flag_is_in_the_pinned_llama_server():
    """The CPU build is the same pinned source: its --help lists the GPU options too."""
    import subprocess

    from appliance.dist.images import default_llama_server

    binary = default_llama_server()
    if not Path(binary).exists():
        pytest.skip("llama-server is not built (./install.sh)")
    text = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=60).stdout
    spec = adapter_for("llamacpp").launch(LLAMA_CFG, LLAMA_CFG.models[0], model_path(LLAMA_CFG, LLAMA_CFG.models[0]), "127.0.0.1", 9200,
                                          GpuSlot((0, 1), 0.1, ("GPU-a", "GPU-b")), ACCESS)
    for flag in (a for a in spec.argv if a.startswith("--")):
        assert f"{flag}" in text, f"{flag} is not an option of the pinned llama-server"
