"""The store's budget (store.budget_gib): which models an import evicts to fit, least
recently used first. Bytes count once per sha256: content already in the store costs
nothing more, and evicting a model frees only the blobs no other model keeps. Pinned
models and models in use (a replica's lease) are never evicted."""

from __future__ import annotations

from collections.abc import Callable

from appliance.safe_paths import StoreError
from appliance.store.records import ModelRecord


def evictions(
    models: list[ModelRecord], incoming: dict[str, int], budget_bytes: int, in_use: Callable[[str], bool], name: str
) -> list[ModelRecord]:
    """The models to evict, in order, so that incoming (sha256 -> size) fits the budget;
    a StoreError saying why when evicting every evictable one would not do."""
    used = unique_bytes(models)
    needed = sum(size for digest, size in incoming.items() if digest not in _digests(models))
    if used + needed <= budget_bytes:
        return []
    candidates = sorted(
        (m for m in models if not m.pinned and not in_use(m.name)),
        key=lambda m: m.last_used_at or m.imported_at,
    )
    plan: list[ModelRecord] = []
    freed = 0
    for m in candidates:
        if used - freed + needed <= budget_bytes:
            break
        plan.append(m)
        kept = [k for k in models if k not in plan]
        freed = used - unique_bytes(kept)
        needed = sum(size for digest, size in incoming.items() if digest not in _digests(kept))
    if used - freed + needed > budget_bytes:
        raise StoreError(
            f"not enough room for '{name}': it needs {gib(needed)}, the store budget is "
            f"{gib(budget_bytes)} with {gib(used)} used and only {gib(freed)} evictable "
            "(pinned or in use models are kept); raise store.budget_gib or rm a model"
        )
    return plan


def unique_bytes(models: list[ModelRecord]) -> int:
    """What the models take on disk: each sha256 once."""
    return sum({f["sha256"]: f["size"] for m in models for f in m.files}.values())


def _digests(models: list[ModelRecord]) -> set[str]:
    return {f["sha256"] for m in models for f in m.files}


def gib(n: int) -> str:
    return f"{n / 1024**3:.2f} GiB" if n >= 1024**3 else f"{n / 1024**2:.1f} MiB"
