"""Engine images: the llamacpp image is built, recorded, verified, rolled back and launched
here; the GPU images' definitions are checked (hashed pins that resolve on PyPI, a full
hashed lock that pip takes in --require-hashes mode)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
import urllib.error
import urllib.request
import zipfile

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from appliance.dist.images import definition, hashed_requirements, wheel_platforms

from .conftest import BUILD_CACHE, PY, ROOT, cached_llama_server

# Tests that make venvs (each a pip run, or several): minutes on a loaded 2-core machine.
VENV_BUILDING = pytest.mark.timeout(600)
needs_llama_build = pytest.mark.skipif(cached_llama_server() is None,
                                       reason="install.sh builds and caches llama-server first")


def appliance(tmp_path, *args, env=None, check=True):
    cfg = tmp_path / "appliance.toml"
    cfg.write_text(f'[images]\ndir = "{tmp_path}/images"\n[paths]\ncache_dir = "{tmp_path}/cache"\n')
    result = subprocess.run([PY, "-m", "appliance.cli", *args, "--config", str(cfg)], capture_output=True,
                            text=True, cwd=ROOT, timeout=600, env={**os.environ, **(env or {})})
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.mark.parametrize("engine", ["llamacpp", "vllm", "sglang"])
def test_every_image_definition_pins_version_python_and_hashed_requirements(engine):
    d = definition(engine)
    assert d.version and d.python.startswith("3.")
    reqs = hashed_requirements(d.requirements)
    assert reqs and all("==" in pin and hashes and all(len(h.split(":")[1]) == 64 for h in hashes)
                        for pin, hashes in reqs)
    if engine == "llamacpp":
        pin = (ROOT / "images" / "llamacpp" / "pin.env").read_text()
        assert f"LLAMACPP_SDIST_VERSION={d.version}" in pin
    else:
        assert f"{engine}=={d.version}" in [p for p, _ in reqs]
        assert (d.folder / "README.md").read_text().count("requirements.lock") >= 1


def _simple_index(name: str) -> str:
    """PyPI's simple index page of a project: every file with its #sha256= fragment."""
    try:
        with urllib.request.urlopen(f"https://pypi.org/simple/{name}/", timeout=15) as r:
            return r.read().decode()
    except urllib.error.HTTPError:
        raise
    except OSError as exc:
        pytest.skip(f"PyPI not reachable: {exc}")


@pytest.mark.parametrize("engine", ["llamacpp", "vllm", "sglang"])
def test_pinned_hashes_are_files_pypi_serves_for_the_pins(engine):
    for pin, hashes in hashed_requirements(definition(engine).requirements):
        name, version = pin.split("==")
        page = _simple_index(name)
        for h in hashes:
            match = re.search(r'href="[^"]*/([^/"#]+)#sha256=' + h.split(":")[1], page)
            assert match, (pin, h)
            assert f"-{version}-" in match.group(1) or f"-{version}." in match.group(1), (pin, match.group(1))


@VENV_BUILDING
@needs_llama_build
def test_llamacpp_image_builds_records_verifies_rolls_back_and_is_what_serve_launches(tmp_path):
    env = {"APPLIANCE_BUILD_CACHE": str(BUILD_CACHE)}
    appliance(tmp_path, "images", "build", "llamacpp", env=env)
    rows = json.loads(appliance(tmp_path, "images", "ls", "--json").stdout)
    assert [(r["engine"], r["version"], r["current"]) for r in rows] == [("llamacpp", "11434.0.0", True)]
    first = rows[0]["tag"]
    binary = tmp_path / "images" / "llamacpp" / "current" / "bin" / "llama-server"
    assert os.access(binary, os.X_OK)
    assert "up to date" in appliance(tmp_path, "images", "build", "llamacpp", env=env).stdout
    assert "ok: llamacpp" in appliance(tmp_path, "images", "verify").stdout

    from appliance.config import parse_config
    from appliance.dist.images import llamacpp_binary

    cfg = parse_config(f'[images]\ndir = "{tmp_path}/images"\n')
    assert llamacpp_binary(cfg) == str(binary.resolve())  # the resolved image: its tag is what runs

    # A changed definition is a new version; the previous one stays for rollback.
    defs = tmp_path / "defs"
    shutil.copytree(ROOT / "images", defs)
    with open(defs / "llamacpp" / "image.toml", "a") as f:
        f.write("# rebuilt\n")
    appliance(tmp_path, "images", "build", "llamacpp", env={**env, "APPLIANCE_IMAGE_DEFS": str(defs)})
    rows = json.loads(appliance(tmp_path, "images", "ls", "--json").stdout)
    assert len(rows) == 2 and next(r for r in rows if r["current"])["tag"] != first
    refused = appliance(tmp_path, "images", "rm", "llamacpp",
                        next(r for r in rows if r["current"])["tag"], check=False)
    assert refused.returncode == 1 and "is the current image" in refused.stderr
    assert first in appliance(tmp_path, "images", "rollback", "llamacpp").stdout
    assert next(r for r in json.loads(appliance(tmp_path, "images", "ls", "--json").stdout)
                if r["current"])["tag"] == first

    os.chmod(binary, 0o755)
    with open(binary, "ab") as f:
        f.write(b"tampered")
    bad = appliance(tmp_path, "images", "verify", "llamacpp", check=False)
    assert bad.returncode == 1 and "bin/llama-server: sha256" in bad.stderr


# --- the GPU images' locks (offline) ------------------------------------------------------

GPU_ENGINES = ["vllm", "sglang"]
HASH = re.compile(r"--hash=sha256:[0-9a-f]{64}")


def lock_entries(path) -> list[tuple[str, list[str]]]:
    """(requirement, options) of each entry of a pip requirements file: comment lines
    dropped, backslash continuations joined."""
    text = "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))
    return [(req, opts) for req, *opts in (line.split() for line in text.replace("\\\n", " ").splitlines()
                                           if line.strip())]


def lock_pins(path) -> dict[str, str]:
    return {canonicalize_name(Requirement(req).name): str(Requirement(req).specifier)[2:]
            for req, _ in lock_entries(path)}


@pytest.mark.parametrize("engine", GPU_ENGINES)
def test_the_lock_pins_every_package_exactly_with_sha256_hashes(engine):
    d = definition(engine)
    assert d.lock is not None and d.lock.is_file(), d.lock
    entries = lock_entries(d.lock)
    assert len(entries) > 100  # the whole tree: torch, CUDA wheels, kernels, the server stack
    names = []
    for req, opts in entries:
        r = Requirement(req)
        (spec,) = r.specifier
        assert spec.operator == "==" and "*" not in spec.version, req
        Version(spec.version)
        assert r.marker is None and r.url is None and not r.extras, req
        assert opts and all(HASH.fullmatch(o) for o in opts), (req, [o for o in opts if not HASH.fullmatch(o)])
        names.append(canonicalize_name(r.name))
    assert len(names) == len(set(names))
    assert {"torch", "triton", "nvidia-cublas"} <= set(names)


@pytest.mark.parametrize("engine", GPU_ENGINES)
def test_the_engine_pin_is_the_same_in_image_toml_requirements_and_lock(engine):
    d = definition(engine)
    (top_pin, top_hashes), = hashed_requirements(d.requirements)
    assert top_pin == f"{engine}=={d.version}"
    assert lock_pins(d.lock)[engine] == d.version
    lock_hashes = {canonicalize_name(Requirement(req).name): opts for req, opts in lock_entries(d.lock)}[engine]
    assert {f"--hash={h}" for h in top_hashes} <= set(lock_hashes)


@pytest.mark.parametrize("engine", GPU_ENGINES)
def test_the_lock_header_says_how_for_what_and_when_it_was_made(engine):
    d = definition(engine)
    header = "\n".join(line for line in d.lock.read_text().splitlines() if line.startswith("#"))
    base, arch = re.fullmatch(r"(manylinux_\d+_\d+)_(\w+)", d.platform).groups()
    assert f"Made by: python3 images/lock.py {engine}" in header
    assert re.search(r"date: \d{4}-\d\d-\d\d", header)
    assert f"--python-version {d.python} --python-platform {arch}-{base}" in header
    assert "--generate-hashes --only-binary :all:" in header and "--index-url https://pypi.org/simple" in header
    assert f"Target: Linux {arch}, CPython {d.python}, glibc >= " in header and d.platform in header
    assert f"torch=={lock_pins(d.lock)['torch']}" in header


@pytest.mark.parametrize("engine", GPU_ENGINES)
def test_the_image_readme_says_how_the_lock_is_made_and_used(engine):
    d = definition(engine)
    readme = (d.folder / "README.md").read_text()
    assert "requirements.lock" in readme and f"python3 images/lock.py {engine}" in readme
    assert f"torch=={lock_pins(d.lock)['torch']}" in readme
    assert d.platform in readme
    download = re.search(r"pip download (?:.*\\\n)*.*", readme).group(0)  # with its continued lines
    assert "--require-hashes" in download and f"-r images/{engine}/requirements.lock" in download
    assert "--only-binary :all:" in download and f"--python-version {d.python}" in download
    glibc = re.fullmatch(r"manylinux_2_(\d+)_x86_64", d.platform)[1]
    assert f"seq {glibc} -1 5" in download and "--platform manylinux2014_x86_64" in download


def test_the_wheel_platforms_of_a_target_are_it_and_every_older_manylinux_tag():
    tags = wheel_platforms("manylinux_2_31_x86_64")
    assert tags[0] == "manylinux_2_31_x86_64" and "manylinux_2_5_x86_64" in tags
    assert {"manylinux_2_28_x86_64", "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"} <= set(tags)
    assert "manylinux_2_32_x86_64" not in tags and all(t.endswith("_x86_64") for t in tags)
    assert "manylinux2014_aarch64" in wheel_platforms("manylinux_2_17_aarch64")
    assert "manylinux2014_aarch64" not in wheel_platforms("manylinux_2_16_aarch64")


def _wheel(folder, name: str, version: str):
    """A minimal pure-Python wheel, built here: a stand-in for the engine's wheelhouse."""
    mod = name.replace("-", "_")
    path = folder / f"{mod}-{version}-py3-none-any.whl"
    info = f"{mod}-{version}.dist-info"
    files = {f"{mod}/__init__.py": f"VERSION = {version!r}\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{p},,\n" for p in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(path, "w") as zf:
        for p, text in {**files, f"{info}/RECORD": record}.items():
            zf.writestr(p, text)
    return path


@VENV_BUILDING
def test_a_gpu_image_installs_its_lock_with_require_hashes_and_wheels_only(tmp_path):
    """`images build vllm` from a definition whose lock is a wheel made here: refused without
    the lock, refused for a requirement without a hash (so --require-hashes is on), a hash
    that does not match or a source tree (wheels only), built when the hash matches."""
    defs = tmp_path / "defs"
    shutil.copytree(ROOT / "images", defs)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    whl = _wheel(wheels, "demo-engine-dep", "1.0")
    env = {"APPLIANCE_IMAGE_DEFS": str(defs), "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1",
           "PIP_FIND_LINKS": str(wheels)}
    lock = defs / "vllm" / "requirements.lock"

    lock.unlink()
    missing = appliance(tmp_path, "images", "build", "vllm", env=env, check=False)
    assert missing.returncode == 1 and "requirements.lock is missing" in missing.stderr

    lock.write_text("demo-engine-dep==1.0\n")
    unhashed = appliance(tmp_path, "images", "build", "vllm", env=env, check=False)
    assert unhashed.returncode == 1 and "Hashes are required in --require-hashes mode" in unhashed.stderr

    lock.write_text(f"demo-engine-dep==1.0 \\\n    --hash=sha256:{'0' * 64}\n")
    wrong = appliance(tmp_path, "images", "build", "vllm", env=env, check=False)
    assert wrong.returncode == 1 and "Expected sha256 " + "0" * 64 in wrong.stderr

    sdist = wheels / "demo_source_only-1.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as tf:
        setup = tmp_path / "setup.py"
        setup.write_text("from setuptools import setup\nsetup(name='demo-source-only', version='1.0')\n")
        tf.add(setup, arcname="demo_source_only-1.0/setup.py")
    lock.write_text(f"demo-source-only==1.0 \\\n    --hash=sha256:{hashlib.sha256(sdist.read_bytes()).hexdigest()}\n")
    source = appliance(tmp_path, "images", "build", "vllm", env=env, check=False)
    assert source.returncode == 1 and "No matching distribution found for demo-source-only==1.0" in source.stderr

    lock.write_text(f"demo-engine-dep==1.0 \\\n    --hash=sha256:{hashlib.sha256(whl.read_bytes()).hexdigest()}\n")
    appliance(tmp_path, "images", "build", "vllm", env=env)
    rows = json.loads(appliance(tmp_path, "images", "ls", "--json").stdout)
    assert [(r["engine"], r["version"], r["current"]) for r in rows] == [("vllm", "0.33.0", True)]
    venv_python = tmp_path / "images" / "vllm" / "current" / "bin" / "python"
    out = subprocess.run([venv_python, "-c", "import demo_engine_dep; print(demo_engine_dep.VERSION)"],
                         capture_output=True, text=True)
    assert out.stdout.strip() == "1.0", out.stderr
    assert "ok: vllm" in appliance(tmp_path, "images", "verify", "vllm", env=env).stdout


def _python_named(folder, name: str, reports: str):
    """An interpreter called NAME that answers the version probe with REPORTS and runs this
    Python for everything else: a stand-in for a pythonX.Y this machine does not have."""
    folder.mkdir(exist_ok=True)
    exe = folder / name
    exe.write_text(f'#!/bin/sh\ncase "$2" in *sys.version_info*) echo {reports}; exit 0 ;; esac\n'
                   f'exec "{PY}" "$@"\n')
    exe.chmod(0o755)
    return exe


@VENV_BUILDING
def test_a_gpu_image_venv_is_made_with_the_python_image_toml_names_or_refused(tmp_path):
    """image.toml's python is the venv's: a version no interpreter here has is refused in one
    line naming it and --python (exit 3, nothing written); so is --python of another version;
    python3.X on PATH is taken when the appliance's own Python is not 3.X."""
    defs = tmp_path / "defs"
    shutil.copytree(ROOT / "images", defs)
    toml = defs / "vllm" / "image.toml"
    toml.write_text(toml.read_text().replace('python = "3.11"', 'python = "3.99"'))
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    whl = _wheel(wheels, "demo-engine-dep", "1.0")
    (defs / "vllm" / "requirements.lock").write_text(
        f"demo-engine-dep==1.0 \\\n    --hash=sha256:{hashlib.sha256(whl.read_bytes()).hexdigest()}\n")
    env = {"APPLIANCE_IMAGE_DEFS": str(defs), "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1",
           "PIP_FIND_LINKS": str(wheels)}
    images = tmp_path / "images"

    refused = appliance(tmp_path, "images", "build", "vllm", env=env, check=False)
    assert refused.returncode == 3, refused.stderr
    assert refused.stderr.strip() == ("Error: the vllm image needs Python 3.99 (its lock is CPython 3.99 "
                                      "wheels): install python3.99, or pass --python PATH")
    assert not images.exists()

    other = _python_named(tmp_path / "bin", "python3.12", "3.12")
    wrong = appliance(tmp_path, "images", "build", "vllm", "--python", str(other), env=env, check=False)
    assert wrong.returncode == 3
    assert f"--python {other} is Python 3.12; the vllm image needs Python 3.99" in wrong.stderr
    assert not images.exists()

    on_path = _python_named(tmp_path / "bin", "python3.99", "3.99")
    built = appliance(tmp_path, "images", "build", "vllm",
                      env={**env, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"})
    assert f"making the vllm venv with {on_path} (Python 3.99)" in built.stdout
    [row] = json.loads(appliance(tmp_path, "images", "ls", "--json").stdout)
    assert (row["engine"], row["python"], row["current"]) == ("vllm", "3.99", True)
    out = subprocess.run([images / "vllm" / "current" / "bin" / "python", "-c",
                          "import demo_engine_dep; print(demo_engine_dep.VERSION)"], capture_output=True, text=True)
    assert out.stdout.strip() == "1.0", out.stderr


@VENV_BUILDING
@pytest.mark.parametrize("engine", GPU_ENGINES)
def test_pip_takes_the_real_lock_in_require_hashes_mode_up_to_fetching_wheels(tmp_path, engine):
    """The checked-in lock, offline: pip parses all of it with --require-hashes and the
    image's target options, and stops only because there is no wheel to fetch."""
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {"PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(empty)}
    built = appliance(tmp_path, "images", "build", engine, env=env, check=False)
    assert built.returncode == 1 and f"installing {engine} failed" in built.stderr
    missing = re.search(r"No matching distribution found for (\S+)==(\S+)", built.stderr)
    assert missing and lock_pins(definition(engine).lock)[canonicalize_name(missing[1])] == missing[2], built.stderr


@VENV_BUILDING
@pytest.mark.parametrize("engine", GPU_ENGINES)
def test_bundle_create_downloads_the_gpu_wheelhouse_from_the_lock_for_the_target(tmp_path, engine):
    """`bundle create --engine vllm|sglang`, offline: it reaches pip download of the lock with
    --require-hashes and the target platform options (no GPU wheels are fetched here)."""
    cache = tmp_path / "cache"
    (cache / "wheels").mkdir(parents=True)
    pins = dict(line.split("=", 1) for line in (ROOT / "images/llamacpp/pin.env").read_text().splitlines()
                if "=" in line and not line.startswith("#"))
    _wheel(cache / "wheels", pins["MODEL_WHEEL_NAME"], pins["MODEL_WHEEL_VERSION"])  # the embedded model
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {"APPLIANCE_BUILD_CACHE": str(cache), "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1",
           "PIP_FIND_LINKS": str(empty)}
    made = appliance(tmp_path, "bundle", "create", "-o", str(tmp_path / "b.tar"), "--engine", engine, "--no-cpu-engine",
                     "--wheelhouse", str(empty), env=env, check=False)
    assert made.returncode == 1 and f"download of the {engine} wheelhouse failed" in made.stderr, made.stderr
    missing = re.search(r"No matching distribution found for (\S+)==(\S+)", made.stderr)
    assert missing and lock_pins(definition(engine).lock)[canonicalize_name(missing[1])] == missing[2], made.stderr
    assert not (tmp_path / "b.tar").exists()


def test_the_llamacpp_cuda_image_is_built_for_the_gpus_architectures_by_the_llamacpp_build(tmp_path):
    """llamacpp-cuda runs images/llamacpp/build.sh with the CUDA architectures (here a
    stand-in build.sh that records them); its tag covers them; serve finds its binary."""
    defs = tmp_path / "defs"
    shutil.copytree(ROOT / "images", defs)
    (defs / "llamacpp" / "build.sh").write_text(
        '#!/bin/sh\nmkdir -p "$1"\nprintf \'#!/bin/sh\\necho cuda %s\\n\' "$APPLIANCE_LLAMACPP_CUDA_ARCHS" '
        '> "$1/llama-server"\nchmod 755 "$1/llama-server"\n')
    env = {"APPLIANCE_IMAGE_DEFS": str(defs)}
    out = appliance(tmp_path, "images", "build", "llamacpp-cuda", "--cuda-archs", "90", env=env)
    assert "building llama-server with CUDA for sm 90" in out.stdout
    binary = tmp_path / "images" / "llamacpp-cuda" / "current" / "bin" / "llama-server"
    assert subprocess.run([str(binary)], capture_output=True, text=True).stdout.strip() == "cuda 90"
    [row] = json.loads(appliance(tmp_path, "images", "ls", "--json").stdout)
    assert (row["engine"], row["cuda_archs"], row["current"]) == ("llamacpp-cuda", "90", True)
    # Another architecture is another image; the same one is up to date.
    assert "up to date" in appliance(tmp_path, "images", "build", "llamacpp-cuda", "--cuda-archs", "90",
                                     env=env).stdout
    appliance(tmp_path, "images", "build", "llamacpp-cuda", "--cuda-archs", "80;90", env=env)
    rows = json.loads(appliance(tmp_path, "images", "ls", "--json").stdout)
    assert len({r["tag"] for r in rows}) == 2 and next(r for r in rows if r["current"])["cuda_archs"] == "80;90"

    from appliance.dist.images import llama_server

    assert llama_server(str(tmp_path / "images"), engine="llamacpp-cuda") == binary.resolve()


def test_an_image_build_passes_on_the_builds_progress_and_says_how_long_a_quiet_step_runs(tmp_path):
    """Never minutes of silence: build.sh's own lines (ninja's [n/m]) come through as they
    come, and a quiet stretch says the elapsed time; a failure ends with the build's last lines."""
    defs = tmp_path / "defs"
    shutil.copytree(ROOT / "images", defs)
    build = defs / "llamacpp" / "build.sh"
    build.write_text(
        '#!/bin/sh\necho "build.sh: building llama-server: 12/240 steps (5%), 0m30s elapsed" >&2\n'
        'sleep 1.5\n[ -z "$FAIL" ] || { echo "ninja: build stopped: subcommand failed." >&2; exit 1; }\n'
        'mkdir -p "$1"\nprintf \'#!/bin/sh\\n\' > "$1/llama-server"\nchmod 755 "$1/llama-server"\n')
    env = {"APPLIANCE_IMAGE_DEFS": str(defs), "APPLIANCE_BUILD_PROGRESS_S": "0.5"}
    out = appliance(tmp_path, "images", "build", "llamacpp-cuda", "--cuda-archs", "90", env=env).stdout
    lines = out.splitlines()
    assert "build.sh: building llama-server: 12/240 steps (5%), 0m30s elapsed" in lines
    assert any(re.fullmatch(r"building llama-server: 0m0\ds elapsed", line) for line in lines), out
    assert lines[-1].startswith("built llamacpp-cuda ")
    # --json: the progress on stderr, the document alone on stdout.
    shutil.rmtree(tmp_path / "images")
    made = appliance(tmp_path, "images", "build", "llamacpp-cuda", "--cuda-archs", "90", "--json", env=env)
    assert json.loads(made.stdout)["engine"] == "llamacpp-cuda" and "12/240 steps" in made.stderr
    failed = appliance(tmp_path, "images", "build", "llamacpp-cuda", "--cuda-archs", "80", check=False,
                       env={**env, "FAIL": "1"})
    assert failed.returncode == 1 and "12/240 steps" in failed.stdout
    assert "building llama-server failed: " in failed.stderr and "subcommand failed" in failed.stderr


def test_the_llamacpp_cuda_image_needs_a_gpu_or_architectures_named(tmp_path):
    no_gpu = appliance(tmp_path, "images", "build", "llamacpp-cuda", check=False)
    assert no_gpu.returncode == 1
    assert "no NVIDIA GPU to build llamacpp-cuda for" in no_gpu.stderr and "--cuda-archs" in no_gpu.stderr
    bad = appliance(tmp_path, "images", "build", "llamacpp-cuda", "--cuda-archs", "sm_90", check=False)
    assert bad.returncode == 1 and "expected CUDA architectures like 90" in bad.stderr
