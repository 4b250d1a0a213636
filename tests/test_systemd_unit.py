"""systemd/appliance.service: valid for systemd, confined ("OK" or better in
systemd-analyze security), and consistent with the daemon's config."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from appliance.config import parse_config

from .conftest import ROOT

UNIT = ROOT / "systemd" / "appliance.service"
GOOD_LEVELS = ("PERFECT", "SAFE", "OK")


def unit_settings(path: Path = UNIT) -> dict[str, list[str]]:
    """Key -> every value it is given (keys such as DeviceAllow= repeat)."""
    settings: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def ensure_systemd_analyze() -> str:
    """systemd-analyze from Debian's systemd package: installed by ./install.sh --dev,
    or here when missing (root with apt-get); it needs no running systemd."""
    found = shutil.which("systemd-analyze")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("systemd-analyze is missing and apt-get (as root) is not available to install "
                    "Debian's systemd package")
    subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "systemd"],
                   check=True, capture_output=True, timeout=900,
                   env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    found = shutil.which("systemd-analyze")
    assert found, "apt-get installed systemd but systemd-analyze is not on PATH"
    return found


@pytest.fixture(scope="module")
def analyze() -> str:
    return ensure_systemd_analyze()


def _system_units() -> Path:
    for candidate in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")):
        if (candidate / "multi-user.target").exists():
            return candidate
    pytest.skip("the systemd package's units (multi-user.target) are not installed")


def verify_root(tmp_path: Path, unit_text: str, dropins: dict[str, str] | None = None) -> Path:
    """A filesystem root where the unit can be verified: systemd's own units, the
    unit under /etc, and an executable where ExecStart and ExecReload point."""
    root = tmp_path / "root"
    (root / "usr/lib/systemd").mkdir(parents=True)
    shutil.copytree(_system_units(), root / "usr/lib/systemd/system", symlinks=True)
    units = root / "etc/systemd/system"
    units.mkdir(parents=True)
    (units / "appliance.service").write_text(unit_text)
    for name, text in (dropins or {}).items():
        (units / "appliance.service.d").mkdir(exist_ok=True)
        (units / "appliance.service.d" / name).write_text(text)
    settings = unit_settings(units / "appliance.service")
    for command in settings["ExecStart"] + settings.get("ExecReload", []):
        exe = root / command.split()[0].lstrip("/")
        exe.parent.mkdir(parents=True, exist_ok=True)
        exe.write_text("#!/bin/sh\n")
        exe.chmod(0o755)
    return root


def run_verify(analyze: str, root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([analyze, "--man=no", "verify", f"--root={root}", "appliance.service"],
                          capture_output=True, text=True, timeout=120)


def test_systemd_analyze_verify_accepts_the_unit(analyze, tmp_path):
    result = run_verify(analyze, verify_root(tmp_path, UNIT.read_text()))
    # verify exits 0 on unknown keys too, with a message: no message is the bar.
    assert result.returncode == 0 and result.stdout + result.stderr == "", result.stdout + result.stderr


def test_verify_catches_a_broken_unit(analyze, tmp_path):
    """Guards the test above: a typo in the unit is reported."""
    broken = UNIT.read_text().replace("ProtectHome=yes", "ProtectHome=yes\nProtectHomes=yes")
    result = run_verify(analyze, verify_root(tmp_path, broken))
    assert "Unknown key" in result.stdout + result.stderr


def test_the_unit_exposure_is_ok_or_better(analyze):
    result = subprocess.run([analyze, "security", "--offline=true", "--no-pager", str(UNIT)],
                            capture_output=True, text=True, timeout=120)
    out = result.stdout + result.stderr
    match = re.search(r"Overall exposure level for appliance\.service: ([\d.]+) (\w+)", out)
    assert match, out
    print(f"\nsystemd-analyze security: exposure {match.group(1)} {match.group(2)}")
    print("\n".join(line.rstrip() for line in out.splitlines() if line.startswith("✗")))
    assert match.group(2) in GOOD_LEVELS, out
    assert float(match.group(1)) < 2.5, out  # 1.8 when written; a regression shows here first


def test_stopping_covers_the_drain_and_the_engines_stop():
    cfg = parse_config("")
    stop_timeout = unit_settings()["TimeoutStopSec"][0]
    assert stop_timeout.endswith("s")
    # serve() drains, then each replica drains, then engines get stop_grace_s.
    needed = 2 * cfg.server.drain_timeout_s + cfg.supervisor.stop_grace_s
    assert float(stop_timeout[:-1]) >= needed + 10


def test_the_unit_is_a_notify_service_with_a_watchdog_that_restarts_on_failure():
    s = unit_settings()
    assert s["Type"] == ["notify"] and s["NotifyAccess"] == ["main"]
    assert s["WatchdogSec"] and s["Restart"] == ["on-failure"]
    # The daemon drains and stops its engines itself; systemd SIGKILLs leftovers.
    assert s["KillMode"] == ["mixed"]
    assert s["ExecStart"] == ["/opt/appliance/venv/bin/appliance serve"]
    assert s["User"] == ["appliance"] and s["Group"] == ["appliance"]
    for key in ("StateDirectory", "CacheDirectory", "LogsDirectory", "ConfigurationDirectory"):
        assert s[key] == ["appliance"], key


def test_the_unit_confines_the_daemon_to_the_nvidia_devices():
    s = unit_settings()
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
                       "PrivateTmp": "yes", "ProtectKernelTunables": "yes",
                       "ProtectKernelModules": "yes", "ProtectKernelLogs": "yes",
                       "DevicePolicy": "closed"}.items():
        assert s[key] == [value], key
    assert "@system-service" in s["SystemCallFilter"]
    assert s["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6 AF_NETLINK"]
    assert {d.split()[0] for d in s["DeviceAllow"]} == {
        "char-nvidia-frontend", "char-nvidia-uvm", "char-nvidia-caps"}


def test_paths_are_the_directories_systemd_made(monkeypatch):
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/appliance")
    monkeypatch.setenv("CACHE_DIRECTORY", "/var/cache/appliance")
    monkeypatch.setenv("LOGS_DIRECTORY", "/var/log/appliance:/var/log/other")
    paths = parse_config("").paths
    assert (paths.state_dir, paths.cache_dir, paths.log_dir) == (
        "/var/lib/appliance", "/var/cache/appliance", "/var/log/appliance")
    # The config still wins over systemd's defaults.
    assert parse_config('[paths]\nstate_dir = "/srv/state"\n').paths.state_dir == "/srv/state"
