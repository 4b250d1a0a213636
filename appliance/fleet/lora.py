"""LoRA adapters served as model names ([[models.adapters]]): each adapter is a model
name clients request, served by its base model's replicas (the base deployment's
cold start and hold queue, its keys, routes, budgets and audit under the adapter's
own name).

This module owns what differs for an adapter:

* which adapters a base's replicas load (``resolve``): a store adapter passes the
  store's admission like weights (present, not quarantined, license allowed or
  accepted, recorded as an adapter) and is leased; a path passes the store's link
  rules (appliance/store/adapters.py). One that does not is left out and its name
  answers 503 with the reason; the base and its other adapters are served;
* what the engine is sent for a name (``LoraServing.fields``): vLLM and SGLang know
  each adapter by its own name (``--lora-modules NAME=PATH``); llama-server knows
  only the base's name and picks adapters per request from its "lora" field, which
  is always set, for the base too, so a client's own "lora" never reaches it; SGLang's
  "lora_path" likewise (it applies the adapter that field names);
* the prefix index's seed per name (``LoraServing.seed``): an adapter changes every
  token's KV, so two names never share a cached prefix;
* whether a reload's new adapter set needs a restart (``adapters_changed``), and
  giving a running vLLM replica the new set when it does not (``apply_live``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Literal

import xxhash

from appliance.config import STORE_PREFIX, Config, LoraAdapterConfig, ModelConfig
from appliance.errors import BadRequest
from appliance.safe_paths import StoreError
from appliance.store import adapters as on_disk
from appliance.store.store import Store
from engines import Lora, ProbeFailed, adapter_for
from engines.llamacpp import lora_selection
from engines.vllm import VllmAdapter

if TYPE_CHECKING:
    from collections.abc import Callable

    from appliance.fleet.replica import Replica

log = logging.getLogger("appliance.lora")

# Engines that load and unload adapters in a running replica (vLLM's
# /v1/load_lora_adapter with VLLM_ALLOW_RUNTIME_LORA_UPDATING, which engines/vllm.py
# sets whenever a model has adapters). llama-server's /lora-adapters sets scales only,
# SGLang's needs flags we do not pin: a changed set restarts their replicas.
LIVE_ENGINES = ("vllm",)


@dataclass
class LoraServing:
    """A base deployment's adapters: those its replicas load, those refused and why,
    and each served name's engine fields."""

    base: str
    loras: tuple[Lora, ...] = ()
    refused: dict[str, str] = field(default_factory=dict)  # adapter name -> why it is not served
    leases: dict[str, BinaryIO] = field(default_factory=dict)  # store name -> lease
    blind: frozenset[str] = frozenset()  # endpoints that cannot apply an adapter (engines/)
    stored: dict[str, str] = field(default_factory=dict)  # adapter name -> its store entry
    _fields: dict[str, dict] = field(default_factory=dict)
    _seeds: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, model: ModelConfig, loras: tuple[Lora, ...], refused: dict[str, str]) -> LoraServing:
        serving = cls(model.name, loras, refused, blind=adapter_for(model.server).lora_blind)
        names = tuple(lora.name for lora in loras)
        for name in (model.name, *names):
            chosen = None if name == model.name else name
            if model.server == "llamacpp":
                serving._fields[name] = {"model": model.name, "lora": lora_selection(names, chosen)}
            elif model.server == "sglang":
                # SGLang applies the adapter its "lora_path" names (a name from --lora-paths),
                # not the one "model" names: always set, so a client's own never picks one.
                serving._fields[name] = {"model": name, "lora_path": chosen}
            else:
                serving._fields[name] = {"model": name}
            serving._seeds[name] = xxhash.xxh3_64_intdigest(name.encode()) if chosen else 0
        return serving

    def fields(self, served: str, sent: str, endpoint: str) -> dict:
        """What to set in a body whose "model" is sent, for a request served as served
        (the base's or an adapter's name): "model" only where it differs. An adapter on
        an endpoint its engine cannot apply it on is a 400, never the base's answer."""
        if endpoint in self.blind and served != self.base:
            raise BadRequest(
                f"Model '{served}' is a LoRA adapter of '{self.base}', which its engine cannot "
                f"apply on this endpoint ({endpoint}); use /v1/chat/completions or /v1/completions",
                param="model",
                code="endpoint_not_supported",
            )
        wanted = self._fields[served]
        return {k: v for k, v in wanted.items() if k != "model" or v != sent}

    def block_store(self, store_name: str, reason: str) -> None:
        """A store entry failed a check (the scrubber found it changed): the adapters
        loaded from it are not served any more (503 with the reason) until a restart."""
        for name, entry in self.stored.items():
            if entry == store_name:
                self.refused[name] = f"adapter '{name}' of model '{self.base}' is not served: {reason}"

    def seed(self, served: str) -> int:
        """The prefix index's seed for a name (0: the base's), mixed into the tenant's."""
        return self._seeds.get(served, 0)


def resolve(cfg: Config, model: ModelConfig, open_store: Callable[[], Store]) -> LoraServing:
    """The adapters model's replicas load, checked now (at boot; a reload resolves again)."""
    loras: list[Lora] = []
    refused: dict[str, str] = {}
    leases: dict[str, BinaryIO] = {}
    stores: dict[str, str] = {}
    store: Store | None = None
    try:
        for a in model.adapters:
            stored = a.source[len(STORE_PREFIX) :] if a.source.startswith(STORE_PREFIX) else None
            try:
                if stored is not None:
                    store = store or open_store()
                    path = _from_store(store, stored)
                else:
                    _check_declared_license(cfg, a)
                    path = on_disk.checked_path(_local_path(cfg, a.source))
                _check_fits(model, path)
            except StoreError as exc:
                refused[a.name] = f"adapter '{a.name}' of model '{model.name}' is not served: {exc}"
                log.error("%s", refused[a.name])
                continue
            if store is not None and stored is not None and stored not in leases:
                leases[stored] = store.lease(stored)  # eviction and `models rm` leave it alone
            if stored is not None:
                stores[a.name] = stored
            loras.append(Lora(a.name, path, on_disk.rank(path)))
    finally:
        if store is not None:
            store.close()
    serving = LoraServing.of(model, tuple(loras), refused)
    serving.leases, serving.stored = leases, stores
    return serving


def _from_store(store: Store, name: str) -> Path:
    """A store adapter's files, if the store's admission lets them be served."""
    reason = store.admission(name, hash_changed=False)
    if reason:
        raise StoreError(reason)
    record = store.need(name)
    if record.kind != on_disk.ADAPTER:
        raise StoreError(f"store entry '{name}' is a model, not a LoRA adapter")
    return store.model_path(record)


def _check_fits(model: ModelConfig, path: Path) -> None:
    """The adapter's shape is the one its base's engine loads."""
    if model.server != "llamacpp":
        if not path.is_dir():
            raise StoreError(f"{path}: a LoRA GGUF is for llamacpp; {model.server} loads a PEFT adapter directory")
    elif path.is_dir():
        raise StoreError(f"{path}: a PEFT directory; llamacpp loads a LoRA GGUF file")
    elif any(c in str(path) for c in ",:"):
        raise StoreError(f"{path}: llama-server's --lora-scaled cannot take a path with ',' or ':'")


def _check_declared_license(cfg: Config, a: LoraAdapterConfig) -> None:
    """A path adapter whose declared license the box does not allow is not served (the
    store's rule: accepting one is `appliance models import` then `accept-license`)."""
    allowed = {lic.lower() for lic in cfg.store.allowed_licenses}
    if a.license and a.license.lower() not in allowed:
        raise StoreError(
            f"its license {a.license} is not in store.allowed_licenses; import it into the store "
            f"(`appliance models import {a.source}`) and `appliance models accept-license` it, or allow the license"
        )


def _local_path(cfg: Config, source: str) -> Path:
    path = Path(source).expanduser()
    return path if path.is_absolute() else Path(cfg.paths.cache_dir) / "models" / path


def adapters_changed(old: ModelConfig, new: ModelConfig) -> Literal["live", "restart"]:
    """For a reload's config diff: can a base model's running replicas take new's
    adapters in place of old's? "live" when the adapters are the same, or when the engine
    loads and unloads adapters at run time (vLLM) and its replicas run with LoRA on (the
    old set was not empty) and stay so (the new one is not either); "restart" otherwise
    (the replicas roll, as for any changed engine argument). The caller compares the rest
    of the model itself. A live load the engine refuses (an adapter of a rank above the
    replica's --max-lora-rank) must fall back to a restart. A store adapter new to the set
    is a restart too: a running engine may read of the store only the files it started
    with (fleet/landlock.store_reads)."""
    if old.adapters == new.adapters:
        return "live"
    if old.server != new.server or new.server not in LIVE_ENGINES or not old.adapters or not new.adapters:
        return "restart"  # LoRA switched on or off is an engine flag
    if {a.source for a in new.adapters if a.source.startswith(STORE_PREFIX)} - {a.source for a in old.adapters}:
        return "restart"
    return "live"


async def apply_live(replica: Replica, new: tuple[Lora, ...], timeout: float = 60.0) -> None:
    """Give a running replica a new adapter set without a restart (adapters_changed said
    "live"): the adapters gone are unloaded, the new ones loaded; its next start loads
    the new set whatever happens here. A replica not serving takes it at that start.
    ProbeFailed when the engine refuses (say, an adapter's rank above the replica's
    --max-lora-rank): the caller restarts the replica instead."""
    old = {lora.name: lora for lora in replica.loras}
    wanted = {lora.name: lora for lora in new}
    replica.loras = new
    session, base_url, engine = replica.session, replica.base_url, replica.adapter
    if session is None or not base_url or old == wanted:
        return
    if not isinstance(engine, VllmAdapter):
        raise ProbeFailed(f"{engine.name} cannot load or unload LoRA adapters at run time")
    for name in old.keys() - wanted.keys():
        await engine.unload_lora(session, base_url, name, timeout)
    for name, lora in wanted.items():
        if old.get(name) != lora:
            if name in old:  # another path under the same name
                await engine.unload_lora(session, base_url, name, timeout)
            await engine.load_lora(session, base_url, lora, timeout)
