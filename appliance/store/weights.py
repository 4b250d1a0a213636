"""The weights a model deployment loads, as a path (builtin:NAME, store:NAME or a path), and
why a llama.cpp model's weights cannot be served (``unusable_weights``).
"""

from __future__ import annotations

from pathlib import Path

from appliance.config import BUILTIN_PREFIX, STORE_PREFIX, Config, ModelConfig, builtin_model_path
from appliance.safe_paths import StoreError
from appliance.store.store import Store


def model_path(cfg: Config, model: ModelConfig) -> Path | None:
    """The weights a model deployment loads (builtin:NAME, store:NAME or a path), or None for
    engines that bring their own."""
    if not model.source:
        return None
    if model.source.startswith(BUILTIN_PREFIX):
        return builtin_model_path(model.source[len(BUILTIN_PREFIX) :])
    if model.source.startswith(STORE_PREFIX):
        return _resolve(cfg, model.source[len(STORE_PREFIX) :])
    path = Path(model.source).expanduser()
    if not path.is_absolute():
        path = Path(cfg.paths.cache_dir) / "models" / path
    return path


def unusable_weights(cfg: Config, model: ModelConfig) -> str | None:
    """Why a llama.cpp model's weights, a file path or builtin:NAME, cannot be served, or
    None: missing, or not a whole GGUF. `serve` refuses to start on it and a reload refuses
    the file, rather than crash-loop an engine that says only "exit code 1" (a store:NAME
    model is checked by the supervisor, which marks it FATAL with the reason)."""
    if model.server != "llamacpp" or model.source.startswith(STORE_PREFIX):
        return None
    path = model_path(cfg, model)
    if path is None:
        return None
    if not path.is_file():
        return f"weights not found at {path}"
    from appliance.store.gguf import GgufError, read_shape

    try:
        read_shape(path)
    except GgufError as exc:
        return f"{path} is not a usable GGUF file: {exc}"
    return None


def _resolve(cfg: Config, name: str) -> Path:
    """The path a store:NAME source loads."""
    store = Store.from_config(cfg)
    try:
        record = store.get(name)
    except StoreError:
        record = None
    if record is None:
        return store.root / "not-in-store" / name.replace("/", "--")
    return store.model_path(record)
