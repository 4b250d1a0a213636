"""`--json` on every command (issue 19): one JSON document on stdout per command, its
progress and notes on stderr; `keys create --json` gives the key in a field; the store's
"pin" is `models protect` now (the old spelling kept, hidden)."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime

import click
import pytest
from click.testing import CliRunner

from appliance.cli.main import main

from .test_store import gguf, run

# Commands with no document to print: the daemon itself, the interactive TUI, and the
# audit export (its output is the export, in --format jsonl or csv).
NO_DOCUMENT = {"serve", "tui", "audit export"}


def _leaves(cmd: click.Command, path: tuple[str, ...] = ()):
    if isinstance(cmd, click.Group):
        for name, sub in cmd.commands.items():
            if not sub.hidden:
                yield from _leaves(sub, (*path, name))
    else:
        yield " ".join(path), cmd


@pytest.mark.parametrize(("name", "command"), list(_leaves(main)), ids=lambda v: v if isinstance(v, str) else "")
def test_every_command_takes_json(name, command):
    if name in NO_DOCUMENT:
        pytest.skip(f"{name}: no --json (see the module docstring)")
    assert any("--json" in p.opts for p in command.params), f"`appliance {name}` has no --json"


def test_keys_create_json_gives_the_key_in_a_field_and_ls_never_shows_it(tmp_path):
    created = json.loads(run(tmp_path, "keys", "create", "--name", "script", "--rpm", "5", "--json").stdout)
    assert created["key"].startswith("ak-") and created["name"] == "script" and created["rpm"] == 5
    listed = json.loads(run(tmp_path, "keys", "ls", "--json").stdout)
    assert [k["id"] for k in listed] == [created["id"]]
    assert created["key"] not in json.dumps(listed)
    assert listed[0]["created_at"].endswith("Z") and listed[0]["revoked_at"] is None  # ISO times in JSON
    revoked = json.loads(run(tmp_path, "keys", "revoke", created["id"], "--json").stdout)
    assert revoked["id"] == created["id"] and revoked["revoked"] is True


def test_models_protect_is_the_stores_pin_and_the_old_spelling_still_works(tmp_path):
    run(tmp_path, "models", "import", str(gguf(tmp_path / "a.gguf")), "--name", "a", "--quiet")
    protected = json.loads(run(tmp_path, "models", "protect", "a", "--json").stdout)
    assert protected["name"] == "a" and protected["pinned"] is True
    assert "evictable again" in run(tmp_path, "models", "unprotect", "a").stdout
    run(tmp_path, "models", "pin", "a")  # hidden alias
    assert json.loads(run(tmp_path, "models", "ls", "--json", "--port", "1").stdout)[-1]["pinned"] is True
    listed = CliRunner().invoke(main, ["models", "--help"]).output
    assert "protect" in listed and " pin " not in listed
    removed = json.loads(run(tmp_path, "models", "rm", "a", "--json").stdout)
    assert removed == {"name": "a", "removed": True}


def test_model_actions_print_the_model_after_the_action_as_json(daemons):
    import subprocess

    from .conftest import PY, ROOT, fake_model

    d = daemons.start(fake_model("fake"))

    def cli(*args: str) -> dict:
        out = subprocess.run([PY, "-m", "appliance.cli", *args, "--config", str(d.config), "--json"],
                             capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    assert cli("pin", "fake")["pinned"] is True
    assert cli("scale", "fake", "1")["override"] == 1
    assert cli("unpin", "fake")["pinned"] is False
    assert cli("check")["ok"] is True


def test_scale_above_max_replicas_says_it_was_clamped_and_logs_it_at_info(daemons):
    import subprocess

    from .conftest import PY, ROOT, fake_model

    d = daemons.start(fake_model("fake", extra="[models.autoscaling]\nmax_replicas = 2\n"))
    out = subprocess.run([PY, "-m", "appliance.cli", "scale", "fake", "5", "--config", str(d.config)],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "clamped to 2 because max_replicas = 2" in out.stdout, out.stdout
    assert "(operator set 2" in out.stdout  # the state after the action
    said = json.loads(subprocess.run([PY, "-m", "appliance.cli", "unload", "fake", "--config", str(d.config),
                                      "--json"], capture_output=True, text=True, cwd=ROOT, timeout=60).stdout)
    assert said["said"].startswith("stopping 2 replicas")
    log = d.log_text()
    assert "INFO" in next(line for line in log.splitlines() if "operator scale 5 fake" in line)


def test_ps_shows_each_replica_with_engine_state_place_memory_and_uptime(daemons):
    import subprocess

    from .conftest import PY, ROOT, fake_model

    idles = '[models.autoscaling]\nmin_replicas = 0\nscale_to_zero_after = "1h"\n'
    d = daemons.start(fake_model("fake") + fake_model("idles", extra=idles))

    def cli(*args: str) -> str:
        out = subprocess.run([PY, "-m", "appliance.cli", *args, "--config", str(d.config)],
                             capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout

    header, row = cli("ps").splitlines()[:2]
    assert header.split()[:4] == ["REPLICA", "ENGINE", "IMAGE", "STATE"]
    assert row.split()[0] == "fake#0" and "openai" in row and "READY" in row
    assert " MiB" in row  # its engine's resident memory
    [replica] = json.loads(cli("ps", "--json"))
    cli("load", "idles")
    [line] = [li for li in cli("ps").splitlines() if li.startswith("idles#0")]
    assert re.search(r" in (59m\d\ds|1h00m) ", line), line  # unloaded once idle for an hour
    [idles] = [r for r in json.loads(cli("ps", "--json")) if r["model"] == "idles"]
    in_s = (datetime.fromisoformat(idles["idle_unload_at"]) - datetime.now(UTC)).total_seconds()
    assert 3000 < in_s <= 3600
    assert replica["model"] == "fake" and replica["rss_bytes"] > 0 and replica["uptime_s"] >= 0
    # What the text columns add, in JSON: the memory measured, times as ISO timestamps.
    assert replica["memory_bytes"] == replica["rss_bytes"]
    assert datetime.fromisoformat(replica["ready_since"]).tzinfo is not None
    assert replica["idle_unload_at"] is None  # fake_model keeps a replica (min_replicas = 1)
    assert "up " in cli("status") and "s  config" in cli("status")


def test_durations_read_at_a_glance():
    from appliance.cli.main import human_duration

    assert [human_duration(s) for s in (5, 365.8, 3 * 3600 + 125, 2 * 86400 + 4 * 3600)] == \
        ["5s", "6m05s", "3h02m", "2d04h"]
