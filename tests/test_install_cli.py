"""install.sh as an operator reads and runs it, without installing anything: its --help,
its exit status for a command line it cannot run, and what it says of a bundle that was
not copied whole or sits on media whose path has spaces (an installed run is
tests/test_install.py's and tests/test_offline_bundle.py's)."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from .conftest import PY, ROOT
from .test_images import _wheel

INSTALL = ROOT / "install.sh"


def install_sh(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    # APPLIANCE_PREFIX and APPLIANCE_BIN_LINK: were anything installed, it would be under tmp_path.
    env = {**os.environ, "APPLIANCE_PREFIX": str(tmp_path / "venv"),
           "APPLIANCE_BIN_LINK": str(tmp_path / "bin" / "appliance")}
    return subprocess.run([str(INSTALL), *args], capture_output=True, text=True, timeout=120, env=env)


def test_install_sh_help_lists_every_option_it_parses_and_its_exit_codes(tmp_path):
    result = install_sh("--help", tmp_path=tmp_path)
    assert result.returncode == 0
    text = result.stdout
    for option in ("--dev", "--offline BUNDLE", "--rollback", "--uninstall", "--purge", "--root DIR", "--help"):
        assert option in text, option
    assert "Exit status: 0" in text and "2 usage error" in text
    # --engine is `appliance bundle create`'s flag, not one install.sh takes.
    assert "bundle create --engine" in text


@pytest.mark.parametrize(("args", "said"), [
    (["--bogus"], "unknown option '--bogus'"),
    (["--offline"], "--offline needs a BUNDLE"),
    (["--root"], "--root needs a directory"),
    (["--purge"], "--purge goes with --uninstall"),
    (["--dev", "--offline", "x.tar"], "--offline is for the system install"),
    (["--dev", "--rollback"], "--rollback is for installs"),
])
def test_install_sh_usage_errors_exit_2_and_do_nothing(tmp_path, args, said):
    """A command line install.sh cannot run as written is a usage error, exit 2, as for every
    `appliance` command (docs/operations.md, "The command line"); 1 is a failed install."""
    result = install_sh(*args, tmp_path=tmp_path)
    assert result.returncode == 2, result.stderr
    assert said in result.stderr and "--help" in result.stderr
    assert not (tmp_path / "venv").exists()


def _bundle_folder(folder: Path) -> Path:
    (folder / "wheels").mkdir(parents=True)
    (folder / "bundle.json").write_text('{"appliance_version": "0.0.0"}\n')
    for name in ("a", "b"):
        (folder / "wheels" / f"{name}-1.0-py3-none-any.whl").write_bytes(name.encode() * 100)
    files = ["bundle.json", "wheels/a-1.0-py3-none-any.whl", "wheels/b-1.0-py3-none-any.whl"]
    sums = "".join(f"{hashlib.sha256((folder / f).read_bytes()).hexdigest()}  {f}\n" for f in files)
    (folder / "SHA256SUMS").write_text(sums)
    return folder


def test_a_bundle_copied_in_part_names_the_missing_file_and_installs_nothing(tmp_path):
    """A copy cut short leaves files of SHA256SUMS out: "missing", not a checksum mismatch."""
    bundle = _bundle_folder(tmp_path / "USB DISK" / "appliance")
    (bundle / "wheels" / "b-1.0-py3-none-any.whl").unlink()
    result = install_sh("--offline", str(bundle), tmp_path=tmp_path)
    assert result.returncode == 1
    assert "wheels/b-1.0-py3-none-any.whl is missing" in result.stderr, result.stderr
    assert "copied whole" in result.stderr and "nothing was installed" in result.stderr
    assert not (tmp_path / "venv").exists()


def test_a_bundle_missing_a_file_early_in_a_long_sha256sums_names_it_not_a_silent_exit(tmp_path):
    """The missing file was looked for through a pipe (cut | while ... break): past the pipe's
    buffer the loop's break killed cut with SIGPIPE, and pipefail with set -e ended install.sh
    there, at 141, saying nothing. A bundle with engine wheelhouses lists thousands of files."""
    bundle = _bundle_folder(tmp_path / "USB DISK" / "appliance")
    (bundle / "wheels" / "a-1.0-py3-none-any.whl").unlink()
    sums = (bundle / "SHA256SUMS").read_text().splitlines(keepends=True)
    sums = [line for line in sums if "a-1.0" in line] + [line for line in sums if "a-1.0" not in line]
    sums += [f"{'0' * 64}  wheelhouses/vllm/package-number-{i:05d}-py3-none-any.whl\n" for i in range(3000)]
    (bundle / "SHA256SUMS").write_text("".join(sums))
    result = install_sh("--offline", str(bundle), tmp_path=tmp_path)
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert "wheels/a-1.0-py3-none-any.whl is missing" in result.stderr, result.stderr
    assert not (tmp_path / "venv").exists()


def test_a_bundle_with_thousands_of_unlisted_files_names_one_not_a_silent_exit(tmp_path):
    """comm | head -n1: past the pipe's buffer, head's exit killed comm with SIGPIPE, and
    pipefail with set -e ended install.sh at 141, saying nothing."""
    bundle = _bundle_folder(tmp_path / "b")
    extra = bundle / "wheelhouses" / "vllm"
    extra.mkdir(parents=True)
    for i in range(3000):
        (extra / f"an-unlisted-package-with-a-long-name-{i:05d}-py3-none-any.whl").write_bytes(b"")
    result = install_sh("--offline", str(bundle), tmp_path=tmp_path)
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert "is not in SHA256SUMS; nothing was installed" in result.stderr, result.stderr
    assert not (tmp_path / "venv").exists()


@pytest.mark.parametrize(("cut_at", "said"), [
    (1600, "not a readable tar archive (cut short in copying"),  # inside a member: tar fails
    (700, "no SHA256SUMS or bundle.json (cut short in copying"),  # after whole members: tar does not
])
def test_a_bundle_tar_cut_short_says_so_and_installs_nothing(tmp_path, cut_at, said):
    bundle = _bundle_folder(tmp_path / "b")
    whole = tmp_path / "appliance.tar"
    subprocess.run(["tar", "-cf", str(whole), "-C", str(bundle), "."], check=True)
    half = tmp_path / "half.tar"
    half.write_bytes(whole.read_bytes()[:cut_at])
    result = install_sh("--offline", str(half), tmp_path=tmp_path)
    assert result.returncode == 1
    assert said in result.stderr and "nothing was installed" in result.stderr, result.stderr
    assert not (tmp_path / "venv").exists()


def test_pip_finds_the_wheels_of_a_bundle_on_a_path_with_spaces(tmp_path):
    """pip splits PIP_FIND_LINKS at whitespace, so a bundle folder on "/media/USB DISK" was two
    places, neither of them the bundle: install.sh hands pip the folder as a file:// URL."""
    wheels = tmp_path / "USB DISK" / "appliance" / "wheels"
    wheels.mkdir(parents=True)
    _wheel(wheels, "spaced-pkg", "1.0")
    defined = subprocess.run(["bash", "-c", f'eval "$(grep "^file_url()" {INSTALL})"; PYTHON={PY}; file_url "$1"',
                              "-", str(wheels)], capture_output=True, text=True, check=True).stdout.strip()
    download = subprocess.run([PY, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                               "-d", str(tmp_path / "got"), "spaced-pkg==1.0"], capture_output=True, text=True,
                              timeout=120, env={**os.environ, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": defined})
    assert download.returncode == 0, download.stderr
    assert (tmp_path / "got" / "spaced_pkg-1.0-py3-none-any.whl").exists()
