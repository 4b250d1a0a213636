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



# Each question an operator asks first: words the troubleshooting section quotes, each with
# the piece of the source that says them (one source line's literal), so the doc quotes what
# the appliance really says.
TROUBLESHOOTING = {
    "The port is taken.": {
        "is already in use by another program; stop it, or set server.port (or --port) to a free port":
            '"stop it, or set server.port (or --port) to a free port"',
        "is already in use by another appliance daemon": "is already in use by another appliance daemon (",
    },
    "No GPU is seen.": {
        "no usable NVIDIA GPU: <NVML's reason>; running CPU-only": 'no usable NVIDIA GPU: {error}; running CPU-only"',
        "`appliance plan` says `No GPUs: <reason>`": "No GPUs: ",
    },
    "A model will not load.": {
        "gave up after N crashes within Ws (supervisor.max_crashes = M); last: ":
            '(supervisor.max_crashes = {sv.max_crashes}); last: {reason}"',
    },
    "Out of memory.": {
        "cannot place on GPUs: ": 'CANNOT_PLACE = "cannot place on GPUs: "',
        "waiting for room held by other models: ": '"waiting for room held by other models: "',
        "(killed by SIGKILL)": 'f" (killed by {signal.Signals(-code).name})"',
    },
    "The disk is full.": {
        "disk full while importing ...; nothing was changed": "disk full while importing {f.path} into {store.root}; nothing was changed",
        "The appliance cannot write its audit log and token ledger now (...); retry later":
            '"The appliance cannot write its audit log and token ledger now "',
    },
}
SOURCES = "\n".join(p.read_text() for p in (ROOT / "appliance").rglob("*.py"))


def _unwrapped(text: str) -> str:
    return " ".join(text.split())


def test_the_troubleshooting_section_answers_the_first_five_questions_with_the_messages_the_code_gives():
    section = _unwrapped(DOC.split("## Troubleshooting\n", 1)[1].split("\n## ", 1)[0])
    for question, quotes in TROUBLESHOOTING.items():
        assert f"**{question}**" in section, question
        for quote, source in quotes.items():
            assert quote in section, quote
            assert source in SOURCES, source
    for command in set(re.findall(r"`appliance ([a-z]+)", section)):
        assert subprocess.run([PY, "-m", "appliance.cli", command, "--help"], capture_output=True,
                              cwd=ROOT, timeout=30).returncode == 0, command
