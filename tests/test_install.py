"""install.sh as an operator runs it: a real install into a fresh prefix that then
serves completions, and a second run that changes nothing."""

from __future__ import annotations

import os
import subprocess
import time

import httpx
import pytest

from .conftest import ROOT, DaemonFactory, free_port, wait_until

# A fresh install is a venv and a pip install: minutes on a loaded 2-core machine.
pytestmark = pytest.mark.timeout(1800)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    base = tmp_path_factory.mktemp("install")
    env = {**os.environ, "APPLIANCE_PREFIX": str(base / "venv"),
           "APPLIANCE_BIN_LINK": str(base / "bin" / "appliance")}
    first = subprocess.run([str(ROOT / "install.sh")], capture_output=True, text=True, env=env,
                           timeout=1800)
    assert first.returncode == 0, first.stdout + first.stderr
    return base, env, first


def _fingerprint(venv):
    files = [venv / "bin" / "llama-server", venv / ".appliance-installed",
             venv / "share/appliance/models/SmolLM2-135M-Instruct.Q4_1.gguf"]
    return {str(f): (f.stat().st_mtime_ns, f.stat().st_size) for f in files}


def test_a_second_install_changes_nothing(installed):
    base, env, _ = installed
    before = _fingerprint(base / "venv")
    again = subprocess.run([str(ROOT / "install.sh")], capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stderr
    out = again.stdout + again.stderr
    assert "Python packages up to date" in out
    assert "llama-server up to date" in out
    assert "bundled model up to date" in out
    assert "building llama-server" not in out
    assert _fingerprint(base / "venv") == before


def test_the_installed_command_serves_the_embedded_default(installed, tmp_path):
    base, env, _ = installed
    link = base / "bin" / "appliance"
    assert os.path.islink(link)
    port = free_port()
    cfg, _ = DaemonFactory(tmp_path).write_config("", port=port)
    installed_code = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.Popen([str(link), "serve", "--config", str(cfg)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True, env=installed_code)
    try:
        def ready():
            try:
                return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, timeout=120, what="the installed daemon to be ready")
        resp = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60, json={
            "model": "smollm2-135m-instruct", "max_tokens": 8,
            "messages": [{"role": "user", "content": "Say hello."}]})
        assert resp.status_code == 200
        assert resp.json()["choices"][0]["message"]["content"].strip()
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0


def test_an_install_killed_half_way_is_finished_by_the_next_run(tmp_path):
    """Killed while pip installs: no version is switched to, and the next run makes the
    half-made version folder again instead of trusting it."""
    import signal

    env = {**os.environ, "APPLIANCE_PREFIX": str(tmp_path / "venv"),
           "APPLIANCE_BIN_LINK": str(tmp_path / "bin" / "appliance")}
    proc = subprocess.Popen([str(ROOT / "install.sh")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)
    for line in proc.stdout:
        if "installing the appliance package with pip" in line:
            break
    time.sleep(1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    [half] = list((tmp_path / "versions").iterdir())
    assert not (half / ".appliance-installed").exists()
    assert not (tmp_path / "venv").exists() and not (tmp_path / "venv").is_symlink()

    again = subprocess.run([str(ROOT / "install.sh")], capture_output=True, text=True, env=env, timeout=1500)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"installed the appliance package (0.1.0) into {half}" in again.stdout
    assert (half / ".appliance-installed").exists() and os.readlink(tmp_path / "venv") == f"versions/{half.name}"
    check = subprocess.run([str(tmp_path / "venv" / "bin" / "appliance"), "check"], capture_output=True, text=True,
                           timeout=120, env={**env, "APPLIANCE_CONFIG": "", "PYTHONPATH": ""})
    assert check.returncode == 0, check.stderr
