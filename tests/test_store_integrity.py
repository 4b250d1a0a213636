"""Integrity at serve time: verified stat fingerprints (a changed file is rehashed before
it is served, an unchanged one is not), the background scrub for bit rot, and what the
daemon does with a mismatch: the model is quarantined and blocked, status and log say
which file and what was expected."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import sqlite_utils

from appliance.store.guard import Scrubber
from appliance.store.hashing import Interrupted, Throttle, hash_file
from appliance.store.store import Store

from .conftest import PY, ROOT, fake_model, wait_until
from .test_store import gguf, listing, run


class CountingHasher:
    """The real sha256, and the files it was asked to hash."""

    def __init__(self) -> None:
        self.calls: list[Path] = []

    def __call__(self, path: Path, throttle: Throttle | None = None) -> str:
        self.calls.append(Path(path))
        return hash_file(path, throttle)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _store(cache: Path, **kw) -> Store:
    return Store(cache, allowed_licenses=["MIT"], **kw)


def _import(store: Store, tmp_path: Path, name: str, seed: bytes = b"a") -> tuple[Path, str]:
    """Import one GGUF file as NAME; its blob and sha256."""
    from appliance.store.sources import incoming_from

    src = gguf(tmp_path / f"{name}.gguf", seed=seed)
    [incoming] = incoming_from(str(src), name=name, license="MIT", sha256=None, expected_version="")
    store.add(incoming)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    return store.root / f"models--{name}" / "blobs" / digest, digest


def _rewrite(blob: Path, keep_times: bool = False) -> None:
    """Flip a byte in place: same size, same inode, other content."""
    st = blob.stat()
    os.chmod(blob, 0o644)
    data = bytearray(blob.read_bytes())
    data[100] ^= 0xFF
    blob.write_bytes(bytes(data))
    if keep_times:
        os.utime(blob, ns=(st.st_atime_ns, st.st_mtime_ns))


def _as_if_bit_rot(cache: Path, name: str, verified_at: float | None = None) -> None:
    """Bit rot changes no stat: record the file's current fingerprint as the verified one."""
    from appliance.store.hashing import fingerprint

    store = _store(cache)
    record = store.need(name)
    db = sqlite_utils.Database(cache / "store.db")
    for f in record.files:
        stamp = {"fingerprint": fingerprint((store.snapshot_dir(record) / f["path"]).stat())}
        if verified_at is not None:
            stamp["verified_at"] = verified_at
        db["files"].update((name, f["path"]), stamp)
    db.conn.close()
    store.close()


def test_an_unchanged_fingerprint_skips_the_rehash_and_any_change_to_the_file_rehashes_it(tmp_path):
    hasher = CountingHasher()
    store = _store(tmp_path / "cache", hasher=hasher)
    blob, _ = _import(store, tmp_path, "tiny")
    # Hashed on import: starts and replica loads only stat it.
    assert store.admission("tiny") is None
    assert store.verify("tiny", full=False).state == "ready"
    assert hasher.calls == []
    # A chmod changes no byte, but ctime: rehashed once, matches, the new fingerprint recorded.
    os.chmod(blob, 0o444)
    assert store.admission("tiny") is None
    assert [p.resolve() for p in hasher.calls] == [blob]
    assert store.admission("tiny") is None
    assert len(hasher.calls) == 1
    # `models verify` rehashes whatever the fingerprint says.
    store.verify("tiny")
    assert len(hasher.calls) == 2


def test_a_rewrite_that_puts_mtime_back_is_still_rehashed_and_quarantined_by_its_ctime(tmp_path):
    hasher = CountingHasher()
    store = _store(tmp_path / "cache", hasher=hasher)
    blob, digest = _import(store, tmp_path, "tiny")
    _rewrite(blob, keep_times=True)
    reason = store.admission("tiny")
    assert len(hasher.calls) == 1
    assert reason is not None and "quarantined: file tiny.gguf has sha256" in reason
    assert f"expected {digest}" in reason
    record = store.need("tiny")
    assert record.state == "quarantined" and "tiny.gguf" in record.state_reason
    # Known bad: later starts do not hash it again; `models verify` still does.
    assert store.admission("tiny") == reason and len(hasher.calls) == 1


def test_a_manifest_without_fingerprints_is_migrated_and_each_file_rehashed_once(tmp_path):
    cache = tmp_path / "cache"
    store = _store(cache)
    _import(store, tmp_path, "old")
    store.close()
    # The manifest as the appliance before fingerprints (and before schema versions) wrote it.
    db = sqlite_utils.Database(cache / "store.db")
    db["files"].transform(drop={"fingerprint", "verified_at"})
    db.execute("PRAGMA user_version = 0")
    assert set(db["files"].columns_dict) == {"model", "path", "sha256", "size"}
    db.conn.close()

    hasher = CountingHasher()
    store = _store(cache, hasher=hasher)
    assert store.admission("old") is None
    assert len(hasher.calls) == 1  # no fingerprint recorded: treated as changed
    assert {"fingerprint", "verified_at"} <= set(store.db["files"].columns_dict)
    assert store.admission("old") is None
    assert len(hasher.calls) == 1
    # An older appliance still writes this manifest, rows without the new columns: such a
    # file is hashed at its next check.
    _import(store, tmp_path, "newer", seed=b"n")
    [row] = store.db["files"].rows_where("model = ?", ["newer"])
    store.db["files"].delete_where("model = ?", ["newer"])
    store.db["files"].insert({k: row[k] for k in ("model", "path", "sha256", "size")})
    assert store.admission("newer") is None
    assert [p.name for p in hasher.calls[1:]] == ["newer.gguf"]
    assert store.admission("newer") is None and len(hasher.calls) == 2


def test_the_scrub_rehashes_only_files_verified_longer_ago_than_the_interval_oldest_first(tmp_path):
    clock = Clock(1000.0)
    hasher = CountingHasher()
    cache = tmp_path / "cache"
    store = _store(cache, clock=clock, hasher=hasher)
    _import(store, tmp_path, "first", seed=b"1")
    clock.now = 1200.0
    _import(store, tmp_path, "second", seed=b"2")
    found: list = []
    scrub = Scrubber(lambda: _store(cache, clock=clock, hasher=hasher), interval_s=600, bytes_per_s=0,
                     on_quarantine=lambda *a: found.append(a))

    clock.now = 1599.0
    step = scrub.step()
    assert (step.model, step.wait_s) == ("", 1.0) and hasher.calls == []
    clock.now = 1600.0
    step = scrub.step()
    assert (step.model, step.path, step.problem) == ("first", "first.gguf", "")
    assert [p.name for p in hasher.calls] == ["first.gguf"]
    step = scrub.step()  # "first" is verified as of now; "second" is due at 1800
    assert (step.model, step.wait_s) == ("", 200.0) and len(hasher.calls) == 1
    clock.now = 1800.0
    assert scrub.step().model == "second"
    step = scrub.step()  # "first" is next due at 1600 + 600; the scrub looks again sooner than that
    assert step.model == "" and step.wait_s == min(400.0, Scrubber.IDLE_MAX_S) and len(hasher.calls) == 2
    assert found == []


def test_the_scrub_logs_a_files_progress_with_bytes_and_rate_then_what_it_took(tmp_path, caplog):
    clock = Clock(1000.0)
    cache = tmp_path / "cache"
    _import(_store(cache, clock=clock), tmp_path, "first")
    size = _store(cache).need("first").files[0]["size"]
    scrub = Scrubber(lambda: _store(cache, clock=clock), interval_s=600, bytes_per_s=0, on_quarantine=print)
    scrub.progress_every_s = 0.0  # every chunk (a file here is one chunk)
    clock.now = 1600.0
    with caplog.at_level("INFO", logger="appliance.store"):
        assert scrub.step().model == "first"
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("store scrub: ")]
    mib = f"{size / 2**20:.1f} MiB"
    assert re.fullmatch(rf"store scrub: first file first\.gguf: {mib} of {mib} \(100%\), [\d.]+ MiB/s", lines[0])
    assert re.fullmatch(rf"store scrub: first file first\.gguf verified: {mib} in \d+s, [\d.]+ MiB/s", lines[-1])


def test_the_scrub_quarantines_bit_rot_that_the_fingerprint_cannot_see(tmp_path):
    clock = Clock(1000.0)
    hasher = CountingHasher()
    cache = tmp_path / "cache"
    store = _store(cache, clock=clock, hasher=hasher)
    blob, digest = _import(store, tmp_path, "rotten")
    _rewrite(blob)
    _as_if_bit_rot(cache, "rotten")
    assert store.admission("rotten") is None and hasher.calls == []  # the stat looks as verified

    scrub = Scrubber(lambda: _store(cache, clock=clock, hasher=hasher), interval_s=3600, bytes_per_s=0,
                     on_quarantine=lambda *a: None)
    clock.now = 1000.0 + 3600
    step = scrub.step()
    assert step.model == "rotten" and step.problem.startswith("file rotten.gguf has sha256 ")
    assert step.problem.endswith(f"expected {digest}")
    assert "model 'rotten' is quarantined" in step.reason
    assert store.need("rotten").state == "quarantined"
    assert "quarantined" in store.admission("rotten")
    # A quarantined model is not scrubbed again (re-import or `models verify` decide).
    assert scrub.step().model == "" and len(hasher.calls) == 1


def test_the_scrub_reads_at_its_rate_and_stops_when_asked(tmp_path):
    big = tmp_path / "big"
    big.write_bytes(os.urandom(10 << 20))
    clock = Clock(0.0)
    slept: list[float] = []

    def sleep(seconds: float) -> bool:
        slept.append(seconds)
        clock.now += seconds
        return False

    rate = 2_000_000
    assert hash_file(big, Throttle(rate, clock=clock, sleep=sleep)) == hashlib.sha256(big.read_bytes()).hexdigest()
    # The fake clock advances only by the sleeps: reading took exactly size / rate.
    assert abs(sum(slept) - (10 << 20) / rate) < 1e-9
    throttle = Throttle(0)
    throttle.stop.set()  # the daemon is stopping
    with pytest.raises(Interrupted):
        hash_file(big, throttle)


# --- the daemon -------------------------------------------------------------------

def _served_from_store(name: str, store_name: str, extra: str = "") -> str:
    return fake_model(name, extra=extra).replace('server = "openai"',
                                                  f'server = "openai"\nsource = "store:{store_name}"')


def _fatal(daemon, model):
    try:
        replicas = daemon.replicas(model)
    except httpx.HTTPError:
        return None
    return next((r for r in replicas if r["state"] == "FATAL"), None)


def _blocked(daemon, model):
    try:
        return next(m for m in daemon.status()["models"] if m["name"] == model)["blocked"]
    except httpx.HTTPError:
        return None


def _assert_blocked_naming(daemon, tmp_path: Path, model: str, store_name: str, file: str, digest: str,
                           replicas: bool = True) -> None:
    if replicas:  # one FATAL replica in place of the model's replicas, with the reason
        replica = wait_until(lambda: _fatal(daemon, model), timeout=60, what="FATAL replica")
        assert f"model '{store_name}' is quarantined: file {file} has sha256" in replica["last_error"]
        assert f"expected {digest}" in replica["last_error"]
    blocked = wait_until(lambda: _blocked(daemon, model), timeout=60, what="model blocked")
    assert f"model '{store_name}' is quarantined: file {file} has sha256" in blocked
    assert f"expected {digest}" in blocked
    entry = next(m for m in daemon.status()["models"] if m["name"] == model)
    assert [r["state"] for r in entry["replicas"]] == (["FATAL"] if replicas else [])
    status = subprocess.run([PY, "-m", "appliance.cli", "status", "--config", str(daemon.config)],
                            capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert "not served: model" in status.stdout and file in status.stdout and digest in status.stdout
    with daemon.client() as c:
        resp = c.post("/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 2})
    assert resp.status_code == 503 and f"expected {digest}" in resp.json()["error"]["message"]
    errors = [line for line in daemon.log_text().splitlines() if line.startswith("ERROR")]
    assert any(f"quarantined: file {file} has sha256" in e and f"expected {digest}" in e for e in errors)
    assert listing(tmp_path)[store_name]["store_state"] == "quarantined"


def _import_victim(tmp_path: Path) -> tuple[str, Path]:
    """Import m.gguf as store model "victim": its sha256 and its blob's path."""
    src = gguf(tmp_path / "m.gguf")
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    run(tmp_path, "models", "import", str(src), "--name", "victim", "--license", "MIT")
    return digest, tmp_path / "cache" / "hf" / "hub" / "models--victim" / "blobs" / digest


def test_a_file_rewritten_after_import_is_caught_at_daemon_start(tmp_path, daemons):
    digest, blob = _import_victim(tmp_path)
    _rewrite(blob)
    # Same size: the size check at admission passes; the changed fingerprint gets it rehashed.
    daemon = daemons.start(_served_from_store("victim-model", "victim"), wait=False)
    _assert_blocked_naming(daemon, tmp_path, "victim-model", "victim", "m.gguf", digest)


def test_a_model_at_zero_replicas_is_checked_at_daemon_start_too(tmp_path, daemons):
    digest, blob = _import_victim(tmp_path)
    _rewrite(blob)
    daemon = daemons.start(_served_from_store("victim-model", "victim",
                                              extra="[models.autoscaling]\nmin_replicas = 0\n"),
                           extra="[autoscaling]\ninterval_s = 0.2\n")
    # No replica starts: the status and a request say why, and none is started for it.
    _assert_blocked_naming(daemon, tmp_path, "victim-model", "victim", "m.gguf", digest, replicas=False)
    # Nor by the autoscaler, for the demand of the refused request: let it tick a few times.
    time.sleep(1.0)
    assert daemon.replicas("victim-model") == []
    assert "autoscale victim-model" not in daemon.log_text()


def test_a_file_changed_while_the_daemon_runs_is_caught_before_a_replica_loads_it(tmp_path, daemons):
    digest, blob = _import_victim(tmp_path)
    daemon = daemons.start(_served_from_store("victim-model", "victim"))
    with daemon.client() as c:
        assert c.post("/v1/completions", json={"model": "victim-model", "prompt": "hi",
                                               "max_tokens": 2}).status_code == 200
        _rewrite(blob)
        assert c.post("/admin/models/victim-model/unload", json={}).status_code == 200
        wait_until(lambda: not daemon.replicas("victim-model"), timeout=30, what="unloaded")
        assert c.post("/admin/models/victim-model/load", json={}).status_code == 200
    _assert_blocked_naming(daemon, tmp_path, "victim-model", "victim", "m.gguf", digest)


def test_bit_rot_under_an_unchanged_fingerprint_is_served_until_the_scrub_blocks_it(tmp_path, daemons):
    digest, blob = _import_victim(tmp_path)
    _rewrite(blob)
    _as_if_bit_rot(tmp_path / "cache", "victim", verified_at=0.0)  # last verified long ago
    models = _served_from_store("victim-model", "victim")

    # Without the scrub, nothing at start can tell: the model is served.
    daemon = daemons.start(models, extra="[store]\nscrub_interval_h = 0\n")
    with daemon.client() as c:
        assert c.post("/v1/completions", json={"model": "victim-model", "prompt": "hi",
                                               "max_tokens": 2}).status_code == 200
    assert daemon.terminate() == 0

    # The scrub (weekly by default) finds the file overdue, rehashes it and blocks the model.
    daemon = daemons.start(models, wait=False)
    _assert_blocked_naming(daemon, tmp_path, "victim-model", "victim", "m.gguf", digest)


# --- a block lifts once the store model is right again ------------------------------

def _served(daemon, model) -> dict:
    entry = next(m for m in daemon.status()["models"] if m["name"] == model)
    return entry if entry["blocked"] is None else None


def _assert_served_again(daemon, model: str, store_name: str) -> None:
    """The running daemon lifts the block by itself: status clean, a completion served."""
    entry = wait_until(lambda: _served(daemon, model), timeout=60, what="block lifted")
    assert "FATAL" not in [r["state"] for r in entry["replicas"]]
    with daemon.client(timeout=60) as c:
        resp = c.post("/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 2})
    assert resp.status_code == 200, resp.text
    assert f"store model {store_name} verified again: serving {model}" in daemon.log_text()
    status = subprocess.run([PY, "-m", "appliance.cli", "status", "--config", str(daemon.config)],
                            capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert "not served" not in status.stdout


def test_a_model_blocked_at_start_is_served_again_after_models_verify_without_a_restart(tmp_path, daemons):
    digest, blob = _import_victim(tmp_path)
    _rewrite(blob)
    daemon = daemons.start(_served_from_store("victim-model", "victim"), wait=False)
    _assert_blocked_naming(daemon, tmp_path, "victim-model", "victim", "m.gguf", digest)
    pid = daemon.proc.pid

    _rewrite(blob)  # the same byte flipped back: the original content
    assert run(tmp_path, "models", "verify", "victim").stdout.strip() == "victim: ok"
    _assert_served_again(daemon, "victim-model", "victim")
    assert daemon.proc.pid == pid and daemon.proc.poll() is None
    entry = next(m for m in daemon.status()["models"] if m["name"] == "victim-model")
    assert [r["state"] for r in entry["replicas"]] == ["READY"]  # its min_replicas, no more
    # Admitted now, so leased: eviction and rm leave it alone while it is served.
    assert Store(tmp_path / "cache").in_use("victim")
    assert listing(tmp_path)["victim"]["store_state"] == "ready"


def test_a_model_blocked_for_its_license_is_served_once_the_license_is_accepted(tmp_path, daemons):
    src = gguf(tmp_path / "m.gguf")
    run(tmp_path, "models", "import", str(src), "--name", "victim", "--license", "LicenseRef-acme")
    daemon = daemons.start(_served_from_store("victim-model", "victim"), wait=False)
    blocked = wait_until(lambda: _blocked(daemon, "victim-model"), timeout=60, what="model blocked")
    assert "license LicenseRef-acme" in blocked and "accept-license victim" in blocked
    with daemon.client() as c:
        assert c.post("/v1/completions", json={"model": "victim-model", "prompt": "hi",
                                               "max_tokens": 2}).status_code == 503

    run(tmp_path, "models", "accept-license", "victim")
    _assert_served_again(daemon, "victim-model", "victim")


async def test_recheck_lifts_only_blocks_whose_store_model_passes_admission_again(tmp_path):
    """The recheck's decision: still quarantined (the file restored but not verified) stays
    blocked, with no rehash; verified again is served again, leased, at its count."""
    import aiohttp

    from appliance.config import parse_config
    from appliance.fleet.supervisor import Supervisor

    digest, blob = _import_victim(tmp_path)
    _rewrite(blob)
    store = Store(tmp_path / "cache", allowed_licenses=["MIT"])
    assert "quarantined" in store.admission("victim")
    cfg = parse_config(
        f'[paths]\nstate_dir = "{tmp_path}/state"\ncache_dir = "{tmp_path}/cache"\n'
        f'log_dir = "{tmp_path}/log"\n'
        + _served_from_store("victim-model", "victim", extra="[models.autoscaling]\nmin_replicas = 0\n"))
    session = aiohttp.ClientSession()
    sup = Supervisor(cfg, session)
    try:
        sup.start()
        dep = sup.deployments["victim-model"]
        assert "quarantined" in dep.blocked and dep.replicas == []
        assert "victim" not in sup.store_leases

        _rewrite(blob)  # restored, but the store still says quarantined until `models verify`
        assert await sup.recheck_blocked() == []
        assert "quarantined" in dep.blocked and "victim" not in sup.store_leases

        assert store.verify("victim").state == "ready"
        assert await sup.recheck_blocked() == ["victim"]
        assert dep.blocked is None and dep.replicas == []  # min_replicas 0: on demand
        assert "victim" in sup.store_leases and store.in_use("victim")
        assert dep.can_become_ready()
        assert await sup.recheck_blocked() == []  # nothing blocked: nothing to do
    finally:
        await sup.stop()
        await session.close()
        store.close()


async def test_a_model_removed_by_a_reload_releases_its_store_lease_once_no_other_model_uses_it(tmp_path):
    """A leased entry can be neither removed nor evicted: the lease goes with the last model
    served from it (once its replicas stopped), not at the daemon's restart."""
    import asyncio

    import aiohttp

    from appliance.config import parse_config
    from appliance.fleet.supervisor import Supervisor

    _import_victim(tmp_path)
    store = Store(tmp_path / "cache", allowed_licenses=["MIT"])
    on_demand = "[models.autoscaling]\nmin_replicas = 0\n"
    cfg = parse_config(
        f'[paths]\nstate_dir = "{tmp_path}/state"\ncache_dir = "{tmp_path}/cache"\n'
        f'log_dir = "{tmp_path}/log"\n'
        + _served_from_store("first", "victim", extra=on_demand)
        + _served_from_store("second", "victim", extra=on_demand))
    session = aiohttp.ClientSession()
    sup = Supervisor(cfg, session)

    async def removed(name: str) -> None:
        sup.remove_deployment(name)
        for _ in range(500):
            if not sup.leaving:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"{name} still leaving")

    try:
        sup.start()
        assert store.in_use("victim")
        await removed("first")
        assert store.in_use("victim") and "victim" in sup.store_leases  # "second" is served from it
        await removed("second")
        assert not store.in_use("victim") and "victim" not in sup.store_leases
    finally:
        await sup.stop()
        await session.close()
        store.close()


async def test_a_roll_to_another_store_entry_releases_the_previous_entrys_lease_once_its_replicas_stopped(
        tmp_path):
    """A reload that serves a model from another store entry rolls its replicas onto it; the
    entry it left is leased until the old replicas stopped, then free (not at a restart)."""
    import asyncio

    import aiohttp

    from appliance.config import parse_config
    from appliance.fleet.supervisor import Supervisor

    _import_victim(tmp_path)
    run(tmp_path, "models", "import", str(gguf(tmp_path / "n.gguf")), "--name", "other", "--license", "MIT")
    store = Store(tmp_path / "cache", allowed_licenses=["MIT"])
    paths = (f'[paths]\nstate_dir = "{tmp_path}/state"\ncache_dir = "{tmp_path}/cache"\n'
             f'log_dir = "{tmp_path}/log"\n')
    session = aiohttp.ClientSession()
    sup = Supervisor(parse_config(paths + _served_from_store("first", "victim")), session)
    try:
        sup.start()
        [old] = sup.deployments["first"].replicas
        await old.wait_ready(30)
        assert store.in_use("victim") and not store.in_use("other")
        rolled = await sup.roll("first", parse_config(paths + _served_from_store("first", "other")).models[0])
        assert rolled == "rolled 1 replica" and store.in_use("other")
        for _ in range(1000):
            if not store.in_use("victim"):
                break
            await asyncio.sleep(0.01)
        assert old.state.value == "STOPPED"
        assert not store.in_use("victim") and "victim" not in sup.store_leases
        assert "other" in sup.store_leases
    finally:
        await sup.stop()
        await session.close()
        store.close()
