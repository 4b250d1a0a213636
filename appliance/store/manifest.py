"""The store manifest's schema (``<cache_dir>/store.db``): its tables, and the steps
that brought them to today's, run by appliance/state/migrations.py when the store
opens it (and by the daemon's start, which checks both databases first)."""

from __future__ import annotations

import sqlite3

from appliance.state import migrations


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
def _title_column(db: sqlite3.Connection) -> None:
    """A model's title (a GGUF's general.name): shown, never used as its name."""
    migrations.add_column(db, "models", "title", "TEXT")


def _kind_column(db: sqlite3.Connection) -> None:
    """A model's kind: "model", or "adapter" for a LoRA adapter (appliance/store/adapters.py)."""
    migrations.add_column(db, "models", "kind", "TEXT NOT NULL DEFAULT 'model'")


MIGRATIONS = migrations.Registry("store manifest", (_v1_tables, _title_column, _kind_column))
