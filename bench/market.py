"""Benchmark of the capacity market (issue 17): a request trace over N models with Zipf
popularity, on GPUs with room for k < N of them, served three ways by the real supervisor
(appliance/fleet/supervisor.py) and fake vLLM engines (tests/fake_engine.py) whose cold
start, sleep and wake take the times given (measured here, not assumed):

  none    today without eviction: nothing is ever evicted (min_residency beyond the run),
          a model that does not fit answers 503;
  swap    one model at a time (llama-swap's exclusive group): every model takes every GPU,
          a request for another model stops the loaded one (no sleep, no residency);
  market  each model on one GPU; idle replicas of other models evicted least recently used
          first, to sleep in host RAM where it allows, woken in place for their next request.

Printed per mode: requests, failed (against `none`), evictions per minute (and by
reason), GPU memory utilisation (reserved by awake replicas, mean over the run), and for
each request that caused a load (its model had no READY replica and no request already
held for one) its wait, cut into what it was spent on (timestamps of the real supervisor
and replica, and the engine's own, which the fake engine writes, --stamp-dir):

  queued   from its arrival until the load was decided: room was held by replicas that
           may not go yet (requests in flight, inside min_residency): queueing behind
           other models' work, not part of a load; so is a busy victim's drain (fairness
           evicts a replica with requests in flight: they finish before it goes);
  freeing  from the decision until the engine was spawned or asked to wake: the evicted
           replicas stopping or going to sleep (their engines' own stop and sleep times);
  engine   THE ENGINE'S OWN START OR WAKE TIME, as the engine itself stamps it: for a cold
           start, from the supervisor's spawn (Replica.loading_since, just before the fork)
           to the engine starting to serve (its interpreter, imports, the simulated
           --cold-start and its app set-up: all the engine's); for a wake, its /wake_up
           handler's own time (the simulated --wake); and then its own time answering the
           supervisor's 1-token readiness probe (after a wake the fake engine serves it at
           --service). Nothing of the supervisor's is in it;
  detect   the engine ready to READY: the supervisor noticing (readiness polls, the
           1-token probe, the wake's HTTP round trip): ours;
  handoff  READY to the held request holding its replica: ours.

The issue's goal, "wait over the engine's own start or wake time", is `over` = wait -
queued - engine = freeing + detect + handoff, reported per cause of the load (cold: on
free room; wake: a sleeping replica woken in place; evict: others freed first, then a
cold start or a wake). "The engine's own start or wake" is the loaded engine's only: for
a load that evicts, `over` still holds the evicted engines' own stop or sleep, which are
engine time too, but another engine's. So each load that evicted is also given

  victims  the evicted engines' own stop or sleep on its path: from the daemon's SIGTERM to
           the exit of the victim's process (as the daemon sees it), or the victim's
           /sleep handler's own time (its stamp); victims freed in parallel count once
           (the longest);
  ours     over - victims: what the daemon adds to the engines' own times (for cold and
           wake loads, ours = over).

The victims' stop is on the request's path unless headroom was made ahead of it
([capacity] headroom_idle_s, --headroom-idle); the first line prints it measured on one
engine alone.

Run from the repository root (no GPU needed):

    .venv/bin/python bench/market.py [--models 6] [--gpus 2] [--duration 60] [--rate 2]
        [--zipf 1.1] [--cold-start 3] [--wake 0.3] [--sleep 0.2] [--service 0.3]
        [--residency 2] [--host-ram-gib 0] [--modes none,swap,market] [--trace FILE]
        [--preempt-after S] [--headroom-idle S] [--seed N] [--burst K] [--burst-every S]
        [--sizes LIST] [--priorities LIST] [--pin LIST] [--no-sleep LIST] [--log F] [--dump F]

The trace and the models, as a reviewer varies them (each in every mode unless said):

  --zipf S, --seed N     popularity exponent (0: uniform) and the trace's random seed;
  --burst K              K requests at one instant, every --burst-every S seconds (default:
                         a third of the trace), each burst for the next least popular model
                         (N-1, N-2, ...): many requests for a cold model at once;
  --sizes 1,2 | 0.5,1    each model's size in GPUs' worth of memory, cycled over the models
                         (2: tensor-parallel over two GPUs, so its load evicts two; 0.5: two
                         share a GPU); fake engine only, not in `swap`;
  --priorities 0,0,1     each model's priority, cycled;
  --pin 0,3              market: these models pinned (operator.pin) once booted;
  --no-sleep 1,2         market: these models without sleep_mode (their victims stop);
  --residency 0          min_residency (the appliance's default is 30 s).

A configuration where a model can never get room by the rules (pinned or higher-priority
replicas hold every GPU it could use) answers its requests 503 naming the holders: failures
there are the rules', not the market's. Each failure is printed (stderr) with its message;
requests neither answered nor refused by the queue's timeout + 60 s are counted as hung,
with the replicas not READY then. --log FILE writes the appliance's log (INFO), --dump FILE
each load's parts (JSON lines).

--preempt-after and --headroom-idle set [capacity] max_wait_before_preempt_s and
headroom_idle_s in the market mode (absent: the appliance's defaults; a tree without these
settings refuses them). The supervisor's autoscaler pass (``tick``) runs every
[autoscaling] interval_s, as in the daemon.

With PYTHONPATH set, the appliance measured is the one there (a checkout of the code
before a change, to compare against: run both, alternating, and note the load average).

--trace FILE: one request per line, "SECONDS MODEL" (MODEL: an index 0..N-1 or m<index>),
or a JSON list of {"t": SECONDS, "model": ...}; replaces the generated trace.

--engine llamacpp: the same three modes on the real CPU engine: N copies of the bundled GGUF
(share/appliance/models/) served by the real llama-server on a core budget for k of them
([cpu] cores = k, one thread each; `swap`: every model takes all k cores), no GPU, no sleep
tier (llama.cpp has none: evictions stop). The engine's own start is read from its own log
(llama-server --log-timestamps: the time since its logger started, a few ms after its exec,
at which it logs "listening", plus its own time answering the readiness probe, from the
task's launch to its release); `victims` is the evicted engines' SIGTERM to exit. A run of
about three minutes on a 2-core machine:

    .venv/bin/python bench/market.py --engine llamacpp --models 4 --gpus 2 --duration 40 \
        --rate 1 --residency 2

(--gpus is k, here cores; --cold-start, --wake, --sleep and --service are the fake engine's
and do not apply; --llama-server BINARY, --gguf FILE choose the engine and the model.)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

# The appliance under test: PYTHONPATH's when given (a baseline checkout), else this tree's.
if not os.environ.get("PYTHONPATH"):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp  # noqa: E402

from appliance.config import EMBEDDED_MODEL_NAME, builtin_model_path, parse_config  # noqa: E402
from appliance.dist.images import default_llama_server  # noqa: E402
from appliance.errors import ApplianceError  # noqa: E402
from appliance.fleet import operator, process  # noqa: E402
try:
    from appliance.fleet.replica_state import State, free_port  # noqa: E402
except ImportError:  # a baseline checkout from before replica.py was split
    from appliance.fleet.replica import State, free_port  # noqa: E402
from appliance.fleet.supervisor import Supervisor  # noqa: E402
from appliance.gpu.probe import GiB  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FAKE = ROOT / "tests" / "fake_engine.py"
GPU_GIB = 80
WEIGHTS_GIB = 40  # + 2 GiB overhead and a small KV cache: one model per 80 GiB GPU


# --- the trace --------------------------------------------------------------------------------


def zipf_trace(models: int, duration: float, rate: float, s: float, seed: int) -> list[tuple[float, int]]:
    """Poisson arrivals at ``rate`` per second; model i with probability ~ 1 / (i + 1)^s."""
    rng = random.Random(seed)
    weights = [1 / (i + 1) ** s for i in range(models)]
    out, t = [], 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= duration:
            return out
        out.append((round(t, 3), rng.choices(range(models), weights)[0]))


def with_bursts(trace: list[tuple[float, int]], models: int, size: int, every: float, duration: float):
    """``size`` requests at one instant every ``every`` seconds, each burst for the next
    least popular model (N-1, N-2, ...): many requests for a cold model at once."""
    if size <= 0:
        return trace
    every = every or duration / 3
    bursts, k, t = [], 0, every / 2
    while t < duration:
        bursts += [(round(t, 3), models - 1 - k % models)] * size
        k, t = k + 1, t + every
    return sorted(trace + bursts)


def cycled(text: str, models: int, kind: type = float) -> list:
    """A comma list given per model, cycled over the N models ("1,2": 1, 2, 1, 2, ...)."""
    values = [kind(v) for v in text.split(",") if v.strip()]
    return [values[i % len(values)] for i in range(models)]


def read_trace(path: Path, models: int) -> list[tuple[float, int]]:
    text = path.read_text()
    if text.lstrip().startswith("["):
        rows = [(float(r["t"]), r["model"]) for r in json.loads(text)]
    else:
        rows = [(float(t), m) for t, m in (line.split()[:2] for line in text.splitlines() if line.strip())]
    out = []
    for t, m in rows:
        index = int(str(m).lstrip("m"))
        if not 0 <= index < models:
            raise SystemExit(f"{path}: model {m} is not one of the {models} models (--models)")
        out.append((t, index))
    return sorted(out)


# --- the engines' own times ---------------------------------------------------------------------


def engine_argv(args: argparse.Namespace) -> list[str]:
    return [
        sys.executable,
        str(FAKE),
        "--as-engine",
        "vllm",
        "--slow-start",
        str(args.cold_start),
        "--sleep-delay",
        str(args.sleep),
        "--wake-delay",
        str(args.wake),
        "--latency",
        str(args.service),
        "--latency-from",
        "2",
        *(["--stamp-dir", str(args.stamp_dir)] if getattr(args, "stamp_dir", None) else []),
    ]


def measure_engine(args: argparse.Namespace) -> dict[str, float]:
    """Cold start (spawn to a health answer), sleep and wake of one fake engine."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    start = time.perf_counter()
    proc = subprocess.Popen(
        [*engine_argv(args), "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=1).close()
                break
            except OSError:
                time.sleep(0.01)
        cold = time.perf_counter() - start
        times = {"cold": cold}
        for name, path in (("sleep", "/sleep?level=1"), ("wake", "/wake_up")):
            t = time.perf_counter()
            urllib.request.urlopen(urllib.request.Request(f"{base}{path}", method="POST"), timeout=30).close()
            times[name] = time.perf_counter() - t
        t = time.perf_counter()
        proc.terminate()
        proc.wait()
        times["exit"] = time.perf_counter() - t
        return times
    finally:
        proc.kill()
        proc.wait()


def measure_llama(args: argparse.Namespace) -> dict[str, float]:
    """llama-server's own cold start (its log's "listening"), alone, on one core; its exit
    after SIGTERM. It has no sleep or wake."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="market-llama-") as tmp:
        log = Path(tmp) / "engine.log"
        argv = [
            args.llama_server,
            "--model",
            str(args.gguf),
            "--port",
            str(port),
            "--threads",
            "1",
            "--ctx-size",
            "2048",
            "--parallel",
            "2",
            "--no-webui",
            "--log-timestamps",
            "--log-prefix",
        ]
        with open(log, "wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            while "listening on" not in log.read_text(errors="replace"):
                if proc.poll() is not None:
                    raise SystemExit(f"{args.llama_server} exited: {log.read_text(errors='replace')[-2000:]}")
                time.sleep(0.01)
            LOGS[proc.pid] = (log, 0)
            cold = next(t for t, text in llama_log(proc.pid) if "listening on" in text)
            t = time.perf_counter()
            proc.terminate()
            proc.wait()
            return {"cold": cold, "sleep": 0.0, "wake": 0.0, "exit": time.perf_counter() - t}
        finally:
            proc.kill()
            proc.wait()


# --- one mode -------------------------------------------------------------------------------------


def config_text(tmp: Path, mode: str, args: argparse.Namespace) -> str:
    inv = tmp / "inventory.toml"
    inv.write_text(f'[[gpu]]\nname = "NVIDIA H100 80GB HBM3"\nmemory_gib = {GPU_GIB}\ncount = {args.gpus}\n')
    sizes = [float(args.gpus)] * args.models if mode == "swap" else cycled(args.sizes, args.models)
    residency = {"none": "1000h", "swap": "0s", "market": f"{args.residency}s"}[mode]
    host_ram = args.host_ram_gib or WEIGHTS_GIB * sum(sizes)
    market = ""
    if mode == "market" and args.preempt_after is not None:
        market += f"max_wait_before_preempt_s = {args.preempt_after}\n"
    if mode == "market" and args.headroom_idle:
        market += f"headroom_idle_s = {args.headroom_idle}\n"
    command = json.dumps(engine_argv(args))
    text = (
        f'[paths]\nstate_dir = "{tmp}/state"\ncache_dir = "{tmp}/cache"\nlog_dir = "{tmp}/log"\n'
        f'[gpu]\ninventory = "{inv}"\n[engines.vllm]\ncommand = {command}\noverhead_gib = 2\n'
        "[supervisor]\nhealth_interval_s = 1.0\n"
        f'[autoscaling]\nmin_residency = "{residency}"\n'
        f"[queue]\nmax_held = 100000\ntimeout_s = {args.queue_timeout}\n"
        f"[capacity]\nhost_ram_gib = {host_ram}\n{market}"
    )
    priorities = cycled(args.priorities, args.models, int)
    no_sleep = {int(i) for i in args.no_sleep.split(",") if i.strip()}
    for i in range(args.models):
        sleeps = mode == "market" and i not in no_sleep
        text += (
            f'[[models]]\nname = "m{i}"\nserver = "vllm"\nsource = "{weights_dir(tmp, sizes[i])}"\n'
            f"kv_cache_tokens = 1024\nsleep_mode = {'true' if sleeps else 'false'}\npriority = {priorities[i]}\n"
            f"[models.gpus]\ncount = {max(1, int(sizes[i]))}\n"
        )
    return text


def weights_dir(tmp: Path, size: float) -> Path:
    """A model of ``size`` GPUs' worth (WEIGHTS_GIB each; 0.5: two share a GPU)."""
    weights = tmp / f"weights-{size}"
    if weights.exists():
        return weights
    weights.mkdir()
    (weights / "config.json").write_text(
        json.dumps(
            {
                "num_hidden_layers": 32,
                "num_attention_heads": 32,
                "num_key_value_heads": 8,
                "head_dim": 128,
                "torch_dtype": "bfloat16",
            }
        )
    )
    with open(weights / "model.safetensors", "wb") as f:
        f.truncate(int(WEIGHTS_GIB * size * GiB))  # sparse: only the size matters
    return weights


def llamacpp_config_text(tmp: Path, mode: str, args: argparse.Namespace) -> str:
    """N copies of the GGUF on a budget of k cores: one thread each (``swap``: all k each)."""
    threads = args.gpus if mode == "swap" else 1
    residency = {"none": "1000h", "swap": "0s", "market": f"{args.residency}s"}[mode]
    market = f"max_wait_before_preempt_s = {args.preempt_after}\n" if args.preempt_after is not None else ""
    market += f"headroom_idle_s = {args.headroom_idle}\n" if args.headroom_idle else ""
    text = (
        f'[paths]\nstate_dir = "{tmp}/state"\ncache_dir = "{tmp}/cache"\nlog_dir = "{tmp}/log"\n'
        f'[engines.llamacpp]\nbinary = "{args.llama_server}"\n[cpu]\ncores = {args.gpus}\n'
        "[supervisor]\nhealth_interval_s = 1.0\n"
        f'[autoscaling]\nmin_residency = "{residency}"\n'
        f"[queue]\nmax_held = 100000\ntimeout_s = {args.queue_timeout}\n"
        + (f"[capacity]\n{market}" if mode == "market" and market else "")
    )
    for i in range(args.models):
        gguf = tmp / f"m{i}.gguf"
        if not gguf.exists():
            shutil.copyfile(args.gguf, gguf)  # N distinct files, as N models would be
        text += (
            f'[[models]]\nname = "m{i}"\nsource = "{gguf}"\ncontext_length = 2048\nparallel = 2\n'
            f"threads = {threads}\npriority = {cycled(args.priorities, args.models, int)[i]}\n"
            'args = ["--log-timestamps", "--log-prefix"]\n'
        )
    return text


@dataclass
class Result:
    mode: str
    requests: int = 0
    failed: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    # Per request that caused a load: its wait cut into queued, freeing, engine, detect,
    # handoff (seconds) and its cause.
    loads: list[dict] = field(default_factory=list)
    waits: list[float] = field(default_factory=list)  # every answered request's wait for a replica
    evictions: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)
    utilisation: list[float] = field(default_factory=list)
    seconds: float = 0.0
    hung: int = 0  # requests neither answered nor refused by the end (queue timeout + 60 s)
    stuck: list[str] = field(default_factory=list)  # replicas not READY then
    asking: dict[str, int] = field(default_factory=dict)  # requests in acquire, by model
    ticks: list[float] = field(default_factory=list)  # each autoscaler pass's CPU seconds
    load: str = ""  # the load average (1, 5, 15 min) as the mode ended


# Each engine process's SIGTERM (its first) and its exit as the daemon saw them, by pid
# (monotonic seconds), and each eviction as it was decided: (when, victim's pid, to, for).
SIGNALLED: dict[int, float] = {}
EXITED: dict[int, float] = {}
# Each engine process's log: its file and where its own output begins, by pid.
LOGS: dict[int, tuple[Path, int]] = {}


def observe_processes() -> None:
    """Time each engine's SIGTERM and its exit, in any version of the appliance (the
    process seam, appliance/fleet/process.py)."""
    signal_group, wait, init = (
        process._RealProcess.signal_group,
        process._RealProcess.wait,
        process._RealProcess.__init__,
    )

    def logged(self, proc, log):
        LOGS[proc.pid] = (log.path, log.path.stat().st_size)
        init(self, proc, log)

    def signalled(self, sig):
        SIGNALLED.setdefault(self.pid, time.monotonic())
        return signal_group(self, sig)

    async def exited(self):
        await self._proc.wait()
        EXITED.setdefault(self.pid, time.monotonic())
        return await wait(self)

    process._RealProcess.signal_group, process._RealProcess.wait = signalled, exited
    process._RealProcess.__init__ = logged  # type: ignore[method-assign]


def watch_evictions(sup: Supervisor) -> list[tuple[float, int, str, str, bool]]:
    """Each eviction as it was decided: (when, the victim's pid, to, for, whether it was busy:
    requests in flight that it finishes before it goes, fairness only)."""
    evictions: list[tuple[float, int, str, str, bool]] = []
    evicted = sup.market.evicted

    def observed(e):
        victim = next((r for r in sup.replicas() if r.name == e.replica), None)
        pid, busy = (victim.pid, victim.inflight > 0) if victim is not None else (0, False)
        evictions.append((time.monotonic(), pid, e.to, e.for_model, busy))
        return evicted(e)

    sup.market.evicted = observed  # type: ignore[method-assign]
    return evictions


async def run_mode(mode: str, trace: list[tuple[float, int]], args) -> Result:
    result = Result(mode)
    with tempfile.TemporaryDirectory(prefix=f"market-{mode}-") as tmp:
        args.stamp_dir = Path(tmp) / "stamps"
        args.stamp_dir.mkdir()
        text = llamacpp_config_text if args.engine == "llamacpp" else config_text
        cfg = parse_config(text(Path(tmp), mode, args))
        session = aiohttp.ClientSession()
        sup = Supervisor(cfg, session)
        decided = watch_decisions(sup)
        evictions = watch_evictions(sup)
        sup.start()
        try:
            await boot(sup)
            for i in (int(i) for i in args.pin.split(",") if i.strip() and mode == "market"):
                operator.pin(sup, f"m{i}", True)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            sampler = asyncio.create_task(sample(sup, result, args.gpus, args.engine))
            ticker = asyncio.create_task(tick(sup, result))
            tasks = []
            for at, model in trace:
                delay = t0 + at - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one_request(sup, f"m{model}", result, decided)))
            done, pending = await asyncio.wait(tasks, timeout=args.queue_timeout + 60)
            if pending:  # hung: neither answered nor refused within the queue's timeout
                result.hung = len(pending)
                result.stuck = [f"{r.name} {r.state.name}" for r in sup.replicas() if r.state is not State.READY]
                for task in pending:
                    task.cancel()
            result.seconds = loop.time() - t0
            sampler.cancel()
            ticker.cancel()
            result.evictions = sum(sup.market.evictions.values())
            for (_, reason), n in sup.market.evictions.items():
                result.by_reason[reason] = result.by_reason.get(reason, 0) + n
            if args.engine == "llamacpp":
                llama_engines_own(result.loads, evictions)
            else:
                engines_own(result.loads, args.stamp_dir, evictions)
        finally:
            result.load = " ".join(f"{x:.2f}" for x in os.getloadavg())
            await sup.stop()
            await session.close()
    return result


async def boot(sup: Supervisor) -> None:
    """Wait until every replica started at boot is READY (or could not be placed)."""
    for _ in range(600):
        if all(r.state in (State.READY, State.FATAL) for r in sup.replicas()):
            return
        await asyncio.sleep(0.1)
    raise SystemExit("boot replicas did not become ready within 60 s")


async def tick(sup: Supervisor, result: Result) -> None:
    """The autoscaler's pass, as the daemon runs it; its CPU time (the event loop's, which
    a held request's handoff waits behind) in result.ticks."""
    while True:
        await asyncio.sleep(sup.cfg.autoscaling.interval_s)
        began = time.thread_time()
        sup.tick()
        result.ticks.append(time.thread_time() - began)


async def sample(sup: Supervisor, result: Result, gpus: int, engine: str) -> None:
    """The share of the GPUs' memory (llama.cpp: of the core budget) awake replicas hold."""
    total = gpus * GPU_GIB * GiB
    while True:
        if engine == "llamacpp":
            budget = sup.cpu_budget()
            result.utilisation.append(budget.used / budget.cores)
        else:
            _, placed, _ = sup.capacity.gpu_view()
            used = sum(p.bytes_per_gpu * len(p.gpus) for p in placed if not p.sleeping)
            result.utilisation.append(used / total)
        await asyncio.sleep(0.25)


def watch_decisions(sup: Supervisor) -> dict[str, float]:
    """When each replica's start or wake was decided (monotonic seconds, by replica name):
    the supervisor's add_replica and wake, observed from outside (so the bench measures
    any version of the supervisor the same way)."""
    decided: dict[str, float] = {}
    add_replica, wake = sup.add_replica, sup._wake

    def observed_add(*args, **kwargs):
        replica = add_replica(*args, **kwargs)
        if replica is not None:
            decided[replica.name] = time.monotonic()
        return replica

    def observed_wake(replica, *args, **kwargs):
        decided[replica.name] = time.monotonic()
        return wake(replica, *args, **kwargs)

    sup.add_replica, sup._wake = observed_add, observed_wake  # type: ignore[method-assign]
    return decided


async def one_request(sup: Supervisor, model: str, result: Result, decided: dict[str, float]) -> None:
    result.requests += 1
    dep = sup.deployment(model)
    # It causes a load: nothing of its model is ready, and no request is held for one already
    # (nor on its way to the hold: requests of one burst arrive in one turn of the loop).
    caused = dep.pick_ready() is None and not dep.waiters and not result.asking.get(model)
    result.asking[model] = result.asking.get(model, 0) + 1
    start = time.monotonic()
    try:
        replica = await dep.acquire()
    except ApplianceError as exc:
        result.asking[model] -= 1
        result.failed += 1
        why = f"{exc.code} {model}"
        result.reasons[why] = result.reasons.get(why, 0) + 1
        print(f"failed: {model}: {exc.code}: {exc}", file=sys.stderr, flush=True)
        return
    result.asking[model] -= 1
    result.waits.append(time.monotonic() - start)
    if caused:
        load = cut(start, time.monotonic(), replica, decided.get(replica.name, start))
        result.loads.append({**load, "cause": dep.loading_cause, "pid": replica.pid, "model": model, "at": start})
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    with replica.lease():
        try:
            async with replica.session.post(f"{replica.base_url}/v1/chat/completions", json=body) as resp:
                await resp.read()
                ok = resp.status == 200
        except aiohttp.ClientError:
            ok = False
    if not ok:
        result.failed += 1
        result.reasons["engine"] = result.reasons.get("engine", 0) + 1


# --- the table ------------------------------------------------------------------------------------


def cut(arrived: float, held: float, replica, decided: float) -> dict[str, float]:
    """A load's wait in its parts (module docstring); the replica's timestamps are the
    supervisor's clock (time.monotonic). ``engine`` is spawn (or wake) to READY until
    engines_own replaces it by the engine's own time."""
    decided = min(max(decided, arrived), replica.loading_since)  # decided before it arrived: no queue
    return {
        "queued": max(0.0, decided - arrived),  # (a load begun before it arrived: none)
        "freeing": replica.loading_since - decided,
        "engine": replica.ready_since - replica.loading_since,
        "handoff": held - replica.ready_since,
        "loading_since": replica.loading_since,
    }


def engines_own(loads: list[dict], stamp_dir: Path, evictions: list) -> None:
    """Each load's ``engine`` as the engine stamped it (module docstring), the rest of
    spawn-to-READY as ``detect``; ``over`` = freeing + detect + handoff; ``victims`` and
    ``ours``. A cold start is the process's serving stamp; a wake the first wake stamped
    after the load began."""
    stamps: dict[int, list[list[str]]] = {}
    for f in stamp_dir.iterdir():
        stamps[int(f.name)] = [line.split() for line in f.read_text().splitlines()]
    for load in loads:
        began, spawn_to_ready = load.pop("loading_since"), load["engine"]
        victims_part(load, began, evictions, stamps)
        rows = [(what, [float(x) for x in at]) for what, *at in stamps.get(load["pid"], [])]
        served = [t[0] for what, t in rows if what == "serving" and t[0] >= began - 0.001]
        woken = [t[1] - t[0] for what, t in rows if what == "wake" and t[0] >= began - 0.001]
        # A process spawned for this load: its start; else a wake of a sleeping one (counted
        # under "wake", or "evict" when others were freed for it first: evict+cold, evict+wake).
        own = served[0] - began if served else woken[0] if woken else spawn_to_ready
        # ... and its answer to the readiness probe that follows (a 1-token completion)
        first = served[0] if served else began
        own += next((t[1] - t[0] for what, t in rows if what == "probe" and t[0] >= first), 0.0)
        if load["cause"] == "evict":
            load["cause"] = "evict+cold" if served else "evict+wake"
        load["engine"] = own
        load["detect"] = spawn_to_ready - own
        load["over"] = load["freeing"] + load["detect"] + load["handoff"]
        load["ours"] = load["over"] - load["victims"]


LLAMA_STAMP = re.compile(r"^(\d+)\.(\d+)\.(\d+)\.(\d+) . (.*)$")


def llama_log(pid: int) -> list[tuple[float, str]]:
    """One llama-server process's log lines with its own timestamps (seconds since its
    logger started: --log-timestamps), up to the next start logged to the same file."""
    if pid not in LOGS:
        return []
    path, offset = LOGS[pid]
    with open(path, "rb") as f:
        f.seek(offset)
        text = f.read().decode("utf-8", "replace").split("--- appliance: starting", 1)[0]
    out = []
    for line in text.splitlines():
        if m := LLAMA_STAMP.match(line):
            minutes, sec, ms, us = (int(x) for x in m.groups()[:4])
            out.append((minutes * 60 + sec + ms / 1e3 + us / 1e6, m[5]))
    return out


def llama_engines_own(loads: list[dict], evictions: list) -> None:
    """engines_own for llama-server: its own start is the time it logs "listening" (its
    model loaded), and then its own time on the readiness probe (the first task's launch
    to its release). What it spends before its logger starts (exec, dynamic linking: a
    few ms) is not in its log, so it counts as ours here: ``ours`` is an upper bound."""
    for load in loads:
        began, spawn_to_ready = load.pop("loading_since"), load["engine"]
        victims_part(load, began, evictions, {})
        lines = llama_log(load["pid"])
        listening = next((t for t, text in lines if "listening on" in text), None)
        launched = next((t for t, text in lines if "launch_slot_" in text and listening is not None), None)
        released = next(
            (t for t, text in lines if " release: " in text and launched is not None and t >= launched), None
        )
        own = spawn_to_ready
        if listening is not None:
            own = listening + (released - launched if launched is not None and released is not None else 0.0)
        if load["cause"] == "evict":
            load["cause"] = "evict+cold"
        load["engine"] = own
        load["detect"] = spawn_to_ready - own
        load["over"] = load["freeing"] + load["detect"] + load["handoff"]
        load["ours"] = load["over"] - load["victims"]


def victims_own(model: str, arrived: float, began: float, evictions: list, stamps: dict) -> tuple[float, float]:
    """The longest own stop (SIGTERM to exit) or sleep (its /sleep stamp) of the engines
    evicted for ``model`` between the request's arrival and its engine's start or wake; and
    the longest drain of a busy victim (fairness: from the eviction to its SIGTERM or its
    /sleep, its requests in flight finishing), which is queueing behind another model's
    work, not the load's."""
    own, drained = [0.0], [0.0]
    for at, pid, to, for_model, busy in evictions:
        if model not in for_model.split("+") or not arrived - 0.001 <= at <= began:
            continue
        if to == "stop" and pid in SIGNALLED and pid in EXITED:
            own.append(EXITED[pid] - SIGNALLED[pid])
            drained.append(SIGNALLED[pid] - at if busy else 0.0)
        elif to == "sleep":
            slept = [
                (float(t[0]), float(t[1])) for what, *t in stamps.get(pid, []) if what == "sleep" and float(t[0]) >= at
            ]
            own += [end - start for start, end in slept[:1]]
            drained += [start - at for start, _ in slept[:1] if busy]
    return max(own), max(drained)


def victims_part(load: dict, began: float, evictions: list, stamps: dict) -> None:
    """A load's ``victims`` (their own stop or sleep), and a busy victim's drain moved from
    ``freeing`` to ``queued``."""
    own, drained = victims_own(load["model"], load["at"], began, evictions, stamps)
    drained = min(drained, load["freeing"])
    load["queued"] += drained
    load["freeing"] -= drained
    load["victims"] = min(own, load["freeing"])


def pct(values: list[float], q: int) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0] * 1000:.0f}"
    return f"{statistics.quantiles(values, n=100, method='inclusive')[q - 1] * 1000:.0f}"


def table(results: list[Result], own: dict[str, float]) -> str:
    base = next((r for r in results if r.mode == "none"), results[0])
    tier = f"sleep {own['sleep']:.2f} s, wake {own['wake']:.2f} s" if own["wake"] else "no sleep tier"
    lines = [
        f"engine's own times (measured alone): cold start {own['cold']:.2f} s, {tier}, "
        f"exit after SIGTERM {own['exit']:.2f} s",
        "| mode | requests | failed (vs none) | wait, every request: p50 / p99 / max ms | loads "
        "| evictions/min (by reason) | GPU memory (llama.cpp: core budget) used, mean | hung "
        "| autoscaler pass, CPU ms p50 / max | load at end |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ratio = f"{r.failed / base.failed:.2f}x" if base.failed else "-"
        why = ", ".join(f"{k} {v}" for k, v in sorted(r.reasons.items()))
        failed = f"{r.failed} ({ratio}{'; ' + why if why else ''})"
        per_min = r.evictions / (r.seconds / 60) if r.seconds else 0.0
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(r.by_reason.items()))
        util = statistics.fmean(r.utilisation) if r.utilisation else 0.0
        waits = f"{pct(r.waits, 50)} / {pct(r.waits, 99)} / {max(r.waits, default=0) * 1000:.0f}"
        lines.append(
            f"| {r.mode} | {r.requests} | {failed} | {waits} | {len(r.loads)} | {per_min:.1f} ({reasons or '-'}) "
            f"| {util:.0%} | {r.hung}{' (' + ', '.join(r.stuck) + ')' if r.stuck else ''} "
            f"| {pct(r.ticks, 50)} / {max(r.ticks, default=0) * 1000:.0f} | {r.load} |"
        )
    lines += [
        "",
        "| mode | cause | loads | ENGINE: its own start or wake p50 | ENGINE: its victims' own stop or sleep "
        "p50 / p99 | OURS p50 / p99 (goal p50 <= 100) | ours: freeing beyond the victims' own p50 | ours: detect "
        "p50 | ours: handoff p50 | over own (victims + ours) p50 / p99 | queued p50 / p99 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    causes = {"evict": ("evict+cold", "evict+wake"), "all": None}
    for r in results:
        for cause in ("cold", "wake", "evict", "evict+cold", "evict+wake", "all"):
            kinds = causes.get(cause, (cause,))
            loads = [x for x in r.loads if kinds is None or x["cause"] in kinds]
            if not loads:
                continue
            part = {k: [x[k] for x in loads] for k in ("over", "victims", "ours", "detect", "handoff", "queued")}
            part["engine"] = [x["engine"] for x in loads]
            part["beyond"] = [x["freeing"] - x["victims"] for x in loads]
            lines.append(
                f"| {r.mode} | {cause} | {len(loads)} | {pct(part['engine'], 50)} "
                f"| {pct(part['victims'], 50)} / {pct(part['victims'], 99)} "
                f"| {pct(part['ours'], 50)} / {pct(part['ours'], 99)} | {pct(part['beyond'], 50)} "
                f"| {pct(part['detect'], 50)} | {pct(part['handoff'], 50)} "
                f"| {pct(part['over'], 50)} / {pct(part['over'], 99)} "
                f"| {pct(part['queued'], 50)} / {pct(part['queued'], 99)} |"
            )
    lines.append(
        "ENGINE columns are the engines' own times as they report them: the loaded engine's start (spawn to serving) "
        "or wake (its /wake_up) and its answer to the readiness probe; its victims' stop (SIGTERM to exit) or sleep "
        "(their /sleep), victims freed in parallel counted once. OURS = the rest of the wait of a request that "
        "caused a load: freeing beyond the victims' own time + detect (engine ready to READY) + handoff (READY to "
        "the held request); queued (waiting for room held by busy or resident replicas) is neither."
    )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=int, default=6, help="N models")
    p.add_argument("--gpus", type=int, default=2, help="k GPUs, each with room for one model")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of generated trace")
    p.add_argument("--rate", type=float, default=2.0, help="requests per second")
    p.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of the models' popularity")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--cold-start", type=float, default=3.0, help="the fake engine's seconds before listening")
    p.add_argument("--wake", type=float, default=0.3, help="the fake engine's /wake_up seconds")
    p.add_argument("--sleep", type=float, default=0.2, help="the fake engine's /sleep seconds")
    p.add_argument("--service", type=float, default=0.3, help="seconds per answer")
    p.add_argument("--residency", type=float, default=2.0, help="the market's min_residency, seconds")
    p.add_argument("--host-ram-gib", type=float, default=0.0, help="0: room for every model asleep")
    p.add_argument("--queue-timeout", type=float, default=120.0)
    p.add_argument("--modes", default="none,swap,market")
    p.add_argument("--trace", type=Path, default=None)
    p.add_argument("--preempt-after", type=float, default=None, help="[capacity] max_wait_before_preempt_s")
    p.add_argument("--headroom-idle", type=float, default=0.0, help="[capacity] headroom_idle_s (0: off)")
    p.add_argument("--burst", type=int, default=0, help="requests at one instant for a cold model (0: none)")
    p.add_argument("--burst-every", type=float, default=0.0, help="seconds between bursts (0: duration / 3)")
    p.add_argument("--sizes", default="1", help="each model's GPUs' worth, cycled: 1,2 or 0.5,1 (fake engine)")
    p.add_argument("--priorities", default="0", help="each model's priority, cycled: 0,0,1")
    p.add_argument("--pin", default="", help="market: models pinned (indices: 0,3)")
    p.add_argument("--no-sleep", default="", help="market: models without sleep mode (indices: 1,2)")
    p.add_argument("--dump", type=Path, default=None, help="each load's parts (JSON lines) to this file")
    p.add_argument("--log", type=Path, default=None, help="the appliance's log (INFO) to this file")
    p.add_argument("--engine", choices=("fake", "llamacpp"), default="fake", help="module docstring")
    p.add_argument("--llama-server", default=default_llama_server(), help="--engine llamacpp: the engine")
    p.add_argument("--gguf", type=Path, default=builtin_model_path(EMBEDDED_MODEL_NAME), help="--engine llamacpp")
    args = p.parse_args()
    if not 0 < args.gpus < args.models:
        p.error("the benchmark wants capacity for k < N models: 0 < --gpus < --models")
    trace = (
        read_trace(args.trace, args.models)
        if args.trace
        else zipf_trace(args.models, args.duration, args.rate, args.zipf, args.seed)
    )
    trace = with_bursts(trace, args.models, args.burst, args.burst_every, max((t for t, _ in trace), default=0))
    if args.log:
        logging.basicConfig(filename=args.log, level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    own = measure_llama(args) if args.engine == "llamacpp" else measure_engine(args)
    observe_processes()
    room = f"{args.gpus} cores (llama.cpp)" if args.engine == "llamacpp" else f"{args.gpus} GPUs"
    print(
        f"{len(trace)} requests over {args.models} models on {room}; load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    results = [asyncio.run(run_mode(mode, trace, args)) for mode in args.modes.split(",")]
    print(table(results, own))
    if args.dump:
        with open(args.dump, "w") as out:
            for r in results:
                for load in r.loads:
                    out.write(json.dumps({"mode": r.mode, **load}) + "\n")


if __name__ == "__main__":
    main()
