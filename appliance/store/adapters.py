"""LoRA adapters on disk: what makes a file or directory an adapter (the store records
its kind), its rank, and the checks an adapter's path passes before an engine is
handed it: the same rules as the store's imports (no link at its end, no link that
leaves its tree, regular files only).

Two shapes, as the engines take them:

* a PEFT directory (``adapter_config.json`` beside ``adapter_model.safetensors``):
  vLLM and SGLang;
* a LoRA GGUF file (``general.type = "adapter"``, ``adapter.type = "lora"``):
  llama-server's ``--lora``.
"""

from __future__ import annotations

import io
import json
import os
import stat
from pathlib import Path

from appliance.safe_paths import StoreError, identity, open_regular
from appliance.store import gguf

ADAPTER = "adapter"
MODEL = "model"
PEFT_CONFIG = "adapter_config.json"
# An adapter's config is a few hundred bytes; one this large is not one.
MAX_CONFIG_BYTES = 1 << 20


def kind_of(paths: list[str], gguf_type: str | None = None) -> str:
    """ADAPTER for a PEFT adapter's files (its config at the top) or a GGUF whose
    general.type says adapter; else MODEL."""
    if PEFT_CONFIG in paths or gguf_type == ADAPTER:
        return ADAPTER
    return MODEL


def gguf_type(path: Path, st: os.stat_result) -> str | None:
    """A GGUF file's general.type ("model", "adapter"), None when it has none."""
    try:
        with io.BufferedReader(open_regular(path, identity(st))) as f:
            found = gguf.read_open(path, f).metadata.get("general.type")
    except (gguf.GgufError, StoreError):
        return None
    return found if isinstance(found, str) else None


def checked_path(path: Path) -> Path:
    """An adapter's path, checked before an engine loads it: a regular LoRA GGUF file,
    or a PEFT directory every file of which is a regular file inside it (a link that
    stays inside the tree is allowed, as in a hub snapshot); StoreError saying why not."""
    try:
        st = path.lstat()
    except OSError as exc:
        raise StoreError(f"{path}: {exc.strerror or exc}") from None
    if stat.S_ISLNK(st.st_mode):
        raise StoreError(f"{path}: a link (to {os.readlink(path)}); name the adapter itself, links are not followed")
    if stat.S_ISREG(st.st_mode):
        if gguf_type(path, st) != ADAPTER:
            raise StoreError(f"{path}: not a LoRA GGUF adapter (its general.type is not 'adapter')")
        return path
    if not stat.S_ISDIR(st.st_mode):
        raise StoreError(f"{path}: not a file or directory")
    _check_tree(path)
    if not (path / PEFT_CONFIG).is_file():
        raise StoreError(f"{path}: no {PEFT_CONFIG}: not a PEFT LoRA adapter directory")
    return path


def _check_tree(root: Path) -> None:
    real_root = root.resolve()
    for folder, dirs, files in os.walk(root, followlinks=False):
        for name in dirs + files:
            entry = Path(folder) / name
            try:
                st = entry.lstat()
                if stat.S_ISLNK(st.st_mode):
                    target = entry.resolve()
                    if not target.is_relative_to(real_root):
                        raise StoreError(
                            f"{entry}: a link out of the adapter's directory (to {target}); copy the file in"
                        )
                    st = target.stat()
            except (OSError, RuntimeError) as exc:  # a dangling link, a link loop, a file gone
                raise StoreError(f"{entry}: {getattr(exc, 'strerror', None) or exc}") from None
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
                raise StoreError(f"{entry}: not a regular file")


def rank(path: Path) -> int:
    """The adapter's rank (PEFT's "r"), 0 when it does not say (a GGUF)."""
    if not path.is_dir():
        return 0
    try:
        with open_regular(path / PEFT_CONFIG) as f:
            config = json.loads(f.read(MAX_CONFIG_BYTES))
    except (StoreError, ValueError):
        return 0
    r = config.get("r") if isinstance(config, dict) else None
    return r if isinstance(r, int) and r > 0 else 0
