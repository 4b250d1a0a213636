"""Providers: OpenAI-compatible APIs off this server (commercial or not) that
permitted routes may fall back to.

A provider's API key comes from a file (relative: under $CREDENTIALS_DIRECTORY,
where systemd's LoadCredential= puts it) or an environment variable, never from
the config, and never appears in a log line, a repr or an error message. Each
provider has its own timeouts, a model-name mapping and a circuit breaker.
EngineProxy forwards to a provider as to a replica (base_url, name, lease()).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import aiohttp
import msgspec

from appliance.config import Config, ConfigError, ProviderConfig, exposed_secret, read_secret_file
from appliance.gateway.api_audio import is_form, set_form_fields

log = logging.getLogger("appliance.upstreams")


class Breaker:
    """Closed until `failures` failures in a row; then open (requests skip the
    provider) for `reset_s`; then half-open: one trial request decides."""

    def __init__(self, failures: int, reset_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.failures = failures
        self.reset_s = reset_s
        self.clock = clock
        self.consecutive = 0
        self.opened_at: float | None = None
        self._trial = False

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        return "half_open" if self.clock() - self.opened_at >= self.reset_s else "open"

    def allow(self) -> bool:
        state = self.state
        if state == "closed":
            return True
        if state == "half_open" and not self._trial:
            self._trial = True
            return True
        return False

    def success(self) -> None:
        self.consecutive = 0
        self.opened_at = None
        self._trial = False

    def failure(self) -> None:
        self.consecutive += 1
        if self._trial or self.consecutive >= self.failures:
            self.opened_at = self.clock()
        self._trial = False


class _Secret:
    """Holds an API key; prints as <redacted> anywhere it is formatted."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "<redacted>"

    __str__ = __repr__


class Provider:
    session: aiohttp.ClientSession | None = None  # the proxy's shared session (a replica has its own)

    def __init__(self, cfg: ProviderConfig, key: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.name = f"provider:{cfg.name}"
        self.base_url = cfg.base_url.rstrip("/")
        self.commercial = cfg.commercial
        self.timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=cfg.connect_timeout_s, sock_read=cfg.read_timeout_s
        )
        self.breaker = Breaker(cfg.breaker_failures, cfg.breaker_reset_s, clock)
        self._key = _Secret(key)

    def __repr__(self) -> str:
        return f"Provider({self.cfg.name!r}, {self.base_url!r}, commercial={self.commercial})"

    def lease(self) -> contextlib.nullcontext[Provider]:
        """Nothing to hold: the drain counts a request at a provider as one on the
        hot path (Gateway.inflight), and no replica choice weighs providers' load."""
        return contextlib.nullcontext(self)

    def path(self, path: str) -> str:
        """/v1/chat/completions -> /chat/completions: base_url ends in the API's /v1."""
        return path.removeprefix("/v1")

    def headers(self, headers: dict[str, str], api: str = "chat") -> dict[str, str]:
        out = {"Content-Type": headers.get("Content-Type", "application/json")}
        if self._key.reveal():
            out["Authorization"] = "Bearer " + self._key.reveal()
            if api in ("messages", "count_tokens"):  # Anthropic's API reads its key here
                out["x-api-key"] = self._key.reveal()
        if api in ("messages", "count_tokens"):
            out["anthropic-version"] = ANTHROPIC_VERSION
        return out

    def body(self, body: bytes, requested_model: str) -> bytes:
        return set_fields(body, model=self.cfg.models.get(requested_model, requested_model))


_TOP = msgspec.json.Decoder(dict[str, msgspec.Raw])
# The Messages API version a provider is asked for (the one the Anthropic SDK sends).
ANTHROPIC_VERSION = "2023-06-01"


def set_fields(body: bytes, **fields) -> bytes:
    """The request body with top-level fields replaced; every other field's bytes
    are kept exactly (decoded as raw JSON, not parsed; a multipart upload's other
    parts untouched)."""
    if is_form(body):
        return set_form_fields(body, fields)
    top = _TOP.decode(body)
    for name, value in fields.items():
        top[name] = msgspec.Raw(msgspec.json.encode(value))
    return msgspec.json.encode(top)


def set_encoded_fields(body: bytes, fields: bytes) -> bytes:
    """set_fields on a JSON body, the fields given as one JSON object (a worker's grant)."""
    top = _TOP.decode(body)
    top.update(_TOP.decode(fields))
    return msgspec.json.encode(top)


def read_key(
    cfg: ProviderConfig, at: str, origin: str, environ: Mapping[str, str] = os.environ, permissions: str = "refuse"
) -> str:
    """The provider's key. A key file its group or others may read is refused
    (permissions = "refuse", server.key_file_permissions) or logged."""
    if cfg.api_key_env:
        key = environ.get(cfg.api_key_env, "").strip()
        if not key:
            raise ConfigError(f"{origin}: field '{at}.api_key_env': environment variable {cfg.api_key_env} is not set")
        return key
    if not cfg.api_key_file:
        return ""
    path = Path(cfg.api_key_file)
    if not path.is_absolute():
        creds = environ.get("CREDENTIALS_DIRECTORY", "")
        if not creds:
            raise ConfigError(
                f"{origin}: field '{at}.api_key_file': {cfg.api_key_file!r} is relative and "
                "$CREDENTIALS_DIRECTORY is not set (systemd LoadCredential=, docs/operations.md)"
            )
        path = Path(creds) / path
    try:
        key = read_secret_file(path)
        problem = exposed_secret(path)
    except OSError as exc:
        raise ConfigError(f"{origin}: field '{at}.api_key_file': cannot read {path}: {exc.strerror}") from None
    if problem and permissions == "refuse":
        raise ConfigError(
            f"{origin}: field '{at}.api_key_file': {problem}; or set "
            'server.key_file_permissions = "warn" to start anyway'
        )
    if problem:
        log.warning("field '%s.api_key_file': %s", at, problem)
    if not key:
        raise ConfigError(f"{origin}: field '{at}.api_key_file': {path} is empty")
    return key


def load_providers(
    cfg: Config, environ: Mapping[str, str] = os.environ, clock: Callable[[], float] = time.monotonic
) -> dict[str, Provider]:
    return {
        p.name: Provider(p, read_key(p, f"providers[{i}]", cfg.origin, environ, cfg.server.key_file_permissions), clock)
        for i, p in enumerate(cfg.providers)
    }
