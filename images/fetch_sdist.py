#!/usr/bin/env python3
"""Fetch one pinned source archive (sdist) as a plain file, checked against its sha256:
nothing is built, not even to read its metadata.

    python3 images/fetch_sdist.py NAME VERSION SHA256 DEST_DIR [--file PATH] [--cache DIR]

`pip download` of an sdist prepares its metadata, which means installing the sdist's build
requirements (and with --no-binary :all: building those from source: CMake itself). Here the
file is looked up where pip would look and downloaded like any other file:

  1. --file PATH (offline media, APPLIANCE_LLAMACPP_SDIST in build.sh);
  2. --cache DIR, a copy fetched before;
  3. pip's find-links (local folders, file:// or http(s) pages);
  4. unless pip's no-index is set: its index-url (default https://pypi.org/simple) and
     extra-index-urls, read as PEP 691 JSON or PEP 503 HTML.

pip's settings are pip's own: PIP_* variables over its config files (as `pip config list`
shows them), cert, timeout, retries and proxy included. The first file with the pinned
name and sha256 wins; a file with that name and another sha256 is refused, saying where.
Prints the fetched file's path; exits 1 with one line saying what was tried otherwise.
Standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import html
import json
import netrc
import os
import re
import shutil
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

DEFAULT_INDEX = "https://pypi.org/simple"
ACCEPT = "application/vnd.pypi.simple.v1+json, application/vnd.pypi.simple.v1+html;q=0.2, text/html;q=0.01"
_ANCHOR = re.compile(r"<a\s[^>]*?href\s*=\s*[\"']([^\"']+)[\"'][^>]*>", re.IGNORECASE)
_TRUE = {"1", "true", "yes", "on"}


class FetchError(Exception):
    """One line for the operator."""


def log(message: str) -> None:
    print(f"fetch_sdist: {message}", file=sys.stderr, flush=True)


# --- pip's settings ------------------------------------------------------------------


def pip_settings() -> dict[str, str]:
    """pip's effective settings for a download: [global] < [install] < [download] < PIP_*."""
    layers: dict[str, dict[str, str]] = {"global": {}, "install": {}, "download": {}, ":env:": {}}
    try:
        out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                             timeout=60, env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}).stdout
    except (OSError, subprocess.TimeoutExpired):
        out = ""  # no pip here: the PIP_* variables below still count
    for line in out.splitlines():
        m = re.fullmatch(r"([^.]+)\.([\w-]+)='(.*)'", line.strip())
        if m and m[1] in layers:
            layers[m[1]][m[2]] = m[3]
    for key, value in os.environ.items():  # also when pip is missing
        if key.startswith("PIP_") and key != "PIP_CONFIG_FILE":
            layers[":env:"][key[4:].lower().replace("_", "-")] = value
    merged: dict[str, str] = {}
    for layer in layers.values():
        merged.update(layer)
    if "default-timeout" in merged and "timeout" not in merged:
        merged["timeout"] = merged["default-timeout"]
    return merged


# --- HTTP -----------------------------------------------------------------------------


class Web:
    def __init__(self, settings: dict[str, str]) -> None:
        self.timeout = float(settings.get("timeout") or 60)
        self.retries = int(settings.get("retries") or 3)
        cert = settings.get("cert")
        context = ssl.create_default_context(cafile=cert if cert and os.path.isfile(cert) else None,
                                             capath=cert if cert and os.path.isdir(cert) else None)
        handlers: list = [urllib.request.HTTPSHandler(context=context)]
        if settings.get("proxy"):
            handlers.append(urllib.request.ProxyHandler({"http": settings["proxy"], "https": settings["proxy"]}))
        self.opener = urllib.request.build_opener(*handlers)
        # user:password@ of an index is sent to its host for the files it links too, as pip does.
        self.credentials: dict[str, tuple[str, str]] = {}
        for url in " ".join(settings.get(k) or "" for k in ("index-url", "extra-index-url", "find-links")).split():
            parts = urllib.parse.urlsplit(url)
            if parts.username:
                self.credentials[parts.netloc.rsplit("@", 1)[1]] = (parts.username, parts.password or "")

    def open(self, url: str, accept: str = "*/*"):
        """The response; retried on connection errors and 5xx, as pip does."""
        clean, headers = _auth(url, self.credentials)
        headers["Accept"] = accept
        headers["User-Agent"] = "appliance-fetch-sdist"
        for attempt in range(self.retries + 1):
            try:
                return self.opener.open(urllib.request.Request(clean, headers=headers), timeout=self.timeout)
            except urllib.error.HTTPError as exc:
                if exc.code < 500 or attempt == self.retries:
                    raise
            except (urllib.error.URLError, TimeoutError, ConnectionError):
                if attempt == self.retries:
                    raise
            time.sleep(min(2 ** attempt, 10))
        raise AssertionError("unreachable")


def _auth(url: str, known: dict[str, tuple[str, str]]) -> tuple[str, dict[str, str]]:
    """The URL without user:password@, and a Basic Authorization header from them, from the
    index of the same host, or from ~/.netrc."""
    parts = urllib.parse.urlsplit(url)
    user, password = parts.username, parts.password
    clean = parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]).geturl() if parts.username else url
    if user is None and parts.netloc in known:
        user, password = known[parts.netloc]
    if user is None and parts.hostname:
        try:
            found = netrc.netrc().authenticators(parts.hostname)
        except (OSError, netrc.NetrcParseError):
            found = None
        if found:
            user, password = found[0], found[2]
    if user is None:
        return clean, {}
    token = base64.b64encode(f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password or '')}".encode())
    return clean, {"Authorization": "Basic " + token.decode()}


# --- where the file may be ----------------------------------------------------------------


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wanted_names(name: str, version: str) -> set[str]:
    """The sdist's file name as PEP 625 writes it, and the older spelling."""
    return {f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}.tar.gz", f"{normalize(name)}-{version}.tar.gz"}


def _local_dir(location: str) -> Path | None:
    if location.startswith("file:"):
        location = urllib.request.url2pathname(urllib.parse.urlsplit(location).path)
    elif "://" in location:
        return None
    return Path(location)


def _links_in_html(text: str, base: str) -> list[tuple[str, str]]:
    """(file name, absolute URL with its #sha256= fragment if any) of each anchor. A page
    from the network may link to the network only (not to this machine's files)."""
    out = []
    remote = urllib.parse.urlsplit(base).scheme in ("http", "https")
    for href in _ANCHOR.findall(text):
        url = urllib.parse.urljoin(base, html.unescape(href))
        if remote and urllib.parse.urlsplit(url).scheme not in ("http", "https"):
            continue
        out.append((urllib.parse.unquote(urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1]), url))
    return out


def _index_page(web: Web, index: str, project: str) -> list[tuple[str, str]]:
    """The files an index lists for a project: (file name, URL#sha256=...)."""
    page = index.rstrip("/") + f"/{project}/"
    local = _local_dir(page)
    if local is not None:
        if (local / "index.html").is_file():
            return _links_in_html((local / "index.html").read_text(errors="replace"), local.as_uri() + "/")
        if local.is_dir():
            return [(p.name, p.as_uri()) for p in local.iterdir() if p.is_file()]
        return []  # this index does not have the project
    try:
        with web.open(page, ACCEPT) as resp:
            kind = resp.headers.get("Content-Type", "")
            body = resp.read().decode("utf-8", errors="replace")
            final = resp.geturl()
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return []
        raise FetchError(f"{_redact(page)}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise FetchError(f"{_redact(page)}: {getattr(exc, 'reason', exc)}") from None
    if "json" in kind:
        files = json.loads(body).get("files", [])
        links = [(f["filename"], urllib.parse.urljoin(final, f["url"]).split("#")[0]
                  + (f"#sha256={f['hashes']['sha256']}" if f.get("hashes", {}).get("sha256") else ""))
                 for f in files]
        return [(name, url) for name, url in links if urllib.parse.urlsplit(url).scheme in ("http", "https")]
    return _links_in_html(body, final)


def _find_links_page(web: Web, location: str) -> list[tuple[str, str]]:
    local = _local_dir(location)
    if local is not None:
        if local.is_dir():
            return [(p.name, p.as_uri()) for p in local.iterdir() if p.is_file()]
        return [(local.name, local.as_uri())] if local.is_file() else []
    try:
        with web.open(location, "text/html") as resp:
            return _links_in_html(resp.read().decode("utf-8", errors="replace"), resp.geturl())
    except (urllib.error.URLError, OSError) as exc:
        raise FetchError(f"{_redact(location)}: {getattr(exc, 'reason', exc)}") from None


# --- fetching -----------------------------------------------------------------------------


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _download(web: Web, url: str, dest: Path) -> str:
    """Copy url to dest (a .partial beside it first); its sha256."""
    h = hashlib.sha256()
    tmp = dest.with_name(dest.name + f".partial.{os.getpid()}")
    local = _local_dir(url.split("#")[0])
    try:
        with (open(local, "rb") if local is not None else web.open(url.split("#")[0])) as src, open(tmp, "wb") as out:
            while chunk := src.read(1 << 20):
                h.update(chunk)
                out.write(chunk)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return h.hexdigest()


def fetch(name: str, version: str, sha256: str, dest_dir: Path, *, file: str | None = None,
          cache: Path | None = None, settings: dict[str, str] | None = None) -> Path:
    names = wanted_names(name, version)
    filename = sorted(names)[-1] if not file else Path(file).name
    dest_dir.mkdir(parents=True, exist_ok=True)

    if file:  # the operator's file: it is that one or nothing
        src = Path(file)
        if not src.is_file():
            raise FetchError(f"{src}: no such file (APPLIANCE_LLAMACPP_SDIST)")
        got = sha256_of(src)
        if got != sha256:
            raise FetchError(f"{src}: sha256 {got}, expected {sha256} (images/llamacpp/pin.env); "
                             f"it is not {name} {version}")
        dest = dest_dir / src.name
        if src.resolve() != dest.resolve():
            shutil.copyfile(src, dest)
        return dest

    if cache is not None:
        for candidate in names:
            if (cache / candidate).is_file() and sha256_of(cache / candidate) == sha256:
                dest = dest_dir / candidate
                if (cache / candidate).resolve() != dest.resolve():
                    shutil.copyfile(cache / candidate, dest)
                log(f"{candidate}: from the cache {cache}")
                return dest

    settings = pip_settings() if settings is None else settings
    web = Web(settings)
    places: list[tuple[str, callable]] = []
    for location in (settings.get("find-links") or "").split():
        places.append((location, lambda loc=location: _find_links_page(web, loc)))
    no_index = (settings.get("no-index") or "").lower() in _TRUE
    if not no_index:
        indexes = [settings.get("index-url") or DEFAULT_INDEX, *(settings.get("extra-index-url") or "").split()]
        for index in dict.fromkeys(indexes):
            places.append((index, lambda index=index: _index_page(web, index, normalize(name))))

    problems: list[str] = []
    for where, listing in places:
        try:
            links = listing()
        except FetchError as exc:
            problems.append(str(exc))
            continue
        for file_name, url in links:
            if file_name.lower() not in names:
                continue
            listed = re.search(r"#sha256=([0-9a-f]{64})", url)
            if listed and listed[1] != sha256:
                problems.append(f"{_redact(url.split('#')[0])} has sha256 {listed[1]}, expected {sha256}")
                continue
            dest = dest_dir / file_name
            start = time.monotonic()
            try:
                got = _download(web, url, dest)
            except (urllib.error.URLError, OSError) as exc:
                problems.append(f"{_redact(url.split('#')[0])}: {getattr(exc, 'reason', exc)}")
                continue
            if got != sha256:
                dest.unlink(missing_ok=True)
                problems.append(f"{_redact(url.split('#')[0])} has sha256 {got}, expected {sha256}")
                continue
            log(f"fetched {file_name} ({dest.stat().st_size / 1e6:.1f} MB) from {_redact(url.split('#')[0])} "
                f"in {time.monotonic() - start:.0f} s")
            if cache is not None:
                _keep(dest, cache)
            return dest
    tried = ", ".join(_redact(w) for w, _ in places) or "nowhere (pip's no-index is set and it has no find-links)"
    why = f" ({'; '.join(problems)})" if problems else ""
    raise FetchError(f"{filename} with sha256 {sha256} was not found in {tried}{why}; on an air-gapped machine "
                     f"set APPLIANCE_LLAMACPP_SDIST to the file, or PIP_FIND_LINKS to a folder holding it")


def _keep(path: Path, cache: Path) -> None:
    """A copy in the cache for the next build or bundle (best effort: the cache may be read-only)."""
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache / f".{path.name}.{os.getpid()}"
        shutil.copyfile(path, tmp)
        os.replace(tmp, cache / path.name)
    except OSError:
        pass


def _redact(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.password:
        return parts._replace(netloc=f"{parts.username}:***@{parts.hostname}"
                              + (f":{parts.port}" if parts.port else "")).geturl()
    return url


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name")
    ap.add_argument("version")
    ap.add_argument("sha256")
    ap.add_argument("dest_dir", type=Path)
    ap.add_argument("--file", help="take this file (offline media) instead of looking for it")
    ap.add_argument("--cache", type=Path, help="a folder of files fetched before, and kept for next time")
    args = ap.parse_args(argv)
    try:
        print(fetch(args.name, args.version, args.sha256, args.dest_dir, file=args.file, cache=args.cache))
    except FetchError as exc:
        print(f"fetch_sdist: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
