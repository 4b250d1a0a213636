"""Checks that a model is what its manifest says: at serve time, on demand and by the scrub.

Integrity at serve time: each file's row records the stat fingerprint (device, inode,
size, mtime, ctime) it had when it was last hashed, and when. A file whose fingerprint
changed since is rehashed before it is served (any write, chmod, rename or replacement
changes its ctime, which only the kernel sets); an unchanged one is not, so a start
costs a stat per file. Bit rot changes no stat: the daemon's scrub
(appliance/store/guard.py) rehashes files whose last verification is old.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from appliance.safe_paths import StoreError
from appliance.store.hashing import PerChunk, fingerprint
from appliance.store.records import QUARANTINED, READY, ModelRecord, quarantine_reason

if TYPE_CHECKING:
    from appliance.store.store import Store

log = logging.getLogger("appliance.store")


def verify(
    store: Store, name: str, *, full: bool = True, hash_changed: bool = True, throttle: PerChunk | None = None
) -> ModelRecord:
    """full: rehash every file; a model that matches again is ready again. Otherwise check
    sizes and rehash only the files whose stat fingerprint changed since they were last
    hashed (or that have none recorded: a manifest of an older appliance), or with
    hash_changed=False sizes only; a quarantined model is left as it is. A mismatch
    quarantines the model. A file that hashes right gets its fingerprint recorded."""
    record = store.need(name)
    if not full and record.state == QUARANTINED:
        return record  # known bad: `appliance models verify` (full) is what clears it
    rehash = True if full else (None if hash_changed else False)
    rows = _file_rows(store, name)
    problem = "" if rows else "the manifest lists no files for it (a damaged import); re-import it"
    for row in rows:
        problem = _check_file(store, record, row, rehash=rehash, throttle=throttle)
        if problem:
            break
    if problem:
        _quarantine(store, name, problem)
    elif full and record.state == QUARANTINED:
        log.info("model %s verified again: ready", name)
        store.update(name, state=READY, state_reason="")
    return store.need(name)


def _file_rows(store: Store, name: str) -> list[dict]:
    return list(store.db["files"].rows_where("model = ?", [name], order_by="path"))


def _check_file(
    store: Store, record: ModelRecord, row: dict, *, rehash: bool | None, throttle: PerChunk | None = None
) -> str:
    """What is wrong with one file ('' when nothing). rehash: True always, None when its
    fingerprint changed, False never (size only)."""
    rel = row["path"]
    path = store.snapshot_dir(record) / rel
    try:
        st = path.stat()
    except OSError:
        return f"file {rel} is missing ({path})"
    if st.st_size != row["size"]:
        return f"file {rel} is {st.st_size} bytes, expected {row['size']}"
    before = fingerprint(st)
    if rehash is False or (rehash is None and before == row.get("fingerprint")):
        return ""
    # What is read from here on includes every change that left this ctime.
    settled = store.clock_past(st.st_ctime_ns)
    try:
        digest = store.hasher(path, throttle)
    except FileNotFoundError:
        return f"file {rel} is missing ({path})"
    except OSError as exc:  # EIO from a failing disk is bit rot too
        return f"file {rel} cannot be read: {exc}"
    if digest != row["sha256"]:
        return f"file {rel} has sha256 {digest}, expected {row['sha256']}"
    try:
        after = fingerprint(path.stat())
    except OSError:
        after = None
    # Changed while being hashed: what was read may not be what is there; the next check
    # hashes it again.
    if after == before and settled:
        with store.db.conn:
            store.db.execute(
                "UPDATE files SET fingerprint = ?, verified_at = ? WHERE model = ? AND path = ? AND sha256 = ?",
                [after, store.clock(), record.name, rel, row["sha256"]],
            )
    return ""


def _quarantine(store: Store, name: str, problem: str) -> None:
    record = store.get(name)
    if record is None:  # removed meanwhile
        return
    if record.state != QUARANTINED or record.state_reason != problem:
        log.error("model %s quarantined: %s", name, problem)
    store.update(name, state=QUARANTINED, state_reason=problem)


def next_scrub(store: Store, interval_s: float) -> tuple[float, str, str] | None:
    """(when it is due, model, path): the ready model's file whose last verification is
    the oldest; never verified since an older appliance imported it counts from its
    import. A verification in the future means the clock was set back: due now."""
    now = store.clock()
    best = None
    for model, path, at in store.db.execute(
        "SELECT f.model, f.path, COALESCE(f.verified_at, m.imported_at) FROM files f "
        "JOIN models m ON m.name = f.model WHERE m.state = ?",
        [READY],
    ).fetchall():
        due = now if at is None or at > now + 60 else at + interval_s
        if best is None or (due, model, path) < best:
            best = (due, model, path)
    return best


def scrub_file(store: Store, name: str, path: str, throttle: PerChunk | None = None) -> str:
    """Rehash one file of a ready model whatever its fingerprint says; a mismatch
    quarantines the model. Returns the problem, '' when there is none."""
    record = store.get(name)
    row = next((r for r in _file_rows(store, name) if r["path"] == path), None)
    if record is None or row is None or record.state != READY:
        return ""
    problem = _check_file(store, record, row, rehash=True, throttle=throttle)
    if problem:
        current = store.get(name)
        if current is None or current.revision != record.revision:
            return ""  # removed or replaced while being hashed
        _quarantine(store, name, problem)
    return problem


def admission(store: Store, name: str, *, hash_changed: bool = True, throttle: PerChunk | None = None) -> str | None:
    """Why the daemon must not serve this store model, or None when it may. Files whose
    fingerprint changed are rehashed first unless hash_changed is False (sizes only)."""
    try:
        record = store.get(name)
    except StoreError as exc:
        return str(exc)
    if record is None:
        return f"model '{name}' is not in the store: `appliance models import PATH --name {name}` first"
    record = verify(store, name, full=False, hash_changed=hash_changed, throttle=throttle)
    if record.state == QUARANTINED:
        return quarantine_reason(record)
    if not store.license_ok(record):
        return (
            f"model '{name}' has license {record.license}, not in store.allowed_licenses; "
            f"`appliance models accept-license {name}` to serve it"
        )
    return None
