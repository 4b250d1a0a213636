"""What a GGUF file says about itself: its architecture's shape and its tensors' bytes,
read from the header alone (the weights are never read).

A small reader of our own rather than the ``gguf`` package: the appliance needs a
dozen numbers from the header and a check that the file is whole, and that package
would bring numpy into the daemon for it. The reader is defensive, because it runs
on files an operator imports from removable media: every count and length is
checked against what is left of the file before anything is allocated, so a hostile
or truncated header is a ``GgufError`` naming the problem, never a crash or a hang.

Format (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md), little-endian:

    "GGUF"  version:u32  tensor_count:u64  kv_count:u64
    kv_count x (key:str  type:u32  value)
    tensor_count x (name:str  n_dims:u32  dims:u64[n_dims]  type:u32  offset:u64)
    padding to general.alignment (32)  |  tensor data, each at its offset
"""

from __future__ import annotations

import functools
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

MAGIC = b"GGUF"
MAX_STRING = 1 << 20  # a key or a string value longer than 1 MiB is not a header
MAX_ARRAY = 1 << 26  # elements in one metadata array
MAX_DIMS = 8

# ggml tensor types: (elements per block, bytes per block). A type not listed here
# (newer than this reader) is sized by the distance to the next tensor.
TYPE_SIZES: dict[int, tuple[int, int]] = {
    0: (1, 4),
    1: (1, 2),
    2: (32, 18),
    3: (32, 20),
    6: (32, 22),
    7: (32, 24),
    8: (32, 34),
    9: (32, 36),
    10: (256, 84),
    11: (256, 110),
    12: (256, 144),
    13: (256, 176),
    14: (256, 210),
    15: (256, 292),
    16: (256, 66),
    17: (256, 74),
    18: (256, 98),
    19: (256, 50),
    20: (32, 18),
    21: (256, 110),
    22: (256, 82),
    23: (256, 136),
    24: (1, 1),
    25: (1, 2),
    26: (1, 4),
    27: (1, 8),
    28: (1, 8),
    29: (256, 56),
    30: (1, 2),
    34: (256, 54),
    35: (256, 66),
    39: (32, 17),
}

# llama.cpp's --cache-type-k/v values: bytes per element of the KV cache.
CACHE_TYPE_BYTES: dict[str, float] = {
    "f32": 4,
    "f16": 2,
    "bf16": 2,
    "q8_0": 34 / 32,
    "q5_1": 24 / 32,
    "q5_0": 22 / 32,
    "q4_1": 20 / 32,
    "q4_0": 18 / 32,
    "iq4_nl": 18 / 32,
}

# Metadata value types: struct format of the scalar ones.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class Strings(int):
    """A metadata array of strings, by its length (the text is not kept)."""


class GgufError(Exception):
    """Not a usable GGUF file; the message says what is wrong with it."""


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[int, ...]
    type: int
    offset: int  # from the start of the data section
    nbytes: int


@dataclass(frozen=True)
class GgufFile:
    path: Path
    version: int
    metadata: dict
    tensors: tuple[Tensor, ...]
    data_offset: int  # where the tensor data starts in the file
    file_size: int

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def arch(self, key: str, default=None):
        return self.metadata.get(f"{self.architecture}.{key}", default)

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


@dataclass(frozen=True)
class GgufShape:
    """What sizing a llama.cpp replica needs."""

    architecture: str
    layers: int
    context_length: int  # the model's trained context
    embedding: int
    feed_forward: int  # the widest layer's
    heads: int
    kv_heads: tuple[int, ...]  # per layer (GGUF may give one number or one per layer)
    key_length: int
    value_length: int
    vocab: int
    tensor_bytes: int

    def kv_bytes_per_token(self, cache_type_k: str = "f16", cache_type_v: str = "f16") -> float:
        k, v = CACHE_TYPE_BYTES[cache_type_k], CACHE_TYPE_BYTES[cache_type_v]
        return sum(h * (self.key_length * k + self.value_length * v) for h in self.kv_heads)


class _Reader:
    def __init__(self, f, size: int) -> None:
        self.f, self.size = f, size

    @property
    def left(self) -> int:
        return self.size - self.f.tell()

    def take(self, n: int, what: str) -> bytes:
        if n > self.left:
            raise GgufError(
                f"truncated: {what} needs {n} bytes at offset {self.f.tell()}, the file ends {self.left} bytes later"
            )
        return self.f.read(n)

    def scalar(self, fmt: str, what: str):
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.scalar("Q", what)
        if n > MAX_STRING:
            raise GgufError(f"{what}: a string of {n} bytes (at most {MAX_STRING})")
        return self.take(n, what).decode("utf-8", errors="replace")

    def value(self, vtype: int, what: str):
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            etype, count = self.scalar("I", what), self.scalar("Q", what)
            if count > MAX_ARRAY or count > self.left:
                raise GgufError(f"{what}: an array of {count} elements does not fit in the file")
            if etype in _SCALARS:  # read in one go: a vocabulary's scores are 150k floats
                fmt = _SCALARS[etype]
                return list(struct.unpack(f"<{count}{fmt}", self.take(count * struct.calcsize(fmt), what)))
            if etype == _ARRAY:
                raise GgufError(f"{what}: nested arrays are not part of GGUF")
            if etype == _STRING:  # a vocabulary: only its size is wanted, its text skipped
                for _ in range(count):
                    n = self.scalar("Q", what)
                    if n > MAX_STRING or n > self.left:
                        raise GgufError(f"truncated: {what} holds a string of {n} bytes")
                    self.f.seek(n, os.SEEK_CUR)
                return Strings(count)
            raise GgufError(f"{what}: an array of unknown type {etype}")
        raise GgufError(f"{what}: unknown value type {vtype}")


def read(path: str | Path) -> GgufFile:
    """The header of the GGUF file at path; GgufError if it is not a whole GGUF file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return read_open(path, f)
    except OSError as exc:
        raise GgufError(f"cannot read {path}: {exc.strerror or exc}") from None


def read_open(path: Path, f: BinaryIO) -> GgufFile:
    """The header of f, a GGUF file already opened (and checked) as path."""
    try:
        f.seek(0)
        return _parse(path, _Reader(f, os.fstat(f.fileno()).st_size))
    except OSError as exc:
        raise GgufError(f"cannot read {path}: {exc.strerror or exc}") from None


def _parse(path: Path, r: _Reader) -> GgufFile:
    if r.size < 24 or r.take(4, "the magic") != MAGIC:
        raise GgufError("not a GGUF file (it does not start with 'GGUF')")
    version = r.scalar("I", "the version")
    if version not in (2, 3):
        raise GgufError(f"GGUF version {version} is not supported (2 or 3)")
    n_tensors, n_kv = r.scalar("Q", "the tensor count"), r.scalar("Q", "the metadata count")
    if n_tensors > r.left // 24 or n_kv > r.left // 12:
        raise GgufError(f"header claims {n_tensors} tensors and {n_kv} metadata entries: more than the file can hold")
    metadata: dict = {}
    for i in range(n_kv):
        key = r.string(f"metadata key #{i}")
        metadata[key] = r.value(r.scalar("I", key), key)
    infos = []
    for i in range(n_tensors):
        name = r.string(f"tensor name #{i}")
        n_dims = r.scalar("I", name)
        if not 1 <= n_dims <= MAX_DIMS:
            raise GgufError(f"tensor {name}: {n_dims} dimensions")
        shape = tuple(r.scalar("Q", name) for _ in range(n_dims))
        infos.append((name, shape, r.scalar("I", name), r.scalar("Q", name)))
    alignment = metadata.get("general.alignment", 32) or 32
    if not isinstance(alignment, int) or alignment < 1 or alignment & (alignment - 1):
        raise GgufError(f"general.alignment {alignment} is not a power of two")
    data_offset = -(-r.f.tell() // alignment) * alignment
    tensors = _sized(infos, r.size - data_offset)
    end = max((t.offset + t.nbytes for t in tensors), default=0)
    if tensors and data_offset + end > r.size:
        raise GgufError(f"truncated: the tensors end at byte {data_offset + end}, the file has {r.size}")
    return GgufFile(path, version, metadata, tensors, data_offset, r.size)


def _sized(infos, data_bytes: int) -> tuple[Tensor, ...]:
    """Each tensor's bytes from its type, or, for a type this reader does not know, the
    distance to the next tensor's data (the end of the file for the last one)."""
    starts = sorted({offset for *_, offset in infos} | {data_bytes})
    out = []
    for name, shape, ttype, offset in infos:
        elements = 1
        for d in shape:
            elements *= d
        if ttype in TYPE_SIZES:
            block, nbytes = TYPE_SIZES[ttype]
            if elements % block:
                raise GgufError(
                    f"tensor {name}: {elements} elements is not a whole number of "
                    f"{block}-element blocks of type {ttype}"
                )
            size = elements // block * nbytes
        else:
            size = next(s for s in starts if s > offset) - offset if offset < data_bytes else 0
        out.append(Tensor(name, shape, ttype, offset, size))
    return tuple(out)


def shape(g: GgufFile) -> GgufShape:
    """The numbers a memory estimate needs; GgufError naming the first one missing."""
    try:
        return _shape(g)
    except (TypeError, ValueError) as exc:  # a number of the wrong type
        raise GgufError(f"{g.architecture or 'the header'}: a shape field is not a number ({exc})") from None


def _shape(g: GgufFile) -> GgufShape:
    arch = g.architecture
    if not arch:
        raise GgufError("no general.architecture in the header")

    def need(key: str) -> int:
        value = g.arch(key)
        if value is None or isinstance(value, (str, list, Strings)):
            raise GgufError(f"no {arch}.{key} in the header")
        return int(value)

    layers, embedding, heads = need("block_count"), need("embedding_length"), need("attention.head_count")
    if min(layers, embedding, heads) <= 0:
        raise GgufError(f"{arch}: block_count, embedding_length and head_count must be positive")
    kv = g.arch("attention.head_count_kv", heads)
    kv_heads = tuple(int(h) for h in kv) if isinstance(kv, list) else (int(kv),) * layers
    if len(kv_heads) != layers:
        raise GgufError(f"{arch}.attention.head_count_kv lists {len(kv_heads)} layers, block_count is {layers}")
    key_length = int(g.arch("attention.key_length", embedding // heads))
    value_length = int(g.arch("attention.value_length", embedding // heads))
    vocab = int(g.arch("vocab_size", g.metadata.get("tokenizer.ggml.tokens", 0)))
    ff = g.arch("feed_forward_length", 4 * embedding)
    feed_forward = max((int(x) for x in ff), default=0) if isinstance(ff, list) else int(ff)
    return GgufShape(
        architecture=arch,
        layers=layers,
        context_length=int(g.arch("context_length", 0)),
        embedding=embedding,
        feed_forward=feed_forward,
        heads=heads,
        kv_heads=kv_heads,
        key_length=key_length,
        value_length=value_length,
        vocab=vocab,
        tensor_bytes=g.tensor_bytes,
    )


def read_shape(path: str | Path) -> GgufShape:
    """shape(read(path)), remembered while the file's size and mtime stay the same
    (the placer asks for every replica it places)."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError as exc:
        raise GgufError(f"cannot read {path}: {exc.strerror or exc}") from None
    return _cached_shape(path, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _cached_shape(path: Path, size: int, mtime_ns: int) -> GgufShape:
    return shape(read(path))
