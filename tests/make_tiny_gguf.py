"""Write a valid random-weight llama GGUF that llama-server loads and generates from:
no download, a few MB by default, a tokenizer in its metadata (SentencePiece-style,
with byte fallback, so any text tokenizes) and a chat template.

    python tests/make_tiny_gguf.py OUT.gguf [--embd 256] [--layers 2] [--heads 4]
        [--kv-heads 2] [--ff 768] [--context 32768] [--seed 0]

The answers are gibberish; what it is for is loading, serving, sizing and
placement: the CPU suite where SmolLM2's answers do not matter, and the GPU check
(tests/gpu_check.py), which makes larger ones with --embd/--layers.
Standard library only (the GPU check runs it where nothing else may be installed).
"""

from __future__ import annotations

import argparse
import os
import random
import struct
import sys
from pathlib import Path

F32, F16 = 0, 1
ALIGN = 32
# Metadata value types (GGUF).
U32, I32, F32V, BOOL, STR, ARR = 4, 5, 6, 7, 8, 9
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def vocabulary() -> tuple[list[str], list[float], list[int]]:
    """<unk> <s> </s>, the chat markers, 256 byte tokens, then single characters and
    a few words: (pieces, scores, token types)."""
    pieces = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    types = [2, 3, 3, 3, 3]  # unknown, control...
    pieces += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256       # byte
    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-:;()"
    words = ["the", "and", "is", "of", "to", "in", "it", "you", "hello", "ok", "yes", "no"]
    normal = ["\u2581"] + list(chars) + ["\u2581" + c for c in chars] + ["\u2581" + w for w in words]
    pieces += normal
    types += [1] * len(normal)
    scores = [0.0] * (len(pieces) - len(normal)) + [-float(i) for i in range(len(normal))]
    return pieces, scores, types


def _str(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def _kv(key: str, vtype: int, value) -> bytes:
    out = _str(key) + struct.pack("<I", vtype)
    if vtype == STR:
        return out + _str(value)
    if vtype == ARR:
        etype, items = value
        out += struct.pack("<IQ", etype, len(items))
        if etype == STR:
            return out + b"".join(_str(i) for i in items)
        return out + struct.pack(f"<{len(items)}{ {I32: 'i', F32V: 'f'}[etype] }", *items)
    return out + struct.pack("<" + {U32: "I", I32: "i", F32V: "f", BOOL: "?"}[vtype], value)


def tensors(a) -> list[tuple[str, tuple[int, ...], int]]:
    """(name, GGUF dims (innermost first), type) of a llama model."""
    head = a.embd // a.heads
    kv = a.kv_heads * head
    out = [("token_embd.weight", (a.embd, a.vocab), F16), ("output_norm.weight", (a.embd,), F32),
           ("output.weight", (a.embd, a.vocab), F16)]
    for i in range(a.layers):
        p = f"blk.{i}."
        out += [(p + "attn_norm.weight", (a.embd,), F32), (p + "attn_q.weight", (a.embd, a.embd), F16),
                (p + "attn_k.weight", (a.embd, kv), F16), (p + "attn_v.weight", (a.embd, kv), F16),
                (p + "attn_output.weight", (a.embd, a.embd), F16), (p + "ffn_norm.weight", (a.embd,), F32),
                (p + "ffn_gate.weight", (a.embd, a.ff), F16), (p + "ffn_up.weight", (a.embd, a.ff), F16),
                (p + "ffn_down.weight", (a.ff, a.embd), F16)]
    return out


def write(path: Path, a) -> int:
    pieces, scores, types = vocabulary()
    a.vocab = len(pieces)
    head = a.embd // a.heads
    meta = [
        ("general.architecture", STR, "llama"), ("general.name", STR, a.name),
        ("general.alignment", U32, ALIGN), *([("general.license", STR, a.license)] if a.license else []),
        ("llama.block_count", U32, a.layers), ("llama.context_length", U32, a.context),
        ("llama.embedding_length", U32, a.embd), ("llama.feed_forward_length", U32, a.ff),
        ("llama.attention.head_count", U32, a.heads), ("llama.attention.head_count_kv", U32, a.kv_heads),
        ("llama.rope.dimension_count", U32, head), ("llama.rope.freq_base", F32V, 10000.0),
        ("llama.attention.layer_norm_rms_epsilon", F32V, 1e-5), ("llama.vocab_size", U32, a.vocab),
        ("tokenizer.ggml.model", STR, "llama"), ("tokenizer.ggml.tokens", ARR, (STR, pieces)),
        ("tokenizer.ggml.scores", ARR, (F32V, scores)), ("tokenizer.ggml.token_type", ARR, (I32, types)),
        ("tokenizer.ggml.unknown_token_id", U32, 0), ("tokenizer.ggml.bos_token_id", U32, 1),
        ("tokenizer.ggml.eos_token_id", U32, 2), ("tokenizer.ggml.add_bos_token", BOOL, True),
        ("tokenizer.ggml.add_eos_token", BOOL, False), ("tokenizer.chat_template", STR, CHATML),
    ]
    specs = tensors(a)
    infos, offset, sizes = [], 0, []
    for name, dims, ttype in specs:
        n = 1
        for d in dims:
            n *= d
        size = n * (4 if ttype == F32 else 2)
        infos.append(_str(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
                     + struct.pack("<IQ", ttype, offset))
        sizes.append(size)
        offset += -(-size // ALIGN) * ALIGN
    header = (b"GGUF" + struct.pack("<IQQ", 3, len(specs), len(meta))
              + b"".join(_kv(*m) for m in meta) + b"".join(infos))
    header += b"\0" * (-len(header) % ALIGN)
    # Random f16 weights ~ N(0, 0.05), one 64K-value block reused with a shifting start:
    # any size is cheap to write, and no value is NaN or infinite.
    rng = random.Random(a.seed)
    block = struct.pack("<65536e", *(rng.gauss(0.0, 0.05) for _ in range(65536)))
    ones = struct.pack("<f", 1.0)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(header)
        for (name, _, ttype), size in zip(specs, sizes):
            if ttype == F32:
                f.write(ones * (size // 4))
            else:
                start = rng.randrange(0, len(block) // 2) * 2
                data = (block[start:] + block[:start]) * (size // len(block) + 1)
                f.write(data[:size])
            f.write(b"\0" * (-size % ALIGN))
    os.replace(tmp, path)
    return path.stat().st_size


def opaque(payload: bytes) -> bytes:
    """A valid GGUF with no tensors, followed by payload: for tests of the store, where a
    file's bytes matter and its weights do not."""
    return b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + _kv("general.architecture", STR, "opaque") + payload


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--embd", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--ff", type=int, default=768)
    p.add_argument("--context", type=int, default=32768, help="the trained context it claims")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="tiny-random-llama")
    p.add_argument("--license", default="", help="general.license (none by default)")
    a = p.parse_args(argv)
    if a.embd % a.heads or a.heads % a.kv_heads or (a.embd // a.heads) % 2:
        p.error("--embd must divide into --heads even-sized heads, --heads into --kv-heads")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse(sys.argv[1:] if argv is None else argv)
    size = write(a.out, a)
    print(f"wrote {a.out} ({size / 2**20:.1f} MiB, {a.layers} layers, embd {a.embd}, vocab {a.vocab})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
