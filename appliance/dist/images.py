"""Engine images: each engine in its own virtual environment, built from the pinned,
hashed definition in ``images/<engine>/``, recorded with its checksums, the previous
version kept for rollback.

    <images.dir>/<engine>/<version>-<definition hash>/   a venv (+ bin/llama-server for llamacpp)
                                     .../image.json      engine, version, python, files' sha256
    <images.dir>/<engine>/current -> <version>-<hash>    what the supervisor launches

``llamacpp-cuda`` is llama-server built from the same pinned source as ``llamacpp``
(images/llamacpp/build.sh with GGML_CUDA) for the CUDA architectures of this box's
GPUs (NVML's compute capability, or --cuda-archs): its tag covers them, so a box that
gains another kind of GPU builds a new image.

The GPU engines' venvs are made with the Python image.toml names (their locks are
that CPython's wheels): the appliance's own when it matches, else pythonX.Y on PATH,
else --python PATH.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
import tomllib
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from appliance.config import Config, install_prefix

ENGINES = ("llamacpp", "llamacpp-cuda", "vllm", "sglang")
LLAMACPP_ENGINES = ("llamacpp", "llamacpp-cuda")  # llama-server builds: a static binary in bin/
MANIFEST = "image.json"


class ImageError(Exception):
    """One line for the operator."""


class PythonNotFound(ImageError):
    """No interpreter of the version an image needs: `images build` exits 3 for it."""


# What a GPU engine's image runs: a file of its venv, then the arguments before the appliance's.
GPU_ENTRY_POINTS = {"vllm": ("bin/vllm", ["serve"]),
                    "sglang": ("bin/python", ["-m", "sglang.launch_server"])}


def definitions_dir() -> Path:
    """The image definitions: $APPLIANCE_IMAGE_DEFS, this checkout's images/, or the
    copy install.sh puts in <venv>/share/appliance/images."""
    if env := os.environ.get("APPLIANCE_IMAGE_DEFS"):
        return Path(env)
    checkout = Path(__file__).resolve().parents[2] / "images"
    if (checkout / "llamacpp" / "image.toml").exists():
        return checkout
    return install_prefix() / "share" / "appliance" / "images"


def images_dir(cfg: Config | None = None) -> Path:
    if cfg is not None and cfg.images.dir:
        return Path(cfg.images.dir)
    return install_prefix() / "images"


@dataclass(frozen=True)
class Definition:
    engine: str
    version: str
    python: str
    folder: Path
    requirements: Path
    lock: Path | None
    platform: str | None = None  # the lock's target wheel platform, e.g. manylinux_2_31_x86_64
    source: Path | None = None   # the folder with build.sh and pin.env, when not this one
    cuda_archs: str = ""         # llamacpp-cuda: the CUDA architectures built for, e.g. "90"

    @property
    def build_folder(self) -> Path:
        return self.source or self.folder

    @property
    def digest(self) -> str:
        h = hashlib.sha256()
        for folder in dict.fromkeys((self.folder, self.build_folder)):
            for f in sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".toml", ".txt", ".env",
                                                                                         ".lock", ".sh", ".cmake")
                            and not p.name.startswith("flags-")):
                h.update(f.name.encode() + b"\0" + f.read_bytes())
        if self.cuda_archs:
            h.update(b"cuda-archs\0" + self.cuda_archs.encode())
        return h.hexdigest()[:12]

    @property
    def tag(self) -> str:
        return f"{self.version}-{self.digest}"


def definition(engine: str, root: Path | None = None) -> Definition:
    if engine not in ENGINES:
        raise ImageError(f"unknown engine {engine!r}; engines: {', '.join(ENGINES)}")
    folder = (root or definitions_dir()) / engine
    try:
        spec = tomllib.loads((folder / "image.toml").read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ImageError(f"{folder / 'image.toml'}: {exc}") from None
    lock = folder / spec["lock"] if spec.get("lock") else None
    source = (folder / spec["source"]).resolve() if spec.get("source") else None
    return Definition(engine, spec["version"], spec["python"], folder, folder / spec["requirements"], lock,
                      spec.get("platform"), source)


def wheel_platforms(platform: str) -> list[str]:
    """pip's --platform values for a manylinux_2_Y_ARCH target: the tag and every older one it
    runs (pip does not widen a manylinux_2_Y tag by itself), legacy aliases included."""
    m = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", platform)
    if not m:
        raise ImageError(f"platform {platform!r}: expected manylinux_2_Y_ARCH")
    glibc, arch = int(m[1]), m[2]
    legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
    return ([f"manylinux_2_{y}_{arch}" for y in range(glibc, 4, -1)]
            + [f"{name}_{arch}" for y, name in legacy.items() if y <= glibc])


def target_pip_args(d: Definition) -> list[str]:
    """`pip download` options that select the wheels of the image's target, not this machine's."""
    if not d.platform:
        raise ImageError(f"{d.engine}: image.toml names no platform for its lock")
    args = ["--only-binary", ":all:", "--implementation", "cp", "--python-version", d.python]
    for tag in wheel_platforms(d.platform):
        args += ["--platform", tag]
    return args


def hashed_requirements(path: Path) -> list[tuple[str, list[str]]]:
    """(pin, hashes) of each requirement in a pip requirements file."""
    out: list[tuple[str, list[str]]] = []
    joined = path.read_text().replace("\\\n", " ")
    for line in joined.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        out.append((parts[0], [p.split("=", 1)[1] for p in parts[1:] if p.startswith("--hash=")]))
    return out


def _file_digests(root: Path) -> dict[str, str]:
    digests = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink() and "__pycache__" not in p.parts and p.name != MANIFEST:
            h = hashlib.sha256()
            with open(p, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            digests[p.relative_to(root).as_posix()] = h.hexdigest()
    return digests


def list_images(cfg: Config | None = None) -> list[dict]:
    rows = []
    base = images_dir(cfg)
    for engine in ENGINES:
        current = current_dir(engine, cfg)
        for d in sorted(p for p in (base / engine).glob("*/" + MANIFEST) if not p.parent.is_symlink()):
            info = json.loads(d.read_text())
            info["current"] = current is not None and d.parent.resolve() == current.resolve()
            info["path"] = str(d.parent)
            rows.append(info)
    return rows


def current_dir(engine: str, cfg: Config | None = None) -> Path | None:
    link = images_dir(cfg) / engine / "current"
    return link.resolve() if link.is_symlink() and (link.resolve() / MANIFEST).exists() else None


def gpu_engine_command(engine: str, cfg: Config) -> tuple[list[str], str]:
    """The argv that starts a GPU engine's server, and the image tag it runs from: the
    configured [engines.<engine>] command when there is one (tag ""), else the current
    image's entry point. ImageError, naming the fix, when neither exists."""
    configured = getattr(cfg.engines, engine).command
    if configured:
        return list(configured), ""
    exe, args = GPU_ENTRY_POINTS[engine]
    current = current_dir(engine, cfg)
    if current is None or not (current / exe).exists():
        raise ImageError(f"no {engine} engine image in {images_dir(cfg) / engine}: run "
                         f"`appliance images build {engine}` (or set engines.{engine}.command)")
    # The resolved folder, not current/: the tag recorded is the one that runs, even if
    # `current` moves (a build, a rollback) while the engine starts.
    return [str(current / exe), *args], current.name


def llamacpp_binary(cfg: Config) -> str:
    """The llama-server a CPU llama.cpp replica runs: [engines.llamacpp] binary, else the current
    llamacpp image's (`appliance images build llamacpp`), else, before an image is built, the one
    install.sh put next to this program. Resolved at each launch, as the GPU engines' are."""
    if cfg.engines.llamacpp.binary:
        return cfg.engines.llamacpp.binary
    return default_llama_server(cfg.images.dir)


def default_llama_server(images_dir: str = "") -> str:
    """The current llamacpp engine image's llama-server; before an image is built, the one
    install.sh put next to this program."""
    return str(llama_server(images_dir) or install_prefix() / "bin" / "llama-server")


def llama_server(cfg_images_dir: str = "", engine: str = "llamacpp") -> Path | None:
    """The current llamacpp (or llamacpp-cuda) image's binary, if one is built: in the
    resolved image folder, not current/, so its tag is the one that runs (image_of)."""
    link = (Path(cfg_images_dir) if cfg_images_dir else install_prefix() / "images") / engine / "current"
    if not (link / MANIFEST).exists():
        return None
    binary = link.resolve() / "bin" / "llama-server"
    return binary if binary.exists() else None


def image_of(binary: str) -> str:
    """The engine image tag a binary runs from (<image>/bin/<exe>), "" for one outside an image."""
    folder = Path(binary).parent.parent
    return folder.name if Path(binary).parent.name == "bin" and (folder / MANIFEST).exists() else ""


def _python_version(python: str) -> str | None:
    """major.minor of an interpreter, None when it does not run (a pyenv shim without
    that version installed, say)."""
    try:
        result = subprocess.run([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                                capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    out = result.stdout.strip()
    return out if result.returncode == 0 and re.fullmatch(r"\d+\.\d+", out) else None


def find_python(d: Definition, python: str | None = None) -> str:
    """The interpreter to make d's venv with: `python` (--python) if it is d.python,
    else the appliance's own if it is, else python<d.python> on PATH."""
    if python:
        found = _python_version(python)
        if found is None:
            raise PythonNotFound(f"--python {python}: not a Python interpreter that runs")
        if found != d.python:
            raise PythonNotFound(f"--python {python} is Python {found}; the {d.engine} image needs "
                                 f"Python {d.python} ({d.folder / 'image.toml'})")
        return python
    if "%d.%d" % sys.version_info[:2] == d.python:
        return sys.executable
    on_path = shutil.which(f"python{d.python}")
    if on_path and _python_version(on_path) == d.python:
        return on_path
    raise PythonNotFound(f"the {d.engine} image needs Python {d.python} (its lock is CPython {d.python} "
                         f"wheels): install python{d.python}, or pass --python PATH")


def cuda_archs(requested: str = "") -> str:
    """The CUDA architectures to build llama-server for: ``requested`` (e.g. "90" or
    "80;90"), else every compute capability NVML reports on this box. ImageError when
    there is neither: a CUDA build for no GPU would be minutes to hours for nothing."""
    if requested:
        archs = [a.strip() for a in requested.replace(",", ";").split(";") if a.strip()]
        if not archs or not all(re.fullmatch(r"\d{2,3}[af]?", a) for a in archs):
            raise ImageError(f"--cuda-archs {requested!r}: expected CUDA architectures like 90 or 80;90")
        return ";".join(archs)
    from appliance.gpu.probe import NvmlProbe

    inventory = NvmlProbe().read()
    found = sorted({g.compute_capability.replace(".", "") for g in inventory.gpus if g.compute_capability})
    if not found:
        why = inventory.error or "NVML reports no compute capability"
        raise ImageError(f"no NVIDIA GPU to build llamacpp-cuda for ({why}); pass --cuda-archs "
                         "(e.g. 90 for H100/H200, 89 for L40S, 80 for A100)")
    return ";".join(found)


def build(engine: str, cfg: Config | None = None, *, python: str | None = None, log=print,
          archs: str = "") -> dict:
    d = definition(engine)
    if engine == "llamacpp-cuda":
        d = dataclasses.replace(d, cuda_archs=cuda_archs(archs))
    base = images_dir(cfg) / engine
    target = base / d.tag
    if (target / MANIFEST).exists():
        _set_current(base, target)
        log(f"{engine} {d.tag} up to date")
        return json.loads((target / MANIFEST).read_text())
    # llama-server is a static binary; its venv only runs the build tools (wheels for any
    # Python 3), so any interpreter does. A GPU engine's venv runs its lock's cp wheels.
    if engine in LLAMACPP_ENGINES:
        interpreter = python or sys.executable
        version = _python_version(interpreter) or d.python
    else:
        interpreter, version = find_python(d, python), d.python
    if engine not in LLAMACPP_ENGINES and (d.lock is None or not d.lock.exists()):
        raise ImageError(f"{d.engine}: {d.lock} is missing: generate the hashed lock of the full "
                         f"dependency tree first (see {d.folder / 'README.md'})")
    # Built where it lives (a venv records its own path); the image exists once its
    # image.json is written, last. A build killed half-way is removed by the next one.
    shutil.rmtree(target, ignore_errors=True)
    base.mkdir(parents=True, exist_ok=True)
    try:
        if engine in LLAMACPP_ENGINES:
            _build_llamacpp(d, target, interpreter, log)
        else:
            _build_python_engine(d, target, interpreter, log)
        manifest = {"engine": engine, "version": d.version, "tag": d.tag,
                    "python": version, **({"cuda_archs": d.cuda_archs} if d.cuda_archs else {}),
                    "built_at": time.time(), "files": _file_digests(target)}
        tmp = target / f".{MANIFEST}.tmp"
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, target / MANIFEST)
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    _set_current(base, target)
    _prune(base, keep=cfg.images.keep if cfg else 2)
    log(f"built {engine} {d.tag} in {target}")
    return manifest


def _progress_every_s() -> float:
    """How often a build step quiet meanwhile (pip) says it is alive: build.sh's own
    interval for its progress lines, APPLIANCE_BUILD_PROGRESS_S (30 s)."""
    try:
        return max(0.1, float(os.environ.get("APPLIANCE_BUILD_PROGRESS_S", "30")))
    except ValueError:
        return 30.0


def _run(argv: list[str], what: str, env: dict | None = None, log=None) -> None:
    """Run one build step. With log, never minutes of silence: the step's own lines
    (build.sh's progress: ninja's [n/m] and the elapsed time) are passed on as they come,
    and a step quiet for every_s says how long it has been running."""
    if log is None:
        result = subprocess.run(argv, capture_output=True, text=True, env=env)
        output, code = result.stderr or result.stdout, result.returncode
    else:
        output, code = _run_speaking(argv, what, env, log, _progress_every_s())
    if code != 0:
        tail = output.strip().splitlines()[-5:]
        raise ImageError(f"{what} failed: " + " | ".join(tail))


def _run_speaking(argv: list[str], what: str, env: dict | None, log, every_s: float) -> tuple[str, int]:
    lines: queue.Queue[str | None] = queue.Queue()
    kept: deque[str] = deque(maxlen=40)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            stdin=subprocess.DEVNULL)

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=read, name="build-output", daemon=True).start()
    started = said = time.monotonic()
    while True:
        try:
            line = lines.get(timeout=max(0.1, said + every_s - time.monotonic()))
        except queue.Empty:
            elapsed = int(time.monotonic() - started)
            log(f"{what}: {elapsed // 60}m{elapsed % 60:02d}s elapsed")
            said = time.monotonic()
            continue
        if line is None:
            break
        kept.append(line)
        if line.strip():
            log(line)
            said = time.monotonic()
    return "\n".join(kept), proc.wait()


def _build_llamacpp(d: Definition, tmp: Path, python: str, log) -> None:
    """build.sh: the cached build, a prebuilt one that fits, or compiled (the build tools
    of d.requirements provisioned by it when missing)."""
    _run([python, "-m", "venv", "--without-pip", str(tmp)], "creating the venv")
    env = {**os.environ, "PYTHON": os.environ.get("PYTHON") or python}
    if d.cuda_archs:
        env["APPLIANCE_LLAMACPP_CUDA_ARCHS"] = d.cuda_archs
        log(f"building llama-server with CUDA for sm {d.cuda_archs} (a few minutes on 16 cores, "
            "much longer on few)")
    _run([str(d.build_folder / "build.sh"), str(tmp / "bin")], "building llama-server", env=env, log=log)


def _build_python_engine(d: Definition, tmp: Path, python: str, log) -> None:
    log(f"making the {d.engine} venv with {python} (Python {d.python})")
    _run([python, "-m", "venv", str(tmp)], "creating the venv")
    # Wheels only: every package of the lock has one for the image's platform; on an older
    # glibc pip says which is missing instead of compiling a source tree.
    _run([str(tmp / "bin" / "pip"), "install", "--quiet", "--require-hashes", "--no-deps",
          "--only-binary", ":all:", "-r", str(d.lock)], f"installing {d.engine}", log=log)


def _set_current(base: Path, target: Path) -> None:
    link = base / "current"
    if link.is_symlink() and os.readlink(link) == target.name:
        return  # already current: an idempotent install touches nothing
    tmp = base / f".current-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target.name)
    os.replace(tmp, link)


def _versions(base: Path) -> list[Path]:
    dirs = [p.parent for p in base.glob("*/" + MANIFEST) if not p.parent.is_symlink()]
    return sorted(dirs, key=lambda p: json.loads((p / MANIFEST).read_text())["built_at"])


def _prune(base: Path, keep: int) -> None:
    current = (base / "current").resolve()
    old = [p for p in _versions(base) if p.resolve() != current]
    for p in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)


def rollback(engine: str, cfg: Config | None = None) -> str:
    base = images_dir(cfg) / engine
    current = current_dir(engine, cfg)
    older = [p for p in _versions(base) if current is None or p.resolve() != current]
    if not older:
        raise ImageError(f"{engine}: no previous image to roll back to")
    _set_current(base, older[-1])
    return older[-1].name


def remove(engine: str, tag: str, cfg: Config | None = None) -> None:
    base = images_dir(cfg) / engine
    target = base / tag
    if "/" in tag or ".." in tag or not (target / MANIFEST).exists():
        raise ImageError(f"{engine}: no image {tag!r} (see `appliance images ls`)")
    if current_dir(engine, cfg) == target.resolve():
        raise ImageError(f"{engine} {tag} is the current image; build or roll back to another first")
    shutil.rmtree(target)


def verify(engine: str, cfg: Config | None = None) -> list[str]:
    """Problems of the current image (empty when every recorded file hashes the same)."""
    current = current_dir(engine, cfg)
    if current is None:
        return [f"{engine}: no image built (`appliance images build {engine}`)"]
    recorded = json.loads((current / MANIFEST).read_text())["files"]
    actual = _file_digests(current)
    problems = [f"{engine}: {path}: sha256 {actual.get(path, 'missing')}, expected {digest}"
                for path, digest in recorded.items() if actual.get(path) != digest]
    problems += [f"{engine}: {path}: not part of the image" for path in actual.keys() - recorded.keys()]
    return problems
