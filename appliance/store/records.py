"""What the store's manifest holds: a model's record, a model being imported, and the
names the store gives them on disk (appliance/store/store.py keeps them)."""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from appliance.safe_paths import StoreError, check_file_set, check_name, check_revision

READY = "ready"
QUARANTINED = "quarantined"
HEX64 = re.compile(r"^[0-9a-f]{64}$")


def repo_folder(name: str) -> str:
    return "models--" + check_name(name).replace("/", "--")


# What an import reads a file from: a file of its own, a zip or tar member.
Readable = io.RawIOBase | io.BufferedIOBase


@dataclass(frozen=True)
class SourceFile:
    """One file of a model being imported: where it goes, how to read it, what it must hash to."""

    path: str
    size: int
    open: Callable[[], Readable]
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
    title: str = ""  # what the model calls itself (a GGUF's general.name), shown beside its name
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
                isinstance(f.expected_sha256, str) and HEX64.fullmatch(f.expected_sha256)
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
    title: str = ""
    kind: str = "model"  # or "adapter": a LoRA adapter (appliance/store/adapters.py)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def quarantine_reason(record: ModelRecord) -> str:
    return (
        f"model '{record.name}' is quarantined: {record.state_reason}; re-import it, or "
        f"`appliance models verify {record.name}` once restored"
    )


def content_revision(hashed: dict[str, str]) -> str:
    """The revision of an import that names none: its paths and contents, hashed."""
    h = hashlib.sha256()
    for path, digest in sorted(hashed.items()):
        h.update(f"{path}\0{digest}\n".encode())
    return h.hexdigest()[:40]


def blob_name(digest: object) -> str:
    """A blob's file name: its sha256, nothing else (it comes from the manifest)."""
    if not isinstance(digest, str) or not HEX64.fullmatch(digest):
        raise StoreError(f"invalid blob name {digest!r}: not a sha256")
    return digest
