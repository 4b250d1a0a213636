"""The app's lifespan: every resource the daemon serves with, opened in one place and
closed in the reverse order (the supervisor and its engines, the engines' HTTP session,
the state database, the audit log and its thread, the key store, tracing, the periodic
jobs, the store's scrubber), and the `Runtime` that holds them for the handlers. What the
config or the machine gets wrong is said first, with its own message (field, path, fix)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from litestar import Litestar

from appliance.access import retention
from appliance.access.audit import AuditLog
from appliance.access.keys import Gate, KeyStore
from appliance.access.tenancy import Tenancy
from appliance.api.admin_access import AdminAccess
from appliance.api.metrics import Metrics
from appliance.api.reload import Reloader
from appliance.config import Config, ConfigError, check_writable_dirs, load_config, read_admin_token
from appliance.fleet.supervisor import Supervisor
from appliance.gateway.forwarded import TrustedProxies
from appliance.gateway.providers import load_providers
from appliance.gateway.proxy import EngineProxy, make_session
from appliance.gateway.routing import Routes
from appliance.gateway.runtime import Gateway
from appliance.gateway.tracing import open_tracing
from appliance.periodic import Periodic
from appliance.state.decisions import StateStore
from appliance.store.guard import RECHECK_S, Scrubber

log = logging.getLogger("appliance.api")


@dataclass
class Runtime(Gateway):
    """What the lifespan opens: the hot path's runtime, and what only the other handlers use."""

    metrics: Metrics  # the hot path's counters, and /metrics rendering them
    started: float = field(default_factory=time.time)
    admin: AdminAccess = field(kw_only=True)
    openapi: dict | None = None
    reloader: Reloader | None = None


def lifespan_for(
    cfg: Config, reread: Callable[[], Config] | None = None
) -> Callable[[Litestar], AbstractAsyncContextManager[None]]:
    """The lifespan of an app serving cfg; reread: the config as the daemon's command
    line reads it, for reloads (default: the file cfg came from)."""

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        session = None
        try:
            # What the config or the machine may get wrong, first: its message (field,
            # path, fix) is what the log and the exit status say (server.serve).
            check_writable_dirs(cfg)
            admin = AdminAccess(cfg, read_admin_token(cfg))
            providers = load_providers(cfg)
            session = make_session(cfg)
            db_path = Path(cfg.paths.state_dir) / "appliance.db"
            state = StateStore(db_path)
            supervisor = Supervisor(cfg, session, state=state)
            audit = AuditLog(db_path, cfg.audit)
            keys = KeyStore(db_path)
            gate = Gate(keys, cfg.keys.required, audit.charge)
            tracing = open_tracing(cfg)
        except Exception as exc:
            app.state.startup_error = str(exc) if isinstance(exc, ConfigError) else f"{type(exc).__name__}: {exc}"
            log.error("startup failed: %s", app.state.startup_error)
            if session is not None:
                await session.close()
            raise
        runtime = Runtime(
            cfg=cfg,
            supervisor=supervisor,
            proxy=EngineProxy(cfg, session),
            metrics=Metrics(supervisor),
            admin=admin,
            routes=Routes(cfg.routes),
            providers=providers,
            gate=gate,
            audit=audit,
            tenancy=Tenancy(cfg.routing.tenant_isolation),
            tag_header=cfg.routing.tag_header.lower().encode("latin-1"),
            proxies=TrustedProxies.of(cfg.server),
            tracing=tracing,
        )
        runtime.reloader = Reloader(runtime, reread or (lambda: load_config(_config_file(cfg))))
        runtime.adopted.append(admin.adopt)  # keys.required, live: the admin door reads it too
        app.state.runtime = runtime
        supervisor.start()
        audit.start()
        jobs = Periodic()
        # Keys created or revoked by `appliance keys` in another process.
        jobs.every(1.0, "keys", gate.refresh)
        jobs.every(cfg.autoscaling.interval_s, "autoscaler", supervisor.tick)
        if supervisor.store_checks is not None:
            # A blocked store model that passes admission again (re-imported, verified, its
            # license accepted) is served again.
            jobs.every(RECHECK_S, "store-recheck", supervisor.recheck_blocked)
        if retention.retention_on(cfg.audit):
            state_db = db_path
            # Blocking SQLite work, in a worker thread: the loop keeps serving.
            jobs.every(
                cfg.audit.purge_interval.seconds,
                "audit-retention",
                lambda: asyncio.to_thread(retention.purge_now, state_db, cfg.audit),
            )
        # Bit rot in the store: rehashed in the background; a mismatch blocks the model.
        scrub = Scrubber.from_config(cfg, on_quarantine=supervisor.block_store_model)
        if scrub is not None:
            scrub.start()
        log.info(
            "serving %s on http://%s:%d/v1 (config: %s)%s",
            ", ".join(supervisor.deployments) or "no models",
            cfg.server.host,
            cfg.server.port,
            cfg.origin,
            _who_is_served(cfg),
        )
        try:
            yield
        finally:
            runtime.draining = True
            await jobs.close()
            if scrub is not None:
                await scrub.close()
            await supervisor.stop(drain_timeout=cfg.server.drain_timeout_s)
            await session.close()
            if tracing is not None:  # the last spans sent, off the loop
                await asyncio.to_thread(tracing.close)
            await audit.close()
            keys.close()
            state.close()
            log.info("stopped")

    return lifespan


def _config_file(cfg: Config) -> str | None:
    return None if cfg.origin.startswith("<") else cfg.origin


def _who_is_served(cfg: Config) -> str:
    """The start line's last words: whether what it serves is open to anyone who reaches the
    port (the operator's first question of a new journal)."""
    if cfg.keys.required:
        return "; API keys required (keys.required = true)"
    return "; no API key required: anyone who reaches the port is served (keys.required = false)"
