"""GGUF files read from their header (appliance/store/gguf.py), sized for a GPU
(memory.estimate_gguf), and placed beside vLLM models on a simulated inventory."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from appliance.config import builtin_model_path, parse_config
from appliance.gpu.memory import LLAMACPP_UBATCH, ModelShapeError, estimate_gguf
from appliance.gpu.planning import gpu_models, plan
from appliance.gpu.probe import GiB, MiB, SimulatedProbe
from appliance.store import gguf

from . import make_tiny_gguf
from .test_gpu_supervision import make_model

DATA = Path(__file__).parent / "data"
SMOLLM = builtin_model_path("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    make_tiny_gguf.main([str(path)])
    return path


@pytest.mark.skipif(not SMOLLM.exists(), reason="the bundled model is not installed (./install.sh)")
def test_the_bundled_smollm2_header_reads_as_the_model_card_says():
    g = gguf.read(SMOLLM)
    s = gguf.shape(g)
    assert (g.version, len(g.tensors)) == (3, 272)
    assert (s.architecture, s.layers, s.embedding, s.feed_forward) == ("llama", 30, 576, 1536)
    assert (s.heads, s.kv_heads, s.key_length, s.value_length) == (9, (3,) * 30, 64, 64)
    assert (s.context_length, s.vocab) == (8192, 49152)
    # Every byte after the header is a tensor: Q4_1 blocks, F32 norms, one Q8_0 embedding.
    assert s.tensor_bytes == g.file_size - g.data_offset == 96_576_768
    embd = next(t for t in g.tensors if t.name == "token_embd.weight")
    assert (embd.shape, embd.type, embd.nbytes) == ((576, 49152), 8, 576 * 49152 // 32 * 34)


def test_the_tiny_model_header_reads_as_it_was_written(tiny):
    g = gguf.read(tiny)
    s = gguf.shape(g)
    assert (s.layers, s.embedding, s.feed_forward, s.heads, s.kv_heads) == (2, 256, 768, 4, (2, 2))
    assert (s.key_length, s.context_length, s.vocab) == (64, 32768, 418)
    assert g.metadata["tokenizer.ggml.model"] == "llama"
    assert g.metadata["tokenizer.ggml.tokens"] == 418  # the strings are skipped: their count is kept
    # 2 f16 vocab matrices + per layer 4 attention and 3 FFN f16 matrices + f32 norms.
    f16 = 2 * 256 * 418 + 2 * (256 * 256 * 2 + 256 * 128 * 2 + 3 * 256 * 768)
    assert s.tensor_bytes == 2 * f16 + 4 * 256 * (1 + 2 * 2)
    # llama.cpp's KV cache per token: layers x KV heads x (K + V head size) x f16.
    assert s.kv_bytes_per_token() == 2 * 2 * (64 + 64) * 2
    assert s.kv_bytes_per_token("q8_0", "q8_0") == pytest.approx(2 * 2 * 128 * 34 / 32)


def test_a_truncated_file_is_refused_saying_so(tiny, tmp_path):
    cut = tmp_path / "cut.gguf"
    data = tiny.read_bytes()
    cut.write_bytes(data[:-1])
    with pytest.raises(gguf.GgufError, match=r"truncated: the tensors end at byte \d+, the file has"):
        gguf.read(cut)
    cut.write_bytes(data[:5000])  # inside the header's vocabulary
    with pytest.raises(gguf.GgufError, match="truncated: tokenizer.ggml.tokens"):
        gguf.read(cut)


@pytest.mark.parametrize("data, message", [
    (b"", "not a GGUF file"),
    (b"PK\x03\x04" + bytes(100), "not a GGUF file"),
    (b"GGUF" + struct.pack("<IQQ", 7, 0, 0), "GGUF version 7 is not supported"),
    # A header claiming more entries than the file could hold: refused before any allocation.
    (b"GGUF" + struct.pack("<IQQ", 3, 1 << 60, 0) + bytes(64), "more than the file can hold"),
    (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1 << 40) + bytes(64),
     "a string of 1099511627776 bytes"),
    (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1) + b"k" + struct.pack("<IIQ", 9, 4, 1 << 40),
     "an array of 1099511627776 elements does not fit"),
    (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1) + b"k" + struct.pack("<I", 99),
     "unknown value type 99"),
])
def test_hostile_or_broken_headers_are_one_clear_error(tmp_path, data, message):
    path = tmp_path / "bad.gguf"
    path.write_bytes(data + bytes(24))
    with pytest.raises(gguf.GgufError, match=message):
        gguf.read(path)


def test_a_header_without_the_shape_cannot_be_sized(tmp_path):
    path = tmp_path / "opaque.gguf"
    path.write_bytes(make_tiny_gguf.opaque(b""))
    gguf.read(path)  # a valid GGUF...
    with pytest.raises(ModelShapeError, match="no opaque.block_count in the header"):
        estimate_gguf(path, 4096, "f16", "f16", 0, 1)  # ...that says nothing to size it by


def test_the_estimate_is_weights_kv_compute_and_overhead(tiny):
    s = gguf.read_shape(tiny)
    overhead = int(0.58 * GiB)
    compute = LLAMACPP_UBATCH * 4 * (418 + 4 * 768)
    one = estimate_gguf(tiny, 4096, "f16", "f16", overhead, 1)
    assert one.weights == s.tensor_bytes and one.kv_cache == 4096 * 1024
    assert one.per_gpu == {1: s.tensor_bytes + 4096 * 1024 + compute + overhead}
    # The context is padded to 256 cells, as llama.cpp does.
    assert estimate_gguf(tiny, 4000, "f16", "f16", overhead, 1).kv_cache == 4096 * 1024
    # A quantized cache is smaller, but attention dequantizes one layer of it to f16.
    q8 = estimate_gguf(tiny, 65536, "q8_0", "q8_0", overhead, 1)
    assert q8.kv_cache == 65536 * 2 * 2 * 128 * 34 // 32
    assert q8.overhead == overhead + compute + 65536 * 2 * 128 * 2
    # Split by layer over two GPUs: each holds half the weights and half the KV cache.
    two = estimate_gguf(tiny, 4096, "f16", "f16", overhead, 2)
    assert two.per_gpu == {2: -(-s.tensor_bytes // 2) + 4096 * 1024 // 2 + compute + overhead}


def test_the_estimate_matches_what_nvml_measured_on_an_h200():
    """tests/gpu_check.py's calibration (docs/gpu.md): llama-server with CUDA 13 on an H200,
    NVML's per-process memory against the estimate, for models written by make_tiny_gguf."""
    measured = [  # (make_tiny_gguf args, context, cache type, NVML MiB)
        ([], 4096, "f16", 602), ([], 65536, "f16", 678),
        (["--embd", "1024", "--layers", "4", "--heads", "8", "--kv-heads", "8", "--ff", "2816"], 32768, "f16", 1232),
        (["--embd", "1024", "--layers", "4", "--heads", "8", "--kv-heads", "8", "--ff", "2816"], 32768, "q8_0", 1106),
    ]
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for n, (args, ctx, cache, nvml_mib) in enumerate(measured):
            path = Path(tmp) / f"m{n}.gguf"
            make_tiny_gguf.main([str(path), *args])
            est = estimate_gguf(path, ctx, cache, cache, int(0.58 * GiB), 1).per_gpu[1] / MiB
            assert abs(est - nvml_mib) / nvml_mib < 0.05, (args, ctx, cache, est, nvml_mib)


def _config(tmp_path: Path, tiny: Path, vllm_dir: Path, extra: str = "") -> str:
    return f"""
[paths]
state_dir = "{tmp_path}/state"
cache_dir = "{tmp_path}/cache"
[gpu]
inventory = "{DATA / 'inventory-8xh100.toml'}"
[engines.vllm]
overhead_gib = 2
[[models]]
name = "small"
server = "vllm"
source = "{vllm_dir}"
kv_cache_tokens = 32768
[[models]]
name = "tiny-gpu"
source = "{tiny}"
context_length = 65536
[models.gpus]
count = 1
[models.autoscaling]
min_replicas = 2
max_replicas = 2
[[models]]
name = "tiny-split"
source = "{tiny}"
[models.gpus]
count = 2
type = "H100"
[[models]]
name = "tiny-cpu"
source = "{tiny}"
{extra}"""


def test_gguf_models_with_gpus_are_placed_beside_vllm_models(tiny, tmp_path):
    cfg = parse_config(_config(tmp_path, tiny, make_model(tmp_path, "small", 14)))
    assert [m.name for m in gpu_models(cfg)] == ["small", "tiny-gpu", "tiny-split"]  # tiny-cpu stays on CPU
    inventory = SimulatedProbe(DATA / "inventory-8xh100.toml").read()
    rows = plan(cfg, inventory, [(m, f"{m.name}#{i}") for m in gpu_models(cfg)
                                 for i in range(m.autoscaling.min_replicas)])
    by = {r.replica: r for r in rows}
    assert all(r.error is None for r in rows), [r.error for r in rows]
    # The vLLM model (20 GiB) and the GGUF replicas share the half-used GPU 0: best fit.
    assert by["small#0"].assignment.gpus == (0,)
    assert by["tiny-gpu#0"].assignment.gpus == by["tiny-gpu#1"].assignment.gpus == (0,)
    est = by["tiny-gpu#0"].estimate
    assert est.kv_cache == 65536 * 1024 and est.weights == gguf.read_shape(tiny).tensor_bytes
    assert by["tiny-split#0"].assignment.tp == 2 and len(by["tiny-split#0"].assignment.gpus) == 2
    free0 = inventory.gpus[0].free_bytes
    taken = sum(r.assignment.bytes_per_gpu for r in rows if 0 in r.assignment.gpus)
    assert taken <= free0


def test_a_gguf_model_that_is_not_a_gguf_file_cannot_be_placed_and_says_why(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a model at all" * 100)
    cfg = parse_config(f"""
[gpu]
inventory = "{DATA / 'inventory-8xh100.toml'}"
[[models]]
name = "broken"
source = "{bad}"
[models.gpus]
count = 1
""")
    [row] = plan(cfg, SimulatedProbe(DATA / "inventory-8xh100.toml").read(), [(cfg.models[0], "broken#0")])
    assert row.assignment is None and "not a GGUF file" in row.error


def test_llamacpp_gpu_fields_are_validated(tmp_path):
    from appliance.config import ConfigError

    with pytest.raises(ConfigError, match=r"models\[0\].cache_type_v': 'fp8' is not a llama.cpp cache type"):
        parse_config(f'[[models]]\nname = "m"\nsource = "{tmp_path}/m.gguf"\ncache_type_v = "fp8"\n')
    with pytest.raises(ConfigError, match=r"models\[0\].gpus.count': must not be negative"):
        parse_config(f'[[models]]\nname = "m"\nsource = "{tmp_path}/m.gguf"\n[models.gpus]\ncount = -1\n')
