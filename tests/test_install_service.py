"""install.sh's root install (the service) into a temporary root: files, modes,
owners, idempotence, the admin's config kept, preflight messages, uninstall and purge."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from .conftest import ROOT

# A fresh install is a venv and a pip install: minutes on a loaded 2-core machine.
pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="the root install sets owners: run as root"),
              pytest.mark.timeout(1800)]

INSTALL = str(ROOT / "install.sh")


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("APPLIANCE_PREFIX", "APPLIANCE_BIN_LINK")}
    return subprocess.run([INSTALL, *args], capture_output=True, text=True, timeout=1800,
                          env={**base, **(env or {})})


def lines(result) -> list[str]:
    return [x for x in (result.stdout + result.stderr).splitlines() if x.startswith("install.sh:")]


def service_ids(root: Path) -> tuple[int, int]:
    for line in (root / "etc/passwd").read_text().splitlines():
        name, _, uid, gid, _, home, shell = line.split(":")
        if name == "appliance":
            assert (home, shell) == ("/var/lib/appliance", "/usr/sbin/nologin")
            return int(uid), int(gid)
    raise AssertionError("no appliance user in etc/passwd")


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under root with its mode, owner, size and mtime."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            out[os.path.relpath(os.path.join(dirpath, name), root)] = (
                st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def installed(service_root):
    root = service_root / "root"
    first = run("--root", str(root))
    assert first.returncode == 0, first.stdout + first.stderr
    return root, first


def mode_owner(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return oct(st.st_mode & 0o7777), st.st_uid, st.st_gid


def test_the_root_install_lays_out_the_service(installed):
    root, first = installed
    uid, gid = service_ids(root)
    assert uid < 1000  # a system user
    assert mode_owner(root / "etc/appliance") == ("0o755", 0, 0)
    assert mode_owner(root / "etc/appliance/credentials") == ("0o700", 0, 0)
    for d in ("var/lib/appliance", "var/cache/appliance", "var/log/appliance"):
        assert mode_owner(root / d) == ("0o750", uid, gid), d
    unit = root / "etc/systemd/system/appliance.service"
    assert mode_owner(unit) == ("0o644", 0, 0)
    assert unit.read_text() == (ROOT / "systemd/appliance.service").read_text()
    config = root / "etc/appliance/appliance.toml"
    assert mode_owner(config) == ("0o644", 0, 0)
    assert config.read_text() == (ROOT / "appliance.example.toml").read_text()
    # The unit's ExecStart exists in the root and runs.
    exe = root / "opt/appliance/venv/bin/appliance"
    assert os.readlink(root / "usr/local/bin/appliance") == str(exe)
    assert subprocess.run([str(exe), "--version"], capture_output=True, timeout=60).returncode == 0
    out = "\n".join(lines(first))
    assert "created system user appliance" in out and "installed the default config" in out
    assert "CPU-only mode" in out  # no NVIDIA driver on this machine
    assert "systemd is not asked to do anything for a --root install" in out


def test_a_second_root_install_changes_nothing(installed):
    root, _ = installed
    before = snapshot(root)
    again = run("--root", str(root))
    assert again.returncode == 0, again.stderr
    assert lines(again)[-1] == "install.sh: nothing changed"
    assert snapshot(root) == before


def test_an_edited_config_is_never_overwritten_and_modes_are_restored(installed):
    root, _ = installed
    config = root / "etc/appliance/appliance.toml"
    config.write_text("[server]\nport = 9999\n")
    (root / "var/log/appliance").chmod(0o777)
    again = run("--root", str(root))
    assert again.returncode == 0, again.stderr
    assert config.read_text() == "[server]\nport = 9999\n"
    out = "\n".join(lines(again))
    assert "kept" in out and "never overwritten" in out
    assert mode_owner(root / "var/log/appliance")[0] == "0o750"
    assert lines(again)[-1] == "install.sh: 1 change(s)"


def test_preflight_reports_the_nvidia_driver_and_refuses_a_full_disk(installed, tmp_path):
    root, _ = installed
    fake = tmp_path / "nvidia"
    (fake / "gpus/0000:17:00.0").mkdir(parents=True)
    (fake / "gpus/0000:65:00.0").mkdir(parents=True)
    (fake / "version").write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  "
                                  "Tue Mar  5 22:23:56 UTC 2024\n")
    gpu = run("--root", str(root), env={"APPLIANCE_NVIDIA_PROC": str(fake)})
    assert "NVIDIA driver 550.54.15, 2 GPU(s)" in gpu.stdout, gpu.stdout
    full = run("--root", str(root), env={"APPLIANCE_MIN_FREE_GIB": "100000000"})
    assert full.returncode == 1
    assert "free on the filesystem of" in full.stderr and "APPLIANCE_MIN_FREE_GIB" in full.stderr


def test_uninstall_keeps_the_data_and_purge_removes_it(service_root):
    root = service_root / "uninstalled"
    assert run("--root", str(root)).returncode == 0
    (root / "var/lib/appliance/appliance.db").write_text("state")
    (root / "var/cache/appliance/models").mkdir()

    gone = run("--root", str(root), "--uninstall")
    assert gone.returncode == 0, gone.stderr
    for path in ("etc/systemd/system/appliance.service", "opt/appliance", "usr/local/bin/appliance"):
        assert not (root / path).exists() and not (root / path).is_symlink(), path
    for path in ("etc/appliance/appliance.toml", "var/lib/appliance/appliance.db",
                 "var/cache/appliance/models", "var/log/appliance"):
        assert (root / path).exists(), path
    service_ids(root)  # the user is kept: the kept files stay its own
    again = run("--root", str(root), "--uninstall")
    assert lines(again)[-1] == "install.sh: nothing changed"

    purged = run("--root", str(root), "--uninstall", "--purge")
    assert purged.returncode == 0, purged.stderr
    for path in ("etc/appliance", "var/lib/appliance", "var/cache/appliance", "var/log/appliance"):
        assert not (root / path).exists(), path
    assert "appliance:" not in (root / "etc/passwd").read_text()
    assert "appliance:" not in (root / "etc/group").read_text()


def test_purge_goes_only_with_uninstall():
    result = run("--purge")
    assert result.returncode == 2 and "--purge goes with --uninstall" in result.stderr  # a usage error


def test_help_names_every_option():
    out = run("--help").stdout
    for option in ("--dev", "--uninstall", "--purge", "--root DIR"):
        assert option in out, option
