"""The `appliance` command as an operator runs it."""

from __future__ import annotations

import json
import subprocess

import pytest

from .conftest import PY, ROOT


def appliance(*args: str, env: dict | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "appliance.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout, env=env)


@pytest.mark.parametrize("command", [[], ["serve"], ["status"], ["models"], ["models", "ls"]])
def test_every_command_has_help(command):
    result = appliance(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout


def test_serve_help_names_host_port_and_config():
    out = appliance("serve", "--help").stdout
    for option in ("--config", "--host", "--port"):
        assert option in out


def test_status_and_models_ls_read_the_running_daemon(shared_daemon):
    cfg = str(shared_daemon.config)
    status = appliance("status", "--config", cfg)
    assert status.returncode == 0, status.stderr
    assert "ready" in status.stdout and "fake" in status.stdout and "READY" in status.stdout
    raw = json.loads(appliance("status", "--config", cfg, "--json").stdout)
    assert {m["name"] for m in raw["models"]} == {"fake", "slow", "embedder"}
    listing = appliance("models", "ls", "--config", cfg, "--json")
    rows = {r["name"]: r for r in json.loads(listing.stdout)}
    assert rows["fake"]["state"] == "READY" and rows["fake"]["server"] == "openai"


def test_status_without_a_daemon_says_so(tmp_path):
    cfg = tmp_path / "a.toml"
    cfg.write_text("[server]\nport = 1\n")
    result = appliance("status", "--config", str(cfg))
    assert result.returncode == 1
    assert "daemon not reachable at http://127.0.0.1:1" in result.stderr


def test_models_ls_without_a_daemon_lists_the_config(tmp_path):
    cfg = tmp_path / "a.toml"
    cfg.write_text('[server]\nport = 1\n[[models]]\nname = "m"\nsource = "/srv/m.gguf"\n')
    result = appliance("models", "ls", "--config", str(cfg))
    assert result.returncode == 0
    assert "m" in result.stdout and "daemon not running" in result.stdout and "/srv/m.gguf" in result.stdout


def test_serve_with_a_bad_config_exits_naming_the_field(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[server]\nport = -1\n")
    result = appliance("serve", "--config", str(cfg))
    assert result.returncode != 0
    assert f"{cfg}: field 'server.port'" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_without_the_cpu_engine_says_how_to_fix_it(tmp_path):
    cfg = tmp_path / "a.toml"
    cfg.write_text(f'[engines.llamacpp]\nbinary = "{tmp_path}/nope/llama-server"\n')
    result = appliance("serve", "--config", str(cfg))
    assert result.returncode != 0
    assert "llama-server not found" in result.stderr and "install.sh" in result.stderr


def test_serve_refuses_a_damaged_bundled_model(tmp_path):
    import sys

    # A fake prefix: a llama-server stand-in and a bundled model with the wrong bytes.
    models = tmp_path / "share" / "appliance" / "models"
    models.mkdir(parents=True)
    (models / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"not the model")
    engine = tmp_path / "llama-server"
    engine.write_text("#!/bin/sh\nexit 1\n")
    engine.chmod(0o755)
    cfg = tmp_path / "a.toml"
    cfg.write_text(f'[engines.llamacpp]\nbinary = "{engine}"\n')
    code = ("import sys; sys.prefix = sys.argv.pop(1); from appliance.cli import main; main()")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path), "serve", "--config", str(cfg)],
                            capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert result.returncode != 0
    assert "has sha256" in result.stderr and "damaged" in result.stderr


def test_serve_refuses_a_gguf_source_that_is_not_a_whole_gguf_file(tmp_path):
    from . import make_tiny_gguf

    cut = tmp_path / "cut.gguf"
    make_tiny_gguf.main([str(cut)])
    with open(cut, "r+b") as f:
        f.truncate(cut.stat().st_size // 2)
    engine = tmp_path / "llama-server"
    engine.write_text("#!/bin/sh\nexit 1\n")
    engine.chmod(0o755)
    cfg = tmp_path / "a.toml"
    cfg.write_text(f'[engines.llamacpp]\nbinary = "{engine}"\n[[models]]\nname = "cut"\nsource = "{cut}"\n')
    result = subprocess.run([PY, "-m", "appliance.cli", "serve", "--config", str(cfg)],
                            capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert result.returncode != 0
    assert f"model 'cut': {cut} is not a usable GGUF file: truncated: the tensors end at byte" in result.stderr
