"""The model store: weights kept once on local disk, verified, shared by every replica.

Layout (under ``<cache_dir>/hf/hub``, the Hugging Face hub cache that engines
read with ``HF_HUB_CACHE=<cache_dir>/hf/hub`` and ``HF_HUB_OFFLINE=1``, and may only
read: appliance/fleet/landlock.py keeps them from ``store.db``, the lock, the leases and
staging)::

    models--ORG--NAME/blobs/<sha256>                  one read-only copy per file content
    models--ORG--NAME/snapshots/<revision>/<path>     relative links to the blobs
    .staging/                                         imports in progress (removed on recovery)
    .lock, .leases/<model>.lock                       writers' lock; the daemon's in-use leases

A GGUF model is a repo with one ``.gguf`` file. The manifest (``<cache_dir>/store.db``,
SQLite in WAL mode) is the truth: a model exists once its row is committed, after
its blobs and snapshot are on disk, so a kill at any moment leaves the old state or
the complete new model; what a killed import left on disk is removed on the next write.

Its parts: what the manifest holds (appliance/store/records.py), reading and hashing
files (hashing.py), blobs shared between models (sharing.py), the budget's evictions
(budget.py), a model's import (importing.py), the checks that a model is what its
manifest says (integrity.py) and the weights a deployment loads (weights.py); ``Store``
here owns the manifest, the tree and removals, and is the one door to all of them.

Nothing from outside is trusted (appliance/safe_paths.py): names, revisions and file
paths are checked before any filesystem call, every removal and rename goes through
``Store.discard`` / ``Store._rename`` (strictly inside the store's root), blobs are
0440, and what a root import writes belongs to the owner of ``cache_dir`` (the daemon's
user), so the daemon reads it.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import io
import logging
import os
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import sqlite_utils

from appliance.safe_paths import StoreError, check_name, inside, open_regular
from appliance.state import migrations
from appliance.store import importing, integrity, sharing
from appliance.store.hashing import Hasher, PerChunk, hash_file, write_all
from appliance.store.manifest import MIGRATIONS
from appliance.store.records import Incoming, ModelRecord, blob_name, repo_folder

log = logging.getLogger("appliance.store")


class Store:
    def __init__(
        self,
        cache_dir: str | Path,
        *,
        budget_bytes: int = 0,
        allowed_licenses: tuple[str, ...] | list[str] = (),
        clock: Callable[[], float] = time.time,
        write: Callable[[int, memoryview], None] = write_all,
        hasher: Hasher = hash_file,
    ) -> None:
        self.cache_dir = Path(cache_dir)
        self.root = self.cache_dir / "hf" / "hub"
        self.db_path = self.cache_dir / "store.db"
        self.budget_bytes = budget_bytes
        self.allowed = {lic.lower() for lic in allowed_licenses}
        self.clock = clock
        self.write = write
        self.hasher = hasher
        self._db: sqlite_utils.Database | None = None
        self._owner: tuple[int, int] | None = None

    @classmethod
    def from_config(cls, cfg) -> Store:
        return cls(
            cfg.paths.cache_dir,
            budget_bytes=int(cfg.store.budget_gib * 1024**3),
            allowed_licenses=cfg.store.allowed_licenses,
        )

    # --- the manifest ---------------------------------------------------------

    @property
    def db(self) -> sqlite_utils.Database:
        if self._db is None:
            self._mkdir(self.root)
            if not self.db_path.exists():
                # Owned by the store's owner before SQLite opens it: its -wal and -shm get that owner.
                try:
                    self.db_path.touch()
                except OSError as exc:
                    raise StoreError(f"{self.db_path}: cannot create the store's manifest: {exc.strerror}") from None
                self._own(self.db_path)
            try:
                conn = migrations.connect(self.db_path, MIGRATIONS, isolation_level="DEFERRED")
            except sqlite3.OperationalError as exc:
                if "readonly" not in str(exc):
                    raise StoreError(f"{self.db_path}: {exc}") from None
                # A reader without write access (an operator's `models ls`): the writer migrates.
                conn = sqlite3.connect(f"{self.db_path.resolve().as_uri()}?mode=ro", uri=True, timeout=10)
            except migrations.SchemaError as exc:
                raise StoreError(str(exc)) from None
            self._db = sqlite_utils.Database(conn)
        return self._db

    def exists(self) -> bool:
        """Whether there is a manifest at all (reading one creates it)."""
        return self.db_path.exists()

    def close(self) -> None:
        if self._db is not None:
            self._db.conn.close()
            self._db = None

    def models(self) -> list[ModelRecord]:
        return [self._record(row) for row in self.db["models"].rows_where(order_by="name")]

    def get(self, name: str) -> ModelRecord | None:
        check_name(name)
        rows = list(self.db["models"].rows_where("name = ?", [name]))
        return self._record(rows[0]) if rows else None

    def need(self, name: str) -> ModelRecord:
        record = self.get(name)
        if record is None:
            raise StoreError(f"model '{name}' is not in the store ({self.root}); `appliance models ls` lists what is")
        return record

    def _record(self, row: dict) -> ModelRecord:
        files = list(self.db["files"].rows_where("model = ?", [row["name"]], order_by="path"))
        return ModelRecord(
            **{**row, "pinned": bool(row["pinned"]), "title": row.get("title") or ""},
            files=[{"path": f["path"], "sha256": f["sha256"], "size": f["size"]} for f in files],
        )

    def snapshot_dir(self, record: ModelRecord) -> Path:
        return self.root / repo_folder(record.name) / "snapshots" / record.revision

    def model_path(self, record: ModelRecord) -> Path:
        """What an engine loads: the GGUF file, or the snapshot directory."""
        snap = self.snapshot_dir(record)
        if record.format == "gguf" and record.files:
            return snap / record.files[0]["path"]
        return snap

    def license_ok(self, record: ModelRecord) -> bool:
        return record.license.lower() in self.allowed or record.license_accepted_at is not None

    def open_blob(self, record: ModelRecord, file: dict) -> io.FileIO:
        """One file's blob, read as itself: never through a link (``bundle create``)."""
        return open_regular(self.root / repo_folder(record.name) / "blobs" / blob_name(file["sha256"]))

    # --- what the store writes: inside its tree, owned by its owner ------------

    def discard(self, path: Path) -> None:
        """Every removal in the store (and of a finished download): strictly inside its root
        (store_paths.inside)."""
        real = inside(self.root, path)
        if real.is_symlink() or (real.exists() and not real.is_dir()):
            real.unlink(missing_ok=True)
        else:
            shutil.rmtree(real, ignore_errors=True)

    def _rename(self, src: Path, dest: Path) -> None:
        """Every rename in the store: both ends strictly inside its root."""
        os.replace(inside(self.root, src), inside(self.root, dest))

    def _store_owner(self) -> tuple[int, int] | None:
        """Whom what this process writes must belong to, when not to itself: root (sudo,
        install.sh) writing into a store whose cache_dir another user (the daemon's) owns."""
        if self._owner is None and os.geteuid() == 0:
            try:
                st = self.cache_dir.stat()
            except OSError:
                return None
            self._owner = (st.st_uid, st.st_gid)
        return self._owner if self._owner and self._owner != (os.geteuid(), os.getegid()) else None

    def _own(self, path: Path) -> None:
        owner = self._store_owner()
        if owner is not None:
            os.chown(path, *owner, follow_symlinks=False)

    def _mkdir(self, path: Path) -> None:
        """PATH and its missing parents, each owned by the store's owner."""
        missing = []
        while not path.exists() and path != path.parent:
            missing.append(path)
            path = path.parent
        for p in reversed(missing):
            try:
                p.mkdir()
            except FileExistsError:
                continue
            except OSError as exc:  # a file where a folder goes (paths.cache_dir), no permission
                raise StoreError(f"{p}: cannot make the store's folder: {exc.strerror}") from None
            self._own(p)

    def _lock_file(self, path: Path) -> BinaryIO:
        self._mkdir(path.parent)
        f = open(path, "a+b")  # noqa: SIM115 - held by the caller
        self._own(path)
        return f

    def download_dir(self, folder: str) -> Path:
        """A folder under the store for a download in progress (hub pulls)."""
        path = inside(self.root, self.root / ".downloads" / folder)
        self._mkdir(path)
        return path

    # --- locking --------------------------------------------------------------

    @contextlib.contextmanager
    def _writer(self) -> Iterator[None]:
        """One writer at a time; the first thing a writer does is clear what a killed one left."""
        with self._lock_file(self.root / ".lock") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._recover()
            yield

    def lease(self, name: str) -> BinaryIO:
        """A shared lock held while a replica may use the model; eviction and rm skip it.
        The kernel drops it when the holder dies, so a crashed daemon leaks nothing."""
        f = self._lock_file(self.root / ".leases" / f"{repo_folder(name)}.lock")
        fcntl.flock(f, fcntl.LOCK_SH)
        return f

    def in_use(self, name: str) -> bool:
        path = self.root / ".leases" / f"{repo_folder(name)}.lock"
        if not path.exists():
            return False
        with self._lock_file(path) as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(f, fcntl.LOCK_UN)
        return False

    def _recover(self) -> None:
        """Remove staging dirs, snapshots and blobs that no committed row refers to."""
        self.discard(self.root / ".staging")
        wanted_snaps: dict[str, set[str]] = {}
        wanted_blobs: dict[str, set[str]] = {}
        for row in self.db["models"].rows:
            folder = repo_folder(row["name"])
            wanted_snaps.setdefault(folder, set()).add(row["revision"])
            for f in self.db["files"].rows_where("model = ?", [row["name"]]):
                wanted_blobs.setdefault(folder, set()).add(f["sha256"])
        for repo in self.root.glob("models--*"):
            snaps, blobs = repo / "snapshots", repo / "blobs"
            for snap in snaps.glob("*") if snaps.is_dir() else ():
                if snap.name not in wanted_snaps.get(repo.name, set()):
                    self.discard(snap)
            for blob in blobs.glob("*") if blobs.is_dir() else ():
                if blob.name not in wanted_blobs.get(repo.name, set()):
                    self.discard(blob)
            if repo.name not in wanted_snaps:
                self.discard(repo)

    # --- import ---------------------------------------------------------------

    def add(self, incoming: Incoming, progress: Callable[[int], None] | None = None) -> tuple[ModelRecord, list[str]]:
        """Import a model (appliance/store/importing.py): its record and the names evicted."""
        return importing.add(self, incoming, progress)

    # --- everything else that writes ------------------------------------------

    def remove(self, name: str, *, force: bool = False) -> None:
        with self._writer():
            self.need(name)
            if self.in_use(name) and not force:
                raise StoreError(f"model '{name}' is in use by a running replica; stop it first")
            self._delete(name)

    def _delete(self, name: str) -> None:
        shared = sharing.shared_blobs(self, name)
        with self.db.conn:
            self.db.table("files").delete_where("model = ?", [name])
            self.db.table("models").delete_where("name = ?", [name])
        self.discard(self.root / repo_folder(name))
        for digest, (before, other) in shared.items():
            sharing.refingerprint(self, digest, before, other)

    def set_pinned(self, name: str, pinned: bool) -> None:
        self.need(name)
        self.update(name, pinned=int(pinned))

    def accept_license(self, name: str, who: str | None = None) -> ModelRecord:
        self.need(name)
        who = who or os.environ.get("SUDO_USER") or getpass.getuser()
        self.update(name, license_accepted_by=who, license_accepted_at=self.clock())
        log.info("license of %s accepted by %s", name, who)
        return self.need(name)

    def touch(self, name: str) -> None:
        self.update(name, last_used_at=self.clock())

    def update(self, name: str, **values) -> None:
        """Set columns of the model's row."""
        with self.db.conn:
            self.db.table("models").update(name, values)

    def clock_past(self, ctime_ns: int, limit_s: float = 5.0) -> bool:
        """Wait until the store filesystem's clock has moved past ctime_ns (file timestamps
        are coarse: a kernel tick on most filesystems, up to 2 s on some), so that any later
        change to a file gets a later ctime: its fingerprint taken now cannot miss it. The
        writers' lock file is the probe (touching it changes no lock). False when the clock
        does not get there (set back, or no write access): record no fingerprint then."""
        probe = self.root / ".lock"
        deadline = time.monotonic() + limit_s
        try:
            while True:
                probe.touch()
                if probe.stat().st_ctime_ns > ctime_ns:
                    return True
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.001)
        except OSError:
            return False

    # --- checks: a model is what its manifest says (appliance/store/integrity.py) ---

    def verify(
        self, name: str, *, full: bool = True, hash_changed: bool = True, throttle: PerChunk | None = None
    ) -> ModelRecord:
        return integrity.verify(self, name, full=full, hash_changed=hash_changed, throttle=throttle)

    def next_scrub(self, interval_s: float) -> tuple[float, str, str] | None:
        return integrity.next_scrub(self, interval_s)

    def scrub_file(self, name: str, path: str, throttle: PerChunk | None = None) -> str:
        return integrity.scrub_file(self, name, path, throttle)

    def admission(self, name: str, *, hash_changed: bool = True, throttle: PerChunk | None = None) -> str | None:
        return integrity.admission(self, name, hash_changed=hash_changed, throttle=throttle)
