"""The offline bundle: `appliance bundle create` on this (connected) machine, then
`./install.sh --offline BUNDLE` inside a network namespace with only loopback, then a
completion served from a store model that came in the bundle. A damaged bundle stops
the install before anything is installed, naming the bad file. A bundle with a GPU
engine's wheelhouse gets that engine's image built by the offline install."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from .conftest import PY, ROOT, free_port
from .test_images import _wheel, needs_llama_build
from .test_store import SMOLLM_WHEEL


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    if not SMOLLM_WHEEL.exists():
        pytest.skip("install.sh caches the bundled model's wheel first")
    base = tmp_path_factory.mktemp("bundle")
    cfg = base / "source.toml"
    cfg.write_text(f'[paths]\ncache_dir = "{base}/source-cache"\n')
    cli = [PY, "-m", "appliance.cli"]
    subprocess.run([*cli, "models", "import", str(SMOLLM_WHEEL), "--name", "smollm2", "--config", str(cfg)],
                   check=True, capture_output=True, cwd=ROOT, timeout=120)
    made = subprocess.run([*cli, "bundle", "create", "-o", str(base / "appliance.tar"), "--model", "smollm2",
                           "--config", str(cfg)], capture_output=True, text=True, cwd=ROOT, timeout=900)
    if made.returncode != 0 and "failed" in made.stderr and "download" in made.stderr.lower():
        pytest.skip(f"PyPI not reachable to make the bundle: {made.stderr.strip()}")
    assert made.returncode == 0, made.stderr
    return base / "appliance.tar"


def _netns_available() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-n", "true"], capture_output=True).returncode == 0


@pytest.mark.timeout(900)
@pytest.mark.skipif(not _netns_available(), reason="needs unshare -n (root, network namespaces)")
def test_offline_install_with_no_network_then_serves_a_store_model(bundle, tmp_path):
    port = free_port()
    cfg = tmp_path / "appliance.toml"
    cfg.write_text(f'[server]\nport = {port}\n[paths]\ncache_dir = "{tmp_path}/cache"\n'
                   f'state_dir = "{tmp_path}/state"\nlog_dir = "{tmp_path}/log"\n'
                   '[[models]]\nname = "smollm2-135m-instruct"\nsource = "store:smollm2"\ncontext_length = 512\n')
    prefix = tmp_path / "venv"
    script = f"""
set -e
ip link set lo up
{PY} -c 'import socket; s = socket.socket(); s.settimeout(3)
try:
    s.connect(("1.1.1.1", 443)); print("NETWORK REACHABLE")
except OSError as e:
    print("no network:", e)'
APPLIANCE_CONFIG={cfg} APPLIANCE_PREFIX={prefix} APPLIANCE_BIN_LINK={tmp_path}/bin/appliance \\
  {ROOT}/install.sh --offline {bundle}
{prefix}/bin/appliance models ls --config {cfg} --port 1
{prefix}/bin/appliance serve --config {cfg} > {tmp_path}/serve.log 2>&1 &
daemon=$!
{PY} - <<'EOF'
import json, time, urllib.request
url = "http://127.0.0.1:{port}"
for _ in range(600):
    try:
        if urllib.request.urlopen(url + "/readyz", timeout=2).status == 200:
            break
    except OSError:
        time.sleep(0.5)
body = json.dumps({{"model": "smollm2-135m-instruct", "max_tokens": 8,
                   "messages": [{{"role": "user", "content": "Say hello."}}]}}).encode()
req = urllib.request.Request(url + "/v1/chat/completions", body, {{"Content-Type": "application/json"}})
print("COMPLETION:", json.loads(urllib.request.urlopen(req, timeout=120).read())["choices"][0]["message"]["content"])
EOF
kill -TERM $daemon
wait $daemon
"""
    result = subprocess.run(["unshare", "-n", "bash", "-c", script], capture_output=True, text=True,
                            timeout=850)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out + (tmp_path / "serve.log").read_text(errors="replace")
    assert "no network:" in out and "NETWORK REACHABLE" not in out
    assert "bundle verified" in out
    assert "imported smollm2" in out
    completion = out.split("COMPLETION:", 1)[1].splitlines()[0]
    assert completion.strip()


@pytest.mark.timeout(900)
@pytest.mark.skipif(not _netns_available(), reason="needs unshare -n (root, network namespaces)")
@needs_llama_build  # the bundle carries no llama.cpp sdist: install.sh takes the cached llama-server
def test_offline_install_builds_the_gpu_engine_image_the_bundle_carries(bundle, tmp_path):
    """`bundle create --engine vllm` with a stand-in vllm definition (its lock: one small wheel
    made here), made offline from the first bundle's wheels; then install.sh --offline with no
    network builds the vllm image from the bundle's wheelhouse, leaves it alone when run again,
    and skips (saying why, installing the rest) an image whose Python this machine lacks."""
    parts = tmp_path / "parts"
    with tarfile.open(bundle) as tf:
        tf.extractall(parts, filter="data")
    defs = tmp_path / "defs"
    shutil.copytree(ROOT / "images", defs)
    engine_wheels = tmp_path / "engine-wheels"
    engine_wheels.mkdir()
    whl = _wheel(engine_wheels, "demo-engine-dep", "1.0")
    (defs / "vllm" / "requirements.lock").write_text(
        f"demo-engine-dep==1.0 \\\n    --hash=sha256:{hashlib.sha256(whl.read_bytes()).hexdigest()}\n")
    cfg = tmp_path / "appliance.toml"
    cfg.write_text(f'[paths]\ncache_dir = "{tmp_path}/cache"\nstate_dir = "{tmp_path}/state"\n'
                   f'log_dir = "{tmp_path}/log"\n')
    env = {**os.environ, "APPLIANCE_IMAGE_DEFS": str(defs), "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1",
           "PIP_FIND_LINKS": str(engine_wheels)}
    gpu_bundle = tmp_path / "gpu.tar"
    made = subprocess.run([PY, "-m", "appliance.cli", "bundle", "create", "-o", str(gpu_bundle),
                           # No llama.cpp sdist offline (its metadata needs build tools from an index).
                           "--engine", "vllm", "--no-cpu-engine", "--wheelhouse", str(parts / "wheels"),
                           "--config", str(cfg)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert made.returncode == 0, made.stderr
    with tarfile.open(gpu_bundle) as tf:
        assert f"images/vllm/{whl.name}" in tf.getnames()
        assert json.load(tf.extractfile("bundle.json"))["engines"] == ["vllm"]

    prefix = tmp_path / "venv"
    no_python = tmp_path / "defs-3.99"
    shutil.copytree(defs, no_python)
    toml = no_python / "vllm" / "image.toml"
    toml.write_text(toml.read_text().replace('python = "3.11"', 'python = "3.99"'))

    def install(image_defs: Path) -> str:
        script = (f"APPLIANCE_CONFIG={cfg} APPLIANCE_PREFIX={prefix} APPLIANCE_BIN_LINK={tmp_path}/bin/appliance "
                  f"APPLIANCE_IMAGE_DEFS={image_defs} {ROOT}/install.sh --offline {gpu_bundle}")
        result = subprocess.run(["unshare", "-n", "bash", "-c", script], capture_output=True, text=True,
                                timeout=600, env={k: v for k, v in os.environ.items() if not k.startswith("PIP_")})
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout + result.stderr

    first = install(defs)
    assert "bundle verified" in first and "install.sh: built vllm 0.33.0-" in first
    assert "WARNING" not in first  # pip's find-links are folders the bundle has
    current = prefix / "images" / "vllm" / "current"
    assert current.is_symlink() and (current / "image.json").is_file()
    tag = json.loads((current / "image.json").read_text())["tag"]
    out = subprocess.run([current / "bin" / "python", "-c", "import demo_engine_dep; print(demo_engine_dep.VERSION)"],
                         capture_output=True, text=True)
    assert out.stdout.strip() == "1.0", out.stderr

    again = install(defs)
    assert f"install.sh: vllm {tag} up to date" in again and "install.sh: nothing changed" in again

    skipped = install(no_python)
    assert ("install.sh: skipped the vllm engine image: the vllm image needs Python 3.99 (its lock is CPython "
            "3.99 wheels): install python3.99, or pass --python PATH; everything else is installed (run "
            "install.sh --offline again once that Python is there)") in skipped
    assert "install.sh: nothing changed" in skipped
    assert json.loads((current / "image.json").read_text())["tag"] == tag  # the built one stays current


def _repack(bundle: Path, dest: Path, change) -> Path:
    work = dest.parent / (dest.name + ".d")
    with tarfile.open(bundle) as tf:
        tf.extractall(work, filter="data")
    change(work)
    with tarfile.open(dest, "w") as tf:
        for p in sorted(work.rglob("*")):
            if p.is_file():
                tf.add(p, arcname=p.relative_to(work).as_posix())
    return dest


def _flip_a_wheel(work: Path) -> None:
    victim = sorted((work / "wheels").glob("click-*.whl"))[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))


def _other_version(work: Path) -> None:
    manifest = work / "bundle.json"
    manifest.write_text(manifest.read_text().replace('"appliance_version": "', '"appliance_version": "9.9.9-'))
    digest = hashlib.sha256(manifest.read_bytes()).hexdigest()
    sums = [f"{digest}  bundle.json" if line.endswith("  bundle.json") else line
            for line in (work / "SHA256SUMS").read_text().splitlines()]
    (work / "SHA256SUMS").write_text("\n".join(sums) + "\n")


def _truncate_model(work: Path) -> None:
    model = next((work / "models").rglob("*.gguf"))
    model.write_bytes(model.read_bytes()[:1000])


def _extra_file(work: Path) -> None:
    (work / "wheels" / "evil-1.0-py3-none-any.whl").write_bytes(b"not listed")


@pytest.mark.parametrize(("damage", "message"), [
    (_flip_a_wheel, "checksum mismatch: wheels/click-"),
    (_truncate_model, "checksum mismatch: models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    (_other_version, "is for appliance 9.9.9-"),
    (_extra_file, "wheels/evil-1.0-py3-none-any.whl is not in SHA256SUMS"),
])
def test_a_damaged_bundle_installs_nothing_and_names_the_bad_file(bundle, tmp_path, damage, message):
    bad = _repack(bundle, tmp_path / "bad.tar", damage)
    prefix = tmp_path / "venv"
    result = subprocess.run([str(ROOT / "install.sh"), "--offline", str(bad)], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "APPLIANCE_PREFIX": str(prefix),
                                              "APPLIANCE_BIN_LINK": str(tmp_path / "bin" / "appliance")})
    assert result.returncode == 1
    error = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(error) == 1 and message in error[0], result.stderr
    assert not prefix.exists()
