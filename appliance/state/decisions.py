"""Operator decisions that must survive a restart: desired replica counts and pins.

SQLite in WAL mode under the state directory (appliance/state/db.py); every write is
one transaction, so a daemon killed at any moment leaves the previous or the new value.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from appliance.errors import StateWriteFailed
from appliance.state.db import connect


@dataclass(frozen=True)
class ModelControl:
    override: int | None = None
    pinned: bool = False


class StateStore:
    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._db = connect(path)  # table model_control: appliance/state/db.py

    def control(self, model: str) -> ModelControl:
        row = self._db.execute("SELECT override, pinned FROM model_control WHERE model = ?", (model,)).fetchone()
        return ModelControl(row[0], bool(row[1])) if row else ModelControl()

    def all(self) -> dict[str, ModelControl]:
        rows = self._db.execute("SELECT model, override, pinned FROM model_control").fetchall()
        return {m: ModelControl(o, bool(p)) for m, o, p in rows}

    def set_override(self, model: str, replicas: int | None) -> None:
        self._upsert(model, "override", replicas)

    def set_pinned(self, model: str, pinned: bool) -> None:
        self._upsert(model, "pinned", int(pinned))

    def _upsert(self, model: str, column: str, value) -> None:
        assert column in ("override", "pinned")
        try:
            with self._db:
                self._db.execute(
                    f"INSERT INTO model_control (model, {column}, updated_at) VALUES (?, ?, ?) "
                    f"ON CONFLICT(model) DO UPDATE SET {column} = excluded.{column}, "
                    "updated_at = excluded.updated_at",
                    (model, value, time.time()),
                )
        except sqlite3.Error as exc:
            # A full or read-only state disk: the transaction rolled back, nothing changed.
            raise StateWriteFailed(
                f"Cannot save the change for model '{model}' in {self.path}: {exc}; nothing was changed"
            ) from None

    def close(self) -> None:
        self._db.close()
