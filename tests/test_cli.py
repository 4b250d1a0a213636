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
    assert "the daemon is not running (nothing answers at http://127.0.0.1:1)" in result.stderr


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


@pytest.mark.parametrize("port", ["0", "70000"])
def test_serve_refuses_a_port_flag_out_of_range_before_starting(tmp_path, port):
    """--port skips the config's check (1-65535): 0 served on a port nobody was told,
    70000 started the engines, then failed to bind with Rust's "number too large"."""
    cfg = tmp_path / "appliance.toml"
    cfg.write_text(f'[paths]\nstate_dir = "{tmp_path}/state"\nlog_dir = "{tmp_path}/log"\n')
    result = appliance("serve", "--config", str(cfg), "--port", port, timeout=20)
    assert result.returncode == 2, result.stderr
    assert "'--port'" in result.stderr and "1<=x<=65535" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "state").exists()

@pytest.mark.parametrize("command", [["status"], ["ps"], ["models", "ls"], ["reload"], ["scale", "m", "1"],
                                     ["load", "m"]])
@pytest.mark.parametrize("port", ["0", "70000"])
def test_the_admin_commands_refuse_a_port_flag_out_of_range(tmp_path, command, port):
    """--port 0 was refused for want of the admin token, 70000 read as "the daemon is not
    running": neither named the flag."""
    from click.testing import CliRunner

    from appliance.cli.main import main

    cfg = tmp_path / "appliance.toml"
    cfg.write_text(f'[paths]\nstate_dir = "{tmp_path}/state"\nlog_dir = "{tmp_path}/log"\n')
    result = CliRunner().invoke(main, [*command, "--config", str(cfg), "--port", port])
    assert result.exit_code == 2, result.output
    assert "'--port'" in result.output and "1<=x<=65535" in result.output, result.output


@pytest.mark.parametrize("url", ["http://[::1", "ftp://host", "nonsense", "http://:8000", "http://h:99999"])
def test_tui_refuses_a_url_that_is_not_http_before_starting(tmp_path, url):
    """http://[::1 was a traceback; ftp:// or no scheme started a TUI retrying every second."""
    from click.testing import CliRunner

    from appliance.cli.main import main

    cfg = tmp_path / "appliance.toml"
    cfg.write_text(f'[paths]\nstate_dir = "{tmp_path}/state"\nlog_dir = "{tmp_path}/log"\n')
    result = CliRunner().invoke(main, ["tui", "--config", str(cfg), "--url", url])
    assert result.exit_code == 2, result.output
    assert "'--url'" in result.output and repr(url) in result.output, result.output


@pytest.mark.parametrize(("command", "said"), [
    (["check"], "field 'paths.state_dir': {file} cannot be a directory: {file} is a file"),
    (["keys", "ls"], "field 'paths.state_dir': cannot open the state database in {file}"),
    (["keys", "create", "--name", "app"], "field 'paths.state_dir': cannot open the state database in {file}"),
    (["models", "import", "{gguf}"], "{file}/hf: cannot make the store's folder: Not a directory"),
    (["models", "verify"], "{file}/hf: cannot make the store's folder: Not a directory"),
])
def test_a_file_where_the_state_or_cache_dir_goes_is_one_line_from_every_command(tmp_path, command, said):
    """check said ok (serve then refused), keys and models were tracebacks."""
    from click.testing import CliRunner

    from appliance.cli.main import main

    from . import make_tiny_gguf

    file = tmp_path / "afile"
    file.write_text("")
    gguf = tmp_path / "m.gguf"
    make_tiny_gguf.main([str(gguf)])
    cfg = tmp_path / "appliance.toml"
    cfg.write_text(f'[paths]\nstate_dir = "{file}"\ncache_dir = "{file}"\nlog_dir = "{file}"\n')
    args = [a.format(gguf=gguf) for a in command]
    result = CliRunner().invoke(main, [*args, "--config", str(cfg)])
    assert result.exit_code == 1 and not isinstance(result.exception, OSError), result.exception
    assert said.format(file=file) in result.output, result.output


@pytest.mark.parametrize(("token_file", "why"), [("fifo", "not a regular file"), ("/dev/zero", "not a regular file"),
                                                 (".", "Is a directory"), ("missing", "No such file or directory")])
def test_check_reads_the_admin_token_file_as_serve_does_and_only_a_regular_file(tmp_path, token_file, why):
    """check said ok for a token file serve could not read; serve blocked for good on a FIFO
    (SIGTERM could not end it) and read /dev/zero until memory ran out."""
    import os

    from click.testing import CliRunner

    from appliance.cli.main import main

    os.mkfifo(tmp_path / "fifo")
    path = token_file if token_file.startswith("/") else str(tmp_path / token_file)
    cfg = tmp_path / "appliance.toml"
    cfg.write_text(f'[server]\nadmin_token_file = "{path}"\n'
                   f'[paths]\nstate_dir = "{tmp_path}/state"\nlog_dir = "{tmp_path}/log"\n')
    result = CliRunner().invoke(main, ["check", "--config", str(cfg)])
    assert result.exit_code == 1, result.output
    assert f"field 'server.admin_token_file': cannot read {os.path.normpath(path)}: {why}" in result.output, result.output


@pytest.mark.parametrize(("key_file", "why"), [("fifo", "not a regular file"), ("/dev/zero", "not a regular file"),
                                               ("big.key", "larger than 4096 bytes, not a key")])
def test_check_reads_a_provider_key_file_only_if_it_is_a_small_regular_file(tmp_path, key_file, why):
    """A FIFO as a provider's api_key_file hung check and serve for good; /dev/zero read until
    memory ran out. The key file is read as the admin token file is: one reader for both."""
    import os

    from click.testing import CliRunner

    from appliance.cli.main import main

    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "big.key").write_text("k" * 5000)
    (tmp_path / "big.key").chmod(0o600)
    path = key_file if key_file.startswith("/") else str(tmp_path / key_file)
    cfg = tmp_path / "appliance.toml"
    cfg.write_text(f'[paths]\nstate_dir = "{tmp_path}/state"\nlog_dir = "{tmp_path}/log"\n'
                   f'[[providers]]\nname = "p"\nbase_url = "http://127.0.0.1:9/v1"\napi_key_file = "{path}"\n'
                   "commercial = false\n")
    result = CliRunner().invoke(main, ["check", "--config", str(cfg)])
    assert result.exit_code == 1, result.output
    assert f"field 'providers[0].api_key_file': cannot read {path}: {why}" in result.output, result.output


@pytest.mark.parametrize("inventory", ["missing.toml", ".", "garbage.json"])
def test_check_and_serve_name_a_gpu_inventory_they_cannot_read_with_its_field(tmp_path, inventory):
    """check said "ok" where serve then failed with a bare FileNotFoundError naming no field."""
    (tmp_path / "garbage.json").write_text("garbage{")
    cfg = tmp_path / "appliance.toml"
    cfg.write_text(f'[paths]\nstate_dir = "{tmp_path}/state"\nlog_dir = "{tmp_path}/log"\n'
                   f'[gpu]\ninventory = "{tmp_path / inventory}"\n')
    for command in ("check", "serve"):
        result = appliance(command, "--config", str(cfg), timeout=20)
        assert result.returncode == 1, (command, result.stderr)
        assert f"{cfg}: field 'gpu.inventory': {tmp_path / inventory}" in result.stderr, (command, result.stderr)
        assert "Errno" not in result.stderr and "Traceback" not in result.stderr

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
    code = ("import sys; sys.prefix = sys.argv.pop(1); from appliance.cli.main import main; main()")
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


def _serve(tmp_path, server: str = "", paths: str = "", extra: str = ""):
    """`appliance serve` with a fake model, expected to refuse to start: its result."""
    from .conftest import fake_model, free_port

    cfg = tmp_path / "appliance.toml"
    paths = paths or (f'state_dir = "{tmp_path}/state"\ncache_dir = "{tmp_path}/cache"\n'
                      f'log_dir = "{tmp_path}/log"\n')
    cfg.write_text(f"[server]\nport = {free_port()}\n{server}\n[paths]\n{paths}\n{extra}\n{fake_model('fake')}")
    return appliance("serve", "--config", str(cfg), timeout=60)


def test_a_lifespan_failure_exits_non_zero_with_the_original_message(tmp_path):
    # A missing admin token file is found inside the app's lifespan, under Granian.
    result = _serve(tmp_path, server=f'admin_token_file = "{tmp_path}/missing.token"')
    assert result.returncode == 1
    assert "ASGI lifespan" not in result.stderr
    assert f"field 'server.admin_token_file': cannot read {tmp_path}/missing.token" in result.stderr
    assert "No such file or directory" in result.stderr and "create it" in result.stderr
    assert "Unclosed client session" not in result.stderr


def test_a_state_dir_that_cannot_be_written_is_named_with_the_fix(tmp_path):
    (tmp_path / "a-file").write_text("")
    result = _serve(tmp_path, paths=f'state_dir = "{tmp_path}/a-file/state"\ncache_dir = "{tmp_path}/cache"\n'
                                    f'log_dir = "{tmp_path}/log"\n')
    assert result.returncode == 1 and "ASGI lifespan" not in result.stderr
    # A file on the way is said as such (check_dirs_are_dirs), as `appliance check` says it.
    assert (f"field 'paths.state_dir': {tmp_path}/a-file/state cannot be a directory: {tmp_path}/a-file is a file"
            in result.stderr)
    assert "point paths.state_dir elsewhere" in result.stderr


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_a_provider_key_file_others_may_read_is_refused_naming_the_file_and_the_fix(tmp_path, mode):
    key = tmp_path / "cloud.key"
    key.write_text("sk-test-provider-key\n")
    key.chmod(mode)
    provider = f'[[providers]]\nname = "cloud"\nbase_url = "https://api.example.com/v1"\napi_key_file = "{key}"\n'
    result = _serve(tmp_path, extra=provider)
    assert result.returncode == 1
    line = next(line for line in result.stderr.splitlines() if str(key) in line)
    assert "providers[0].api_key_file" in line and f"mode 0{mode:o}" in line and f"chmod 600 {key}" in line
    assert "sk-test-provider-key" not in result.stderr


def test_a_provider_key_file_only_its_owner_reads_is_accepted(tmp_path, caplog):
    from appliance.config import parse_config
    from appliance.gateway.providers import load_providers

    key = tmp_path / "cloud.key"
    key.write_text("sk-test-provider-key\n")
    provider = f'[[providers]]\nname = "cloud"\nbase_url = "https://api.example.com/v1"\napi_key_file = "{key}"\n'
    key.chmod(0o600)
    assert load_providers(parse_config(provider))["cloud"].headers({})["Authorization"].endswith("provider-key")
    key.chmod(0o644)  # and with the switch at "warn", an open one is logged, not refused
    warn = parse_config('[server]\nkey_file_permissions = "warn"\n' + provider)
    assert "cloud" in load_providers(warn)
    assert f"chmod 600 {key}" in caplog.text


def test_check_wait_ready_without_a_daemon_says_it_was_not_ready(tmp_path):
    """install.sh's readiness check after a systemd start: no daemon answering is one line
    naming /readyz and the fix, exit 1 (it was a NameError traceback)."""
    cfg = tmp_path / "appliance.toml"
    cfg.write_text(f'[server]\nport = 9\n[paths]\nstate_dir = "{tmp_path}/s"\ncache_dir = "{tmp_path}/c"\n'
                   f'log_dir = "{tmp_path}/l"\n')
    result = appliance("check", "--config", str(cfg), "--wait-ready", "1")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "was not ready within 1 s (http://127.0.0.1:9/readyz" in result.stderr


def test_status_json_is_the_admin_apis_typed_status(shared_daemon):
    import msgspec

    from appliance.status import DaemonStatus

    out = appliance("status", "--config", str(shared_daemon.config), "--json").stdout
    status = msgspec.json.decode(out, type=DaemonStatus)
    assert status.now >= status.started and status.now.utcoffset() is not None
    assert set(json.loads(out)) == set(DaemonStatus.__struct_fields__)


def test_the_cli_has_one_command_per_model_action_with_its_help():
    from appliance.cli.main import main
    from appliance.status import MODEL_ACTION_HELP, ModelAction

    for action in ModelAction:
        assert main.commands[action].help == MODEL_ACTION_HELP[action]


def test_an_answer_this_cli_cannot_read_is_an_error_naming_the_call():
    import httpx

    from appliance.daemon.admin_client import AdminError, answer
    from appliance.status import DaemonStatus

    request = httpx.Request("GET", "http://appliance/admin/status")
    with pytest.raises(AdminError, match="GET /admin/status: the daemon's answer is not what this client reads"):
        answer(httpx.Response(200, json={"models": "not a list"}, request=request), DaemonStatus)
