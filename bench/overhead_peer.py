"""A peer proxy beside the appliance in bench/gateway_overhead.py (--peer litellm).

LiteLLM's proxy is installed on demand into a throwaway virtual environment of its
own (never the product's dependencies, never in CI): $APPLIANCE_BENCH_PEER_DIR, else
``appliance-bench-peer-<uid>`` in the temp dir, reused when a previous run completed
the install there. The peer serves one model, "fake", from the fake engine as an
OpenAI-compatible base URL, with as many worker processes as each appliance side
(--workers; one is LiteLLM's default, ``--num_workers 1``). A failed install or start is
reported as the reason the side was not measured; the other sides still are.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead_procs import Sides, free_port  # noqa: E402

INSTALLED = ".installed"  # written last: a venv without it is installed again
PEERS = ("litellm",)


def peer_dir() -> Path:
    given = os.environ.get("APPLIANCE_BENCH_PEER_DIR")
    return Path(given) if given else Path(tempfile.gettempdir()) / f"appliance-bench-peer-{os.getuid()}"


def _check_ours(path: Path) -> None:
    """A venv we run code from must be ours and writable by us alone (a shared temp dir)."""
    st = path.lstat()
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise SystemExit(f"{path} is not a directory")
    if st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise SystemExit(f"{path} is not owned by this user alone (uid {st.st_uid}, mode {st.st_mode & 0o777:o}): "
                         "remove it or set APPLIANCE_BENCH_PEER_DIR")


def install_litellm(where: Path) -> Path:
    """The venv's litellm command, installing `litellm[proxy]` first when no earlier run did."""
    litellm = where / "bin" / "litellm"
    if where.exists():
        _check_ours(where)
        if (where / INSTALLED).exists() and litellm.exists():
            return litellm
    else:
        where.mkdir(mode=0o700, parents=True)
    print(f"installing litellm[proxy] into {where} (once; reused by later runs)", file=sys.stderr)
    steps = ([sys.executable, "-m", "venv", str(where)],
             [str(where / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
              "litellm[proxy]"])
    for cmd in steps:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, check=False)
        except subprocess.TimeoutExpired:
            raise SystemExit(f"`{' '.join(cmd[-3:])}` did not finish in 20 minutes") from None
        if out.returncode != 0:
            tail = " | ".join((out.stderr or out.stdout).strip().splitlines()[-3:])
            raise SystemExit(f"`{' '.join(cmd[-3:])}` failed (rc {out.returncode}): {tail[-600:]}")
    (where / INSTALLED).write_text("litellm[proxy]\n")
    return litellm


def litellm_config(tmp: Path, engine_port: int) -> Path:
    cfg = tmp / "litellm.yaml"
    cfg.write_text(f"""model_list:
  - model_name: fake
    litellm_params:
      model: openai/fake-model
      api_base: http://127.0.0.1:{engine_port}/v1
      api_key: unused
litellm_settings:
  set_verbose: false
general_settings:
  # Keyless, as the appliance sides are: no master key to check (loopback, throwaway).
  dangerously_permit_weak_or_unset_master_key: true
""")
    return cfg


def start_litellm(sides: Sides, engine_port: int, worker_counts: list[int]) -> None:
    """A LiteLLM side per --workers value: "litellm" with one worker process (its default),
    "litellm-wN" with --num_workers N."""
    litellm = install_litellm(peer_dir())
    cfg = litellm_config(sides.tmp, engine_port)
    # The model cost map from the package, not fetched; no telemetry; no colour in the log.
    env = {**sides.env, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_TELEMETRY": "False",
           "NO_COLOR": "1", "LITELLM_LOG": "ERROR"}
    env.pop("PYTHONPATH", None)  # its own venv, not this tree's modules
    for n in worker_counts:
        name, port = ("litellm" if n == 1 else f"litellm-w{n}"), free_port()
        cmd = [str(litellm), "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port), "--num_workers", str(n)]
        if n > 1:  # uvicorn kills a worker that answers its health check late: a busy one, on a small box
            cmd += ["--timeout_worker_healthcheck", "120"]
        sides.optional(name, lambda name=name, port=port, cmd=cmd: sides.start(
            name, cmd, "/health/liveliness", port=port, env=env, timeout=300))


def start_peer(peer: str, sides: Sides, engine_port: int, worker_counts: list[int]) -> None:
    if peer == "litellm":
        sides.optional("litellm", lambda: start_litellm(sides, engine_port, worker_counts))
