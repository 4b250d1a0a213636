"""The README's quick start and CI agree, and what the docs promise exists."""

from __future__ import annotations

import re

from .conftest import ROOT

README = (ROOT / "README.md").read_text()


def quick_start_commands() -> list[str]:
    section = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.+?)\n```", section)


def test_the_quick_start_is_exactly_two_commands():
    commands = quick_start_commands()
    assert commands == ["./install.sh && appliance serve",
                        "./install.sh --dev && .ci/lint && .venv/bin/python -m pytest"]


def test_ci_runs_exactly_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1] == quick_start_commands()[1]


def test_the_readme_opens_with_what_the_appliance_is():
    opening = README.split("## ", 1)[0]
    assert "OpenAI-compatible" in opening and "on-prem" in opening


def test_every_endpoint_in_the_readme_is_served():
    from appliance.api.app import create_app
    from appliance.config import parse_config

    app = create_app(parse_config(""))
    placeholder = re.compile(r"\{[^}]*\}")  # {id} in the README, {model_id:path} in a route
    served = {placeholder.sub("{}", route.path) for route in app.routes}
    documented = {placeholder.sub("{}", p) for p in re.findall(r"`(?:GET|POST) (/[^`]*)`", README)}
    assert documented and documented <= served, documented - served


def test_files_the_readme_links_exist():
    for link in re.findall(r"\]\(([^)#]+)\)", README):
        if not link.startswith("http"):
            assert (ROOT / link).exists(), link


def test_the_pinned_model_hash_matches_the_one_serve_verifies():
    from appliance.config import EMBEDDED_MODEL_SHA256

    pin = (ROOT / "images" / "llamacpp" / "pin.env").read_text()
    assert f"MODEL_SHA256={EMBEDDED_MODEL_SHA256}" in pin


def test_every_appliance_command_in_the_readme_exists():
    import subprocess
    import sys

    commands = set(re.findall(r"^appliance ([a-z]+(?: ls)?)", README, flags=re.M))
    assert {"serve", "status", "models ls", "plan"} <= commands
    for command in commands:
        result = subprocess.run([sys.executable, "-m", "appliance.cli", *command.split(), "--help"],
                                capture_output=True, text=True, cwd=ROOT, timeout=30)
        assert result.returncode == 0, (command, result.stderr)


def test_the_gpu_doc_inventory_example_loads(tmp_path):
    from appliance.gpu.probe import load_inventory

    doc = (ROOT / "docs" / "gpu.md").read_text()
    example = re.search(r"```toml\n(.+?)```", doc, flags=re.S).group(1)
    path = tmp_path / "inv.toml"
    path.write_text(example)
    inv = load_inventory(path)
    assert len(inv.gpus) == 8 and inv.gpus[0].processes[0].pid == 4242


MODEL_STORE = (ROOT / "docs" / "model-store.md").read_text()


def test_every_command_in_the_model_store_doc_exists():
    import subprocess
    import sys

    commands = set(re.findall(r"^appliance ((?:models|images|bundle) [a-z-]+)", MODEL_STORE, flags=re.M))
    assert len(commands) == 14, commands  # every models, images and bundle command
    for command in commands:
        result = subprocess.run([sys.executable, "-m", "appliance.cli", *command.split(), "--help"],
                                capture_output=True, text=True, cwd=ROOT, timeout=30)
        assert result.returncode == 0, (command, result.stderr)


def test_the_model_store_doc_config_loads():
    from appliance.config import parse_config

    for snippet in re.findall(r"```toml\n(.+?)```", MODEL_STORE, flags=re.S):
        cfg = parse_config(snippet, origin="docs/model-store.md")
        assert cfg.models[0].source == "store:smollm2"


def test_the_model_store_doc_names_the_integrity_settings_with_their_defaults():
    from appliance.config import StoreConfig

    section = MODEL_STORE.split("## Integrity at serve time", 1)[1].split("\n## ", 1)[0]
    defaults = StoreConfig()
    for field in ("scrub_interval_h", "scrub_mb_per_s"):
        assert f"`store.{field}`" in section, field
        assert f"default {getattr(defaults, field):g}" in section, field


def test_the_autoscaling_doc_names_real_commands_and_settings():
    import msgspec

    from appliance.config import AutoscalerConfig, CpuConfig, QueueConfig

    doc = (ROOT / "docs" / "autoscaling.md").read_text()
    for section in (AutoscalerConfig, QueueConfig, CpuConfig):
        for field in msgspec.structs.fields(section):
            if field.name in ("interval_s", "idle_ttl", "stabilization_s", "cooldown_s", "max_held",
                              "timeout_s", "keepalive_s", "cores"):
                assert field.name in doc, field.name
    for command in re.findall(r"^appliance (\w+)", doc, flags=re.M):
        assert command in ("scale", "load", "unload", "pin", "unpin"), command


ROUTING = (ROOT / "docs" / "routing.md").read_text()


def test_the_routing_doc_config_loads_and_refuses_what_it_says(tmp_path, monkeypatch):
    from appliance.config import ConfigError, parse_config

    snippets = re.findall(r"```toml\n(.+?)```", ROUTING, flags=re.S)
    cfg = parse_config("\n".join(snippets), origin="docs/routing.md")
    assert [r.name for r in cfg.routes] == ["claims", "general"] and cfg.routes[0].regulated
    assert cfg.providers[0].name == "openai"
    bad = snippets[0].replace('regulated = true ', 'fallbacks = ["openai"]\nregulated = true ', 1)
    try:
        parse_config(bad, origin="docs/routing.md")
    except ConfigError as exc:
        assert "route 'claims' is regulated" in str(exc)
    else:
        raise AssertionError("a regulated route with a commercial fallback was accepted")


def test_every_command_in_the_routing_doc_exists():
    import subprocess
    import sys

    commands = set(re.findall(r"^appliance (keys [a-z]+)", ROUTING, flags=re.M))
    assert commands == {"keys create", "keys ls", "keys set", "keys revoke"}
    for command in commands:
        result = subprocess.run([sys.executable, "-m", "appliance.cli", *command.split(), "--help"],
                                capture_output=True, text=True, cwd=ROOT, timeout=30)
        assert result.returncode == 0, (command, result.stderr)


def test_the_module_map_names_every_module_and_nothing_else():
    """docs/architecture.md's module map: every module of appliance/ under its package, so a
    newcomer finds each behaviour's owner there; a module that moved or went leaves no row."""
    section = (ROOT / "docs" / "architecture.md").read_text().split("## Module map", 1)[1].split("\n## ", 1)[0]
    mapped, package = set(), None
    for line in section.splitlines():
        heading = re.match(r"\| \*\*(appliance/(?:\w+/)?)\*\*", line)
        if heading:
            package = heading.group(1)
            continue
        row = re.match(r"\| `(\w+\.py)` \|", line)
        if row and package:
            mapped.add(package + row.group(1))
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "appliance").rglob("*.py")
               if p.name not in ("__init__.py", "__main__.py") and p.parent.name != "export"}
    assert mapped == modules


def test_every_description_of_a_regulated_route_says_what_it_may_reach_not_this_server_only():
    """README, routing.md, the example config and the config's own message said regulated
    routes "never leave this server", yet one may reach a provider declared commercial = false
    (the operator's server, maybe another host) and target a cluster model: a reviewer reading
    any one of them was misled. Each says what it may reach, in the same words."""
    import glob

    from appliance.config import ConfigError, parse_config

    misleading = re.compile(r"never leaves? (this server|the box)|served on this server only|off this server: refused")
    texts = ["README.md", "appliance.example.toml", *glob.glob("docs/*.md", root_dir=ROOT),
             *glob.glob("appliance/**/*.py", root_dir=ROOT, recursive=True)]
    said = {path: misleading.findall((ROOT / path).read_text()) for path in texts}
    assert not {path: found for path, found in said.items() if found}
    reach = "commercial = false"
    for path in ("README.md", "docs/routing.md", "appliance.example.toml"):
        assert reach in (ROOT / path).read_text(), path
    snippets = re.findall(r"```toml\n(.+?)```", ROUTING, flags=re.S)
    try:
        parse_config(snippets[0].replace("regulated = true ", 'fallbacks = ["openai"]\nregulated = true ', 1))
    except ConfigError as exc:
        assert "providers declared commercial = false" in str(exc) and "never leaves" not in str(exc)
    else:
        raise AssertionError("a regulated route falling back to a commercial provider was accepted")
