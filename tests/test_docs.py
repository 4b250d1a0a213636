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
                        "./install.sh --dev && .venv/bin/python -m pytest"]


def test_ci_runs_exactly_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1] == quick_start_commands()[1]


def test_the_readme_opens_with_what_the_appliance_is():
    opening = README.split("## ", 1)[0]
    assert "OpenAI-compatible" in opening and "on-prem" in opening


def test_every_endpoint_in_the_readme_is_served():
    from appliance.app import create_app
    from appliance.config import parse_config

    app = create_app(parse_config(""))
    served = {route.path for route in app.routes}
    documented = set(re.findall(r"`(?:GET|POST) (/[^`]*)`", README))
    documented = {p.replace("{id}", "{model_id:path}") for p in documented}
    assert documented and documented <= served, documented - served


def test_files_the_readme_links_exist():
    for link in re.findall(r"\]\(([^)#]+)\)", README):
        if not link.startswith("http"):
            assert (ROOT / link).exists(), link


def test_the_pinned_model_hash_matches_the_one_serve_verifies():
    from appliance.config import EMBEDDED_MODEL_SHA256

    pin = (ROOT / "images" / "llamacpp" / "pin.env").read_text()
    assert f"MODEL_SHA256={EMBEDDED_MODEL_SHA256}" in pin
