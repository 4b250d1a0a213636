"""Config reload: the file read and validated again, and what changed applied while
the daemon serves (SIGHUP, `appliance reload`, POST /admin/reload, the TUI's key).

    read + validate (config.load_config, as at start) ── invalid ─▶ refused, nothing changes
      ─▶ a setting that cannot change live (listen port, state dir...) ─▶ refused, naming it
      ─▶ the new gateway policy built whole: routes, providers (their key files read),
         tenancy; the regulated check run on it ── fails ─▶ refused, nothing changes
      ─▶ one synchronous step (no await: no request runs in between):
           the policy swapped (Gateway.adopt), models added, removed (draining: stopped
           once their requests end), live model settings (autoscaling, priority,
           default_max_tokens) set
      ─▶ models whose engine settings changed roll in the background, one replica at
         a time (Supervisor.roll): a new replica READY before the old one drains

A request keeps what it was admitted with (its key, limits, route and fallbacks);
sending to a provider is checked against the live policy when it goes
(gateway/routing.forward): a route a reload made regulated, or a provider it
removed, gets nothing from then on, from a request admitted before too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import msgspec

from appliance.access.tenancy import Tenancy
from appliance.config import Config, ConfigError, ModelConfig
from appliance.errors import ApplianceError, ShuttingDown
from appliance.fleet import lora, rollout
from appliance.gateway.providers import Provider, load_providers
from appliance.gateway.routing import Routes
from appliance.status import ReloadReport
from appliance.store.weights import unusable_weights

if TYPE_CHECKING:
    from appliance.api.app import Runtime

log = logging.getLogger("appliance.reload")

# Settings outside [[models]], [[routes]] and [[providers]] that a reload applies:
# each is read where it is used, per request or per autoscaler tick. Any other
# (listen address, paths, audit database, engines, store...) needs a restart.
LIVE_SETTINGS = frozenset(
    {
        "server.max_body_bytes",
        "server.max_upload_bytes",
        "server.body_read_timeout_s",
        "server.send_timeout_s",
        "server.drain_timeout_s",
        "server.trusted_proxies",
        "server.forwarded_header",
        "server.media_url_prefixes",  # read at each request (gateway/media_urls.py)
        "upstream.max_answer_bytes",
        "queue.max_held",
        "queue.timeout_s",
        "queue.keepalive_s",
        "autoscaling.idle_ttl",
        "autoscaling.stabilization_s",
        "autoscaling.cooldown_s",
        "autoscaling.min_residency",
        # The capacity market reads these at each decision (appliance/fleet/fairness.py,
        # headroom.py, capacity.py); held requests look for room again once they change.
        "capacity.max_wait_before_preempt_s",
        "capacity.headroom_idle_s",
        "capacity.host_ram_gib",
        "routing.tag_header",
        "routing.tenant_isolation",
        "routing.prefix_aware",
        "keys.required",
        "audit.include_text",
    }
)
# The tables a reload diffs one by one, and what it does not compare.
_LISTS = ("models", "routes", "providers")
_NOT_SETTINGS = ("origin", "deprecations")
# A model's settings that change without restarting its replicas (read from the
# deployment, not the engine's command line); any other change rolls its replicas.
MODEL_LIVE = frozenset({"autoscaling", "priority", "default_max_tokens"})
# (and "adapters" where fleet/lora.adapters_changed says the engine swaps them live)


class ReloadRefused(ApplianceError):
    """The new config is invalid, or changes what only a restart may: nothing changed."""

    status = 400
    error_type = "invalid_request_error"
    code = "config_refused"


class ModelDiff(msgspec.Struct, frozen=True):
    """What a reload does to the models: by name, and what changed in each."""

    added: list[ModelConfig]
    removed: list[str]
    rolled: dict[str, list[str]]  # engine settings changed: its replicas are replaced
    updated: dict[str, list[str]]  # live settings only


def changed_fields(old: msgspec.Struct, new: msgspec.Struct) -> list[str]:
    """Dotted names of the fields whose values differ (nested tables walked)."""
    a, b = msgspec.to_builtins(old, enc_hook=str), msgspec.to_builtins(new, enc_hook=str)  # str: a Duration
    return _differences(a, b, "")


def _differences(a: object, b: object, at: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for name in sorted(set(a) | set(b)):
            out += _differences(a.get(name), b.get(name), f"{at}.{name}" if at else name)
        return out
    return [] if a == b else [at]


def restart_only(old: Config, new: Config) -> list[str]:
    """The changed settings a running daemon cannot take (outside models, routes, providers)."""
    skip = (*_LISTS, *_NOT_SETTINGS)
    return [f for f in changed_fields(old, new) if f.split(".")[0] not in skip and f not in LIVE_SETTINGS]


def diff_models(old: list[ModelConfig], new: list[ModelConfig]) -> ModelDiff:
    before, after = {m.name: m for m in old}, {m.name: m for m in new}
    rolled, updated = {}, {}
    for name in before.keys() & after.keys():
        fields = changed_fields(before[name], after[name])
        # LoRA adapters swap in place on an engine that loads them at run time (vLLM).
        live = MODEL_LIVE | ({"adapters"} if lora.adapters_changed(before[name], after[name]) == "live" else set())
        if any(f.split(".")[0] not in live for f in fields):
            rolled[name] = fields
        elif fields:
            updated[name] = fields
    return ModelDiff(
        added=[m for m in new if m.name not in before],
        removed=[n for n in before if n not in after],
        rolled=dict(sorted(rolled.items())),
        updated=dict(sorted(updated.items())),
    )


def diff_named(kind: str, old: list, new: list) -> list[str]:
    """Routes or providers added, removed or changed, in words."""
    before, after = {x.name: x for x in old}, {x.name: x for x in new}
    lines = [f"{kind} {n}: added" for n in after if n not in before]
    lines += [f"{kind} {n}: removed" for n in before if n not in after]
    for n in before.keys() & after.keys():
        if fields := changed_fields(before[n], after[n]):
            lines.append(f"{kind} {n}: {', '.join(fields)} changed")
    return sorted(lines)


def check_regulated(routes: Routes, providers: dict[str, Provider], origin: str) -> None:
    """The new policy, as it will run: no regulated route can reach a commercial provider
    (config validation says so of the file; this says so of the built objects)."""
    for route in routes.table.values():
        for name in route.fallbacks:
            provider = providers.get(name)
            if route.regulated and provider is not None and provider.commercial:
                raise ConfigError(
                    f"{origin}: field 'routes.{route.name}.fallbacks': route {route.name!r} is regulated "
                    f"and may not fall back to commercial provider {name!r}"
                )


def check_weights(cfg: Config, starting: set[str]) -> None:
    """The models a reload starts have weights an engine can load, as `serve` checks at start:
    a missing or cut file would otherwise take a serving model's place with an engine that
    exits at each start, saying only its exit code."""
    for i, m in enumerate(cfg.models):
        if m.name in starting and (problem := unusable_weights(cfg, m)):
            raise ConfigError(f"{cfg.origin}: field 'models[{i}].source': model '{m.name}': {problem}")


class ReloadNotices(Protocol):
    """Who hears that a reload started, and how it ended (appliance/daemon/service_manager.py)."""

    def reloading(self) -> None: ...

    def reloaded(self, text: str) -> None: ...


class _NoNotices:
    def reloading(self) -> None:
        pass

    def reloaded(self, text: str) -> None:
        pass


_NO_NOTICES = _NoNotices()


class Reloader:
    """The one owner of reloads. Each is applied in one synchronous step, so two never
    interleave; a model's roll finishes before a reload may change that model again."""

    def __init__(self, rt: Runtime, reread: Callable[[], Config]) -> None:
        self.rt = rt
        self.reread = reread  # the config as `appliance serve` reads it (its --config, --host, --port)
        self.rolling: dict[str, asyncio.Task[str]] = {}
        # Told of every reload, whoever asked (SIGHUP, POST /admin/reload: the CLI, the TUI):
        # the daemon's service manager (RELOADING=1, then READY=1 with what it did).
        self.notices: ReloadNotices = _NO_NOTICES

    async def reload(self, wait: bool = False) -> ReloadReport:
        """Apply the config file as it is now; wait: until the rolls it started end.
        An invalid file, or a change only a restart may make: ReloadRefused, and
        nothing changed. While the daemon shuts down: ShuttingDown."""
        if self.rt.draining:  # models added or rolled now would only be stopped again
            raise ShuttingDown("The appliance is shutting down: the config was not reloaded", retry_after=30)
        started = time.monotonic()
        self.notices.reloading()
        try:
            report = self._apply(self.reread())
        except ConfigError as exc:
            log.error("reload refused, nothing changed: %s", exc)
            self.notices.reloaded(f"reload refused, running the previous config: {exc}")
            raise ReloadRefused(str(exc)) from None
        except Exception:
            self.notices.reloaded("reload failed, running the previous config; see the log")
            raise
        self.notices.reloaded(f"config reloaded: {report.summary()}")
        rolls = {name: self.rolling[name] for name in report.rolling}
        if wait and rolls:
            await asyncio.wait(rolls.values())
            report.rolled = {name: _outcome(t) for name, t in rolls.items()}
            report.rolling = []
        report.seconds = round(time.monotonic() - started, 3)
        return report

    def _apply(self, new: Config) -> ReloadReport:
        """Everything checked first; then the change, in one step without an await."""
        rt, old = self.rt, self.rt.cfg
        refused = restart_only(old, new)
        if refused:
            raise ConfigError(
                f"{new.origin}: field '{refused[0]}' cannot change while the daemon runs: restart it "
                f"(systemctl restart appliance), or put the old value back to reload the rest"
                + (f" (also changed: {', '.join(refused[1:])})" if len(refused) > 1 else "")
            )
        models = diff_models(old.models, new.models)
        busy = sorted(n for n in (*models.rolled, *models.updated, *models.removed) if n in self.rolling)
        if busy:
            raise ConfigError(
                f"{new.origin}: field 'models.{busy[0]}': its replicas are still being replaced by the "
                "last reload; reload again once `appliance status` shows the roll done"
            )
        check_weights(new, {m.name for m in models.added} | models.rolled.keys())
        routes = Routes(new.routes)
        providers = load_providers(new)
        for name, p in providers.items():  # an unchanged provider keeps its circuit breaker
            if name in rt.providers and rt.providers[name].cfg == p.cfg:
                p.breaker = rt.providers[name].breaker
        check_regulated(routes, providers, new.origin)
        tenancy = rt.tenancy
        if new.routing.tenant_isolation != old.routing.tenant_isolation:
            tenancy = Tenancy(new.routing.tenant_isolation)

        # --- from here on, no await: requests see all of the old or all of the new
        rt.adopt(new, routes, providers, tenancy)
        rt.openapi = None  # its model list
        sup = rt.supervisor
        sup.cfg = sup.capacity.cfg = new
        by_name = {m.name: m for m in new.models}
        removing: dict[str, int] = {}
        for name in models.removed:
            dep = sup.deployments[name]
            removing[name] = dep.inflight + len(dep.waiters)  # what it finishes before it stops
            sup.remove_deployment(name)
        for name in models.updated:
            dep = sup.deployments[name]
            adapters_before, dep.model = dep.model.adapters, by_name[name]
            if dep.model.adapters != adapters_before:
                rollout.swap_adapters(sup, dep)
        failed = {}
        for m in models.added:
            try:
                sup.add_deployment(m)
            except Exception as exc:  # e.g. the store cannot be opened: said, the rest applied
                log.exception("reload: model %s could not be added", m.name)
                failed[m.name] = f"not added: {exc}"
        for name in models.rolled:
            self._start_roll(name, by_name[name])
        if changed_fields(old.capacity, new.capacity):
            sup.capacity_changed()
        report = ReloadReport(
            config=new.origin,
            added=[m.name for m in models.added],
            removed=models.removed,
            removing=removing,
            rolling=list(models.rolled),
            changed=models.updated | models.rolled,
            policy=diff_named("route", old.routes, new.routes)
            + diff_named("provider", old.providers, new.providers)
            + [f"{f} changed" for f in changed_fields(old, new) if f in LIVE_SETTINGS],
            failed=failed,
        )
        log.info("config reloaded from %s: %s", new.origin, report.summary())
        return report

    def _start_roll(self, name: str, model: ModelConfig) -> None:
        async def roll() -> str:
            try:
                outcome = await self.rt.supervisor.roll(name, model)
            except Exception as exc:  # logged and reported; the old replicas keep serving
                outcome = f"failed: {exc}"
            (log.info if outcome.startswith("rolled") else log.error)("reload: roll of %s %s", name, outcome)
            return outcome

        task = asyncio.create_task(roll(), name=f"roll-{name}")
        self.rolling[name] = task
        task.add_done_callback(lambda t: self.rolling.get(name) is t and self.rolling.pop(name))


def _outcome(task: asyncio.Task[str]) -> str:
    return task.result() if not task.cancelled() else "cancelled"


__all__ = ["Reloader", "ReloadRefused", "changed_fields", "diff_models", "restart_only"]
