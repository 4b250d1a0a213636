"""The memory model: weights + KV cache + overhead per GPU, TP sizes that divide the heads."""

from __future__ import annotations

import json

import pytest

from appliance.gpu.memory import GiB, MeasuredMemory, ModelShapeError, estimate, read_shape, tp_sizes


def model_dir(tmp_path, weights_bytes=16 * GiB, **config):
    cfg = {"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
           "hidden_size": 4096, "torch_dtype": "bfloat16", **config}
    d = tmp_path / "m"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg))
    with open(d / "model-00001-of-00002.safetensors", "wb") as f:
        f.truncate(weights_bytes // 2)
    with open(d / "model-00002-of-00002.safetensors", "wb") as f:
        f.truncate(weights_bytes - weights_bytes // 2)
    (d / "tokenizer.json").write_text("{}")  # not weights
    return d


def test_kv_cache_is_tokens_x_layers_x_kv_heads_x_head_size_x_2_x_dtype(tmp_path):
    d = model_dir(tmp_path)
    est = estimate(d, kv_tokens=100_000, overhead_bytes=2 * GiB, gpu_count=8)
    # Llama-3-8B shape: 32 layers, 8 KV heads of 128, bf16: 128 KiB per token.
    assert est.kv_cache == 100_000 * 32 * 8 * 128 * 2 * 2
    assert est.weights == 16 * GiB
    assert est.per_gpu[1] == 16 * GiB + est.kv_cache + 2 * GiB
    assert est.per_gpu[2] == 8 * GiB + est.kv_cache // 2 + 2 * GiB


def test_fp8_kv_halves_the_cache(tmp_path):
    d = model_dir(tmp_path)
    bf16 = estimate(d, kv_tokens=1000, overhead_bytes=0, gpu_count=1)
    fp8 = estimate(d, kv_tokens=1000, overhead_bytes=0, gpu_count=1, kv_dtype_bytes=1)
    assert fp8.kv_cache * 2 == bf16.kv_cache


def test_tp_sizes_divide_the_attention_heads_and_fit_the_gpu_count(tmp_path):
    shape = read_shape(model_dir(tmp_path, num_attention_heads=40, num_key_value_heads=8, hidden_size=5120))
    assert tp_sizes(shape, 8) == [1, 2, 4, 8]
    shape = read_shape(model_dir(tmp_path, num_attention_heads=28, num_key_value_heads=4, hidden_size=3584))
    assert tp_sizes(shape, 8) == [1, 2, 4]
    assert tp_sizes(shape, 2) == [1, 2]


def test_a_fixed_tp_is_the_only_size_offered(tmp_path):
    est = estimate(model_dir(tmp_path), kv_tokens=10, overhead_bytes=0, gpu_count=8, fixed_tp=4)
    assert list(est.per_gpu) == [4]


def test_missing_config_or_weights_is_a_clear_error(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    with pytest.raises(ModelShapeError, match="config.json not found"):
        estimate(d, kv_tokens=1, overhead_bytes=0, gpu_count=1)
    (d / "config.json").write_text(json.dumps({"num_hidden_layers": 2, "num_attention_heads": 2,
                                                "hidden_size": 64}))
    with pytest.raises(ModelShapeError, match="no weight files"):
        estimate(d, kv_tokens=1, overhead_bytes=0, gpu_count=1)


def test_measured_memory_replaces_the_estimate_for_that_model_and_tp(tmp_path):
    est = estimate(model_dir(tmp_path), kv_tokens=1000, overhead_bytes=GiB, gpu_count=2)
    measured = MeasuredMemory()
    measured.observe("llama", 2, 11 * GiB)
    corrected = measured.correct("llama", est)
    assert corrected.per_gpu[2] == 11 * GiB and corrected.per_gpu[1] == est.per_gpu[1]
    assert corrected.measured and "measured" in corrected.describe(2)
    assert measured.correct("other", est) is est
