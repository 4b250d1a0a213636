"""Schema versions and forward-only migrations for the SQLite databases the daemon owns.

Each database has one registry: an ordered tuple of steps, step N taking the schema from
version N-1 to N; the version is the file's ``PRAGMA user_version`` (0: written before
versions existed, by appliance 0.1.0, whose tables step 1 creates where they are missing).
The registries:

    <state_dir>/appliance.db   appliance/state/db.py  MIGRATIONS (state, keys, audit, ledger)
    <cache_dir>/store.db       appliance/store/store.py    MIGRATIONS (the model store's manifest)

Changing a schema is appending one small function to its registry (add a column, a table,
an index); a step that has shipped is never edited or removed, so every database, however
old, takes the same path to today's schema.

On open (``connect``): the version is read first on a read-only connection; a database
from a newer appliance is refused before anything writes to it (the file stays
byte-identical); the missing steps then run once, all in one transaction with the
version bump, so a crash or a full disk leaves the database as it was. A file that is
not a database, or is damaged, is refused in one line naming it and the fix.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

log = logging.getLogger("appliance.migrations")

Step = Callable[[sqlite3.Connection], None]


class SchemaError(Exception):
    """A database the daemon cannot use as it is: one line naming the file and the fix."""


@dataclass(frozen=True)
class Registry:
    what: str  # "state database", for messages
    steps: tuple[Step, ...]

    @property
    def latest(self) -> int:
        return len(self.steps)


def run_script(db: sqlite3.Connection, script: str) -> None:
    """Execute several statements inside the caller's transaction (executescript would
    commit it first)."""
    statement = ""
    for line in script.splitlines(keepends=True):
        statement += line
        if sqlite3.complete_statement(statement):
            db.execute(statement)
            statement = ""
    if statement.strip():
        raise ValueError(f"incomplete SQL statement: {statement.strip()[:60]}")


def columns(db: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in db.execute(f"PRAGMA table_info({table})")}


def add_column(db: sqlite3.Connection, table: str, column: str, decl: str) -> None:
    """ALTER TABLE ... ADD COLUMN unless it is there (an older appliance may have added it)."""
    if column not in columns(db, table):
        db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")


def schema_version(path: Path) -> int:
    """The version of the database at path, read without writing anything. Through SQLite
    only: closing any other descriptor of the file would drop the locks this process's
    connections hold on it (POSIX), and another process would then check-point and delete
    the write-ahead log under them. With no log beside it, the file is read as immutable (no
    lock, no -wal or -shm made); with one, through a read-only connection that reads it."""
    wal = path.with_name(path.name + "-wal")
    mode = "ro" if wal.exists() and wal.stat().st_size else "ro&immutable=1"
    try:
        ro = sqlite3.connect(f"{path.resolve().as_uri()}?mode={mode}", uri=True, timeout=10)
    except sqlite3.Error as exc:
        raise SchemaError(f"{path}: cannot open it: {exc}") from None
    try:
        return ro.execute("PRAGMA user_version").fetchone()[0]
    except sqlite3.OperationalError as exc:
        raise SchemaError(f"{path}: cannot read it: {exc}") from None
    except sqlite3.DatabaseError as exc:
        raise unreadable(path, exc) from None
    finally:
        ro.close()


def unreadable(path: Path | str, exc: Exception | str) -> SchemaError:
    return SchemaError(
        f"{path}: not a usable SQLite database ({exc}); restore it from a backup (install.sh "
        f"keeps one from before each upgrade, see docs/operations.md), or move it aside to "
        f"start with an empty one"
    )


def too_new(path: Path | str, registry: Registry, version: int) -> SchemaError:
    return SchemaError(
        f"{path}: {registry.what} schema version {version} was written by a newer appliance "
        f"(this one knows up to {registry.latest}); it was left unchanged: run the newer "
        f"appliance again, or `install.sh --rollback` restores the copy taken before the upgrade"
    )


def connect(
    path: Path | str,
    registry: Registry,
    *,
    timeout: float = 10,
    isolation_level: Literal["DEFERRED", "IMMEDIATE", "EXCLUSIVE"] | None = None,
) -> sqlite3.Connection:
    """The database at path (created if missing), in WAL mode, at the registry's latest version.
    isolation_level: sqlite3's (None: autocommit, transactions explicit)."""
    memory = str(path) == ":memory:"
    if not memory:
        path = Path(path)
        path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)  # audit rows, key hashes: not for others
        if path.exists():
            version = schema_version(path)
            if version > registry.latest:
                raise too_new(path, registry, version)
    db = sqlite3.connect(str(path), isolation_level=isolation_level, check_same_thread=False, timeout=timeout)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        migrate(db, registry, path)
    except sqlite3.OperationalError:  # locked, read-only, out of space: the caller's to say
        db.close()
        raise
    except sqlite3.DatabaseError as exc:  # not a database, or a damaged one
        db.close()
        raise unreadable(path, exc) from None
    except BaseException:
        db.close()
        raise
    return db


def migrate(db: sqlite3.Connection, registry: Registry, path: Path | str) -> int:
    """Run the steps the database lacks, once, in one transaction; the version it had."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version == registry.latest:
        return version
    if version > registry.latest:
        raise too_new(path, registry, version)
    db.execute("BEGIN IMMEDIATE")
    try:
        # Under the write lock: another process may have migrated it meanwhile.
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > registry.latest:
            raise too_new(path, registry, version)
        for step in registry.steps[version:]:
            step(db)
        db.execute(f"PRAGMA user_version = {registry.latest}")
    except BaseException as exc:
        db.execute("ROLLBACK")
        if isinstance(exc, sqlite3.OperationalError) and "full" in str(exc):
            raise SchemaError(
                f"{path}: disk full while updating its {registry.what} schema to version "
                f"{registry.latest}; it was left as it was (version {version}): free some space "
                f"on that filesystem and start again"
            ) from None
        raise
    db.execute("COMMIT")
    if version < registry.latest:
        log.info("%s: %s schema %d -> %d", path, registry.what, version, registry.latest)
    return version
