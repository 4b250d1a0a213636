"""What the appliance needs from the GPUs, behind one small interface.

``NvmlProbe`` reads real GPUs through nvidia-ml-py, initialised lazily on the
first read; any NVML failure becomes a value (``Inventory.error``) and one log
line, never an exception. ``SimulatedProbe`` reads an inventory file instead
(``8x H100 80GB``, some already half used by foreign processes), for tests and
for planning on a machine without GPUs.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Protocol

import msgspec

from appliance.gpu.placement import kind_key

log = logging.getLogger("appliance.gpu")

GiB = 1024**3
MiB = 1024**2


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    used_bytes: int
    name: str = ""


@dataclass(frozen=True)
class GpuInfo:
    index: int
    uuid: str
    name: str
    total_bytes: int
    used_bytes: int
    free_bytes: int
    utilization_pct: int | None = None
    processes: tuple[GpuProcess, ...] = ()
    compute_capability: str = ""  # "9.0" (H100/H200): what a CUDA build targets

    @property
    def kind(self) -> str:
        return gpu_kind(self.name)

    def used_by(self, pids: set[int]) -> int:
        return sum(p.used_bytes for p in self.processes if p.pid in pids)


@dataclass(frozen=True)
class Inventory:
    gpus: tuple[GpuInfo, ...] = ()
    # Why there are no GPUs, when there are none: "NVML: driver not loaded", ...
    error: str | None = None
    source: str = "nvml"

    @property
    def cpu_only(self) -> bool:
        return not self.gpus

    def process_bytes(self) -> dict[int, int]:
        """GPU memory per PID, summed over GPUs."""
        out: dict[int, int] = {}
        for g in self.gpus:
            for p in g.processes:
                out[p.pid] = out.get(p.pid, 0) + p.used_bytes
        return out


class GpuProbe(Protocol):
    def read(self) -> Inventory: ...


# Families by the name NVML reports ("NVIDIA H100 80GB HBM3" -> "H100"). Longer
# names first so "L40S" is not read as "L40", "GH200" not as "H200".
_KINDS = (
    "GH200",
    "GB200",
    "B200",
    "B100",
    "H200",
    "H100",
    "H800",
    "H20",
    "A100",
    "A800",
    "A40",
    "A30",
    "A10G",
    "A10",
    "L40S",
    "L40",
    "L20",
    "L4",
    "V100",
    "T4",
    "RTX 6000 ADA",
    "RTX A6000",
)


def gpu_kind(name: str) -> str:
    upper = name.upper()
    for kind in _KINDS:
        if re.search(rf"(?<![A-Z0-9]){re.escape(kind)}(?![0-9])", upper):
            return kind.replace(" ", "-")
    return re.sub(r"^NVIDIA\s+", "", name.strip()) or "unknown"


def kinds_match(wanted: str | None, kind: str) -> bool:
    """A GPU of ``kind`` is one a model asking for ``wanted`` may use ("any" or none: all)."""
    want = kind_key(wanted)
    return want is None or want == kind_key(kind)


# --- NVML ------------------------------------------------------------------------


class NvmlProbe:
    """Real GPUs through nvidia-ml-py. Initialised on first read; when NVML cannot
    start (no driver, no library, no device), every read returns an Inventory
    with no GPUs and the reason, logged once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ready = False
        self._error: str | None = None
        self._said: set[str] = set()

    def _init(self) -> str | None:
        if self._ready or self._error:
            return self._error
        try:
            import pynvml
        except ImportError:
            self._error = "nvidia-ml-py is not installed"
        else:
            try:
                pynvml.nvmlInit()
                self._ready = True
            except pynvml.NVMLError as exc:
                self._error = f"NVML cannot start: {_nvml_text(exc)}"
        return self._error

    def read(self) -> Inventory:
        with self._lock:
            error = self._init()
            if error:
                self._say(f"no usable NVIDIA GPU: {error}; running CPU-only")
                return Inventory(error=error)
            try:
                return Inventory(gpus=tuple(self._read_all()))
            except Exception as exc:  # any NVML failure is a value, never a crash
                import pynvml

                text = _nvml_text(exc) if isinstance(exc, pynvml.NVMLError) else repr(exc)
                self._say(f"NVML read failed: {text}")
                return Inventory(error=f"NVML read failed: {text}")

    def _say(self, message: str) -> None:
        if message not in self._said:
            self._said.add(message)
            log.warning("%s", message)

    @staticmethod
    def _read_all() -> list[GpuInfo]:
        import pynvml

        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            gpus.append(
                GpuInfo(
                    index=i,
                    uuid=_text(pynvml.nvmlDeviceGetUUID(h)),
                    name=_text(pynvml.nvmlDeviceGetName(h)),
                    total_bytes=int(mem.total),
                    used_bytes=int(mem.used),
                    free_bytes=int(mem.free),
                    utilization_pct=_optional(lambda h=h: pynvml.nvmlDeviceGetUtilizationRates(h).gpu),
                    processes=tuple(_processes(h)),
                    compute_capability=_capability(h),
                )
            )
        return gpus


def _processes(handle) -> list[GpuProcess]:
    import pynvml

    seen: dict[int, int] = {}
    for getter in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
        try:
            procs = getattr(pynvml, getter)(handle)
        except pynvml.NVMLError:
            continue
        for p in procs:
            # usedGpuMemory is None where the driver cannot attribute (some containers).
            seen[int(p.pid)] = seen.get(int(p.pid), 0) + int(p.usedGpuMemory or 0)
    return [GpuProcess(pid=pid, used_bytes=used) for pid, used in sorted(seen.items())]


def _capability(handle) -> str:
    import pynvml

    try:
        return "%d.%d" % tuple(pynvml.nvmlDeviceGetCudaComputeCapability(handle))
    except Exception:
        return ""


def _optional(read) -> int | None:
    try:
        return int(read())
    except Exception:
        return None


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _nvml_text(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"


# --- simulated inventory -------------------------------------------------------------


class SimulatedProbe:
    """An inventory from a TOML or JSON file:

    [[gpu]]
    name = "NVIDIA H100 80GB HBM3"
    memory_gib = 80
    count = 8
    # uuid = "GPU-..."   (count = 1 only) a real card's UUID: a budget smaller than
    #                    that card, with engines launched on it (tests/gpu_check.py)

    [[process]]          # memory already used by something that is not ours
    gpu = 0
    pid = 4242
    used_gib = 40
    name = "training-job"
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._inventory = load_inventory(self.path)

    def read(self) -> Inventory:
        return self._inventory


class _GpuSpec(msgspec.Struct):
    """One [[gpu]] entry of an inventory file: count GPUs alike."""

    name: str
    memory_gib: Annotated[float, msgspec.Meta(gt=0, le=1 << 20)]
    count: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 1
    compute_capability: str = ""
    uuid: str | None = None


class _ProcessSpec(msgspec.Struct):
    """One [[process]] entry: memory a process that is not ours holds on GPU `gpu`."""

    gpu: int
    used_gib: Annotated[float, msgspec.Meta(ge=0, le=1 << 20)]
    pid: int = 0
    name: str = ""


class _InventoryFile(msgspec.Struct):
    gpu: list[_GpuSpec] = []
    gpus: list[_GpuSpec] = []
    process: list[_ProcessSpec] = []
    processes: list[_ProcessSpec] = []


def load_inventory(path: Path) -> Inventory:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the inventory: {exc.strerror or exc}") from None
    try:
        data = json.loads(raw) if path.suffix == ".json" else tomllib.loads(raw.decode())
        # Each field's type and range checked here: a wrong one is a line naming it, not a
        # traceback from `plan` or `serve` (a count of 10**9 GPUs was a list that long).
        spec = msgspec.convert(data, _InventoryFile)
    except (ValueError, RecursionError) as exc:  # TOML's, JSON's and msgspec's errors are ValueErrors
        raise ValueError(f"{path}: not a valid inventory: {exc}") from None
    specs = spec.gpu or spec.gpus
    procs = spec.process or spec.processes
    expanded: list[tuple[str, int, str, str | None]] = []
    for n, gpu in enumerate(specs):
        if gpu.uuid and gpu.count != 1:
            raise ValueError(f"{path}: gpu[{n}] names a uuid: its count must be 1")
        expanded += [(gpu.name, int(gpu.memory_gib * GiB), gpu.compute_capability, gpu.uuid)] * gpu.count
    per_gpu: dict[int, list[GpuProcess]] = {}
    for n, proc in enumerate(procs):
        if not 0 <= proc.gpu < len(expanded):
            raise ValueError(f"{path}: process[{n}].gpu must be 0-{len(expanded) - 1}")
        per_gpu.setdefault(proc.gpu, []).append(
            GpuProcess(pid=proc.pid, used_bytes=int(proc.used_gib * GiB), name=proc.name)
        )
    gpus = []
    for i, (name, total, capability, uuid) in enumerate(expanded):
        ps = tuple(per_gpu.get(i, ()))
        used = min(total, sum(p.used_bytes for p in ps))
        gpus.append(
            GpuInfo(
                index=i,
                uuid=str(uuid or f"GPU-sim-{i:04d}"),
                name=name,
                total_bytes=total,
                used_bytes=used,
                free_bytes=total - used,
                utilization_pct=50 if ps else 0,
                processes=ps,
                compute_capability=capability,
            )
        )
    return Inventory(gpus=tuple(gpus), source=f"simulated:{path}")
