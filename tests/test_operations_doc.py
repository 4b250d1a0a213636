"""docs/operations.md agrees with the unit, install.sh and the CLI it describes."""

from __future__ import annotations

import re
import subprocess

from .conftest import PY, ROOT
from .test_systemd_unit import analyze, run_verify, unit_settings, verify_root  # noqa: F401 - fixture

DOC = (ROOT / "docs" / "operations.md").read_text()
UNIT = ROOT / "systemd" / "appliance.service"
HARDENING = ("NoNewPrivileges", "CapabilityBoundingSet", "AmbientCapabilities", "ProtectSystem",
             "ProtectHome", "PrivateTmp", "ProtectKernelTunables", "ProtectKernelModules",
             "ProtectKernelLogs", "ProtectControlGroups", "ProtectClock", "ProtectHostname",
             "ProtectProc", "RestrictAddressFamilies", "RestrictNamespaces", "RestrictRealtime",
             "RestrictSUIDSGID", "LockPersonality", "RemoveIPC", "SystemCallArchitectures",
             "SystemCallFilter", "SystemCallErrorNumber", "DevicePolicy", "DeviceAllow", "UMask")


def test_every_hardening_setting_of_the_unit_is_explained():
    settings = unit_settings(UNIT)
    table = DOC.split("## Hardening", 1)[1].split("\n## ", 1)[0]
    for key in HARDENING:
        for value in settings[key]:
            assert f"`{key}={value}`" in table, f"{key}={value}"


def test_the_documented_exposure_score_is_the_unit_s(analyze):
    result = subprocess.run([analyze, "security", "--offline=true", "--no-pager", str(UNIT)],
                            capture_output=True, text=True, timeout=120)
    score = re.search(r"Overall exposure level for appliance\.service: ([\d.]+ \w+)", result.stdout)
    assert score and f"**{score.group(1)}**" in DOC


def test_the_credential_drop_in_of_the_doc_verifies(analyze, tmp_path):
    dropin = re.search(r"```ini\n(.+?)```", DOC, flags=re.S).group(1)
    assert "LoadCredential=openai:/etc/appliance/credentials/openai" in dropin
    assert "$CREDENTIALS_DIRECTORY/<name>" in DOC
    root = verify_root(tmp_path, UNIT.read_text(), dropins={"credentials.conf": dropin})
    result = run_verify(analyze, root)
    assert result.returncode == 0 and result.stdout + result.stderr == "", result.stdout + result.stderr


def test_the_install_options_of_the_doc_exist():
    help_text = subprocess.run([str(ROOT / "install.sh"), "--help"], capture_output=True, text=True,
                               timeout=30).stdout
    for option in set(re.findall(r"install\.sh (--[a-z]+)", DOC)) | {"--purge", "--root"}:
        assert option in help_text, option


def test_the_appliance_logs_examples_parse():
    for line in re.findall(r"^appliance logs[^#\n]*", DOC, flags=re.M):
        args = line.split()[1:]
        result = subprocess.run([PY, "-m", "appliance.cli", *args, "--help"], capture_output=True,
                                text=True, cwd=ROOT, timeout=30)
        assert result.returncode == 0, (line, result.stderr)
