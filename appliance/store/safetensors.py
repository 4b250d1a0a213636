"""Is a safetensors checkpoint whole? Its header, and the files a sharded one's index
names: checked at import, so that a model directory copied in part from offline media is
refused there, naming the file, instead of failing minutes later in the engine's load.

A .safetensors file is an 8-byte little-endian header length, that many bytes of JSON
(each tensor's dtype, shape and [begin, end) data offsets), then the data: the file is
whole when it ends where the last tensor does. Only the header is read."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

# safetensors refuses headers above 100 MB itself; so does this check, before reading one.
HEADER_MAX = 100 * 1024 * 1024
INDEX_SUFFIX = ".safetensors.index.json"


class SafetensorsError(ValueError):
    """Why a safetensors file, or a sharded checkpoint's set of files, is not whole."""


def check_file(path: Path) -> None:
    """SafetensorsError unless path holds a readable header and exactly the data it
    describes. A file that does not begin as safetensors does (a header length, then "{")
    is not judged: what it is, is the engine's to say, as before this check."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(9)
        if len(head) < 9:
            raise SafetensorsError(f"truncated: {size} bytes, not even a header")
        (length,) = struct.unpack("<Q", head[:8])
        if length > HEADER_MAX or head[8:9] != b"{":
            return
        f.seek(8)
        if 8 + length > size:
            raise SafetensorsError(f"truncated: the header ends at byte {8 + length}, the file has {size}")
        try:
            header = json.loads(f.read(length))
        # (ValueError: JSONDecodeError, and a number past int's digit limit; RecursionError:
        # arrays nested past the parser's depth. The file is the media's, or a hub repo's.)
        except (ValueError, RecursionError) as exc:
            raise SafetensorsError(f"its header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise SafetensorsError("its header is not a JSON object")
    end = 0
    for name, tensor in header.items():
        if name == "__metadata__":
            continue
        offsets = tensor.get("data_offsets") if isinstance(tensor, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise SafetensorsError(f"tensor {name!r} has no [begin, end] data_offsets")
        end = max(end, offsets[1])
    expected = 8 + length + end
    if size < expected:
        raise SafetensorsError(f"truncated: the tensors end at byte {expected}, the file has {size}")
    if size > expected:
        raise SafetensorsError(f"{size - expected} bytes past the last tensor (byte {expected}): not as written")


def missing_shards(index: Path, index_path: str, present: Iterable[str]) -> list[str]:
    """The shard files a sharded checkpoint's index (model.safetensors.index.json, read from
    index; index_path: where it sits in the model, as present names files) names that are
    not among present."""
    try:
        weight_map = json.loads(index.read_text()).get("weight_map", {})
    except (OSError, ValueError, RecursionError, AttributeError) as exc:  # (as the header's, above)
        raise SafetensorsError(f"unreadable index: {exc}") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise SafetensorsError("its weight_map is not an object of file names")
    folder = PurePosixPath(index_path).parent  # the index sits beside its shards
    return sorted({str(folder / shard) for shard in weight_map.values()} - set(present))
