"""The GPU check: run by hand on a machine with an NVIDIA GPU (not part of the suite).

    python tests/gpu_check.py [--gib 10]

1. The appliance's probe reads the real GPUs through nvidia-ml-py.
2. A child process allocates a known amount of GPU memory with torch.
3. The probe must attribute that memory to the child's PID (within the CUDA
   context's overhead), and descendants() must find it from its parent.
4. `appliance plan` places a set of vLLM models on the real card(s), the child's
   memory counting as foreign. Model directories are config.json plus sparse
   weight files of the right size: nothing is downloaded.
Prints everything it sees; exits non-zero if the attribution fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from appliance.gpu import GiB, NvmlProbe  # noqa: E402
from appliance.process import descendants  # noqa: E402

ALLOCATOR = """
import os, sys, time, torch
x = torch.empty(int(float(sys.argv[1]) * 2**30), dtype=torch.uint8, device="cuda")
x.fill_(1)
torch.cuda.synchronize()
print("allocated", os.getpid(), flush=True)
time.sleep(float(sys.argv[2]))
"""

# name: (weights GB, layers, attention heads, kv heads, head dim)
MODELS = {
    "llama-3.1-8b-instruct": (16.1, 32, 32, 8, 128),
    "qwen2.5-32b-instruct": (65.5, 64, 40, 8, 128),
    "llama-3.1-70b-instruct": (141.1, 80, 64, 8, 128),
}


def show(inv, title: str) -> None:
    print(f"--- {title}: source={inv.source} error={inv.error}")
    for g in inv.gpus:
        print(f"GPU {g.index} {g.name} ({g.kind}) uuid={g.uuid} total={g.total_bytes / GiB:.2f} GiB "
              f"used={g.used_bytes / GiB:.2f} GiB free={g.free_bytes / GiB:.2f} GiB util={g.utilization_pct}%")
        for p in g.processes:
            print(f"    pid {p.pid}: {p.used_bytes / GiB:.3f} GiB")


def make_models(base: Path) -> Path:
    models = []
    for name, (gb, layers, heads, kv, hd) in MODELS.items():
        d = base / name
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps({
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
            "head_dim": hd, "hidden_size": heads * hd, "torch_dtype": "bfloat16"}))
        with open(d / "model.safetensors", "wb") as f:
            f.truncate(int(gb * 1e9))  # sparse: the size is what matters
        models.append(f'[[models]]\nname = "{name}"\nserver = "vllm"\nsource = "{d}"\n'
                      f"context_length = 8192\nparallel = 16\n")
    cfg = base / "appliance.toml"
    cfg.write_text(f'[paths]\nstate_dir = "{base}/state"\ncache_dir = "{base}/cache"\n'
                   f'log_dir = "{base}/log"\n\n' + "\n".join(models))
    return cfg


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=10.0)
    args = ap.parse_args()
    probe = NvmlProbe()
    before = probe.read()
    show(before, "before")
    if before.cpu_only:
        print("no GPU: nothing to check")
        return 1

    child = subprocess.Popen([sys.executable, "-c", ALLOCATOR, str(args.gib), "120"],
                             stdout=subprocess.PIPE, text=True)
    line = child.stdout.readline().split()
    assert line[:1] == ["allocated"], line
    t0 = time.monotonic()
    after = probe.read()
    print(f"(probe read in {1000 * (time.monotonic() - t0):.1f} ms)")
    show(after, f"after a child (pid {child.pid}) allocated {args.gib} GiB")
    ok = True
    seen = after.process_bytes().get(child.pid)
    if seen is None:
        ok = False
        print(f"FAIL: NVML lists no process with pid {child.pid}; it lists "
              f"{sorted(after.process_bytes())} (a PID namespace would explain this)")
    else:
        extra = seen - args.gib * GiB
        verdict = "OK" if 0 <= extra < 2 * GiB else "FAIL"
        ok = ok and verdict == "OK"
        print(f"{verdict}: NVML attributes {seen / GiB:.3f} GiB to pid {child.pid} "
              f"({args.gib} GiB asked + {extra / 2**20:.0f} MiB CUDA context)")
    tree = descendants(os.getpid())
    in_tree = child.pid in tree
    ok = ok and in_tree
    print(f"{'OK' if in_tree else 'FAIL'}: descendants(this process) includes the child: {in_tree}; "
          f"its GPU memory by process tree: "
          f"{sum(g.used_by(tree) for g in after.gpus) / GiB:.3f} GiB")
    used_delta = (sum(g.used_bytes for g in after.gpus) - sum(g.used_bytes for g in before.gpus)) / GiB
    print(f"device used memory grew by {used_delta:.3f} GiB")

    with tempfile.TemporaryDirectory() as tmp:
        cfg = make_models(Path(tmp))
        print("--- appliance plan (the child's memory counts as foreign)")
        plan = subprocess.run([sys.executable, "-m", "appliance.cli", "plan", "--config", str(cfg)],
                              cwd=ROOT, capture_output=True, text=True)
        print(plan.stdout + plan.stderr)
        print(f"appliance plan exit code {plan.returncode} (2 = something could not be placed)")
    child.kill()
    child.wait()
    print("RESULT:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
