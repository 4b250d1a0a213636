"""The model store: weights kept once on local disk, verified, shared by every replica.

Layout (under ``<cache_dir>/hf/hub``, the Hugging Face hub cache that engines
read with ``HF_HOME=<cache_dir>/hf`` and ``HF_HUB_OFFLINE=1``)::

    models--ORG--NAME/blobs/<sha256>                  one read-only copy per file content
    models--ORG--NAME/snapshots/<revision>/<path>     relative links to the blobs
    .staging/                                         imports in progress (removed on recovery)
    .lock, .leases/<model>.lock                       writers' lock; the daemon's in-use leases

A GGUF model is a repo with one ``.gguf`` file. The manifest (``<cache_dir>/store.db``,
SQLite in WAL mode) is the truth: a model exists once its row is committed, after
its blobs and snapshot are on disk, so a kill at any moment leaves the old state or
the complete new model; what a killed import left on disk is removed on the next write.

Integrity at serve time: each file's row records the stat fingerprint (device, inode,
size, mtime, ctime) it had when it was last hashed, and when. A file whose fingerprint
changed since is rehashed before it is served (any write, chmod, rename or replacement
changes its ctime, which only the kernel sets); an unchanged one is not, so a start
costs a stat per file. Bit rot changes no stat: the daemon's scrub
(appliance/store/guard.py) rehashes files whose last verification is old.

Nothing from outside is trusted (appliance/safe_paths.py): names, revisions and file
paths are checked before any filesystem call, every removal and rename goes through
``Store.discard`` / ``Store._rename`` (strictly inside the store's root), blobs are
0440, and what a root import writes belongs to the owner of ``cache_dir`` (the daemon's
user), so the daemon reads it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import getpass
import hashlib
import logging
import os
import re
import shutil
import sqlite3
import stat
import tarfile
import threading
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

import sqlite_utils

from appliance.config import BUILTIN_PREFIX, STORE_PREFIX, Config, ModelConfig, builtin_model_path
from appliance.safe_paths import StoreError, check_file_set, check_name, check_revision, inside, open_regular
from appliance.state import migrations

log = logging.getLogger("appliance.store")


READY = "ready"
QUARANTINED = "quarantined"
CHUNK = 4 << 20
BLOB_MODE = 0o440  # read-only, and not for other users: weights may be licensed or private
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def repo_folder(name: str) -> str:
    return "models--" + check_name(name).replace("/", "--")


@dataclass(frozen=True)
class SourceFile:
    """One file of a model being imported: where it goes, how to read it, what it must hash to."""

    path: str
    size: int
    open: Callable[[], BinaryIO]
    expected_sha256: str | None = None


@dataclass
class Incoming:
    name: str
    source: str
    files: list[SourceFile]
    license: str = "unknown"
    revision: str | None = None
    # A license accepted where the model came from (a bundle): accepted here too.
    license_accepted_by: str | None = None
    license_accepted_at: float | None = None
    kind: str = "model"  # or "adapter": a LoRA adapter (appliance/store/adapters.py)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def check(self) -> Incoming:
        """Name, revision and every file's path, size and hash against the store's grammar:
        called before anything is read or written (a bundle's models all at once)."""
        check_name(self.name)
        if self.revision is not None:
            check_revision(self.revision)
        if not self.files:
            raise StoreError(f"{self.source}: no model files found")
        check_file_set((f.path for f in self.files), self.source)
        for f in self.files:
            if type(f.size) is not int or f.size < 0:
                raise StoreError(f"{self.source}: {f.path} has size {f.size!r}, not a number of bytes")
            if f.expected_sha256 is not None and not (
                isinstance(f.expected_sha256, str) and _HEX64.fullmatch(f.expected_sha256)
            ):
                raise StoreError(f"{self.source}: {f.path} has sha256 {f.expected_sha256!r}, not 64 hex digits")
        return self


@dataclass
class ModelRecord:
    name: str
    format: str
    source: str
    revision: str
    total_bytes: int
    license: str
    license_accepted_by: str | None
    license_accepted_at: float | None
    imported_at: float
    last_used_at: float | None
    pinned: bool
    state: str
    state_reason: str
    files: list[dict] = field(default_factory=list)
    kind: str = "model"  # or "adapter": a LoRA adapter (appliance/store/adapters.py)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        written = os.write(fd, data)
        data = data[written:]


def copy_and_hash(
    src: BinaryIO,
    dest: Path,
    write: Callable[[int, memoryview], None] = _write_all,
    progress: Callable[[int], None] | None = None,
) -> tuple[str, int]:
    """Stream src into dest and hash it in the same pass (one read of the source);
    progress is told each chunk's size."""
    h = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    size = 0
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        while n := src.readinto(buf):
            h.update(view[:n])
            write(fd, view[:n])
            size += n
            if progress is not None:
                progress(n)
        os.fsync(fd)
    finally:
        os.close(fd)
    return h.hexdigest(), size


class Interrupted(Exception):
    """A throttled read was stopped (the daemon is stopping)."""


class Throttle:
    """Paces a read to bytes_per_s on average (0: unlimited); once stop is set, the next
    chunk raises Interrupted. clock and sleep are seams for tests; sleep(s) waits up to s
    seconds and returns True when stopped (threading.Event.wait)."""

    def __init__(
        self,
        bytes_per_s: float = 0,
        stop: threading.Event | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], bool] | None = None,
    ) -> None:
        self.bytes_per_s = bytes_per_s
        self.stop = stop or threading.Event()
        self.clock = clock
        self.sleep = sleep or self.stop.wait
        self._start: float | None = None
        self._done = 0

    def __call__(self, n: int) -> None:
        """n more bytes were read."""
        if self.stop.is_set():
            raise Interrupted
        if not self.bytes_per_s:
            return
        now = self.clock()
        if self._start is None:
            self._start = now
        self._done += n
        ahead = self._done / self.bytes_per_s - (now - self._start)
        if ahead > 0 and self.sleep(ahead):
            raise Interrupted


# Told the size of each chunk read: a Throttle paces the reads, a progress bar counts them.
PerChunk = Callable[[int], None]


class Hasher(Protocol):
    def __call__(self, path: Path, throttle: PerChunk | None = None) -> str: ...


def hash_file(path: Path, throttle: PerChunk | None = None) -> str:
    h = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
            if throttle is not None:
                throttle(n)
    return h.hexdigest()


def fingerprint(st: os.stat_result) -> str:
    """What changes when a file is written, truncated, chmod-ed, renamed or replaced. The
    kernel sets ctime to its clock on every such change; nobody can set it back (short of
    setting the system clock back). Text, not integers: inode and device numbers may not
    fit SQLite's signed 64 bits."""
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Store:
    def __init__(
        self,
        cache_dir: str | Path,
        *,
        budget_bytes: int = 0,
        allowed_licenses: tuple[str, ...] | list[str] = (),
        clock: Callable[[], float] = time.time,
        write: Callable[[int, memoryview], None] = _write_all,
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
                conn = migrations.connect(self.db_path, MIGRATIONS, isolation_level="")
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
            **{**row, "pinned": bool(row["pinned"])},
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

    def open_blob(self, record: ModelRecord, file: dict) -> BinaryIO:
        """One file's blob, read as itself: never through a link (``bundle create``)."""
        return open_regular(self.root / repo_folder(record.name) / "blobs" / _blob_name(file["sha256"]))

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
        """Import a model; returns its record and the names evicted to make room. Models are
        evicted only once the import is staged and checked: a bad one evicts nothing.
        progress is told the size of each chunk copied."""
        incoming.check()
        with self._writer():
            existing = self.get(incoming.name)
            evicted: list[str] = []
            staging = self.root / ".staging" / uuid.uuid4().hex
            self._mkdir(staging)
            try:
                hashed = self._stage(incoming, staging, progress)
                revision = incoming.revision or _content_revision(hashed)
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
                evicted = self._make_room(sizes, incoming.name)
                self._publish(incoming.name, revision, hashed, staging, sizes)
            finally:
                self.discard(staging)
            fmt = "gguf" if len(hashed) == 1 and next(iter(hashed)).endswith(".gguf") else "hf"
            # Hashed on the way in: the published blobs' fingerprints are their verified state
            # (none recorded, so hashed at the first check, if the clock does not move on).
            snap = self.root / repo_folder(incoming.name) / "snapshots" / revision
            stats = {path: (snap / path).stat() for path in hashed}
            settled = self._clock_past(max(st.st_ctime_ns for st in stats.values()))
            prints = {
                path: fingerprint(st) if settled and fingerprint((snap / path).stat()) == fingerprint(st) else None
                for path, st in stats.items()
            }
            now = self.clock()
            self._commit(
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
            return self.need(incoming.name), evicted

    def _commit(self, model: dict, files: list[dict]) -> None:
        """The model's row and its files' rows in one transaction: all of them or none.
        (sqlite_utils' insert commits on its own, so plain SQL here.)"""

        def insert(table: str, rows: list[dict]) -> None:
            columns = list(rows[0])
            self.db.conn.executemany(
                f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
                [[row[c] for c in columns] for row in rows],
            )

        try:
            with self.db.conn:
                insert("models", [model])
                insert("files", files)
        except sqlite3.Error as exc:
            raise StoreError(
                f"cannot record model '{model['name']}' in {self.db_path}: {exc}; nothing was imported"
            ) from None

    def _stage(
        self, incoming: Incoming, staging: Path, progress: Callable[[int], None] | None = None
    ) -> dict[str, str]:
        hashed: dict[str, str] = {}
        for i, f in enumerate(incoming.files):
            dest = staging / f"{i}.blob"
            try:
                with f.open() as src:
                    digest, size = copy_and_hash(src, dest, self.write, progress)
            except (zipfile.BadZipFile, tarfile.TarError, EOFError) as exc:
                raise StoreError(f"{incoming.source}: {f.path} is damaged or truncated: {exc}") from None
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    raise StoreError(
                        f"disk full while importing {f.path} into {self.root}; nothing was changed"
                    ) from None
                raise StoreError(f"{incoming.source}: cannot read {f.path}: {exc}") from None
            if size != f.size:
                raise StoreError(f"{incoming.source}: {f.path} is {size} bytes, expected {f.size} (truncated?)")
            if f.expected_sha256 and digest != f.expected_sha256:
                raise StoreError(f"{incoming.source}: {f.path} has sha256 {digest}, expected {f.expected_sha256}")
            if f.path.endswith(".gguf"):
                _check_gguf(incoming.source, f.path, dest)
            hashed[f.path] = digest
        return hashed

    def _publish(self, name: str, revision: str, hashed: dict[str, str], staging: Path, sizes: dict[str, int]) -> None:
        """Blobs into place (content-addressed: renaming one twice is harmless; content another
        model keeps already is a second name of its blob, one copy per sha256), then the
        snapshot directory, built in staging, renamed into place in one step."""
        repo = self.root / repo_folder(name)
        blobs = repo / "blobs"
        self._mkdir(blobs)
        self._mkdir(repo / "snapshots")
        snap_tmp = staging / "snapshot"
        for i, (path, digest) in enumerate(hashed.items()):
            blob = blobs / digest
            if not blob.exists() and not self._link_shared(digest, sizes[digest], blob, name):
                tmp = staging / f"{i}.blob"
                self._own(tmp)
                os.chmod(tmp, BLOB_MODE)
                self._rename(tmp, blob)
            link = snap_tmp / path
            self._mkdir(link.parent)
            depth = len(Path(path).parts) + 1  # snapshots/<rev>/<path...>
            link.symlink_to(Path(*([".."] * depth)) / "blobs" / digest)
            self._own(link)
        _fsync_dir(blobs)
        target = repo / "snapshots" / check_revision(revision)
        if target.exists():  # a leftover of a killed import of this very content
            self.discard(target)
        self._rename(snap_tmp, target)
        _fsync_dir(repo / "snapshots")

    def _make_room(self, incoming: dict[str, int], name: str) -> list[str]:
        """Evict least recently used models until incoming (sha256 -> size) fits the budget.
        Bytes are counted once per sha256: content already in the store costs nothing more,
        and evicting a model frees only the blobs no other model keeps."""
        if not self.budget_bytes:
            return []
        models = self.models()
        used = _unique_bytes(models)
        stored = {f["sha256"] for m in models for f in m.files}
        needed = sum(size for digest, size in incoming.items() if digest not in stored)
        if used + needed <= self.budget_bytes:
            return []
        candidates = sorted(
            (m for m in models if not m.pinned and not self.in_use(m.name)),
            key=lambda m: m.last_used_at or m.imported_at,
        )
        plan: list[ModelRecord] = []
        freed = 0
        for m in candidates:
            if used - freed + needed <= self.budget_bytes:
                break
            plan.append(m)
            kept = [k for k in models if k not in plan]
            freed = used - _unique_bytes(kept)
            needed = sum(size for digest, size in incoming.items() if digest not in _digests(kept))
        if used - freed + needed > self.budget_bytes:
            raise StoreError(
                f"not enough room for '{name}': it needs {_gib(needed)}, the store budget is "
                f"{_gib(self.budget_bytes)} with {_gib(used)} used and only {_gib(freed)} evictable "
                "(pinned or in use models are kept); raise store.budget_gib or rm a model"
            )
        for m in plan:
            self._delete(m.name)
            log.warning("evicted %s (%s, least recently used) to make room for %s", m.name, _gib(m.total_bytes), name)
        return [m.name for m in plan]

    # --- blobs shared between models: one copy per sha256 -------------------------

    def _blob_of(self, model: str, digest: str) -> Path:
        return self.root / repo_folder(model) / "blobs" / _blob_name(digest)

    def _link_shared(self, digest: str, size: int, dest: Path, name: str) -> bool:
        """dest made a second name of the blob another ready model keeps with this content,
        if that blob is still as it was verified (its fingerprint unchanged: a link never
        spreads a changed file); False when there is none (the staged copy is used)."""
        rows = self.db.execute(
            "SELECT f.model, f.fingerprint FROM files f JOIN models m ON m.name = f.model "
            "WHERE f.sha256 = ? AND f.size = ? AND f.model != ? AND m.state = ?",
            [digest, size, name, READY],
        ).fetchall()
        for model, recorded in rows:
            existing = self._blob_of(model, digest)
            try:
                st = existing.lstat()
            except OSError:
                continue
            if recorded is None or not stat.S_ISREG(st.st_mode) or fingerprint(st) != recorded:
                continue
            try:
                os.link(inside(self.root, existing), inside(self.root, dest), follow_symlinks=False)
            except OSError:
                return False  # another filesystem, or links not allowed: a copy of its own
            self._refingerprint(digest, recorded, dest)
            return True
        return False

    def _refingerprint(self, digest: str, before: str, blob: Path) -> None:
        """A name added to a blob or removed from it changes its ctime, not its content: the
        rows that recorded it as it was (before) get its new fingerprint, so that the models
        sharing it are not all rehashed at their next start. Once the clock is past the new
        ctime (as at import), else none: then it is hashed at its next check."""
        try:
            st = blob.lstat()
        except OSError:
            return
        now = fingerprint(st) if self._clock_past(st.st_ctime_ns) else None
        with self.db.conn:
            self.db.execute(
                "UPDATE files SET fingerprint = ? WHERE sha256 = ? AND fingerprint = ?", [now, digest, before]
            )

    # --- everything else that writes ------------------------------------------

    def remove(self, name: str, *, force: bool = False) -> None:
        with self._writer():
            self.need(name)
            if self.in_use(name) and not force:
                raise StoreError(f"model '{name}' is in use by a running replica; stop it first")
            self._delete(name)

    def _delete(self, name: str) -> None:
        shared = self._shared_blobs(name)
        with self.db.conn:
            self.db["files"].delete_where("model = ?", [name])
            self.db["models"].delete_where("name = ?", [name])
        self.discard(self.root / repo_folder(name))
        for digest, (before, other) in shared.items():
            self._refingerprint(digest, before, other)

    def _shared_blobs(self, name: str) -> dict[str, tuple[str, Path]]:
        """The model's blobs that other models keep too: sha256 -> (fingerprint now, another
        model's name of it)."""
        rows = self.db.execute(
            "SELECT DISTINCT f.sha256, o.model FROM files f JOIN files o ON o.sha256 = f.sha256 "
            "WHERE f.model = ? AND o.model != ?",
            [name, name],
        ).fetchall()
        shared: dict[str, tuple[str, Path]] = {}
        for digest, other in rows:
            blob = self._blob_of(other, digest)
            try:
                shared[digest] = (fingerprint(blob.lstat()), blob)
            except OSError:
                continue
        return shared

    def set_pinned(self, name: str, pinned: bool) -> None:
        self.need(name)
        self._update(name, pinned=int(pinned))

    def accept_license(self, name: str, who: str | None = None) -> ModelRecord:
        self.need(name)
        who = who or os.environ.get("SUDO_USER") or getpass.getuser()
        self._update(name, license_accepted_by=who, license_accepted_at=self.clock())
        log.info("license of %s accepted by %s", name, who)
        return self.need(name)

    def touch(self, name: str) -> None:
        self._update(name, last_used_at=self.clock())

    def _update(self, name: str, **values) -> None:
        with self.db.conn:
            self.db["models"].update(name, values)

    def verify(
        self, name: str, *, full: bool = True, hash_changed: bool = True, throttle: PerChunk | None = None
    ) -> ModelRecord:
        """full: rehash every file; a model that matches again is ready again. Otherwise check
        sizes and rehash only the files whose stat fingerprint changed since they were last
        hashed (or that have none recorded: a manifest of an older appliance), or with
        hash_changed=False sizes only; a quarantined model is left as it is. A mismatch
        quarantines the model. A file that hashes right gets its fingerprint recorded."""
        record = self.need(name)
        if not full and record.state == QUARANTINED:
            return record  # known bad: `appliance models verify` (full) is what clears it
        rehash = True if full else (None if hash_changed else False)
        rows = self._file_rows(name)
        problem = "" if rows else "the manifest lists no files for it (a damaged import); re-import it"
        for row in rows:
            problem = self._check_file(record, row, rehash=rehash, throttle=throttle)
            if problem:
                break
        if problem:
            self._quarantine(name, problem)
        elif full and record.state == QUARANTINED:
            log.info("model %s verified again: ready", name)
            self._update(name, state=READY, state_reason="")
        return self.need(name)

    def _file_rows(self, name: str) -> list[dict]:
        return list(self.db["files"].rows_where("model = ?", [name], order_by="path"))

    def _check_file(
        self, record: ModelRecord, row: dict, *, rehash: bool | None, throttle: PerChunk | None = None
    ) -> str:
        """What is wrong with one file ('' when nothing). rehash: True always, None when its
        fingerprint changed, False never (size only)."""
        rel = row["path"]
        path = self.snapshot_dir(record) / rel
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
        settled = self._clock_past(st.st_ctime_ns)
        try:
            digest = self.hasher(path, throttle)
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
            with self.db.conn:
                self.db.execute(
                    "UPDATE files SET fingerprint = ?, verified_at = ? WHERE model = ? AND path = ? AND sha256 = ?",
                    [after, self.clock(), record.name, rel, row["sha256"]],
                )
        return ""

    def _clock_past(self, ctime_ns: int, limit_s: float = 5.0) -> bool:
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

    def _quarantine(self, name: str, problem: str) -> None:
        record = self.get(name)
        if record is None:  # removed meanwhile
            return
        if record.state != QUARANTINED or record.state_reason != problem:
            log.error("model %s quarantined: %s", name, problem)
        self._update(name, state=QUARANTINED, state_reason=problem)

    def next_scrub(self, interval_s: float) -> tuple[float, str, str] | None:
        """(when it is due, model, path): the ready model's file whose last verification is
        the oldest; never verified since an older appliance imported it counts from its
        import. A verification in the future means the clock was set back: due now."""
        now = self.clock()
        best = None
        for model, path, at in self.db.execute(
            "SELECT f.model, f.path, COALESCE(f.verified_at, m.imported_at) FROM files f "
            "JOIN models m ON m.name = f.model WHERE m.state = ?",
            [READY],
        ).fetchall():
            due = now if at is None or at > now + 60 else at + interval_s
            if best is None or (due, model, path) < best:
                best = (due, model, path)
        return best

    def scrub_file(self, name: str, path: str, throttle: PerChunk | None = None) -> str:
        """Rehash one file of a ready model whatever its fingerprint says; a mismatch
        quarantines the model. Returns the problem, '' when there is none."""
        record = self.get(name)
        row = next((r for r in self._file_rows(name) if r["path"] == path), None)
        if record is None or row is None or record.state != READY:
            return ""
        problem = self._check_file(record, row, rehash=True, throttle=throttle)
        if problem:
            current = self.get(name)
            if current is None or current.revision != record.revision:
                return ""  # removed or replaced while being hashed
            self._quarantine(name, problem)
        return problem

    def admission(self, name: str, *, hash_changed: bool = True, throttle: PerChunk | None = None) -> str | None:
        """Why the daemon must not serve this store model, or None when it may. Files whose
        fingerprint changed are rehashed first unless hash_changed is False (sizes only)."""
        try:
            record = self.get(name)
        except StoreError as exc:
            return str(exc)
        if record is None:
            return f"model '{name}' is not in the store: `appliance models import PATH --name {name}` first"
        record = self.verify(name, full=False, hash_changed=hash_changed, throttle=throttle)
        if record.state == QUARANTINED:
            return quarantine_reason(record)
        if not self.license_ok(record):
            return (
                f"model '{name}' has license {record.license}, not in store.allowed_licenses; "
                f"`appliance models accept-license {name}` to serve it"
            )
        return None


def quarantine_reason(record: ModelRecord) -> str:
    return (
        f"model '{record.name}' is quarantined: {record.state_reason}; re-import it, or "
        f"`appliance models verify {record.name}` once restored"
    )


def _v1_tables(db: sqlite3.Connection) -> None:
    """The manifest of appliance 0.1.0 (a manifest it wrote, version 0, may lack the files'
    fingerprint and verified_at columns: its rows are hashed again at their next check)."""
    migrations.run_script(
        db,
        """
CREATE TABLE IF NOT EXISTS "models" (
   "name" TEXT PRIMARY KEY,
   "format" TEXT,
   "source" TEXT,
   "revision" TEXT,
   "total_bytes" INTEGER,
   "license" TEXT,
   "license_accepted_by" TEXT,
   "license_accepted_at" REAL,
   "imported_at" REAL,
   "last_used_at" REAL,
   "pinned" INTEGER,
   "state" TEXT,
   "state_reason" TEXT
);
CREATE TABLE IF NOT EXISTS "files" (
   "model" TEXT,
   "path" TEXT,
   "sha256" TEXT,
   "size" INTEGER,
   PRIMARY KEY ("model", "path")
);
""",
    )
    migrations.add_column(db, "files", "fingerprint", "TEXT")
    migrations.add_column(db, "files", "verified_at", "REAL")


# The manifest's schema (appliance/state/migrations.py): append a step to change it, e.g.
# `lambda db: migrations.add_column(db, "models", "notes", "TEXT")`; never edit a shipped one.
MIGRATIONS = migrations.Registry(
    "store manifest",
    (_v1_tables, lambda db: migrations.add_column(db, "models", "kind", "TEXT NOT NULL DEFAULT 'model'")),
)


def _content_revision(hashed: dict[str, str]) -> str:
    h = hashlib.sha256()
    for path, digest in sorted(hashed.items()):
        h.update(f"{path}\0{digest}\n".encode())
    return h.hexdigest()[:40]


def _unique_bytes(models: list[ModelRecord]) -> int:
    """What the models take on disk: each sha256 once."""
    return sum({f["sha256"]: f["size"] for m in models for f in m.files}.values())


def _digests(models: list[ModelRecord]) -> set[str]:
    return {f["sha256"] for m in models for f in m.files}


def _blob_name(digest: object) -> str:
    """A blob's file name: its sha256, nothing else (it comes from the manifest)."""
    if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
        raise StoreError(f"invalid blob name {digest!r}: not a sha256")
    return digest


def _check_gguf(source: str, path: str, staged: Path) -> None:
    """A GGUF file must be whole and readable (its header, every tensor inside the file)
    before it is stored: never hand llama.cpp a file it would choke on."""
    from appliance.store.gguf import GgufError, read

    try:
        read(staged)
    except GgufError as exc:
        raise StoreError(f"{source}: {path} is not a usable GGUF file: {exc}") from None


def _gib(n: int) -> str:
    return f"{n / 1024**3:.2f} GiB" if n >= 1024**3 else f"{n / 1024**2:.1f} MiB"


def model_path(cfg: Config, model: ModelConfig) -> Path | None:
    """The weights a model deployment loads (builtin:NAME, store:NAME or a path), or None for
    engines that bring their own."""
    if not model.source:
        return None
    if model.source.startswith(BUILTIN_PREFIX):
        return builtin_model_path(model.source[len(BUILTIN_PREFIX) :])
    if model.source.startswith(STORE_PREFIX):
        return _resolve(cfg, model.source[len(STORE_PREFIX) :])
    path = Path(model.source).expanduser()
    if not path.is_absolute():
        path = Path(cfg.paths.cache_dir) / "models" / path
    return path


def _resolve(cfg: Config, name: str) -> Path:
    """The path a store:NAME source loads."""
    store = Store.from_config(cfg)
    try:
        record = store.get(name)
    except StoreError:
        record = None
    if record is None:
        return store.root / "not-in-store" / name.replace("/", "--")
    return store.model_path(record)
