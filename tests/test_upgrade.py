"""Upgrades and rollback with install.sh, under --root, as an operator does them: the
previous commit's install (git HEAD~1, or $APPLIANCE_UPGRADE_FROM) serves a completion
with an API key and a pinned model; this tree installed over it keeps the config, the
state (the key, the pin, the usage and audit rows), the store and the images, and serves
the same completion with the same key; `install.sh --rollback` goes back; a release that
fails its readiness check is rolled back by its own install; a disk too full for the new
version stops the upgrade in one line and the installed version keeps working."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
from pathlib import Path

import httpx
import pytest

from appliance.state import db as statedb

from .conftest import BUILD_CACHE, ROOT, cached_llama_server, free_port, wait_until

UPGRADE_FROM = os.environ.get("APPLIANCE_UPGRADE_FROM", "HEAD~1")
MODEL = "smollm2-135m-instruct"

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="the root install sets owners: run as root"),
              pytest.mark.skipif(cached_llama_server() is None, reason="install.sh builds llama-server first")]


def _tree_at(rev: str, dest: Path) -> Path:
    """The checkout as it was at rev (git archive), its engine build replaced by a copy of
    the llama-server already built here: the upgrade is under test, not that build."""
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], capture_output=True)
    if archive.returncode != 0:
        pytest.skip(f"no {rev} to upgrade from (a shallow clone?): {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    # Always another release than this tree, even when the last commit changed no code (the
    # install's version folder is named after the code's content).
    with (dest / "appliance/__init__.py").open("a") as init:
        init.write(f"# the release before this one ({rev})\n")
    (dest / "images/llamacpp/build.sh").write_text(
        '#!/bin/sh\nfor dest in "$@"; do :; done\n'
        f'mkdir -p "$dest" && install -m 0755 {cached_llama_server()} "$dest/llama-server"\n')
    return dest


def _copy_of_this_tree(dest: Path) -> Path:
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard"], capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dest / f)
    return dest


class Server:
    """The installed root: install.sh runs, and the service user's `appliance` commands."""

    def __init__(self, root: Path, port: int) -> None:
        self.root, self.port = root, port
        self.config = root / "etc/appliance/appliance.toml"

    def install(self, tree: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        base = {k: v for k, v in os.environ.items() if k not in ("APPLIANCE_PREFIX", "APPLIANCE_BIN_LINK")}
        return subprocess.run([str(tree / "install.sh"), "--root", str(self.root), *args], capture_output=True,
                              text=True, timeout=1500, env={**base, "APPLIANCE_BUILD_CACHE": str(BUILD_CACHE),
                                                            **(env or {})})

    def as_service(self, *argv: str) -> list[str]:
        uid, gid = next(line.split(":")[2:4] for line in (self.root / "etc/passwd").read_text().splitlines()
                        if line.startswith("appliance:"))
        return ["env", "-u", "PYTHONPATH", f"STATE_DIRECTORY={self.root}/var/lib/appliance",
                f"CACHE_DIRECTORY={self.root}/var/cache/appliance", f"LOGS_DIRECTORY={self.root}/var/log/appliance",
                "setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--", *argv]

    def cli(self, *args: str) -> str:
        result = subprocess.run(self.as_service(str(self.root / "opt/appliance/venv/bin/appliance"), *args,
                                                "--config", str(self.config)),
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    def current(self) -> str:
        """The version folder the program link points at ("unversioned": an install from before them)."""
        link = self.root / "opt/appliance/venv"
        return os.readlink(link) if link.is_symlink() else "unversioned"

    def previous(self) -> str:
        return os.readlink(self.root / "opt/appliance/previous")

    def serving(self, token: str, then=None) -> str:
        """Start the installed daemon, answer one completion with token, run then(), stop it."""
        log = self.root / "tmp-serve.log"
        proc = subprocess.Popen(self.as_service(str(self.root / "opt/appliance/venv/bin/appliance"), "serve",
                                                "--config", str(self.config)),
                                stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
        try:
            def ready():
                assert proc.poll() is None, log.read_text(errors="replace")
                try:
                    return httpx.get(f"http://127.0.0.1:{self.port}/readyz", timeout=2).status_code == 200
                except httpx.HTTPError:
                    return False

            wait_until(ready, timeout=180, interval=0.5, what="the installed daemon to be ready")
            resp = httpx.post(f"http://127.0.0.1:{self.port}/v1/chat/completions", timeout=120,
                              headers={"Authorization": f"Bearer {token}"},
                              json={"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}]})
            assert resp.status_code == 200, resp.text
            text = resp.json()["choices"][0]["message"]["content"]
            if then is not None:
                then()
            return text
        finally:
            proc.terminate()
            assert proc.wait(timeout=60) == 0, log.read_text(errors="replace")


@pytest.fixture(scope="module")
def server(tmp_path_factory, service_root) -> Server:
    """The previous commit installed under a root, a key made, the model pinned, a request served."""
    base = tmp_path_factory.mktemp("upgrade")
    root = service_root / "upgraded"
    port = free_port()
    (root / "etc/appliance").mkdir(parents=True)
    (root / "etc/appliance/appliance.toml").write_text(f"[server]\nport = {port}\n[keys]\nrequired = true\n")
    s = Server(root, port)
    old = s.install(_tree_at(UPGRADE_FROM, base / "old"))
    assert old.returncode == 0, old.stdout + old.stderr
    s.old_version = s.current()
    s.token = s.cli("keys", "create", "--name", "billing").strip().splitlines()[-1]
    assert s.token.startswith("ak-")
    assert s.serving(s.token, then=lambda: s.cli("pin", MODEL)).strip()
    return s


def _read(path: Path, sql: str):
    """One value from a database, read-only."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return db.execute(sql).fetchone()[0]
    finally:
        db.close()


def _audit_rows(root: Path) -> int:
    return _read(root / "var/lib/appliance/appliance.db", "SELECT COUNT(*) FROM audit")


def _user_version(path: Path) -> int:
    return _read(path, "PRAGMA user_version")


@pytest.mark.timeout(1800)
def test_an_upgrade_keeps_config_keys_pins_and_usage_and_serves_with_the_same_key(server):
    config_before = server.config.read_bytes()
    rows_before = _audit_rows(server.root)
    upgraded = server.install(ROOT)
    out = upgraded.stdout + upgraded.stderr
    assert upgraded.returncode == 0, out
    assert "install.sh: upgraded appliance" in out and "kept for install.sh --rollback" in out
    assert "install.sh: kept: the config, the state and store, the engine images" in out
    new_version, old_version = server.current(), server.previous()
    assert new_version.startswith("versions/") and old_version.startswith("versions/") and new_version != old_version
    if server.old_version != "unversioned":
        assert old_version == server.old_version
    assert server.config.read_bytes() == config_before

    def intact():
        status = json.loads(server.cli("status", "--json"))
        assert next(m for m in status["models"] if m["name"] == MODEL)["pinned"] is True
        assert [k["name"] for k in json.loads(server.cli("keys", "ls", "--json"))] == ["billing"]

    assert server.serving(server.token, then=intact).strip()
    assert _user_version(server.root / "var/lib/appliance/appliance.db") == statedb.MIGRATIONS.latest
    assert _audit_rows(server.root) >= rows_before + 1

    again = server.install(ROOT)
    assert again.returncode == 0 and again.stdout.splitlines()[-1] == "install.sh: nothing changed", again.stdout

    back = server.install(ROOT, "--rollback")
    assert back.returncode == 0, back.stdout + back.stderr
    assert (server.current(), server.previous()) == (old_version, new_version)
    assert server.serving(server.token).strip()  # the previous version, the same key and rows

    forward = server.install(ROOT)  # and forward again: the built version is reused
    assert forward.returncode == 0 and server.current() == new_version, forward.stdout + forward.stderr
    assert "Python packages up to date" in forward.stdout


@pytest.mark.timeout(1800)
def test_a_release_that_fails_its_readiness_check_is_rolled_back_by_its_install(server, tmp_path):
    good = server.install(ROOT)
    assert good.returncode == 0, good.stdout + good.stderr
    good_version = server.current()
    broken = _copy_of_this_tree(tmp_path / "broken")
    cli = broken / "appliance" / "cli" / "serve.py"
    check = "    _check_databases(cfg, migrate=False)\n"
    assert check in cli.read_text(), "the readiness check moved: break the release where it is now"
    cli.write_text(cli.read_text().replace(
        check, '    raise click.ClickException("this release cannot start: forced failure")\n', 1))
    result = server.install(broken)
    assert result.returncode == 1, result.stdout + result.stderr
    [error] = [line for line in result.stderr.splitlines() if "error:" in line]
    assert "failed its readiness check: this release cannot start: forced failure" in error
    assert "rolled back to appliance" in error
    assert server.current() == good_version
    assert server.serving(server.token).strip()


@pytest.mark.timeout(1800)
def test_a_full_disk_stops_an_upgrade_in_one_line_and_the_installed_version_keeps_working(tmp_path, service_root):
    """The root on a small tmpfs (a mount namespace): this tree installed, then the space cut
    to what is used plus a little, then an upgrade that needs more."""
    root = service_root / "full"
    newer = _copy_of_this_tree(tmp_path / "newer")
    (newer / "appliance" / "_newer.py").write_text("# another release\n")  # another version folder
    script = f"""
set -e
mount --make-rprivate /
mkdir -p {root}
mount -t tmpfs -o size=2g tmpfs {root}
cd {root}
APPLIANCE_BUILD_CACHE={BUILD_CACHE} APPLIANCE_MIN_FREE_GIB=0 {ROOT}/install.sh --root {root} > {tmp_path}/first.log 2>&1
used=$(df -Pk {root} | awk 'NR==2 {{print $3}}')
mount -o remount,size=$((used + 20 * 1024))k {root}
rc=0
APPLIANCE_BUILD_CACHE={BUILD_CACHE} APPLIANCE_MIN_FREE_GIB=0 {newer}/install.sh --root {root} \\
  > {tmp_path}/second.out 2> {tmp_path}/second.err || rc=$?
echo "second rc=$rc"
echo "current: $(readlink {root}/opt/appliance/venv)"
echo "versions: $(ls {root}/opt/appliance/versions | tr '\n' ' ')"
{root}/opt/appliance/venv/bin/appliance check --config {root}/etc/appliance/appliance.toml
"""
    result = subprocess.run(["unshare", "-m", "bash", "-c", script], capture_output=True, text=True, timeout=1500)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out + (tmp_path / "first.log").read_text(errors="replace")
    assert "second rc=1" in out
    errors = [line for line in (tmp_path / "second.err").read_text().splitlines() if "error:" in line]
    assert len(errors) == 1, (tmp_path / "second.err").read_text()
    assert "disk full while" in errors[0] and f"free some space on {root}" in errors[0]
    assert "the installed version (" in errors[0] and "is unchanged" in errors[0]
    current = result.stdout.split("current: ", 1)[1].splitlines()[0]
    versions = result.stdout.split("versions: ", 1)[1].splitlines()[0].split()
    assert [f"versions/{v}" for v in versions] == [current]  # the half-made one is gone
    assert result.stdout.splitlines()[-1].startswith("ok: ")  # and the installed one still checks out


@pytest.mark.timeout(1800)
def test_a_rollback_over_a_schema_change_puts_the_pre_upgrade_copy_back_and_keeps_the_migrated_one(
        tmp_path, service_root):
    """This tree installed and serving (its state database migrated to today's schema), then
    a release whose registry has one more step: the upgrade copies the database first, its
    daemon migrates it; --rollback finds this tree refusing the newer database, puts the copy
    back (the migrated file kept beside it) and serves with the same key."""
    root = service_root / "schema"
    port = free_port()
    (root / "etc/appliance").mkdir(parents=True)
    (root / "etc/appliance/appliance.toml").write_text(f"[server]\nport = {port}\n[keys]\nrequired = true\n")
    s = Server(root, port)
    first = s.install(ROOT)
    assert first.returncode == 0, first.stdout + first.stderr
    token = s.cli("keys", "create", "--name", "billing").strip().splitlines()[-1]
    assert s.serving(token).strip()
    today = s.current()

    later = _copy_of_this_tree(tmp_path / "later")
    statedb_py = later / "appliance" / "state" / "db.py"
    # One more step appended to the registry (whatever the module's formatting).
    statedb_py.write_text(statedb_py.read_text() + (
        "\n\nfrom appliance.state.migrations import add_column as _add_column  # noqa: E402\n\n"
        'MIGRATIONS = Registry(MIGRATIONS.what, (*MIGRATIONS.steps, '
        'lambda db: _add_column(db, "api_keys", "note", "TEXT")))\n'))
    upgraded = s.install(later)
    assert upgraded.returncode == 0, upgraded.stdout + upgraded.stderr
    assert f"copied {root}/var/lib/appliance/appliance.db (schema {statedb.MIGRATIONS.latest})" in upgraded.stdout, \
        upgraded.stdout + upgraded.stderr
    assert s.serving(token).strip()  # the later release migrates it at its start
    db = root / "var/lib/appliance/appliance.db"
    assert _user_version(db) == statedb.MIGRATIONS.latest + 1

    back = s.install(ROOT, "--rollback")
    out = back.stdout + back.stderr
    assert back.returncode == 0, out
    assert s.current() == today
    assert f"put back {db} as it was before the upgrade (the migrated one is kept as {db}.migrated-" in out
    assert _user_version(db) == statedb.MIGRATIONS.latest
    [kept] = list(db.parent.glob("appliance.db.migrated-*[0-9]"))
    assert _user_version(kept) == statedb.MIGRATIONS.latest + 1
    assert s.serving(token).strip()

