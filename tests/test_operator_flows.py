"""The flows an operator runs by hand, as the operator sees them: what each command's
--help says, exit codes, and what the daemon's log and `status --json` never show."""

from __future__ import annotations

import json
import os
import subprocess

from appliance.socket_token import read_token

from .conftest import PY, ROOT, engine_key, fake_model, wait_until

CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}


def cli(daemon, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "appliance.cli", *args, "--config", str(daemon.config)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)


def test_no_secret_reaches_the_daemon_log_the_replica_logs_or_status_json(daemons, tmp_path):
    """After a session of requests with good, wrong and revoked API keys, admin calls with a
    right and a wrong admin token: no API key, admin token, socket token or engine key in
    any line of the daemon's log (at debug), a replica's log, or `appliance status --json`."""
    token = tmp_path / "admin.token"
    token.write_text("adm1n-t0ken-" + "z" * 32 + "\n")
    token.chmod(0o600)
    daemon = daemons.start(fake_model("fake", "--chunks", "3"),
                           server=f'admin_token_file = "{token}"\nlog_level = "debug"',
                           extra="[keys]\nrequired = true\n\n[audit]\nflush_interval_s = 0.2\n")
    created = cli(daemon, "keys", "create", "--name", "ops", "--json")
    assert created.returncode == 0, created.stderr
    created = json.loads(created.stdout)
    key, key_id = created["key"], created["id"]
    revoked = json.loads(cli(daemon, "keys", "create", "--name", "gone", "--json").stdout)
    assert cli(daemon, "keys", "revoke", revoked["id"]).returncode == 0
    wrong = key[:-6] + "ZZZZZZ"  # a key mistyped: as secret as the key itself
    admin = token.read_text().strip()
    with daemon.client() as c:
        for bearer in (key, wrong, revoked["key"], "sk-not-a-key-" + "q" * 30, key, key):
            c.post("/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {bearer}"})
        c.post("/v1/chat/completions", json={**CHAT, "model": "nope"}, headers={"Authorization": f"Bearer {key}"})
        c.get("/v1/models", headers={"Authorization": f"Bearer {wrong}"})
        c.get("/admin/status", headers={"Authorization": f"Bearer {admin}"})
        c.get("/admin/status", headers={"Authorization": f"Bearer {admin}x"})
        c.get("/admin/status", headers={"X-Api-Key": key})
    status = cli(daemon, "status", "--json")
    assert status.returncode in (0, 3), status.stderr
    replicas = [r for m in json.loads(status.stdout)["models"] for r in m["replicas"] if r["pid"]]
    secrets = {"api key": key, "mistyped api key": wrong, "revoked key": revoked["key"], "admin token": admin,
               "socket token": read_token(daemon.admin_socket),
               **{f"engine key of pid {r['pid']}": engine_key(r["pid"]) for r in replicas}}
    secrets["api key's secret part"] = key.split(f"{key_id}-", 1)[1]
    daemon.terminate()
    places = {"daemon log": daemon.log_text(), "status --json": status.stdout,
              **{f"replica log {p.name}": p.read_text(errors="replace")
                 for p in (daemon.config.parent / "log").rglob("*.log")}}
    found = [f"{what} in {where}" for what, secret in secrets.items() if secret
             for where, text in places.items() if secret in text]
    assert not found, found


def _commands(group, path=()):
    import click

    yield path, group
    if isinstance(group, click.Group):
        for name, command in sorted(group.commands.items()):
            yield from _commands(command, (*path, name))


def test_every_command_s_help_says_what_it_does_with_an_example_that_parses():
    """`appliance scale --help` (and every other) gave no example: an operator new to the
    product had to guess whether REPLICAS was a number, or where --config went. Each
    example is parsed against its command, so none names a flag that is gone."""
    import shlex

    from click.testing import CliRunner

    from appliance.cli.main import main

    missing, broken = [], []
    for path, command in _commands(main):
        shown = CliRunner().invoke(main, [*path, "--help"])
        assert shown.exit_code == 0, (path, shown.output)
        examples = [line.strip() for line in shown.output.split("Examples:", 1)[-1].splitlines()
                    if line.strip().startswith("appliance ")] if "Examples:" in shown.output else []
        if not examples or not command.help:
            missing.append(" ".join(path) or "appliance")
        for example in examples:
            words = shlex.split(example)[1:]
            target = main
            while hasattr(target, "commands") and words and words[0] in target.commands:
                target = target.commands[words.pop(0)]
            try:
                target.make_context(example, words)
            except Exception as exc:  # noqa: BLE001 - any refusal is the finding
                broken.append(f"{example}: {exc}")
    assert not missing, f"no help text or no example: {missing}"
    assert not broken, broken
    assert "Exit status: 0 done; 1 failed" in CliRunner().invoke(main, ["--help"]).output


def test_exit_codes_are_the_documented_ones_and_2_is_only_a_usage_error(tmp_path):
    """`appliance plan` exited 2 when a replica could not be placed: the status click gives
    a usage error, so a script could not tell "does not fit" from "wrong flag"."""
    doc = (ROOT / "docs" / "operations.md").read_text().split("## The command line", 1)[1].split("\n## ", 1)[0]
    table = {line.split("|")[1].strip(): line for line in doc.splitlines() if line.startswith("| ")}
    assert {"0", "1", "2", "3"} <= set(table), table
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text('{"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 2}')
    (model / "model.safetensors").write_bytes(b"\0" * 1024)
    cfg = tmp_path / "a.toml"
    cfg.write_text(f'[server]\nport = 1\n[[models]]\nname = "big"\nserver = "vllm"\nsource = "{model}"\n'
                   f'[paths]\nstate_dir = "{tmp_path}/st"\ncache_dir = "{tmp_path}/c"\nlog_dir = "{tmp_path}/l"\n')

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([PY, "-m", "appliance.cli", *args], capture_output=True, text=True, cwd=ROOT, timeout=60)

    (tmp_path / "none.toml").write_text("# no GPUs\n")
    unplaced = run("plan", "--config", str(cfg), "--inventory", str(tmp_path / "none.toml"))
    assert unplaced.returncode == 3 and "big#0: cannot place" in unplaced.stdout, unplaced.stdout + unplaced.stderr
    down = run("status", "--config", str(cfg), "--json")
    assert down.returncode == 1 and down.stdout == "" and down.stderr.startswith("Error: the daemon is not running")
    for usage in (["plan", "--no-such-flag"], ["no-such-command"], ["scale", "m", "many", "--config", str(cfg)]):
        result = run(*usage)
        assert result.returncode == 2 and result.stdout == "" and "Traceback" not in result.stderr, (usage, result)


def test_an_empty_config_path_is_a_usage_error_not_the_built_in_defaults(tmp_path):
    """`appliance serve --config "$CFG"` with CFG unset started the built-in defaults (the
    bundled model on the default paths) as if no --config had been given."""
    for command in (["serve"], ["check"], ["status"], ["keys", "ls"]):
        result = subprocess.run([PY, "-m", "appliance.cli", *command, "--config", ""], capture_output=True,
                                text=True, cwd=ROOT, timeout=60, env={**os.environ, "XDG_STATE_HOME": str(tmp_path)})
        assert result.returncode == 2, (command, result.stdout, result.stderr[-500:])
        assert "Invalid value for '--config': an empty path" in result.stderr and result.stdout == ""


def test_serve_refuses_an_unopenable_log_file_or_a_file_as_state_dir_in_one_line(tmp_path):
    """A server.log_file that cannot be opened (a directory, a folder not there in /proc)
    ended `appliance serve` in a traceback from the logging setup; a state_dir that is a
    file said "not writable ...: File exists"."""
    (tmp_path / "a-dir.log").mkdir()
    (tmp_path / "a-file").write_text("")
    cases = {
        "server.log_file": (f'log_file = "{tmp_path / "a-dir.log"}"', f'state_dir = "{tmp_path}/st"'),
        "paths.state_dir": ("", f'state_dir = "{tmp_path / "a-file"}"'),
    }
    for field, (server, state) in cases.items():
        cfg = tmp_path / "a.toml"
        cfg.write_text(f"[server]\nport = 1\n{server}\n[paths]\n{state}\n"
                       f'cache_dir = "{tmp_path}/c"\nlog_dir = "{tmp_path}/l"\n')
        result = subprocess.run([PY, "-m", "appliance.cli", "serve", "--config", str(cfg)],
                                capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-800:]
        [line] = result.stderr.splitlines()
        assert line.startswith(f"Error: {cfg}: field '{field}': "), line
    assert "is a file; point paths.state_dir elsewhere" in line


def test_a_user_who_may_not_open_the_admin_socket_is_told_so_not_only_that_tcp_needs_a_token(
        daemons, monkeypatch):
    """An operator not in the daemon's group ran `appliance status` and read only the daemon's
    "Admin API over TCP needs the admin token ..., or use the admin socket": nothing said the
    CLI had found the socket and could not open it, nor what to do about that."""
    import os as os_module

    from click.testing import CliRunner

    from appliance.cli.main import main

    daemon = daemons.start(fake_model("fake"), extra="[keys]\nrequired = true\n")
    socket = str(daemon.admin_socket)
    real_access = os_module.access
    monkeypatch.setattr(os_module, "access", lambda p, mode, **kw: str(p) != socket and real_access(p, mode, **kw))
    result = CliRunner().invoke(main, ["status", "--config", str(daemon.config)])
    assert result.exit_code == 1, result.output
    assert "Admin API over TCP needs the admin token" in result.output, result.output
    assert f"may not open the admin socket {socket}: run as root or the daemon's user, or add yourself to group" \
        in result.output, result.output


def test_serve_with_a_model_file_missing_says_how_to_fix_it(tmp_path):
    """"weights not found at /srv/m.gguf" said what, never how: the field to correct, or the
    store to import it into."""
    cfg = tmp_path / "a.toml"
    cfg.write_text(f'[server]\nport = 1\n[paths]\nstate_dir = "{tmp_path}/st"\ncache_dir = "{tmp_path}/c"\n'
                   f'log_dir = "{tmp_path}/l"\n[[models]]\nname = "m"\nsource = "{tmp_path}/gone.gguf"\n')
    result = subprocess.run([PY, "-m", "appliance.cli", "serve", "--config", str(cfg)],
                            capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-800:]
    [line] = result.stderr.splitlines()
    assert line == (f"Error: {cfg}: field 'models[0].source': model 'm': weights not found at {tmp_path}/gone.gguf; "
                    "correct models[0].source, or import the model (`appliance models import PATH --name NAME`) "
                    'and set source = "store:NAME"'), line


def test_a_replica_the_daemon_gave_up_on_says_why_where_its_log_is_and_restarts_from_the_cli(daemons):
    """A crash-looping engine, as the operator meets it: `status` said "starting" and only the
    last crash's reason, so nothing told that no restart was coming, and no CLI command
    restarted it (only the TUI's r). Now: "not ready (boom#0 FATAL", the give-up with its
    count and setting, the commands for its log and another try; `appliance restart` works."""
    daemon = daemons.start(fake_model("fake") + fake_model("boom", "--crash-after", "1"), wait=False,
                           supervisor="max_crashes = 1\ncrash_window_s = 600")
    wait_until(lambda: any(r["state"] == "FATAL" for r in daemon.replicas("boom")) if daemon.admin_socket.exists()
               and read_token(daemon.admin_socket) else False, 60, what="boom#0 FATAL")
    shown = cli(daemon, "status")
    assert shown.returncode == 3
    assert "not ready (boom#0 FATAL" in shown.stdout.splitlines()[0]
    assert ("last error: gave up after 2 crashes within 600s (supervisor.max_crashes = 1); "
            "last: engine exited (exit code 3)") in shown.stdout, shown.stdout
    assert ("its log: appliance logs --replica boom#0 --no-follow; once fixed: appliance restart boom#0"
            in shown.stdout)
    log = cli(daemon, "logs", "--replica", "boom#0", "--no-follow")
    assert log.returncode == 0 and "--crash-after 1" in log.stdout
    restarted = cli(daemon, "restart", "boom#0")
    assert restarted.returncode == 0 and "boom#0" in restarted.stdout, restarted.stderr
    wait_until(lambda: "replica boom#0 FATAL -> STOPPED: restart requested by the operator" in daemon.log_text(),
               10, what="the restart in the daemon's log")
    bad = cli(daemon, "restart", "boom")
    assert bad.returncode == 2 and "expected MODEL#N" in bad.stderr


def test_a_replica_number_in_other_digits_is_a_usage_error_not_a_traceback():
    """'²'.isdigit() is true and int('²') raises: `appliance restart boom#²` was a traceback."""
    for replica in ("boom#²", "boom#١"):
        result = subprocess.run([PY, "-m", "appliance.cli", "restart", replica], capture_output=True, text=True,
                                cwd=ROOT, timeout=60)
        assert result.returncode == 2, result.stderr
        assert "expected MODEL#N" in result.stderr and "Traceback" not in result.stderr, result.stderr
