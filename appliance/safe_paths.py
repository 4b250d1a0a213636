"""Store paths are validated, never trusted.

Names, revisions and file paths come from bundles (``bundle.json``), hub pulls
(``models pull ORG/NAME@REV``), model directories and the command line; each is checked
against a strict grammar here before it reaches a filesystem call:

* a model name is ``NAME`` or ``ORG/NAME``, the hub's grammar: letters, digits, ``. _ -``,
  each part starting with a letter or digit, at most 96 characters, no ``--`` (the repo
  folder's separator) and no ``..`` (a trailing ``.`` or ``-``, which the hub refuses, is
  kept: earlier appliances accepted it, and it is harmless in a folder name);
* a revision (the snapshot folder's name) is one name: a 40-hex commit, a content
  revision, or a tag or branch like ``main`` or ``v1.0``; never a path. A hub ref with
  slashes (``refs/pr/1``) is sent to the hub as it is but names no folder
  (``download_folder``; the snapshot is named by its content);
* a file path is relative and normalized: ``/``-separated parts, none empty, ``.`` or
  ``..``, no backslash, no control character, valid UTF-8; and no two files of a model
  have the same path, or one's path is another's folder.

Removals and renames in the store go through ``inside``: a path is strictly inside the
store's root, reached through no link that leaves it. Files are read with ``open_regular``:
never through a link, and only the file that was checked.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import re
import stat
import tempfile
import urllib.parse
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO


class StoreError(Exception):
    """One line for the operator: what is wrong and, where there is one, the fix."""


_NAME_PART = r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
_NAME_RE = re.compile(rf"{_NAME_PART}(?:/{_NAME_PART})?")  # fullmatch: "$" would let "\n" in
_REVISION_PART = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_REVISION_RE = re.compile(_REVISION_PART)
_REF_RE = re.compile(rf"{_REVISION_PART}(?:/{_REVISION_PART})*")
MAX_REVISION = 128
MAX_REF = 255
MAX_PATH = 1024
MAX_PART = 255
_UNSAFE_CHARS = re.compile(r"[\x00-\x1f\x7f\\]")


def check_name(name: object) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or ".." in name or "--" in name:
        raise StoreError(
            f"invalid model name {name!r}: use NAME or ORG/NAME (letters, digits, . _ -; "
            "each part up to 96, starting with a letter or digit; no '..' or '--')"
        )
    return name


def check_revision(revision: object) -> str:
    """The name of a snapshot folder: one safe name, never a path."""
    if (
        not isinstance(revision, str)
        or len(revision) > MAX_REVISION
        or not _REVISION_RE.fullmatch(revision)
        or ".." in revision
    ):
        raise StoreError(
            f"invalid revision {revision!r}: a revision is one name of letters, digits and "
            f". _ - (up to {MAX_REVISION}, e.g. a 40-hex commit), never a path"
        )
    return revision


def check_hub_ref(ref: str) -> str:
    """A revision a hub pull asks for: a revision, or a ref with slashes (refs/pr/1)."""
    if len(ref) > MAX_REF or not _REF_RE.fullmatch(ref) or ".." in ref or ref.endswith(".lock"):
        raise StoreError(
            f"invalid revision {ref!r}: use a commit, a branch or tag (main, v1.0) or a "
            "ref like refs/pr/1 (letters, digits, . _ - and /; no '..', no leading '/')"
        )
    return ref


def snapshot_revision(ref: str) -> str | None:
    """The snapshot folder a pulled ref lands in: the ref when it is one safe name, else None
    (the store names it by its content)."""
    try:
        return check_revision(ref)
    except StoreError:
        return None


def download_folder(repo_folder: str, ref: str) -> str:
    """One folder name per (repo, ref): the ref's slashes are %-encoded (a ref has no '%')."""
    return f"{repo_folder}@{urllib.parse.quote(check_hub_ref(ref), safe='')}"


def check_file_path(path: object) -> str:
    """A model file's path inside its snapshot: relative and normalized."""
    why = _file_path_problem(path)
    if why:
        raise StoreError(f"refusing file path {path!r}: {why}")
    return path  # type: ignore[return-value]


def _file_path_problem(path: object) -> str:
    if not isinstance(path, str) or not path:
        return "not a file name"
    try:
        size = len(path.encode())
    except UnicodeEncodeError:
        return "not valid UTF-8"
    if _UNSAFE_CHARS.search(path):
        return "it has a backslash or a control character"
    if path.startswith("/"):
        return "it is absolute"
    parts = path.split("/")
    if ".." in parts:
        return "it leaves the model directory ('..')"
    if "" in parts or "." in parts:
        return "it is not normalized (an empty or '.' part)"
    if size > MAX_PATH or any(len(p.encode()) > MAX_PART for p in parts):
        return "it is too long"
    return ""


def check_file_set(paths: Iterable[str], source: str) -> None:
    """No duplicate paths, and no path that is also another's folder."""
    seen: set[str] = set()
    folders: dict[str, str] = {}
    for path in paths:
        check_file_path(path)
        if path in seen:
            raise StoreError(f"{source}: duplicate file path {path!r}; each file of a model has one path")
        seen.add(path)
        parts = path.split("/")
        for i in range(1, len(parts)):
            folders.setdefault("/".join(parts[:i]), path)
    clash = sorted(seen & folders.keys())
    if clash:
        raise StoreError(f"{source}: file path {clash[0]!r} is also the folder of {folders[clash[0]]!r}")


def inside(root: Path, path: Path) -> Path:
    """PATH as it really is, if it is strictly inside ROOT, reached through no link that
    leaves ROOT; else StoreError. Every removal and rename in the store goes through this."""
    real_root = root.resolve()
    parent = Path(path).parent.resolve()
    name = Path(path).name
    if name in ("", ".", "..") or not parent.is_relative_to(real_root):
        raise StoreError(f"refusing to remove or replace {path}: it is outside the store ({root})")
    return parent / name


def identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def open_regular(path: Path, expected: tuple[int, int] | None = None) -> io.FileIO:
    """Open PATH for reading: never through a link at its end, only a regular file, and when
    EXPECTED (device, inode) is given, only that very file (it was checked earlier: anything
    swapped in since, through a link anywhere on the way, is refused)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # the last part is a link
            raise StoreError(f"refusing {path}: it is a link, and links are not followed") from None
        raise StoreError(f"cannot read {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise StoreError(f"refusing {path}: not a regular file")
        if expected is not None and identity(st) != expected:
            raise StoreError(
                f"refusing {path}: it changed since it was checked (replaced or linked "
                "elsewhere); nothing was imported, run the import again"
            )
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb", buffering=0)
    except BaseException:
        os.close(fd)
        raise


@contextlib.contextmanager
def written_aside(path: Path, mode: str = "w", newline: str | None = None) -> Iterator[IO]:
    """A file the caller writes, renamed onto PATH once whole: no half-written file is
    visible under its name. It is written under a fresh name beside PATH, created here
    with mode 0600 (mkstemp): never a name known in advance, where a local user's link in
    a shared directory such as /tmp would have a root command write through it; removed
    if writing fails."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, mode, newline=newline) as out:
            yield out
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
