"""Blobs shared between models: content another model keeps already is stored once, as a
second name (a hard link) of its blob, and only while that blob is as it was verified.
Adding or removing a name changes a blob's ctime, not its content: the rows that recorded
it get its new fingerprint (``refingerprint``), so sharing costs no rehash."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.safe_paths import inside
from appliance.store.hashing import fingerprint
from appliance.store.records import READY, blob_name, repo_folder

if TYPE_CHECKING:
    from appliance.store.store import Store


def blob_of(store: Store, model: str, digest: str) -> Path:
    return store.root / repo_folder(model) / "blobs" / blob_name(digest)


def link_shared(store: Store, digest: str, size: int, dest: Path, name: str) -> bool:
    """dest made a second name of the blob another ready model keeps with this content,
    if that blob is still as it was verified (its fingerprint unchanged: a link never
    spreads a changed file); False when there is none (the staged copy is used)."""
    rows = store.db.execute(
        "SELECT f.model, f.fingerprint FROM files f JOIN models m ON m.name = f.model "
        "WHERE f.sha256 = ? AND f.size = ? AND f.model != ? AND m.state = ?",
        [digest, size, name, READY],
    ).fetchall()
    for model, recorded in rows:
        existing = blob_of(store, model, digest)
        try:
            st = existing.lstat()
        except OSError:
            continue
        if recorded is None or not stat.S_ISREG(st.st_mode) or fingerprint(st) != recorded:
            continue
        try:
            os.link(inside(store.root, existing), inside(store.root, dest), follow_symlinks=False)
        except OSError:
            return False  # another filesystem, or links not allowed: a copy of its own
        refingerprint(store, digest, recorded, dest)
        return True
    return False


def refingerprint(store: Store, digest: str, before: str, blob: Path) -> None:
    """A name added to a blob or removed from it changes its ctime, not its content: the
    rows that recorded it as it was (before) get its new fingerprint, so that the models
    sharing it are not all rehashed at their next start. Once the clock is past the new
    ctime (as at import), else none: then it is hashed at its next check."""
    try:
        st = blob.lstat()
    except OSError:
        return
    now = fingerprint(st) if store.clock_past(st.st_ctime_ns) else None
    with store.db.conn:
        store.db.execute("UPDATE files SET fingerprint = ? WHERE sha256 = ? AND fingerprint = ?", [now, digest, before])


def shared_blobs(store: Store, name: str) -> dict[str, tuple[str, Path]]:
    """The model's blobs that other models keep too: sha256 -> (fingerprint now, another
    model's name of it)."""
    rows = store.db.execute(
        "SELECT DISTINCT f.sha256, o.model FROM files f JOIN files o ON o.sha256 = f.sha256 "
        "WHERE f.model = ? AND o.model != ?",
        [name, name],
    ).fetchall()
    shared: dict[str, tuple[str, Path]] = {}
    for digest, other in rows:
        blob = blob_of(store, other, digest)
        try:
            shared[digest] = (fingerprint(blob.lstat()), blob)
        except OSError:
            continue
    return shared
