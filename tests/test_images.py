"""Engine images: the llamacpp image is built, recorded, verified, rolled back and launched
here; the GPU images' definitions are checked (hashed pins that resolve on PyPI)."""

from __future__ import annotations

import json
import os
import shutil
import re
import subprocess
import urllib.error
import urllib.request

import pytest

from appliance.images import definition, hashed_requirements

from .conftest import PY, ROOT

BUILD_CACHE = os.environ.get("APPLIANCE_BUILD_CACHE") or os.path.expanduser("~/.cache/appliance-build")
needs_llama_build = pytest.mark.skipif(
    not any(p.startswith("llama-server-") for p in os.listdir(BUILD_CACHE)) if os.path.isdir(BUILD_CACHE)
    else True, reason="install.sh builds and caches llama-server first")


def appliance(tmp_path, *args, env=None, check=True):
    cfg = tmp_path / "appliance.toml"
    cfg.write_text(f'[images]\ndir = "{tmp_path}/images"\n[paths]\ncache_dir = "{tmp_path}/cache"\n')
    result = subprocess.run([PY, "-m", "appliance.cli", *args, "--config", str(cfg)], capture_output=True,
                            text=True, cwd=ROOT, timeout=600, env={**os.environ, **(env or {})})
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.mark.parametrize("engine", ["llamacpp", "vllm", "sglang"])
def test_every_image_definition_pins_version_python_and_hashed_requirements(engine):
    d = definition(engine)
    assert d.version and d.python.startswith("3.")
    reqs = hashed_requirements(d.requirements)
    assert reqs and all("==" in pin and hashes and all(len(h.split(":")[1]) == 64 for h in hashes)
                        for pin, hashes in reqs)
    if engine == "llamacpp":
        pin = (ROOT / "images" / "llamacpp" / "pin.env").read_text()
        assert f"LLAMACPP_SDIST_VERSION={d.version}" in pin
    else:
        assert f"{engine}=={d.version}" in [p for p, _ in reqs]
        assert (d.folder / "README.md").read_text().count("requirements.lock") >= 1


def _simple_index(name: str) -> str:
    """PyPI's simple index page of a project: every file with its #sha256= fragment."""
    try:
        with urllib.request.urlopen(f"https://pypi.org/simple/{name}/", timeout=15) as r:
            return r.read().decode()
    except urllib.error.HTTPError:
        raise
    except OSError as exc:
        pytest.skip(f"PyPI not reachable: {exc}")


@pytest.mark.parametrize("engine", ["llamacpp", "vllm", "sglang"])
def test_pinned_hashes_are_files_pypi_serves_for_the_pins(engine):
    for pin, hashes in hashed_requirements(definition(engine).requirements):
        name, version = pin.split("==")
        page = _simple_index(name)
        for h in hashes:
            match = re.search(r'href="[^"]*/([^/"#]+)#sha256=' + h.split(":")[1], page)
            assert match, (pin, h)
            assert f"-{version}-" in match.group(1) or f"-{version}." in match.group(1), (pin, match.group(1))


@needs_llama_build
def test_llamacpp_image_builds_records_verifies_rolls_back_and_is_what_serve_launches(tmp_path):
    env = {"APPLIANCE_BUILD_CACHE": BUILD_CACHE}
    appliance(tmp_path, "images", "build", "llamacpp", env=env)
    rows = json.loads(appliance(tmp_path, "images", "ls", "--json").stdout)
    assert [(r["engine"], r["version"], r["current"]) for r in rows] == [("llamacpp", "11434.0.0", True)]
    first = rows[0]["tag"]
    binary = tmp_path / "images" / "llamacpp" / "current" / "bin" / "llama-server"
    assert os.access(binary, os.X_OK)
    assert "up to date" in appliance(tmp_path, "images", "build", "llamacpp", env=env).stdout
    assert "ok: llamacpp" in appliance(tmp_path, "images", "verify").stdout

    from appliance.config import parse_config

    cfg = parse_config(f'[images]\ndir = "{tmp_path}/images"\n')
    assert cfg.engines.llamacpp.binary == str(binary)

    # A changed definition is a new version; the previous one stays for rollback.
    defs = tmp_path / "defs"
    shutil.copytree(ROOT / "images", defs)
    with open(defs / "llamacpp" / "image.toml", "a") as f:
        f.write("# rebuilt\n")
    appliance(tmp_path, "images", "build", "llamacpp", env={**env, "APPLIANCE_IMAGE_DEFS": str(defs)})
    rows = json.loads(appliance(tmp_path, "images", "ls", "--json").stdout)
    assert len(rows) == 2 and next(r for r in rows if r["current"])["tag"] != first
    refused = appliance(tmp_path, "images", "rm", "llamacpp",
                        next(r for r in rows if r["current"])["tag"], check=False)
    assert refused.returncode == 1 and "is the current image" in refused.stderr
    assert first in appliance(tmp_path, "images", "rollback", "llamacpp").stdout
    assert next(r for r in json.loads(appliance(tmp_path, "images", "ls", "--json").stdout)
                if r["current"])["tag"] == first

    os.chmod(binary, 0o755)
    with open(binary, "ab") as f:
        f.write(b"tampered")
    bad = appliance(tmp_path, "images", "verify", "llamacpp", check=False)
    assert bad.returncode == 1 and "bin/llama-server: sha256" in bad.stderr
