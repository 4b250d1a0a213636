"""The flows an operator runs by hand, as the operator sees them: what each command's
--help says, exit codes, and what the daemon's log and `status --json` never show."""

from __future__ import annotations

import subprocess

from .conftest import PY, ROOT

CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}


def cli(daemon, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "appliance.cli", *args, "--config", str(daemon.config)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)


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
