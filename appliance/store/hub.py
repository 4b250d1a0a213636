"""`appliance models pull`: a model hub download into the store, on a connected machine only.

huggingface_hub is optional (`pip install appliance[hub]`) and imported only here.
Downloads go to <hub>/.downloads/<repo>@<ref>, which survives an interrupted
pull (huggingface_hub resumes the partial files there); the store import then
verifies and publishes the snapshot atomically. The repo, the ref and the store name
are checked (appliance/safe_paths.py) before anything is downloaded or written: a ref
with slashes (refs/pr/1) is %-encoded in the download folder's name and its snapshot is
named by its content.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from appliance.safe_paths import StoreError, check_name, download_folder, snapshot_revision
from appliance.store.records import ModelRecord, repo_folder
from appliance.store.sources import from_directory
from appliance.store.store import Store

Downloader = Callable[..., str]


def _snapshot_download(**kwargs) -> str:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise StoreError("models pull needs huggingface_hub: pip install 'appliance[hub]'") from None
    return snapshot_download(**kwargs)


def pull(
    cfg, store: Store, spec: str, *, name: str | None = None, download: Downloader = _snapshot_download
) -> ModelRecord:
    if cfg.store.offline:
        raise StoreError(
            "models pull is refused: this appliance is offline (store.offline = true, the "
            "default); bring the model on offline media and `appliance models import PATH`, "
            "or set [store] offline = false on a connected machine"
        )
    repo, _, revision = spec.partition("@")
    check_name(repo)
    if name is not None:
        check_name(name)
    target = store.download_dir(download_folder(repo_folder(repo), revision or "main"))
    kwargs = {"repo_id": repo, "revision": revision or None, "local_dir": str(target)}
    if cfg.store.hub_endpoint:
        kwargs["endpoint"] = cfg.store.hub_endpoint
    try:
        local = Path(download(**kwargs))
    except StoreError:
        raise
    except Exception as exc:  # the hub client's errors: network, auth, not found
        raise StoreError(f"pull of {spec} failed (rerun to resume): {type(exc).__name__}: {exc}") from None
    incoming = from_directory(local, name or repo)
    incoming.source = f"hub:{spec}"
    incoming.revision = snapshot_revision(revision) if revision else None
    record, _ = store.add(incoming)
    store.discard(target)
    return record
