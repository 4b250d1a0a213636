"""What building an engine's Landlock ruleset costs the daemon before each spawn, on a store
of many models: this tree against a baseline.

    python bench/landlock_ruleset.py --baseline /work/base-6a1c645 [--models 50] [--files 8] [--builds 200] [--rounds 3]

A store of --models HF-style models (--files files each, every one a snapshot link to its
blob) is imported once into a temp cache directory (with this tree's store: the layout is
the same in both). Each round runs each tree in a fresh process (alternating which goes
first), which builds the ruleset of one engine serving the first model --builds times, as
the spawn does (appliance/fleet/process.py SubprocessRunner._ruleset: engine_keep_out,
engine_read_only, and in a tree that has it store_reads of the model's path), and reports
the min and the median per build and the rules the ruleset holds. The table shows each
side's medians over the rounds and this tree against the baseline. Needs a kernel with
Landlock (the ruleset is not built without it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
         "special_tokens_map.json"]

MEASURE = r"""
import json, os, statistics, sys, time
from pathlib import Path
cache, builds = Path(sys.argv[1]), int(sys.argv[2])
from appliance.config import parse_config
from appliance.fleet import landlock
from appliance.store.store import Store

cfg = parse_config(f'[paths]\nstate_dir = "{cache.parent}/state"\ncache_dir = "{cache}"\n'
                   f'log_dir = "{cache.parent}/log"\n')
store = Store(cache)
snapshot = store.model_path(store.models()[0])
store.close()
home = cache / "engine-home" / "m-0"
home.mkdir(parents=True, exist_ok=True)
engine = landlock.engine_landlock()
assert engine.enforced, engine.reason
rules = 0
add_rule = engine._add_rule
def counted(*args):
    global rules
    rules += 1
    return add_rule(*args)
engine._add_rule = counted
reads = getattr(landlock, "store_reads", None)
own = (landlock.private_root(), home)
times = []
for i in range(builds):
    rules = 0
    start = time.perf_counter()
    keep_out, read_only = landlock.engine_keep_out(cfg), landlock.engine_read_only(cfg)
    if reads is None:
        fd = engine.ruleset(keep_out, own, read_only)
    else:
        fd = engine.ruleset(keep_out, own, read_only, reads(cfg, [snapshot]))
    times.append(time.perf_counter() - start)
    os.close(fd)
print(json.dumps({"min_us": min(times) * 1e6, "median_us": statistics.median(times) * 1e6, "rules": rules}))
"""


def make_store(cache: Path, models: int, files: int) -> None:
    sys.path.insert(0, str(ROOT))
    from appliance.store.records import Incoming, SourceFile
    from appliance.store.store import Store

    source = cache.parent / "source"
    store = Store(cache)
    try:
        for m in range(models):
            folder = source / f"m{m}"
            folder.mkdir(parents=True)
            names = (FILES + [f"model-{i:05d}-of-{files:05d}.safetensors" for i in range(files)])[:files]
            for name in names:
                (folder / name).write_text(f"{m} {name}")
            sources = [SourceFile(n, (folder / n).stat().st_size, lambda p=folder / n: open(p, "rb")) for n in names]
            store.add(Incoming(f"org/model-{m}", str(folder), sources))
    finally:
        store.close()


def measure(tree: str, cache: Path, builds: int) -> dict:
    env = {**os.environ, "PYTHONPATH": tree}
    done = subprocess.run([sys.executable, "-c", MEASURE, str(cache), str(builds)], env=env, capture_output=True,
                          text=True, check=True, cwd=tree)
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", required=True, help="a tree of the baseline (git archive of main)")
    parser.add_argument("--models", type=int, default=50)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--builds", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        make_store(cache, args.models, args.files)
        trees = {"base": args.baseline, "tree": str(ROOT)}
        seen: dict[str, list[dict]] = {name: [] for name in trees}
        for r in range(args.rounds):
            order = list(trees) if r % 2 == 0 else list(reversed(trees))
            for name in order:
                seen[name].append(measure(trees[name], cache, args.builds))
        print(f"load: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
        print(f"{args.models} models of {args.files} files, {args.builds} builds a round, {args.rounds} rounds")
        print(f"{'':6} {'min us':>10} {'median us':>10} {'rules':>6}")
        medians = {}
        for name, runs in seen.items():
            lo = statistics.median(run["min_us"] for run in runs)
            mid = medians[name] = statistics.median(run["median_us"] for run in runs)
            print(f"{name:6} {lo:10.0f} {mid:10.0f} {runs[0]['rules']:6d}")
        print(f"tree / base (median): {medians['tree'] / medians['base']:.2f}x")


if __name__ == "__main__":
    main()
