"""`appliance models import` from offline media, as an operator meets it: a model folder
on a path with spaces, a safetensors file or a sharded checkpoint copied in part (refused,
naming the file, nothing stored), and the same import run twice (said to change nothing)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from .test_store import run


def safetensors(path: Path, floats: int = 4096) -> Path:
    """A whole safetensors file: one F32 tensor of `floats` values."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [floats], "data_offsets": [0, 4 * floats]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(range(256)) * (4 * floats // 256))
    return path


def model_folder(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    safetensors(folder / "model.safetensors")
    return folder


def stored(tmp_path: Path) -> list[str]:
    hub = tmp_path / "cache" / "hf" / "hub"
    return sorted(p.name for p in hub.glob("models--*")) if hub.exists() else []


def test_a_safetensors_file_copied_in_part_is_refused_naming_it_and_nothing_is_stored(tmp_path):
    folder = model_folder(tmp_path / "USB DISK" / "Tiny Model")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    result = run(tmp_path, "models", "import", str(folder), "--name", "tiny", "--license", "mit", check=False)
    assert result.returncode == 1
    assert f"{folder}: model.safetensors is not whole (truncated: the tensors end at byte" in result.stderr
    assert "was it copied whole? nothing was imported" in result.stderr, result.stderr
    assert stored(tmp_path) == []


def test_a_sharded_checkpoint_missing_a_shard_is_refused_naming_it(tmp_path):
    folder = tmp_path / "USB DISK" / "Sharded"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    safetensors(folder / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                            "b": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    result = run(tmp_path, "models", "import", str(folder), "--name", "sharded", "--license", "mit", check=False)
    assert result.returncode == 1
    assert ("model.safetensors.index.json names 1 shard(s) that are not there (model-00002-of-00002.safetensors)"
            in result.stderr), result.stderr
    assert stored(tmp_path) == []
    safetensors(folder / "model-00002-of-00002.safetensors")  # the rest of the copy: now it imports
    run(tmp_path, "models", "import", str(folder), "--name", "sharded", "--license", "mit")
    assert stored(tmp_path) == ["models--sharded"]


def test_importing_the_same_folder_twice_says_it_changed_nothing(tmp_path):
    folder = model_folder(tmp_path / "USB DISK" / "Tiny Model")
    first = run(tmp_path, "models", "import", str(folder), "--name", "tiny", "--license", "mit")
    assert first.stdout.startswith("imported tiny revision ")
    again = run(tmp_path, "models", "import", str(folder), "--name", "tiny", "--license", "mit")
    assert "is in the store already, with these same files (hashed again): nothing changed" in again.stdout
    as_json = run(tmp_path, "models", "import", str(folder), "--name", "tiny", "--license", "mit", "--json")
    assert json.loads(as_json.stdout)[0]["already_imported"] is True
    assert stored(tmp_path) == ["models--tiny"]


def test_removing_a_model_in_use_names_the_config_model_serving_it_and_the_way_out(tmp_path):
    """"in use by a running replica; stop it first" named neither which model of the config
    runs it nor how to stop it for good (an unloaded model starts again at its next request)."""
    from appliance.store.store import Store

    folder = model_folder(tmp_path / "USB DISK" / "Tiny Model")
    run(tmp_path, "models", "import", str(folder), "--name", "tiny", "--license", "mit",
        config='[[models]]\nname = "assistant"\nserver = "vllm"\nsource = "store:tiny"\n')
    lease = Store(tmp_path / "cache").lease("tiny")  # what a running replica of it holds
    try:
        refused = run(tmp_path, "models", "rm", "tiny", check=False)
    finally:
        lease.close()
    assert refused.returncode == 1
    assert ("model 'tiny' is in use by a running replica of assistant (source = \"store:tiny\" in "
            in refused.stderr), refused.stderr
    assert "`appliance reload`" in refused.stderr and "`appliance unload assistant`" in refused.stderr
    assert stored(tmp_path) == ["models--tiny"]
    run(tmp_path, "models", "rm", "tiny")
    assert stored(tmp_path) == []


HOSTILE_HEADERS = {
    "nested past the parser's depth": b'{"w": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "a number past int's digit limit": b'{"w": {"data_offsets": [0, ' + b"9" * 5000 + b"]}}",
}


@pytest.mark.parametrize("case", list(HOSTILE_HEADERS))
def test_a_safetensors_header_json_cannot_read_is_refused_naming_it_not_a_traceback(tmp_path, case):
    folder = model_folder(tmp_path / "media" / "Hostile")
    header = HOSTILE_HEADERS[case]
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    result = run(tmp_path, "models", "import", str(folder), "--name", "hostile", "--license", "mit", check=False)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"{folder}: model.safetensors is not whole (its header is not JSON" in result.stderr, result.stderr
    assert stored(tmp_path) == []


def test_a_sharded_index_json_cannot_read_is_refused_naming_it_not_a_traceback(tmp_path):
    folder = model_folder(tmp_path / "media" / "Hostile index")
    (folder / "model.safetensors.index.json").write_text('{"weight_map": ' + "[" * 100_000 + "]" * 100_000 + "}")
    result = run(tmp_path, "models", "import", str(folder), "--name", "hostile", "--license", "mit", check=False)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "model.safetensors.index.json: unreadable index" in result.stderr, result.stderr
    assert stored(tmp_path) == []


def test_removing_an_adapter_in_use_names_the_config_model_whose_adapter_it_is(tmp_path):
    """A store adapter's replicas lease it as a model's do: `models rm` named no user and
    said it was another daemon's, though this config's model loads it as an adapter."""
    from appliance.store.store import Store

    folder = model_folder(tmp_path / "USB DISK" / "Tiny Model")
    config = (
        '[[models]]\nname = "assistant"\nserver = "vllm"\nsource = "/models/base"\n'
        '[[models.adapters]]\nname = "assistant-legal"\nsource = "store:tiny"\n'
    )
    run(tmp_path, "models", "import", str(folder), "--name", "tiny", "--license", "mit", config=config)
    lease = Store(tmp_path / "cache").lease("tiny")  # what a running replica loading it holds
    try:
        refused = run(tmp_path, "models", "rm", "tiny", check=False)
    finally:
        lease.close()
    assert refused.returncode == 1, refused.stderr
    assert "in use by a running replica of assistant (its adapter 'assistant-legal'" in refused.stderr, refused.stderr
    assert "whose config is not" not in refused.stderr
