"""Write a LoRA adapter GGUF for a llama-architecture base GGUF (the bundled SmolLM2-135M):
random rank-R deltas for the last layers' ffn_down, large enough that the adapter's
greedy answer differs from the base's. No download, no gguf package.

    python tests/make_lora_gguf.py BASE.gguf OUT.gguf [--rank 4] [--layers 4] [--seed 0]

What it is for: proving that llama-server loads an adapter the appliance hands it
(--lora) and applies it per request (the "lora" field), not the quality of an answer.
"""

from __future__ import annotations

import argparse
import random
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_tiny_gguf import ALIGN, F32, F32V, STR, U32, _kv, _str  # noqa: E402

from appliance.store.gguf import read  # noqa: E402


def write(base: Path, out: Path, rank: int = 4, layers: int = 4, seed: int = 0, scale: float = 0.5) -> Path:
    model = read(base)
    shapes = {t.name: t.shape for t in model.tensors}
    blocks = int(model.arch("block_count"))
    specs: list[tuple[str, tuple[int, int]]] = []
    for i in range(max(0, blocks - layers), blocks):
        name = f"blk.{i}.ffn_down.weight"
        n_in, n_out = shapes[name]
        specs += [(name + ".lora_a", (n_in, rank)), (name + ".lora_b", (rank, n_out))]
    meta = [
        ("general.architecture", STR, model.architecture),
        ("general.type", STR, "adapter"),
        ("general.alignment", U32, ALIGN),
        ("adapter.type", STR, "lora"),
        ("adapter.lora.alpha", F32V, float(rank)),
    ]
    infos, offset, sizes = [], 0, []
    for name, dims in specs:
        size = dims[0] * dims[1] * 4
        infos.append(_str(name) + struct.pack("<I", 2) + struct.pack("<2Q", *dims) + struct.pack("<IQ", F32, offset))
        sizes.append(size)
        offset += -(-size // ALIGN) * ALIGN
    header = b"GGUF" + struct.pack("<IQQ", 3, len(specs), len(meta)) + b"".join(_kv(*m) for m in meta)
    header += b"".join(infos)
    header += b"\0" * (-len(header) % ALIGN)
    rng = random.Random(seed)
    with open(out, "wb") as f:
        f.write(header)
        for (_, dims), size in zip(specs, sizes):
            n = dims[0] * dims[1]
            f.write(struct.pack(f"<{n}f", *(rng.gauss(0.0, scale) for _ in range(n))))
            f.write(b"\0" * (-size % ALIGN))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("base", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    write(a.base, a.out, a.rank, a.layers, a.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
