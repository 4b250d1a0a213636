"""API keys: created and revoked by the CLI, checked by the daemon.

A key is ``ak-<id>-<secret>``; it is shown once, and only the SHA-256 of its
secret is stored (table ``api_keys`` in the state database). The daemon looks a
key up by its id and compares digests in constant time. Per key: the routes it
may use (empty: any), a tag that binds it (appliance/gateway/routing.py: Routes.match),
a requests-per-minute limit and a token budget per period (hour, day or month,
UTC), both 0 = none.

A budget is reserved, then settled: admission holds the most the request can
cost (its prompt's bound plus its completion cap, appliance/gateway/metering.py) against
what the key has left, minus what its requests in flight hold, and refuses it
with 429 when that does not fit (a 400 when it never can: more than the whole
budget); the end of the request settles the hold to its
real usage. Check and hold happen with no await between them, so concurrent
requests can never together spend more than the budget. ``Gate.admit`` and
``Gate.settle`` are the whole interface: a data plane of several processes
would run the same two calls against one authority (the daemon, or a row
updated under BEGIN IMMEDIATE) instead of this in-process one.
"""

from __future__ import annotations

import calendar
import hashlib
import hmac
import json
import math
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from appliance.access.audit import connect, transaction
from appliance.errors import ApplianceError, BeyondBudget, Forbidden, MissingCredential, RateLimited, Unauthorized

PREFIX = "ak-"
PERIODS = ("hour", "day", "month")


class Standing:
    """Whether a key's requests in flight may go on: one object per key id, kept by
    every ApiKey the daemon makes of it (Gate.refresh), so a stream holding the key
    it was admitted with reads a revocation as one attribute (the relay, per chunk).
    A stream a worker carries is not relayed here: its ticket watches the standing
    (``carriers``) and tells the worker when it ends (dataplane/authority.py)."""

    __slots__ = ("carriers", "ended")

    def __init__(self) -> None:
        self.ended: str | None = None  # why its requests in flight end: "revoked", "budget"
        # Told why, once, when it ends: the tickets of its streams workers carry.
        self.carriers: set[Callable[[str], None]] = set()

    def end(self, why: str) -> None:
        first = self.ended is None
        self.ended = why
        if first:
            for tell in list(self.carriers):
                tell(why)


# The standing of a keyless request's (nothing ends it).
NO_KEY = Standing()


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
    standing: Standing = field(default_factory=Standing, compare=False, repr=False)

    def public(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("secret_sha256", "standing")}


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


NAME_MAX = 128


class KeyStore:
    def __init__(self, path: Path | str) -> None:
        self.db = connect(path)  # table api_keys: appliance/state/db.py

    def create(
        self,
        name: str,
        routes: Sequence[str] = (),
        tag: str = "",
        rpm: int = 0,
        budget_tokens: int = 0,
        budget_period: str = "day",
    ) -> tuple[ApiKey, str]:
        """A new key and its one-time token (never stored)."""
        if budget_period not in PERIODS:
            raise ValueError(f"budget period must be one of {', '.join(PERIODS)}")
        if not name.strip() or len(name) > NAME_MAX or not name.isprintable():
            # Listed by `keys ls`, `status` and the TUI: a control character would be obeyed
            # by the terminal showing it (an escape sequence rewriting the screen or its title).
            raise ValueError(f"a key's name is 1-{NAME_MAX} printable characters, no control characters: got {name!r}")
        key_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
        key = ApiKey(key_id, name, _digest(secret), list(routes), tag, rpm, budget_tokens, budget_period, time.time())
        with transaction(self.db):
            self.db.execute(
                "INSERT INTO api_keys (id, name, secret_sha256, routes, tag, rpm, budget_tokens, "
                "budget_period, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    key.id,
                    name,
                    key.secret_sha256,
                    json.dumps(key.routes),
                    tag,
                    rpm,
                    budget_tokens,
                    budget_period,
                    key.created_at,
                ),
            )
        return key, f"{PREFIX}{key_id}-{secret}"

    def all(self) -> list[ApiKey]:
        rows = self.db.execute(
            "SELECT id, name, secret_sha256, routes, tag, rpm, budget_tokens, "
            "budget_period, created_at, revoked_at FROM api_keys ORDER BY created_at"
        )
        return [ApiKey(r[0], r[1], r[2], json.loads(r[3]), *r[4:]) for r in rows]

    def revoke(self, key_id: str) -> tuple[float, bool] | None:
        """Revoke a key: (when it was revoked, whether this call did it: False when it
        was revoked already, at that time), or None when no key has that id."""
        with transaction(self.db):
            now = time.time()
            cur = self.db.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", (now, key_id)
            )
            if cur.rowcount == 1:
                return now, True
            row = self.db.execute("SELECT revoked_at FROM api_keys WHERE id = ?", (key_id,)).fetchone()
        return None if row is None else (row[0], False)

    def usable(self, key_id: str) -> bool:
        """Whether a key of this id exists and is not revoked: one lookup by the primary key."""
        row = self.db.execute("SELECT 1 FROM api_keys WHERE id = ? AND revoked_at IS NULL", (key_id,)).fetchone()
        return row is not None

    def set_limits(
        self, key_id: str, rpm: int | None = None, budget_tokens: int | None = None, budget_period: str | None = None
    ) -> tuple[ApiKey, ApiKey] | None:
        """Change an active key's limits in place (its secret, and so its clients, stay):
        (the key before, the key after), or None when no active key has that id. The
        running daemon reads the change as it reads a new key (Gate.refresh); the tokens
        used in the current period stay counted."""
        if budget_period is not None and budget_period not in PERIODS:
            raise ValueError(f"budget period must be one of {', '.join(PERIODS)}")
        with transaction(self.db):
            before = next((k for k in self.all() if k.id == key_id and k.revoked_at is None), None)
            if before is None:
                return None
            after = replace(
                before,
                rpm=before.rpm if rpm is None else rpm,
                budget_tokens=before.budget_tokens if budget_tokens is None else budget_tokens,
                budget_period=budget_period or before.budget_period,
            )
            self.db.execute(
                "UPDATE api_keys SET rpm = ?, budget_tokens = ?, budget_period = ? WHERE id = ?",
                (after.rpm, after.budget_tokens, after.budget_period, key_id),
            )
        return before, after

    def used(self, period_starts: dict[str, int]) -> dict[str, int]:
        """Tokens each key used in its current budget period (from the ledger)."""
        out = {}
        for key_id, start in period_starts.items():
            row = self.db.execute(
                "SELECT tokens FROM usage_ledger WHERE key_id = ? AND period_start = ?", (key_id, start)
            ).fetchone()
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


def bearer_token(authorization: str) -> str:
    """The credential an Authorization header carries: after its Bearer scheme, in any
    case (RFC 9110: "bearer ak-..." is a key too), or the whole value when it names none."""
    scheme, _, rest = authorization.strip().partition(" ")
    return rest.strip() if scheme.lower() == "bearer" else authorization.strip()


# What a request that sent two different keys carries in place of either (Authorization
# twice, or beside the Anthropic SDK's x-api-key): Gate.authenticate refuses it.
TWO_KEYS = b"\0two different keys"


def one_key(first: bytes | None, other: bytes) -> bytes:
    """A request's credential once another credential header came (other, as an
    Authorization value): the first when both name the same key, else TWO_KEYS. Which
    header wins would otherwise decide whose key is charged and audited, and a proxy
    in front checking one of them would pass the other unseen."""
    if first is None:
        return other
    if first is TWO_KEYS or bearer_token(first.decode("latin-1")) != bearer_token(other.decode("latin-1")):
        return TWO_KEYS
    return first


class Gate:
    """The daemon's view of the keys: authenticate, limit, charge usage."""

    def __init__(
        self,
        store: KeyStore,
        required: bool,
        charge: Callable[[str, int, int], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.required = required
        self.clock = clock
        self._charge = charge
        self.keys: dict[str, ApiKey] = {}
        self.used: dict[str, tuple[int, int]] = {}  # key id -> (period start, tokens)
        self.held: dict[str, int] = {}  # key id -> tokens its requests in flight hold
        # key name -> [requests, prompt tokens, completion tokens] since the daemon started
        # (the status and the TUI's usage view).
        self.usage: dict[str, list[int]] = {}
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
        self._carry_standing(keys)
        self.keys = keys

    def _carry_standing(self, keys: dict[str, ApiKey]) -> None:
        """Each key's Standing passed on to its new ApiKey; a key gone (revoked) ends its
        requests in flight, and so does one whose budget is now below what it used."""
        for key_id, old in self.keys.items():
            new = keys.get(key_id)
            if new is None:
                old.standing.end("revoked")
                continue
            # An ended standing stays with the requests it ended; the key's next ones
            # get a new one (a budget raised again, or a new period, lets them run:
            # admit judges them).
            if old.standing.ended is None:
                new.standing = old.standing
            if new.budget_tokens and new.budget_tokens != old.budget_tokens:
                start = period_bounds(new.budget_period, self.clock())[0]
                if self._used(key_id, start) >= new.budget_tokens:
                    new.standing.end("budget")

    def authenticate(self, authorization: bytes | None) -> ApiKey | None:
        """The caller's key; None for a keyless local client where that is allowed."""
        if authorization is TWO_KEYS:
            raise Unauthorized("Two different API keys sent (Authorization twice, or beside x-api-key): send one")
        token = bearer_token(authorization.decode("latin-1")) if authorization else ""
        if not token.startswith(PREFIX):
            if self.required and not token:
                raise MissingCredential("Missing API key: send 'Authorization: Bearer ak-...'")
            if self.required:
                raise Unauthorized("Invalid API key")
            return None
        key_id, _, secret = token[len(PREFIX) :].partition("-")
        key = self.keys.get(key_id)
        if key is None and self.store.version() != self._version and self.store.usable(key_id):
            # A key created a moment ago by `appliance keys create`. Only then: a made-up id
            # (anyone may send one) costs one lookup, not a reload of every key.
            self.refresh()
            key = self.keys.get(key_id)
        expected = key.secret_sha256 if key is not None else "0" * 64
        if not hmac.compare_digest(_digest(secret), expected) or key is None:
            raise Unauthorized("Invalid or revoked API key")
        return key

    def admit(
        self, key: ApiKey, route: str | None, prompt: int = 0, cap: int | None = 0, ceiling: int = 0, choices: int = 1
    ) -> Reservation:
        """Admit one request of the key, or refuse it (403, 429; 400 beyond its whole
        budget). A budgeted key
        holds prompt + cap tokens; with no cap (the request set no length), the
        completion is reserved at ``ceiling`` per choice, or at what the budget
        has left for it, which the caller must then impose on the engine
        (Reservation.completion)."""
        if key.routes and route not in key.routes:
            # The same words whether the model is another route's or none: naming the
            # route would tell a key another team's route, and that its model exists.
            raise Forbidden("This API key may not use this model", code="route_not_allowed")
        now = self.clock()
        bucket = None
        if key.rpm:
            bucket = self.buckets.get(key.id)
            if bucket is None:
                bucket = self.buckets[key.id] = _Bucket(key.rpm, now)
            bucket.tokens = min(float(key.rpm), bucket.tokens + (now - bucket.at) * key.rpm / 60.0)
            bucket.at = now
            if bucket.tokens < 1.0:
                raise RateLimited(
                    f"This API key is over its limit of {key.rpm} requests per minute",
                    retry_after=math.ceil((1.0 - bucket.tokens) * 60.0 / key.rpm),
                )
        reservation = Reservation(key, 0, 0, None)
        if key.budget_tokens:
            self._reserve(reservation, now, prompt, cap, ceiling, choices)
        if bucket is not None:
            bucket.tokens -= 1.0
        return reservation

    def _reserve(self, res: Reservation, now: float, prompt: int, cap: int | None, ceiling: int, choices: int) -> None:
        key = res.key
        start, end = period_bounds(key.budget_period, now)
        used = self._used(key.id, start)
        held = self.held.get(key.id, 0)
        left = key.budget_tokens - used - held
        if cap is None:
            completion = min(ceiling, (left - prompt) // choices)
            need = prompt + max(completion, 1) * choices
            res.completion = completion
        else:
            need = prompt + cap
        if need > left:
            raise _over_budget(key, need, prompt, used, end - now)
        res.period_start, res.held = start, need
        self.held[key.id] = held + need

    def _used(self, key_id: str, start: int) -> int:
        current = self.used.get(key_id)
        return current[1] if current is not None and current[0] == start else 0

    def settle(self, key: ApiKey, res: Reservation | None, prompt: int, completion: int) -> None:
        """The key's request is over (admitted, or refused: no reservation): counted
        in the key's usage, its hold released, what it used charged."""
        seen = self.usage.get(key.name)
        if seen is None:
            seen = self.usage[key.name] = [0, 0, 0]
        seen[0] += 1
        seen[1] += prompt
        seen[2] += completion
        if res is None:
            return
        tokens = prompt + completion
        if res.held:
            held = self.held.get(key.id, 0) - res.held
            if held > 0:
                self.held[key.id] = held
            else:
                self.held.pop(key.id, None)
            res.held = 0
        if not tokens:
            return
        start = res.period_start or period_bounds(key.budget_period, self.clock())[0]
        self.used[key.id] = (start, self._used(key.id, start) + tokens)
        self._charge(key.id, start, tokens)


@dataclass(slots=True)
class Reservation:
    """What one admitted request of a key holds against its budget."""

    key: ApiKey
    period_start: int
    held: int
    # The completion reserved per choice for a budgeted request that named no
    # length; when below what the engine would generate, it must be told.
    completion: int | None


def ended_error(standing: Standing) -> ApplianceError:
    """What a request of a key whose standing ended gets: its stream's error event, or
    a held request's refusal."""
    if standing.ended == "budget":
        return RateLimited(
            "This API key's budget was lowered below what it has used: its request was ended",
            retry_after=60,
            code="budget_exceeded",
        )
    return Unauthorized("This API key was revoked: its request was ended")


def _over_budget(key: ApiKey, need: int, prompt: int, used: int, until_reset: float) -> ApplianceError:
    per = f"{key.budget_tokens} tokens per {key.budget_period}"
    if need > key.budget_tokens:
        return _beyond_budget(key, need, prompt, per)
    if need <= key.budget_tokens - used:
        # It would fit once this key's requests in flight settle to what they really used.
        return RateLimited(
            f"This API key's requests in flight hold the rest of its budget of {per}; retry when they finish",
            retry_after=2,
            code="budget_exceeded",
        )
    message = (
        f"This API key has {max(0, key.budget_tokens - used)} of its {per} left; this request "
        f"may cost up to {need} (its prompt counts one token per byte until the engine reports "
        "it, plus its completion limit)"
    )
    return RateLimited(message, retry_after=math.ceil(until_reset), code="budget_exceeded")


def _beyond_budget(key: ApiKey, need: int, prompt: int, per: str) -> BeyondBudget:
    """No reset will ever admit it: the client must send a smaller request, not retry."""
    room = key.budget_tokens - prompt
    fix = (
        f"lower max_tokens (times n: at most {room} in all)"
        if room > 0
        else "its prompt alone is more than that: send a shorter one"
    )
    return BeyondBudget(
        f"This request may cost up to {need} tokens (its prompt counts one token per byte until the engine "
        f"reports it, plus its completion limit: max_tokens times n), more than this API key's whole "
        f"budget of {per}, so it can never be served under this key: {fix}, or ask for a larger budget"
    )


__all__ = ["ApiKey", "Gate", "KeyStore", "PERIODS", "NO_KEY", "Reservation", "Standing", "ended_error", "period_bounds"]
