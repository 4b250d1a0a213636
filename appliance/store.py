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
(appliance/store_guard.py) rehashes files whose last verification is old.
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

from . import migrations

log = logging.getLogger("appliance.store")

STORE_PREFIX = "store:"
READY = "ready"
QUARANTINED = "quarantined"
CHUNK = 4 << 20
# ORG/NAME or NAME, each part a hub-style name; no "..", no "--" (the folder separator).
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class StoreError(Exception):
    """One line for the operator: what is wrong and, where there is one, the fix."""


def check_name(name: str) -> str:
    if not _NAME_RE.match(name) or ".." in name or "--" in name:
        raise StoreError(f"invalid model name {name!r}: use NAME or ORG/NAME (letters, digits, . _ -; "
                         "no '..' or '--')")
    return name


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

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


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

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        written = os.write(fd, data)
        data = data[written:]


def copy_and_hash(src: BinaryIO, dest: Path, write: Callable[[int, memoryview], None] = _write_all) -> tuple[str, int]:
    """Stream src into dest and hash it in the same pass (one read of the source)."""
    h = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    size = 0
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        while n := src.readinto(buf):
            h.update(view[:n])
            write(fd, view[:n])
            size += n
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

    def __init__(self, bytes_per_s: float = 0, stop: threading.Event | None = None, *,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], bool] | None = None) -> None:
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


class Hasher(Protocol):
    def __call__(self, path: Path, throttle: Throttle | None = None) -> str: ...


def hash_file(path: Path, throttle: Throttle | None = None) -> str:
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
    def __init__(self, cache_dir: str | Path, *, budget_bytes: int = 0,
                 allowed_licenses: tuple[str, ...] | list[str] = (),
                 clock: Callable[[], float] = time.time,
                 write: Callable[[int, memoryview], None] = _write_all,
                 hasher: Hasher = hash_file) -> None:
        self.cache_dir = Path(cache_dir)
        self.root = self.cache_dir / "hf" / "hub"
        self.db_path = self.cache_dir / "store.db"
        self.budget_bytes = budget_bytes
        self.allowed = {lic.lower() for lic in allowed_licenses}
        self.clock = clock
        self.write = write
        self.hasher = hasher
        self._db: sqlite_utils.Database | None = None

    @classmethod
    def from_config(cls, cfg) -> Store:
        return cls(cfg.paths.cache_dir, budget_bytes=int(cfg.store.budget_gib * 1024**3),
                   allowed_licenses=cfg.store.allowed_licenses)

    # --- the manifest ---------------------------------------------------------

    @property
    def db(self) -> sqlite_utils.Database:
        if self._db is None:
            self.root.mkdir(parents=True, exist_ok=True)
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
            raise StoreError(f"model '{name}' is not in the store ({self.root}); "
                             "`appliance models ls` lists what is")
        return record

    def _record(self, row: dict) -> ModelRecord:
        files = list(self.db["files"].rows_where("model = ?", [row["name"]], order_by="path"))
        return ModelRecord(**{**row, "pinned": bool(row["pinned"])},
                           files=[{"path": f["path"], "sha256": f["sha256"], "size": f["size"]}
                                  for f in files])

    def snapshot_dir(self, record: ModelRecord) -> Path:
        return self.root / repo_folder(record.name) / "snapshots" / record.revision

    def model_path(self, record: ModelRecord) -> Path:
        """What an engine loads: the GGUF file, or the snapshot directory."""
        snap = self.snapshot_dir(record)
        if record.format == "gguf":
            return snap / record.files[0]["path"]
        return snap

    def license_ok(self, record: ModelRecord) -> bool:
        return record.license.lower() in self.allowed or record.license_accepted_at is not None

    # --- locking --------------------------------------------------------------

    @contextlib.contextmanager
    def _writer(self) -> Iterator[None]:
        """One writer at a time; the first thing a writer does is clear what a killed one left."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._recover()
            yield

    def lease(self, name: str) -> BinaryIO:
        """A shared lock held while a replica may use the model; eviction and rm skip it.
        The kernel drops it when the holder dies, so a crashed daemon leaks nothing."""
        leases = self.root / ".leases"
        leases.mkdir(parents=True, exist_ok=True)
        f = open(leases / f"{repo_folder(name)}.lock", "a+b")  # noqa: SIM115 - held by the caller
        fcntl.flock(f, fcntl.LOCK_SH)
        return f

    def in_use(self, name: str) -> bool:
        path = self.root / ".leases" / f"{repo_folder(name)}.lock"
        if not path.exists():
            return False
        with open(path, "a+b") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(f, fcntl.LOCK_UN)
        return False

    def _recover(self) -> None:
        """Remove staging dirs, snapshots and blobs that no committed row refers to."""
        shutil.rmtree(self.root / ".staging", ignore_errors=True)
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
                    _remove_tree(snap)
            for blob in blobs.glob("*") if blobs.is_dir() else ():
                if blob.name not in wanted_blobs.get(repo.name, set()):
                    blob.unlink(missing_ok=True)
            if repo.name not in wanted_snaps:
                _remove_tree(repo)

    # --- import ---------------------------------------------------------------

    def add(self, incoming: Incoming) -> tuple[ModelRecord, list[str]]:
        """Import a model; returns its record and the names evicted to make room."""
        check_name(incoming.name)
        if not incoming.files:
            raise StoreError(f"{incoming.source}: no model files found")
        with self._writer():
            existing = self.get(incoming.name)
            evicted: list[str] = []
            if existing is None:
                evicted = self._make_room(incoming.total_bytes, incoming.name)
            staging = self.root / ".staging" / uuid.uuid4().hex
            staging.mkdir(parents=True)
            try:
                hashed = self._stage(incoming, staging)
                revision = incoming.revision or _content_revision(hashed)
                if existing is not None:
                    if existing.revision == revision and \
                            {(f["path"], f["sha256"]) for f in existing.files} == set(hashed.items()):
                        return existing, []
                    raise StoreError(f"model '{incoming.name}' is already in the store (revision "
                                     f"{existing.revision}); `appliance models rm {incoming.name}` first")
                self._publish(incoming.name, revision, hashed, staging)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            fmt = "gguf" if len(hashed) == 1 and next(iter(hashed)).endswith(".gguf") else "hf"
            # Hashed on the way in: the published blobs' fingerprints are their verified state
            # (none recorded, so hashed at the first check, if the clock does not move on).
            snap = self.root / repo_folder(incoming.name) / "snapshots" / revision
            stats = {path: (snap / path).stat() for path in hashed}
            settled = self._clock_past(max(st.st_ctime_ns for st in stats.values()))
            prints = {path: fingerprint(st) if settled and fingerprint((snap / path).stat()) == fingerprint(st)
                      else None for path, st in stats.items()}
            now = self.clock()
            with self.db.conn:
                self.db["models"].insert({
                    "name": incoming.name, "format": fmt, "source": incoming.source,
                    "revision": revision, "total_bytes": incoming.total_bytes,
                    "license": incoming.license, "license_accepted_by": incoming.license_accepted_by,
                    "license_accepted_at": incoming.license_accepted_at, "imported_at": now, "last_used_at": None,
                    "pinned": 0, "state": READY, "state_reason": ""})
                self.db["files"].insert_all(
                    {"model": incoming.name, "path": f.path, "sha256": hashed[f.path], "size": f.size,
                     "fingerprint": prints[f.path], "verified_at": now}
                    for f in incoming.files)
            log.info("imported %s (%d files, %d bytes, license %s)", incoming.name,
                     len(hashed), incoming.total_bytes, incoming.license)
            return self.need(incoming.name), evicted

    def _stage(self, incoming: Incoming, staging: Path) -> dict[str, str]:
        hashed: dict[str, str] = {}
        for i, f in enumerate(incoming.files):
            _check_relpath(f.path)
            dest = staging / f"{i}.blob"
            try:
                with f.open() as src:
                    digest, size = copy_and_hash(src, dest, self.write)
            except (zipfile.BadZipFile, tarfile.TarError, EOFError) as exc:
                raise StoreError(f"{incoming.source}: {f.path} is damaged or truncated: {exc}") from None
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    raise StoreError(f"disk full while importing {f.path} into {self.root}; "
                                     "nothing was changed") from None
                raise StoreError(f"{incoming.source}: cannot read {f.path}: {exc}") from None
            if size != f.size:
                raise StoreError(f"{incoming.source}: {f.path} is {size} bytes, expected {f.size} "
                                 "(truncated?)")
            if f.expected_sha256 and digest != f.expected_sha256:
                raise StoreError(f"{incoming.source}: {f.path} has sha256 {digest}, expected "
                                 f"{f.expected_sha256}")
            hashed[f.path] = digest
        return hashed

    def _publish(self, name: str, revision: str, hashed: dict[str, str], staging: Path) -> None:
        """Blobs into place (content-addressed: renaming one twice is harmless), then the
        snapshot directory, built in staging, renamed into place in one step."""
        repo = self.root / repo_folder(name)
        blobs = repo / "blobs"
        blobs.mkdir(parents=True, exist_ok=True)
        (repo / "snapshots").mkdir(exist_ok=True)
        snap_tmp = staging / "snapshot"
        for i, (path, digest) in enumerate(hashed.items()):
            blob = blobs / digest
            if not blob.exists():
                tmp = staging / f"{i}.blob"
                os.chmod(tmp, 0o444)
                os.replace(tmp, blob)
            link = snap_tmp / path
            link.parent.mkdir(parents=True, exist_ok=True)
            depth = len(Path(path).parts) + 1  # snapshots/<rev>/<path...>
            link.symlink_to(Path(*([".."] * depth)) / "blobs" / digest)
        _fsync_dir(blobs)
        target = repo / "snapshots" / revision
        if target.exists():  # a leftover of a killed import of this very content
            _remove_tree(target)
        os.replace(snap_tmp, target)
        _fsync_dir(repo / "snapshots")

    def _make_room(self, incoming: int, name: str) -> list[str]:
        if not self.budget_bytes:
            return []
        models = self.models()
        used = sum(m.total_bytes for m in models)
        if used + incoming <= self.budget_bytes:
            return []
        candidates = sorted((m for m in models if not m.pinned and not self.in_use(m.name)),
                            key=lambda m: m.last_used_at or m.imported_at)
        plan, freed = [], 0
        for m in candidates:
            if used - freed + incoming <= self.budget_bytes:
                break
            plan.append(m)
            freed += m.total_bytes
        if used - freed + incoming > self.budget_bytes:
            raise StoreError(
                f"not enough room for '{name}': it needs {_gib(incoming)}, the store budget is "
                f"{_gib(self.budget_bytes)} with {_gib(used)} used and only {_gib(freed)} evictable "
                "(pinned or in use models are kept); raise store.budget_gib or rm a model")
        for m in plan:
            self._delete(m.name)
            log.warning("evicted %s (%s, least recently used) to make room for %s", m.name,
                        _gib(m.total_bytes), name)
        return [m.name for m in plan]

    # --- everything else that writes ------------------------------------------

    def remove(self, name: str, *, force: bool = False) -> None:
        with self._writer():
            self.need(name)
            if self.in_use(name) and not force:
                raise StoreError(f"model '{name}' is in use by a running replica; stop it first")
            self._delete(name)

    def _delete(self, name: str) -> None:
        with self.db.conn:
            self.db["files"].delete_where("model = ?", [name])
            self.db["models"].delete_where("name = ?", [name])
        _remove_tree(self.root / repo_folder(name))

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

    def verify(self, name: str, *, full: bool = True, hash_changed: bool = True,
               throttle: Throttle | None = None) -> ModelRecord:
        """full: rehash every file; a model that matches again is ready again. Otherwise check
        sizes and rehash only the files whose stat fingerprint changed since they were last
        hashed (or that have none recorded: a manifest of an older appliance), or with
        hash_changed=False sizes only; a quarantined model is left as it is. A mismatch
        quarantines the model. A file that hashes right gets its fingerprint recorded."""
        record = self.need(name)
        if not full and record.state == QUARANTINED:
            return record  # known bad: `appliance models verify` (full) is what clears it
        rehash = True if full else (None if hash_changed else False)
        problem = ""
        for row in self._file_rows(name):
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

    def _check_file(self, record: ModelRecord, row: dict, *, rehash: bool | None,
                    throttle: Throttle | None = None) -> str:
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
                self.db.execute("UPDATE files SET fingerprint = ?, verified_at = ? "
                                "WHERE model = ? AND path = ? AND sha256 = ?",
                                [after, self.clock(), record.name, rel, row["sha256"]])
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
                "JOIN models m ON m.name = f.model WHERE m.state = ?", [READY]).fetchall():
            due = now if at is None or at > now + 60 else at + interval_s
            if best is None or (due, model, path) < best:
                best = (due, model, path)
        return best

    def scrub_file(self, name: str, path: str, throttle: Throttle | None = None) -> str:
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

    def admission(self, name: str, *, hash_changed: bool = True,
                  throttle: Throttle | None = None) -> str | None:
        """Why the daemon must not serve this store model, or None when it may. Files whose
        fingerprint changed are rehashed first unless hash_changed is False (sizes only)."""
        try:
            record = self.get(name)
        except StoreError as exc:
            return str(exc)
        if record is None:
            return (f"model '{name}' is not in the store: `appliance models import PATH --name {name}` "
                    "first")
        record = self.verify(name, full=False, hash_changed=hash_changed, throttle=throttle)
        if record.state == QUARANTINED:
            return quarantine_reason(record)
        if not self.license_ok(record):
            return (f"model '{name}' has license {record.license}, not in store.allowed_licenses; "
                    f"`appliance models accept-license {name}` to serve it")
        return None


def quarantine_reason(record: ModelRecord) -> str:
    return (f"model '{record.name}' is quarantined: {record.state_reason}; re-import it, or "
            f"`appliance models verify {record.name}` once restored")


def _v1_tables(db: sqlite3.Connection) -> None:
    """The manifest of appliance 0.1.0 (a manifest it wrote, version 0, may lack the files'
    fingerprint and verified_at columns: its rows are hashed again at their next check)."""
    migrations.run_script(db, """
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
""")
    migrations.add_column(db, "files", "fingerprint", "TEXT")
    migrations.add_column(db, "files", "verified_at", "REAL")


# The manifest's schema (appliance/migrations.py): append a step to change it, e.g.
# `lambda db: migrations.add_column(db, "models", "notes", "TEXT")`; never edit a shipped one.
MIGRATIONS = migrations.Registry("store manifest", (
    _v1_tables,
))


def _content_revision(hashed: dict[str, str]) -> str:
    h = hashlib.sha256()
    for path, digest in sorted(hashed.items()):
        h.update(f"{path}\0{digest}\n".encode())
    return h.hexdigest()[:40]


def _check_relpath(path: str) -> None:
    p = Path(path)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise StoreError(f"refusing file path {path!r}: it leaves the model directory")


def _remove_tree(path: Path) -> None:
    """Blobs are read-only; their directories are not, so rmtree works as is."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _gib(n: int) -> str:
    return f"{n / 1024**3:.2f} GiB" if n >= 1024**3 else f"{n / 1024**2:.1f} MiB"


def resolve(cfg, name: str) -> Path:
    """The path a store:NAME source loads (config.model_path calls this)."""
    store = Store.from_config(cfg)
    try:
        record = store.get(name)
    except StoreError:
        record = None
    if record is None:
        return store.root / "not-in-store" / name.replace("/", "--")
    return store.model_path(record)
