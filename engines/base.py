"""What the supervisor needs to know about an engine, one adapter per engine.

An adapter is pure: it turns a model deployment into a launch spec (argv, env)
and says how to tell that a replica is ready and healthy. The supervisor does
the spawning, the waiting and the restarting.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import aiohttp

if TYPE_CHECKING:
    from appliance.config import Config, ModelConfig


class ProbeFailed(Exception):
    """A readiness or health probe got no good answer; the message says why."""


@dataclass(frozen=True)
class LaunchSpec:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)


class EngineAdapter(Protocol):
    name: str

    def supervised(self, model: ModelConfig) -> bool:
        """False for an external server the appliance only health-checks."""

    def launch(self, cfg: Config, model: ModelConfig, host: str, port: int) -> LaunchSpec:
        """argv and extra environment for one replica listening on host:port."""

    def base_url(self, model: ModelConfig, host: str, port: int) -> str:
        """Where the replica's OpenAI API lives (without the /v1)."""

    async def probe_ready(self, session: aiohttp.ClientSession, base_url: str, model: ModelConfig,
                          timeout: float) -> None:
        """Return once the replica answered a real request; raise ProbeFailed otherwise."""

    async def probe_health(self, session: aiohttp.ClientSession, base_url: str, timeout: float) -> None:
        """Cheap periodic liveness check of a READY replica; raise ProbeFailed when unhealthy."""


async def one_token_completion(session: aiohttp.ClientSession, base_url: str, model_name: str,
                               timeout: float) -> None:
    """Readiness is a real 1-token completion answered, not an open port."""
    body = {"model": model_name, "prompt": "ok", "max_tokens": 1, "temperature": 0}
    try:
        async with session.post(f"{base_url}/v1/completions", json=body,
                                timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            payload = await resp.read()
            if resp.status != 200:
                raise ProbeFailed(f"1-token completion answered {resp.status}: {payload[:200]!r}")
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        raise ProbeFailed(f"1-token completion failed: {type(exc).__name__}: {exc}") from None


async def http_ok(session: aiohttp.ClientSession, url: str, timeout: float) -> None:
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            await resp.read()
            if resp.status != 200:
                raise ProbeFailed(f"GET {url} answered {resp.status}")
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        raise ProbeFailed(f"GET {url} failed: {type(exc).__name__}: {exc}") from None
