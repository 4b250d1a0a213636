#!/usr/bin/env python3
"""Regenerate a GPU engine's hashed lock: the full dependency tree of its requirements.txt,
every package pinned with the sha256 of its files on PyPI, for the Python version and
platform named in its image.toml. Reads package metadata only (no wheels are downloaded),
so it runs on any connected machine; it needs uv (`pip install uv`).

    python3 images/lock.py vllm|sglang
"""

from __future__ import annotations

import datetime
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

INDEX = "https://pypi.org/simple"


def uv() -> list[str]:
    if path := shutil.which("uv"):
        return [path]
    if subprocess.run([sys.executable, "-m", "uv", "--version"], capture_output=True).returncode == 0:
        return [sys.executable, "-m", "uv"]
    sys.exit("lock.py: uv is needed (python3 -m venv /tmp/uvenv && /tmp/uvenv/bin/pip install uv; "
             "then PATH=/tmp/uvenv/bin:$PATH)")


def main(engine: str) -> None:
    folder = Path(__file__).resolve().parent / engine
    spec = tomllib.loads((folder / "image.toml").read_text())
    base, arch = re.fullmatch(r"(manylinux_\d+_\d+)_(\w+)", spec["platform"]).groups()
    compile_args = ["pip", "compile", "--no-config", "--quiet", "--no-header", "--generate-hashes",
                    "--only-binary", ":all:", "--python-version", spec["python"],
                    "--python-platform", f"{arch}-{base}", "--index-url", INDEX,
                    spec["requirements"], "-o", spec["lock"]]
    cmd = uv()
    version = subprocess.run([*cmd, "--version"], capture_output=True, text=True, check=True).stdout.strip()
    subprocess.run([*cmd, *compile_args], cwd=folder, check=True)
    lock = folder / spec["lock"]
    body = lock.read_text()
    pins = dict(re.findall(r"^([A-Za-z0-9._-]+)==(\S+)", body, flags=re.M))
    if pins.get(engine) != spec["version"]:
        sys.exit(f"lock.py: the lock pins {engine}=={pins.get(engine)}, image.toml says {spec['version']}")
    glibc = base.removeprefix("manylinux_").replace("_", ".")
    header = [
        f"# The full {engine} {spec['version']} environment: every package pinned, with the sha256",
        "# of each of its files on PyPI (pip install --require-hashes --no-deps -r requirements.lock).",
        f"# Made by: python3 images/lock.py {engine}   (date: {datetime.date.today().isoformat()}, {version})",
        f"#   which runs, in images/{engine}: uv {' '.join(compile_args)}",
        f"# Target: Linux {arch}, CPython {spec['python']}, glibc >= {glibc} ({spec['platform']}), wheels only;",
        "#   every package resolved from PyPI alone (no other index).",
        f"# {len(pins)} packages; torch=={pins.get('torch')}. Do not edit: rerun the command above.",
    ]
    lock.write_text("\n".join(header) + "\n" + body)
    print(f"wrote {lock} ({len(pins)} packages, {engine}=={pins[engine]}, torch=={pins.get('torch')})")


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in ("vllm", "sglang"):
        sys.exit(__doc__)
    main(sys.argv[1])
