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


PROBE = ROOT / "images" / "llamacpp-cuda" / "probe.sh"


def _fake_tools(folder, nvidia_smi: str | None = "GPU 0: NVIDIA H200 (UUID: GPU-2768d482)", nvcc: bool = True):
    """A folder of stand-ins for the driver's nvidia-smi and the toolkit's nvcc."""
    folder.mkdir(parents=True, exist_ok=True)
    if nvidia_smi is not None:
        (folder / "nvidia-smi").write_text(f"#!/bin/sh\necho '{nvidia_smi}'\n")
    if nvcc:
        (folder / "nvcc").write_text("#!/bin/sh\necho 'Cuda compilation tools, release 13.0, V13.0.88'\n")
    for f in folder.iterdir():
        f.chmod(0o755)
    return folder


def _probe(tmp_path, tools, **env):
    # /usr/bin and /bin only: this machine's own nvcc (if any) is not on that PATH.
    run_env = {"PATH": f"{tools}:/usr/bin:/bin", "APPLIANCE_CUDA_HOME": str(tmp_path / "no-cuda"), **env}
    return subprocess.run([str(PROBE)], capture_output=True, text=True, env=run_env, timeout=30)


@pytest.mark.parametrize("case, tools, expected", [
    ("no driver", dict(nvidia_smi=None), "no NVIDIA driver (nvidia-smi not found)"),
    ("no gpu", dict(nvidia_smi=""), "the NVIDIA driver lists no GPU (nvidia-smi -L)"),
    ("no toolkit", dict(nvcc=False), "no CUDA toolkit (nvcc not found on PATH or in "),
])
def test_the_cuda_probe_says_why_not(tmp_path, case, tools, expected):
    out = _probe(tmp_path, _fake_tools(tmp_path / "bin", **tools))
    assert out.returncode == 1 and out.stdout.startswith(expected), out.stdout + out.stderr


def test_the_cuda_probe_finds_nvcc_on_path_in_cudacxx_or_in_the_toolkit_home(tmp_path):
    tools = _fake_tools(tmp_path / "bin")
    out = _probe(tmp_path, tools)
    assert out.returncode == 0 and out.stdout.strip() == str(tools / "nvcc")
    (tools / "nvcc").unlink()
    home = _fake_tools(tmp_path / "cuda" / "bin", nvidia_smi=None)
    out = _probe(tmp_path, tools, APPLIANCE_CUDA_HOME=str(tmp_path / "cuda"))
    assert out.returncode == 0 and out.stdout.strip() == str(home / "nvcc")
    out = _probe(tmp_path, tools, CUDACXX=str(home / "nvcc"))
    assert out.returncode == 0 and out.stdout.strip() == str(home / "nvcc")


def test_install_builds_the_cuda_engine_only_where_the_probe_finds_a_driver_and_nvcc(installed, tmp_path):
    base, env, first = installed
    # This machine has no NVIDIA driver: the install says so, and what it means.
    assert ("no CUDA engine: no NVIDIA driver (nvidia-smi not found); GGUF models run on the CPU, "
            "those with [models.gpus] are not placed") in first.stdout
    # With a driver and nvcc (faked), install.sh goes for the CUDA build; NVML (no GPU here)
    # has no architecture to build for, and the install still succeeds, saying what that means.
    tools = _fake_tools(tmp_path / "bin")
    again = subprocess.run([str(ROOT / "install.sh")], capture_output=True, text=True, timeout=600,
                           env={**env, "PATH": f"{tools}:{env['PATH']}"})
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"CUDA toolkit found ({tools / 'nvcc'}): building llama-server with CUDA" in again.stdout
    assert "the CUDA engine (llamacpp-cuda) did not build: " in again.stdout
    assert "no NVIDIA GPU to build llamacpp-cuda for" in again.stdout
    assert "GGUF models with [models.gpus] will not be placed; everything else is installed" in again.stdout
