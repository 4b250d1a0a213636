"""Config: loaded, defaulted and validated in one place; errors name the file and field."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import msgspec
import pytest

from appliance import config as config_mod
from appliance.config import (
    EMBEDDED_MODEL_NAME,
    Config,
    ConfigError,
    load_config,
    parse_config,
)
from appliance.store.weights import model_path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "appliance.example.toml"


def test_the_example_config_loads_and_equals_the_built_in_defaults():
    example = load_config(str(EXAMPLE))
    defaults = parse_config("")
    # The example documents every default: apart from where it came from, it is the same config.
    assert msgspec.structs.replace(example, origin="") == msgspec.structs.replace(defaults, origin="")


def test_the_example_config_names_every_setting():
    text = EXAMPLE.read_text()

    def fields(struct_type, prefix=""):
        for f in msgspec.structs.fields(struct_type):
            if f.name in ("origin", "deprecations"):  # not TOML keys
                continue
            t = f.type
            if isinstance(t, type) and issubclass(t, msgspec.Struct):
                yield from fields(t, f"{prefix}{f.name}.")
            else:
                yield f.name

    lists = ("models", "routes", "providers")
    missing = [name for name in fields(Config) if f"{name} =" not in text and name not in lists]
    model_fields = [f.name for f in msgspec.structs.fields(config_mod.ModelConfig)]
    missing += [n for n in model_fields if f"{n} =" not in text and f"[models.{n}]" not in text]
    for struct, table in ((config_mod.RouteConfig, "routes"), (config_mod.ProviderConfig, "providers")):
        assert f"# [[{table}]]" in text
        missing += [f"{table}.{f.name}" for f in msgspec.structs.fields(struct) if f"# {f.name} =" not in text]
    assert missing == []


def test_no_config_file_serves_the_embedded_default(monkeypatch, tmp_path):
    monkeypatch.delenv("APPLIANCE_CONFIG", raising=False)
    monkeypatch.setattr(config_mod.loading, "DEFAULT_CONFIG_PATH", tmp_path / "absent.toml")
    cfg = load_config(None)
    assert [m.name for m in cfg.models] == [EMBEDDED_MODEL_NAME]
    assert cfg.models[0].server == "llamacpp"
    assert model_path(cfg, cfg.models[0]).name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert cfg.server.host == "127.0.0.1" and cfg.server.port == 8000


def test_appliance_config_env_is_used_and_cli_wins_over_it(monkeypatch, tmp_path):
    env_file = tmp_path / "env.toml"
    env_file.write_text("[server]\nport = 9001\n")
    cli_file = tmp_path / "cli.toml"
    cli_file.write_text("[server]\nport = 9002\n")
    monkeypatch.setenv("APPLIANCE_CONFIG", str(env_file))
    assert load_config(None).server.port == 9001
    assert load_config(str(cli_file)).server.port == 9002


def test_an_explicit_config_that_is_missing_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="absent.toml: config file not found"):
        load_config(str(tmp_path / "absent.toml"))


def test_paths_follow_fhs_for_root_and_xdg_for_users(monkeypatch, tmp_path):
    monkeypatch.setattr(config_mod.paths, "_is_root", lambda: True)
    root = parse_config("")
    assert (root.paths.state_dir, root.paths.cache_dir) == ("/var/lib/appliance", "/var/cache/appliance")
    monkeypatch.setattr(config_mod.paths, "_is_root", lambda: False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    user = parse_config("")
    assert user.paths.state_dir == str(tmp_path / "state" / "appliance")
    assert user.paths.cache_dir == str(tmp_path / "cache" / "appliance")
    explicit = parse_config('[paths]\nstate_dir = "/srv/st"\n')
    assert explicit.paths.state_dir == "/srv/st"


@pytest.mark.parametrize(
    ("toml", "field", "message"),
    [
        ('[server]\nport = "eighty"\n', "server.port", "Expected `int`, got `str`"),
        ("[server]\nport = 70000\n", "server.port", "must be 1-65535"),
        ("[server]\nprot = 8000\n", "server.prot", "is unknown; did you mean 'server.port'?"),
        ("[supervisor]\nmax_crashes = 0\n", "supervisor.max_crashes", "must be >= 1"),
        ("[store]\nscrub_interval_h = -1\n", "store.scrub_interval_h", "must not be negative"),
        ("[store]\nscrub_mb_per_s = -200\n", "store.scrub_mb_per_s", "must not be negative"),
        ('[[models]]\nname = "a"\nserver = "tpu"\n', "models[0].server", "Invalid enum value 'tpu'"),
        ('[[models]]\nname = "bad name!"\nsource = "x.gguf"\n', "models[0].name", "not a valid model name"),
        ('[[models]]\nname = "a"\nserver = "llamacpp"\n', "models[0].source", "needs a GGUF file"),
        ('[[models]]\nname = "a"\nserver = "openai"\n', "models[0]", "exactly one of 'command'"),
        ('[[models]]\nname = "a"\nserver = "openai"\ncommand = ["srv"]\n', "models[0].command",
         "must contain {port}"),
        ('[[models]]\nname = "a"\nsource = "a.gguf"\n[[models]]\nname = "a"\nsource = "b.gguf"\n',
         "models[1].name", "duplicate model name"),
        ('[[models]]\nname = "a"\nsource = "a.gguf"\n[models.autoscaling]\nmin_replicas = 3\n'
         "max_replicas = 2\n", "models[0].autoscaling.max_replicas", "must be >= min_replicas"),
        ('[[models]]\nname = "a"\nsource = "builtin:llama-70b"\n', "models[0].source",
         "unknown builtin model"),
        ('[[models]]\nname = "a"\nserver = "vllm"\n', "models[0].source", "needs a model directory"),
        ('[engines.vllm]\ncommand = "vllm serve"\n', "engines.vllm.command", "Expected `array`, got `str`"),
        ('[[models]]\nname = "a"\nserver = "sglang"\nsource = "/m"\nsleep_mode = true\n',
         "models[0].sleep_mode", "only vllm has a sleep mode"),
    ],
)
def test_validation_errors_name_the_file_and_the_field(tmp_path, toml, field, message):
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    text = str(info.value)
    assert text.startswith(f"{path}: ")
    assert f"field '{field}'" in text or f"`{field}`" in text or f"'{field}'" in text, text
    assert message in text, text


def test_a_missing_config_named_by_the_environment_says_so(tmp_path, monkeypatch):
    """$APPLIANCE_CONFIG left over in a shell named a file the operator never typed, and the
    error did not say where the path came from."""
    monkeypatch.setenv("APPLIANCE_CONFIG", str(tmp_path / "gone.toml"))
    with pytest.raises(ConfigError) as info:
        load_config(None)
    assert str(info.value) == f"{tmp_path / 'gone.toml'}: config file not found (named by $APPLIANCE_CONFIG)"
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path / "typed.toml"))
    assert str(info.value) == f"{tmp_path / 'typed.toml'}: config file not found"


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ('[server]\nport = 8000\nlog_levl = "info"\n',
         "line 3: field 'server.log_levl' is unknown; did you mean 'server.log_level'?"),
        ('[[models]]\nname = "a"\nsource = "a.gguf"\n# the second\n[[models]]\nname = "b"\nsourc = "b.gguf"\n',
         "line 7: field 'models[1].sourc' is unknown; did you mean 'models[1].source'?"),
        ('[[models]]\nname = "a"\nsource = "a.gguf"\n[models.autoscaling]\nmin_replica = 1\n',
         "line 5: field 'models[0].autoscaling.min_replica' is unknown; did you mean "
         "'models[0].autoscaling.min_replicas'?"),
        ("[telemtry]\n", "line 1: field 'telemtry' is unknown; did you mean 'telemetry'?"),
        ("servr.port = 1\n", "line 1: field 'servr' is unknown; did you mean 'server'?"),
        ("[server]\nzzzz = 1\n", "line 2: field 'server.zzzz' is unknown (appliance.example.toml lists every key)"),
        ('[server]\n\nport = "eighty"\n', "line 3: field 'server.port': Expected `int`, got `str`"),
    ],
)
def test_a_typo_or_a_wrong_type_in_the_config_names_its_line_and_the_key_meant(tmp_path, toml, expected):
    """A typo'd key said only "field 'server': Object contains unknown field `log_levl`":
    no line, and no hint of the key the operator meant."""
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value).startswith(f"{path}: {expected}"), str(info.value)


@pytest.mark.parametrize("internal", ["origin", "deprecations"])
def test_the_fields_the_loader_fills_are_no_keys_of_a_config_file(tmp_path, internal):
    """Config's own bookkeeping (where it came from, the renamed keys it used) was taken
    from a file silently, then overwritten: a key that does nothing is a typo to name."""
    path = tmp_path / "odd.toml"
    path.write_text(f'{internal} = "x"\n')
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value) == f"{path}: field '{internal}' is unknown (appliance.example.toml lists every key)"


def test_two_model_names_that_would_share_a_replica_log_file_are_refused(tmp_path):
    """'/' is written '_' in a replica log's name: "org/m" and "org_m" both logged to
    replicas/org_m-0.log, interleaved, and `appliance logs --replica org/m#0` showed both."""
    path = tmp_path / "a.toml"
    path.write_text('[[models]]\nname = "org/m"\nsource = "a.gguf"\n[[models]]\nname = "org_m"\nsource = "b.gguf"\n')
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    text = str(info.value)
    assert f"{path}: field 'models[1].name'" in text and "'org/m'" in text and "org_m-N.log" in text, text
    path.write_text('[[models]]\nname = "org/m"\nsource = "a.gguf"\n[[models]]\nname = "org-m"\nsource = "b.gguf"\n')
    assert [m.name for m in load_config(str(path)).models] == ["org/m", "org-m"]

def test_invalid_toml_names_the_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[server\nport = 1\n")
    with pytest.raises(ConfigError, match=f"{path}: not valid TOML"):
        load_config(str(path))


def test_a_config_nested_too_deeply_is_a_clear_error_not_a_traceback(tmp_path):
    from click.testing import CliRunner

    from appliance.cli.main import main

    path = tmp_path / "deep.toml"
    path.write_text("a = " + "[" * 100_000 + "]" * 100_000 + "\n")
    result = CliRunner().invoke(main, ["check", "--config", str(path)])
    assert result.exit_code == 1 and not isinstance(result.exception, RecursionError), result.exception
    assert f"{path}: not valid TOML: arrays or tables nested too deeply" in result.output, result.output


def test_a_config_path_that_cannot_even_be_looked_at_is_a_clear_error_not_a_traceback(tmp_path, monkeypatch):
    """Path.exists() raises for a folder this user may not enter (EACCES, /etc/appliance
    0750 to an operator) or a name too long; `check` and `status` were tracebacks."""
    from click.testing import CliRunner

    from appliance.cli.main import main

    long = str(tmp_path / ("a" * 300) / "appliance.toml")
    result = CliRunner().invoke(main, ["check", "--config", long])
    assert result.exit_code == 1 and not isinstance(result.exception, OSError), result.exception
    assert result.output == f"Error: {long}: cannot read config: File name too long\n", result.output
    monkeypatch.setenv("APPLIANCE_CONFIG", long)
    result = CliRunner().invoke(main, ["status"])
    assert result.exit_code == 1 and "cannot read config: File name too long" in result.output, result.output


@pytest.mark.parametrize("server", ["llamacpp", "vllm", "sglang"])
@pytest.mark.parametrize("arg", ["--host", "--host=0.0.0.0", "--port", "--api-key", "--api-key-file", "--uds"])
def test_engine_args_may_not_override_where_a_replica_listens_or_its_key(tmp_path, server, arg):
    """args are appended last: ["--host", "0.0.0.0", "--api-key", "x"] put a llama.cpp replica
    on every interface answering a key anyone who read the config knew."""
    source = "builtin:smollm2-135m-instruct" if server == "llamacpp" else str(tmp_path)
    path = tmp_path / "a.toml"
    path.write_text(f'[[models]]\nname = "m"\nserver = "{server}"\nsource = "{source}"\n'
                    f'args = ["--threads-http", "2", "{arg}", "x"]\n')
    with pytest.raises(ConfigError, match=re.escape(f"{path}: field 'models[0].args': {arg!r} is the appliance's")):
        load_config(str(path))


def test_relative_model_sources_resolve_under_the_cache_dir():
    cfg = parse_config('[paths]\ncache_dir = "/srv/cache"\n[[models]]\nname = "a"\nsource = "a.gguf"\n')
    assert model_path(cfg, cfg.models[0]) == Path("/srv/cache/models/a.gguf")


def test_the_llama_server_defaults_to_the_current_llamacpp_image(tmp_path):
    from appliance.dist.images import llamacpp_binary

    cfg = parse_config(f'[images]\ndir = "{tmp_path}"\n')
    # No image built there: the one install.sh put next to the daemon.
    assert llamacpp_binary(cfg) == os.path.join(os.sys.prefix, "bin", "llama-server")
    image = tmp_path / "llamacpp" / "11434.0.0-x"
    (image / "bin").mkdir(parents=True)
    (image / "bin" / "llama-server").write_bytes(b"")
    (image / "image.json").write_text("{}")
    (tmp_path / "llamacpp" / "current").symlink_to(image.name)
    # The resolved image, not current/: the tag recorded is the one that runs, even if
    # `current` moves (a build, a rollback) while the engine starts.
    from appliance.dist.images import image_of

    assert llamacpp_binary(cfg) == str(image / "bin" / "llama-server")
    assert image_of(llamacpp_binary(cfg)) == "11434.0.0-x"


def test_gpu_engines_run_from_their_image_unless_a_command_is_configured():
    # No command: the supervisor runs the current engine image (tests/test_gpu_adapters.py);
    # a GPU model needs nothing more in the config.
    cfg = parse_config('[[models]]\nname = "a"\nserver = "vllm"\nsource = "/m"\n'
                       '[[models]]\nname = "b"\nserver = "sglang"\nsource = "/m"\n')
    assert cfg.engines.vllm.command == [] and cfg.engines.sglang.command == []
    cfg = parse_config('[engines.vllm]\ncommand = ["/srv/vllm/bin/vllm", "serve"]\noverhead_gib = 4\n')
    assert cfg.engines.vllm.command == ["/srv/vllm/bin/vllm", "serve"] and cfg.engines.vllm.overhead_gib == 4
    assert cfg.engines.sglang.command == []


def test_a_renamed_key_is_read_under_its_new_name_with_a_warning(monkeypatch, tmp_path):
    monkeypatch.setattr(config_mod.loading, "RENAMED_KEYS", [("server.listen_port", "server.port", "0.2.0"),
                                                     ("models[].ctx", "models[].context_length", "0.2.0"),
                                                     ("store.max_gib", "store.budget_gib", "0.2.0")])
    path = tmp_path / "old.toml"
    path.write_text('[server]\nlisten_port = 9001\n[store]\nmax_gib = 5.0\n'
                    '[[models]]\nname = "a"\nsource = "/m/a.gguf"\nctx = 1024\n'
                    '[[models]]\nname = "b"\nsource = "/m/b.gguf"\n')
    cfg = load_config(str(path))
    assert (cfg.server.port, cfg.store.budget_gib) == (9001, 5.0)
    assert [m.context_length for m in cfg.models] == [1024, config_mod.ModelConfig(name="x").context_length]
    assert list(cfg.deprecations) == [
        f"{path}: field 'server.listen_port' is deprecated: it was renamed 'server.port' in 0.2.0 and is read as "
        "that for now; rename it before the next release",
        f"{path}: field 'models[0].ctx' is deprecated: it was renamed 'models[].context_length' in 0.2.0 and is "
        "read as that for now; rename it before the next release",
        f"{path}: field 'store.max_gib' is deprecated: it was renamed 'store.budget_gib' in 0.2.0 and is read as "
        "that for now; rename it before the next release"]
    assert load_config(str(EXAMPLE)).deprecations == ()

    both = tmp_path / "both.toml"
    both.write_text("[server]\nlisten_port = 9001\nport = 9002\n")
    with pytest.raises(ConfigError, match=f"{both}: field 'server.listen_port' is the old name of 'server.port' "
                                          r"\(renamed in 0.2.0\) and both are set; keep only 'server.port'"):
        load_config(str(both))


def test_appliance_check_and_serve_say_which_keys_are_deprecated(monkeypatch, tmp_path):
    """`appliance check` (install.sh's readiness check) prints each warning; the config still loads."""
    from click.testing import CliRunner

    from appliance.cli.main import main

    monkeypatch.setattr(config_mod.loading, "RENAMED_KEYS", [("server.listen_port", "server.port", "0.2.0")])
    path = tmp_path / "old.toml"
    path.write_text(f'[server]\nlisten_port = 9001\n[paths]\nstate_dir = "{tmp_path}/s"\ncache_dir = "{tmp_path}/c"\n'
                    '[[models]]\nname = "ext"\nserver = "openai"\nurl = "http://127.0.0.1:9/v1"\n')
    result = CliRunner().invoke(main, ["check", "--config", str(path)])
    assert result.exit_code == 0, result.output
    assert f"warning: {path}: field 'server.listen_port' is deprecated: it was renamed 'server.port'" in result.output


def test_the_queue_and_cpu_settings_moved_out_of_autoscaling_are_still_read_with_a_warning():
    cfg = parse_config("[autoscaling]\ninterval_s = 2\nmax_queue = 7\nqueue_timeout_s = 9\nkeepalive_s = 0\n"
                       "cpu_cores = 3\n", "old.toml")
    assert (cfg.queue.max_held, cfg.queue.timeout_s, cfg.queue.keepalive_s, cfg.cpu.cores) == (7, 9, 0, 3)
    assert cfg.autoscaling.interval_s == 2
    assert [w.split(":")[1].split("'")[1] for w in cfg.deprecations] == [
        "autoscaling.max_queue", "autoscaling.queue_timeout_s", "autoscaling.keepalive_s", "autoscaling.cpu_cores"]
    assert "renamed 'queue.max_held' in 0.2.0" in cfg.deprecations[0]
    with pytest.raises(ConfigError, match="both are set; keep only 'cpu.cores'"):
        parse_config("[autoscaling]\ncpu_cores = 3\n[cpu]\ncores = 2\n", "both.toml")


def test_durations_are_parsed_once_at_load():
    cfg = parse_config('[autoscaling]\nidle_ttl = "5m"\n[[models]]\nname = "a"\nsource = "a.gguf"\n'
                       '[models.autoscaling]\nmin_residency = "90s"\n')
    model = cfg.models[0]
    assert (cfg.autoscaling.idle_ttl.seconds, model.autoscaling.min_residency.seconds) == (300, 90)
    assert str(cfg.autoscaling.idle_ttl) == "5m" and not model.autoscaling.scale_to_zero_after


def test_context_per_request_sets_the_total_the_slots_share():
    cfg = parse_config('[[models]]\nname = "m"\nsource = "builtin:smollm2-135m-instruct"\nparallel = 4\n'
                       "context_per_request = 4096\n")
    from appliance.config import request_context

    assert cfg.models[0].context_length == 16384 and request_context(cfg.models[0]) == 4096
    with pytest.raises(ConfigError, match=r"models\[0\]\.context_per_request"):
        parse_config('[[models]]\nname = "m"\nsource = "builtin:smollm2-135m-instruct"\ncontext_per_request = 10\n')


@pytest.mark.parametrize(("args", "per_request"), [
    ([], 2048),
    (["--kv-unified"], 8192),
    (["-kvu"], 8192),
    (["-kvu", "--no-kv-unified"], 2048),  # llama-server reads the last of them
])
def test_a_unified_kv_cache_gives_one_llamacpp_request_the_whole_context(args, per_request):
    """llama-server with --kv-unified (-kvu in a model's args) lets one slot use the whole
    shared context: its requests' max_tokens up to context_length are not a 400
    context_length_exceeded (capabilities.check_fields reads request_context)."""
    from appliance.config import request_context

    cfg = parse_config('[[models]]\nname = "m"\nsource = "builtin:smollm2-135m-instruct"\nparallel = 4\n'
                       f"context_length = 8192\nargs = {json.dumps(args)}\n")
    assert request_context(cfg.models[0]) == per_request
