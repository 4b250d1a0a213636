"""`appliance bundle create`: one archive that installs the appliance on a server with
no network at all and no checkout beside it: ``tar -xf appliance.tar -C DIR &&
DIR/install.sh``, or ``./install.sh --offline appliance.tar`` from any checkout.

    bundle.json                  format, appliance version, engines, prebuilt binaries, models
    SHA256SUMS                   every other file, checked before anything is installed
    install.sh, pyproject.toml,  the installer of this version and what it reads
    appliance.example.toml,
    systemd/
    images/                      the engine image definitions (as in the checkout)
    wheels/                      the appliance and its dependencies, its [telemetry] extra's
                                 (OpenTelemetry) included (+ setuptools to build it)
    embedded/                    the bundled default model's wheel
    wheelhouses/llamacpp/        the pinned llama.cpp sdist and the build tools' wheels: the
                                 fallback where no prebuilt binary fits the server
    prebuilt/llamacpp/<key>/     llama-server built here (portable: x86-64-v3 / armv8-a; or
                                 native, for servers with this CPU's features), with its
                                 build.json: arch, glibc, CPU features it needs, flags
    wheelhouses/vllm|sglang/     the engine's locked wheelhouse (requirements.lock), which
                                 install.sh builds the engine's image from
    models/<name>/<path>         store models (their license, and its acceptance, in bundle.json)

Nothing is built to make a bundle but the appliance's own wheel and, once per machine
(cached), the portable llama-server; every download is a plain file: wheels only, and the
llama.cpp sdist as a file checked against its pinned sha256 (images/fetch_sdist.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from importlib.metadata import version as dist_version
from pathlib import Path
from typing import Any

from appliance.config import Config, install_prefix
from appliance.dist.images import definition, target_pip_args
from appliance.safe_paths import StoreError, check_file_path, open_regular, written_aside
from appliance.store.hashing import copy_and_hash, hash_file
from appliance.store.store import Store

FORMAT = 2
# What the installer reads beside install.sh (install.sh's and systemd/install-*.sh's $here).
INSTALLER = ("install.sh", "pyproject.toml", "appliance.example.toml", "systemd", "images")


class BundleError(Exception):
    """One line for the operator."""


def installer_source() -> Path:
    """The installer and image definitions to carry: this checkout, else the copy install.sh
    put beside the installed program (<venv>/share/appliance/installer)."""
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "pyproject.toml").exists() and (checkout / "install.sh").exists():
        return checkout
    installed = install_prefix() / "share" / "appliance" / "installer"
    if (installed / "install.sh").exists():
        return installed
    raise BundleError(f"no installer to carry: neither a checkout ({checkout}) nor an installed copy "
                      f"({installed}); run bundle create from a checkout")


def _checkout() -> Path:
    root = Path(__file__).resolve().parents[2]
    if not (root / "pyproject.toml").exists() or not (root / "install.sh").exists():
        raise BundleError("bundle create builds the appliance's wheels from its source checkout; run it "
                          "from one, or pass --wheelhouse DIR")
    return root


def _pin_env() -> dict[str, str]:
    text = (installer_source() / "images" / "llamacpp" / "pin.env").read_text()
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))


def _build_cache() -> Path:
    return Path(os.environ.get("APPLIANCE_BUILD_CACHE") or Path.home() / ".cache/appliance-build")


def _pip(args: list[str], what: str) -> None:
    result = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
                            capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise BundleError(f"{what} failed: " + " | ".join(tail))


def create(cfg: Config, output: Path, *, engines: list[str], models: list[str],
           wheelhouse: Path | None = None, prebuilt: str | None = "native",
           log: Callable[[str], None] = print) -> Path:
    output = output.resolve()
    if not output.parent.is_dir():
        raise BundleError(f"{output.parent} is not a directory: make it first, or write the bundle elsewhere (-o)")
    # The parts gather beside the archive under a fresh private name: a name known in
    # advance, in a shared directory (-o /tmp/...), was a local user's to plant first.
    work = Path(tempfile.mkdtemp(prefix=f".{output.name}.parts-", dir=output.parent))
    try:
        manifest: dict[str, Any] = {"format": FORMAT, "appliance_version": dist_version("appliance"), "created": time.time(),
                    "engines": engines, "prebuilt": [], "models": []}
        _installer(work)
        with _part(log, "the appliance's wheels"):
            _appliance_wheels(work / "wheels", wheelhouse, log)
        pins = _pin_env()
        with _part(log, "the bundled model"):
            _embedded_model(work / "embedded", pins, log)
        for engine in engines:
            with _part(log, f"the {engine} engine's sources and wheels"):
                _engine_wheelhouse(engine, work / "wheelhouses" / engine, pins, log)
        if "llamacpp" in engines and prebuilt:
            with _part(log, f"the {prebuilt} llama-server"):
                manifest["prebuilt"].append(_prebuilt_llama_server(prebuilt, work / "prebuilt" / "llamacpp", log))
        store = Store.from_config(cfg)
        for name in models:
            with _part(log, f"model {name}"):
                manifest["models"].append(_model(store, name, work / "models", log))
        (work / "bundle.json").write_text(json.dumps(manifest, indent=1))
        with _part(log, "the checksums and the archive"):
            sums = [f"{hash_file(p)}  {p.relative_to(work).as_posix()}"
                    for p in sorted(work.rglob("*")) if p.is_file()]
            (work / "SHA256SUMS").write_text("\n".join(sums) + "\n")
            # Never through a link a local user put beside it (-o /tmp/...): written_aside.
            with written_aside(output, "wb") as out, tarfile.open(fileobj=out, mode="w") as tf:
                os.fchmod(out.fileno(), 0o644)  # for copying to the offline server
                for p in sorted(work.rglob("*")):
                    if p.is_file():
                        tf.add(p, arcname=p.relative_to(work).as_posix())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return output


@contextlib.contextmanager
def _part(log: Callable[[str], None], what: str) -> Iterator[None]:
    """One line when a part of the bundle is done, with how long it took (parts take from
    seconds to many minutes: the operator sees which one the time goes to)."""
    start = time.monotonic()
    yield
    log(f"{what}: done in {time.monotonic() - start:.0f}s")


def _installer(dest: Path) -> None:
    """install.sh and what it reads; the image definitions from $APPLIANCE_IMAGE_DEFS when set."""
    source = installer_source()
    for name in INSTALLER:
        src = source / name
        if name == "images" and os.environ.get("APPLIANCE_IMAGE_DEFS"):
            src = Path(os.environ["APPLIANCE_IMAGE_DEFS"])
        if src.is_dir():
            shutil.copytree(src, dest / name, symlinks=False,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, dest / name)


def _appliance_wheels(dest: Path, wheelhouse: Path | None, log) -> None:
    dest.mkdir(parents=True)
    if wheelhouse is not None:
        for whl in wheelhouse.glob("*.whl"):
            with open_regular(whl) as src:  # a link's target is not the operator's wheelhouse
                copy_and_hash(src, dest / whl.name)
            os.chmod(dest / whl.name, 0o644)  # a public package, as pip would write it
        return
    log("building the appliance's wheelhouse (pip wheel; its dependencies as published wheels)")
    # With its extra for traces ([telemetry]): what install.sh installs, offline too.
    _pip(["wheel", "--quiet", "--only-binary", ":all:", "--wheel-dir", str(dest), f"{_checkout()}[telemetry]"],
         "pip wheel of the appliance")
    # An older installer builds the appliance from a checkout: the build backend goes along.
    _pip(["download", "--quiet", "--only-binary", ":all:", "-d", str(dest), "setuptools>=77", "wheel", "pip"],
         "pip download of the build backend")


def _embedded_model(dest: Path, pins: dict[str, str], log) -> None:
    dest.mkdir(parents=True)
    name, version = pins["MODEL_WHEEL_NAME"], pins["MODEL_WHEEL_VERSION"]
    cached = sorted((_build_cache() / "wheels").glob(f"{name.replace('-', '_')}-{version}-*.whl"))
    if cached:
        shutil.copy2(cached[0], dest / cached[0].name)
    else:
        log(f"downloading {name}=={version}")
        _pip(["download", "--quiet", "--no-deps", "--only-binary", ":all:", "-d", str(dest), f"{name}=={version}"],
             f"download of {name}")


def _engine_wheelhouse(engine: str, dest: Path, pins: dict[str, str], log) -> None:
    dest.mkdir(parents=True)
    # The checkout's definitions, or $APPLIANCE_IMAGE_DEFS (install.sh --offline builds the
    # GPU images from the same ones).
    d = definition(engine, None if os.environ.get("APPLIANCE_IMAGE_DEFS") else installer_source() / "images")
    if engine == "llamacpp":
        log(f"fetching the llama.cpp sdist {pins['LLAMACPP_SDIST_VERSION']} (a plain download) and the build tools")
        fetch = [sys.executable, str(d.folder.parent / "fetch_sdist.py"), pins["LLAMACPP_SDIST_NAME"],
                 pins["LLAMACPP_SDIST_VERSION"], pins["LLAMACPP_SDIST_SHA256"], str(dest),
                 "--cache", str(_build_cache() / "sdist")]
        if os.environ.get("APPLIANCE_LLAMACPP_SDIST"):
            fetch += ["--file", os.environ["APPLIANCE_LLAMACPP_SDIST"]]
        result = subprocess.run(fetch, capture_output=True, text=True)
        if result.returncode != 0:
            raise BundleError(result.stderr.strip().splitlines()[-1].removeprefix("fetch_sdist: error: "))
        _pip(["download", "--quiet", "--no-deps", "--only-binary", ":all:", "--require-hashes", "-d", str(dest),
              "-r", str(d.requirements)], "download of the build tools")
        return
    if d.lock is None or not d.lock.exists():
        raise BundleError(f"{engine}: {d.lock} is missing; see images/{engine}/README.md for how to make it")
    log(f"downloading the {engine} wheelhouse (several GB, {d.platform}, Python {d.python})")
    _pip(["download", "--quiet", "--no-deps", "--require-hashes", *target_pip_args(d), "-d", str(dest),
          "-r", str(d.lock)], f"download of the {engine} wheelhouse")


def _prebuilt_llama_server(variant: str, dest: Path, log) -> dict:
    """llama-server of a variant (images/llamacpp/build.sh --variant: built once per machine
    and cached), for servers whose arch, glibc and CPU features it fits."""
    build = installer_source() / "images" / "llamacpp" / "build.sh"
    if os.environ.get("APPLIANCE_IMAGE_DEFS"):
        build = Path(os.environ["APPLIANCE_IMAGE_DEFS"]) / "llamacpp" / "build.sh"
    out = dest / ".new"
    log(f"the {variant} llama-server: from the build cache, else compiled here once (minutes)")
    # build.sh's lines (its progress every 30 s, or why it failed) go straight to stderr.
    if subprocess.run([str(build), "--variant", variant, str(out)],
                      env={**os.environ, "PYTHON": sys.executable}).returncode != 0:
        raise BundleError(f"building the {variant} llama-server failed (build.sh's lines above say why)")
    info = json.loads((out / "build.json").read_text())
    key = f"{info['arch']}-glibc{info['glibc']}-{info['variant']}"
    os.replace(out, dest / key)
    needs = " ".join(info.get("cpu_needs") or []) or "the arch's baseline"
    log(f"added the prebuilt llama-server {key}: servers with glibc >= {info['glibc']} and these CPU "
        f"features use it ({needs}); others compile it from the carried sdist")
    return {"engine": "llamacpp", "path": f"prebuilt/llamacpp/{key}", **{k: info[k] for k in (
        "variant", "arch", "glibc", "cpu_needs")}}


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
            # Readable by all, as every other file of the bundle: the server imports it as its
            # service user, whoever unpacked it (copy_and_hash creates 0600 files).
            target.chmod(0o644)
        except StoreError as exc:
            raise BundleError(f"model '{name}' file {f['path']}: {exc}") from None
        if digest != f["sha256"]:
            store.verify(name)  # quarantines it
            raise BundleError(f"model '{name}' file {f['path']} has sha256 {digest}, expected {f['sha256']}; "
                              f"it is quarantined: re-import it")
    log(f"added model {name} ({record.total_bytes / 1024**2:.1f} MiB)")
    entry: dict[str, Any] = {"name": name, "license": record.license, "revision": record.revision, "format": record.format,
             "files": record.files}
    if record.title:
        entry["title"] = record.title
    if record.license_accepted_at is not None:  # accepted here: served there without asking again
        entry["license_accepted_by"] = record.license_accepted_by
        entry["license_accepted_at"] = record.license_accepted_at
    return entry
