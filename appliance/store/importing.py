"""A model's import into the store: its files copied and hashed into staging and checked
(sizes, sha256, a GGUF whole), room made under the budget, its blobs and snapshot
published, then its manifest rows committed in one transaction (``add``). Called through
``Store.add`` (appliance/store/store.py), inside the writers' lock: a kill at any moment
leaves the old state or the whole new model.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import tarfile
import uuid
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.safe_paths import StoreError, check_revision
from appliance.store import budget, sharing
from appliance.store.budget import gib
from appliance.store.hashing import copy_and_hash, fingerprint
from appliance.store.records import READY, Incoming, ModelRecord, content_revision, repo_folder

if TYPE_CHECKING:
    from appliance.store.store import Store

log = logging.getLogger("appliance.store")


BLOB_MODE = 0o440  # read-only, and not for other users: weights may be licensed or private


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def add(
    store: Store, incoming: Incoming, progress: Callable[[int], None] | None = None
) -> tuple[ModelRecord, list[str]]:
    """Import a model; returns its record and the names evicted to make room. Models are
    evicted only once the import is staged and checked: a bad one evicts nothing.
    progress is told the size of each chunk copied."""
    incoming.check()
    with store._writer():
        existing = store.get(incoming.name)
        evicted: list[str] = []
        staging = store.root / ".staging" / uuid.uuid4().hex
        store._mkdir(staging)
        try:
            hashed = _stage(store, incoming, staging, progress)
            revision = incoming.revision or content_revision(hashed)
            if existing is not None:
                if existing.revision == revision and {(f["path"], f["sha256"]) for f in existing.files} == set(
                    hashed.items()
                ):
                    return existing, []
                raise StoreError(
                    f"model '{incoming.name}' is already in the store (revision "
                    f"{existing.revision}); `appliance models rm {incoming.name}` first"
                )
            sizes = {hashed[f.path]: f.size for f in incoming.files}
            evicted = _make_room(store, sizes, incoming.name)
            _publish(store, incoming.name, revision, hashed, staging, sizes)
        finally:
            store.discard(staging)
        fmt = "gguf" if len(hashed) == 1 and next(iter(hashed)).endswith(".gguf") else "hf"
        # Hashed on the way in: the published blobs' fingerprints are their verified state
        # (none recorded, so hashed at the first check, if the clock does not move on).
        snap = store.root / repo_folder(incoming.name) / "snapshots" / revision
        stats = {path: (snap / path).stat() for path in hashed}
        settled = store.clock_past(max(st.st_ctime_ns for st in stats.values()))
        prints = {
            path: fingerprint(st) if settled and fingerprint((snap / path).stat()) == fingerprint(st) else None
            for path, st in stats.items()
        }
        now = store.clock()
        _commit(
            store,
            {
                "name": incoming.name,
                "format": fmt,
                "source": incoming.source,
                "revision": revision,
                "total_bytes": incoming.total_bytes,
                "license": incoming.license,
                "license_accepted_by": incoming.license_accepted_by,
                "license_accepted_at": incoming.license_accepted_at,
                "imported_at": now,
                "last_used_at": None,
                "pinned": 0,
                "state": READY,
                "state_reason": "",
                "title": incoming.title,
                "kind": incoming.kind,
            },
            [
                {
                    "model": incoming.name,
                    "path": f.path,
                    "sha256": hashed[f.path],
                    "size": f.size,
                    "fingerprint": prints[f.path],
                    "verified_at": now,
                }
                for f in incoming.files
            ],
        )
        log.info(
            "imported %s (%d files, %d bytes, license %s)",
            incoming.name,
            len(hashed),
            incoming.total_bytes,
            incoming.license,
        )
        return store.need(incoming.name), evicted


def _commit(store: Store, model: dict, files: list[dict]) -> None:
    """The model's row and its files' rows in one transaction: all of them or none.
    (sqlite_utils' insert commits on its own, so plain SQL here.)"""

    def insert(table: str, rows: list[dict]) -> None:
        columns = list(rows[0])
        store.db.conn.executemany(
            f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
            [[row[c] for c in columns] for row in rows],
        )

    try:
        with store.db.conn:
            insert("models", [model])
            insert("files", files)
    except sqlite3.Error as exc:
        raise StoreError(
            f"cannot record model '{model['name']}' in {store.db_path}: {exc}; nothing was imported"
        ) from None


def _stage(
    store: Store, incoming: Incoming, staging: Path, progress: Callable[[int], None] | None = None
) -> dict[str, str]:
    hashed: dict[str, str] = {}
    for i, f in enumerate(incoming.files):
        dest = staging / f"{i}.blob"
        try:
            with f.open() as src:
                digest, size = copy_and_hash(src, dest, store.write, progress)
        except (zipfile.BadZipFile, tarfile.TarError, EOFError) as exc:
            raise StoreError(f"{incoming.source}: {f.path} is damaged or truncated: {exc}") from None
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise StoreError(f"disk full while importing {f.path} into {store.root}; nothing was changed") from None
            raise StoreError(f"{incoming.source}: cannot read {f.path}: {exc}") from None
        if size != f.size:
            raise StoreError(f"{incoming.source}: {f.path} is {size} bytes, expected {f.size} (truncated?)")
        if f.expected_sha256 and digest != f.expected_sha256:
            raise StoreError(f"{incoming.source}: {f.path} has sha256 {digest}, expected {f.expected_sha256}")
        if f.path.endswith(".gguf"):
            _check_gguf(incoming.source, f.path, dest)
        elif f.path.endswith(".safetensors"):
            _check_safetensors(incoming.source, f.path, dest)
        hashed[f.path] = digest
    _check_shards(incoming, staging)
    return hashed


def _publish(
    store: Store, name: str, revision: str, hashed: dict[str, str], staging: Path, sizes: dict[str, int]
) -> None:
    """Blobs into place (content-addressed: renaming one twice is harmless; content another
    model keeps already is a second name of its blob, one copy per sha256), then the
    snapshot directory, built in staging, renamed into place in one step."""
    repo = store.root / repo_folder(name)
    blobs = repo / "blobs"
    store._mkdir(blobs)
    store._mkdir(repo / "snapshots")
    snap_tmp = staging / "snapshot"
    for i, (path, digest) in enumerate(hashed.items()):
        blob = blobs / digest
        if not blob.exists() and not sharing.link_shared(store, digest, sizes[digest], blob, name):
            tmp = staging / f"{i}.blob"
            store._own(tmp)
            os.chmod(tmp, BLOB_MODE)
            store._rename(tmp, blob)
        link = snap_tmp / path
        store._mkdir(link.parent)
        depth = len(Path(path).parts) + 1  # snapshots/<rev>/<path...>
        link.symlink_to(Path(*([".."] * depth)) / "blobs" / digest)
        store._own(link)
    _fsync_dir(blobs)
    target = repo / "snapshots" / check_revision(revision)
    if target.exists():  # a leftover of a killed import of this very content
        store.discard(target)
    store._rename(snap_tmp, target)
    _fsync_dir(repo / "snapshots")


def _make_room(store: Store, incoming: dict[str, int], name: str) -> list[str]:
    """Evict what appliance/store/budget.py chooses so that incoming (sha256 -> size)
    fits the budget; the names evicted."""
    if not store.budget_bytes:
        return []
    plan = budget.evictions(store.models(), incoming, store.budget_bytes, store.in_use, name)
    for m in plan:
        store._delete(m.name)
        log.warning("evicted %s (%s, least recently used) to make room for %s", m.name, gib(m.total_bytes), name)
    return [m.name for m in plan]


def _check_gguf(source: str, path: str, staged: Path) -> None:
    """A GGUF file must be whole and readable (its header, every tensor inside the file)
    before it is stored: never hand llama.cpp a file it would choke on."""
    from appliance.store.gguf import GgufError, read

    try:
        read(staged)
    except GgufError as exc:
        raise StoreError(f"{source}: {path} is not a usable GGUF file: {exc}") from None


def _check_safetensors(source: str, path: str, staged: Path) -> None:
    """A safetensors file must hold all the data its header describes: a copy cut short on
    the way from the media is refused here, not by the engine minutes into its load."""
    from appliance.store.safetensors import SafetensorsError, check_file

    try:
        check_file(staged)
    except SafetensorsError as exc:
        raise StoreError(f"{source}: {path} is not whole ({exc}): was it copied whole? nothing was imported") from None


def _check_shards(incoming: Incoming, staging: Path) -> None:
    """Every shard a sharded checkpoint's index names must have come along."""
    from appliance.store.safetensors import INDEX_SUFFIX, SafetensorsError, missing_shards

    present = [f.path for f in incoming.files]
    for i, f in enumerate(incoming.files):
        if not f.path.endswith(INDEX_SUFFIX):
            continue
        try:
            missing = missing_shards(staging / f"{i}.blob", f.path, present)
        except SafetensorsError as exc:
            raise StoreError(f"{incoming.source}: {f.path}: {exc}; nothing was imported") from None
        if missing:
            raise StoreError(
                f"{incoming.source}: {f.path} names {len(missing)} shard(s) that are not there "
                f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): was the folder copied whole? "
                "nothing was imported"
            )
