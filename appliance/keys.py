"""API keys: created and revoked by the CLI, checked by the daemon.

A key is ``ak-<id>-<secret>``; it is shown once, and only the SHA-256 of its
secret is stored (table ``api_keys`` in the state database). The daemon looks a
key up by its id and compares digests in constant time. Per key: the routes it
may use (empty: any), a default tag for route matching, a requests-per-minute
limit and a token budget per period (hour, day or month, UTC), both 0 = none.
"""

from __future__ import annotations

import calendar
import hashlib
import hmac
import json
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .audit import connect, transaction
from .errors import Forbidden, RateLimited, Unauthorized

PREFIX = "ak-"
PERIODS = ("hour", "day", "month")

@dataclass
class ApiKey:
    id: str
    name: str
    secret_sha256: str
    routes: list[str] = field(default_factory=list)
    tag: str = ""
    rpm: int = 0
    budget_tokens: int = 0
    budget_period: str = "day"
    created_at: float = 0.0
    revoked_at: float | None = None

    def public(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "secret_sha256"}


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class KeyStore:
    def __init__(self, path: Path | str) -> None:
        self.db = connect(path)  # table api_keys: appliance/statedb.py

    def create(self, name: str, routes: list[str] = (), tag: str = "", rpm: int = 0,
               budget_tokens: int = 0, budget_period: str = "day") -> tuple[ApiKey, str]:
        """A new key and its one-time token (never stored)."""
        if budget_period not in PERIODS:
            raise ValueError(f"budget period must be one of {', '.join(PERIODS)}")
        key_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
        key = ApiKey(key_id, name, _digest(secret), list(routes), tag, rpm, budget_tokens, budget_period,
                     time.time())
        with transaction(self.db):
            self.db.execute("INSERT INTO api_keys (id, name, secret_sha256, routes, tag, rpm, budget_tokens, "
                            "budget_period, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            (key.id, name, key.secret_sha256, json.dumps(key.routes), tag, rpm,
                             budget_tokens, budget_period, key.created_at))
        return key, f"{PREFIX}{key_id}-{secret}"

    def all(self) -> list[ApiKey]:
        rows = self.db.execute("SELECT id, name, secret_sha256, routes, tag, rpm, budget_tokens, "
                               "budget_period, created_at, revoked_at FROM api_keys ORDER BY created_at")
        return [ApiKey(r[0], r[1], r[2], json.loads(r[3]), *r[4:]) for r in rows]

    def revoke(self, key_id: str) -> bool:
        with transaction(self.db):
            cur = self.db.execute("UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                                  (time.time(), key_id))
        return cur.rowcount == 1

    def used(self, period_starts: dict[str, int]) -> dict[str, int]:
        """Tokens each key used in its current budget period (from the ledger)."""
        out = {}
        for key_id, start in period_starts.items():
            row = self.db.execute("SELECT tokens FROM usage_ledger WHERE key_id = ? AND period_start = ?",
                                  (key_id, start)).fetchone()
            out[key_id] = row[0] if row else 0
        return out

    def version(self) -> int:
        """Changes whenever another connection (the CLI, the audit writer) commits."""
        return self.db.execute("PRAGMA data_version").fetchone()[0]

    def close(self) -> None:
        self.db.close()


def period_bounds(period: str, now: float) -> tuple[int, int]:
    """[start, end) of the UTC hour, day or month holding now."""
    t = time.gmtime(now)
    if period == "hour":
        start = calendar.timegm((t.tm_year, t.tm_mon, t.tm_mday, t.tm_hour, 0, 0))
        return start, start + 3600
    if period == "day":
        start = calendar.timegm((t.tm_year, t.tm_mon, t.tm_mday, 0, 0, 0))
        return start, start + 86400
    start = calendar.timegm((t.tm_year, t.tm_mon, 1, 0, 0, 0))
    year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
    return start, calendar.timegm((year, month, 1, 0, 0, 0))


class _Bucket:
    """A token bucket: rpm requests a minute, bursts up to rpm."""

    __slots__ = ("tokens", "at")

    def __init__(self, rpm: int, now: float) -> None:
        self.tokens = float(rpm)
        self.at = now


class Gate:
    """The daemon's view of the keys: authenticate, limit, charge usage."""

    def __init__(self, store: KeyStore, required: bool, charge: Callable[[str, int, int], None],
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.required = required
        self.clock = clock
        self._charge = charge
        self.keys: dict[str, ApiKey] = {}
        self.used: dict[str, tuple[int, int]] = {}  # key id -> (period start, tokens)
        self.buckets: dict[str, _Bucket] = {}
        self._version = -1
        self.refresh()

    def refresh(self) -> None:
        """Reload keys (the CLI writes them from another process) and their usage."""
        self._version = self.store.version()
        keys = {k.id: k for k in self.store.all() if k.revoked_at is None}
        now = self.clock()
        starts = {k.id: period_bounds(k.budget_period, now)[0] for k in keys.values() if k.budget_tokens}
        stored = self.store.used(starts)
        for key_id, start in starts.items():
            current = self.used.get(key_id)
            if current is None or current[0] != start or stored[key_id] > current[1]:
                self.used[key_id] = (start, max(stored[key_id], current[1] if current and current[0] == start else 0))
        self.keys = keys

    def authenticate(self, authorization: bytes | None) -> ApiKey | None:
        """The caller's key; None for a keyless local client where that is allowed."""
        token = authorization.decode("latin-1").removeprefix("Bearer ").strip() if authorization else ""
        if not token.startswith(PREFIX):
            if self.required:
                raise Unauthorized("Missing API key: send 'Authorization: Bearer ak-...'"
                                   if not token else "Invalid API key")
            return None
        key_id, _, secret = token[len(PREFIX):].partition("-")
        key = self.keys.get(key_id)
        if key is None and self.store.version() != self._version:
            self.refresh()  # a key created a moment ago by `appliance keys create`
            key = self.keys.get(key_id)
        expected = key.secret_sha256 if key is not None else "0" * 64
        if not hmac.compare_digest(_digest(secret), expected) or key is None:
            raise Unauthorized("Invalid or revoked API key")
        return key

    def admit(self, key: ApiKey, route: str | None) -> None:
        if key.routes and route not in key.routes:
            raise Forbidden(f"This API key may not use {'route ' + repr(route) if route else 'this model'}",
                            code="route_not_allowed")
        now = self.clock()
        if key.budget_tokens:
            start, end = period_bounds(key.budget_period, now)
            used = self.used.get(key.id, (start, 0))
            if used[0] == start and used[1] >= key.budget_tokens:
                raise RateLimited(f"This API key used its budget of {key.budget_tokens} tokens per "
                                  f"{key.budget_period}", retry_after=math.ceil(end - now),
                                  code="budget_exceeded")
        if key.rpm:
            bucket = self.buckets.get(key.id)
            if bucket is None:
                bucket = self.buckets[key.id] = _Bucket(key.rpm, now)
            bucket.tokens = min(float(key.rpm), bucket.tokens + (now - bucket.at) * key.rpm / 60.0)
            bucket.at = now
            if bucket.tokens < 1.0:
                raise RateLimited(f"This API key is over its limit of {key.rpm} requests per minute",
                                  retry_after=math.ceil((1.0 - bucket.tokens) * 60.0 / key.rpm))
            bucket.tokens -= 1.0

    def charge(self, key: ApiKey, tokens: int) -> None:
        if not tokens:
            return
        start = period_bounds(key.budget_period, self.clock())[0]
        current = self.used.get(key.id)
        total = (current[1] if current and current[0] == start else 0) + tokens
        self.used[key.id] = (start, total)
        self._charge(key.id, start, tokens)


__all__ = ["ApiKey", "Gate", "KeyStore", "PERIODS", "period_bounds"]
