"""Fixed admin-API answers for the TUI's snapshot tests (the seam: tui.client.Admin)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec

from appliance.status import (
    DaemonLog,
    DaemonStatus,
    GpusStatus,
    ModelStatus,
    ReloadReport,
    ReplicaLog,
    ReplicaStatus,
)
from tui.client import AdminError, DaemonDown

GiB = 1024**3
NOW = datetime(2026, 11, 30, 9, 0, 0, tzinfo=UTC)


def _replica(model: str, index: int, state: str, pid: int, **kw) -> dict:
    return {"replica": f"{model}#{index}", "index": index, "state": state, "pid": pid, "port": 40000 + pid % 1000,
            "url": None, "supervised": True, "inflight": kw.get("inflight", 0), "retiring": False,
            "restarts": kw.get("restarts", 0), "gpus": kw.get("gpus"), "memory_fraction": None,
            "load": None, "last_error": kw.get("last_error"), "log_file": None, "log_tail": []}


def _decision(model: str, ago_s: float, current: int, desired: int, action: str, reason: str) -> dict:
    return {"model": model, "at": (NOW - timedelta(seconds=ago_s)).isoformat(), "current": current,
            "desired": desired, "action": action, "reason": reason, "inputs": {}}


STATUS = {
    "version": "0.1.0", "config": "/etc/appliance/appliance.toml", "uptime_s": 7384.0, "draining": False,
    "ready": True, "listen": "127.0.0.1:8000", "now": NOW.isoformat(),
    "started": (NOW - timedelta(seconds=7384)).isoformat(),
    "paths": {"state": "/var/lib/appliance", "cache": "/var/cache/appliance", "logs": "/var/log/appliance"},
    "models": [
        {"name": "llama-3.1-70b", "server": "vllm", "source": "store:llama-3.1-70b", "ready": True,
         "pinned": True, "override": None, "rps_10s": 6.4, "rps_60s": 5.9, "inflight": 7, "queued": 0,
         "idle_s": 0.2, "idle_ttl_s": 900.0, "last_cold_start_s": 94.2, "min_replicas": 1, "max_replicas": 4,
         "ttft_p50_ms": 182.5,
         "replicas": [_replica("llama-3.1-70b", 0, "READY", 4101, inflight=4, gpus=[0, 1]),
                      _replica("llama-3.1-70b", 1, "READY", 4102, inflight=3, gpus=[2, 3], restarts=1)],
         "decisions": [_decision("llama-3.1-70b", 380.0, 1, 2, "up", "6.4 rps / 4 per replica = 2"),
                       _decision("llama-3.1-70b", 10.0, 2, 2, "hold", "5.9 rps / 4 per replica = 2")]},
        {"name": "qwen2.5-7b", "server": "sglang", "source": "store:qwen2.5-7b", "ready": False,
         "pinned": False, "override": 1, "rps_10s": 0.3, "rps_60s": 0.2, "inflight": 0, "queued": 2,
         "idle_s": 4.0, "idle_ttl_s": 300.0, "last_cold_start_s": None, "min_replicas": 0, "max_replicas": 2,
         "ttft_p50_ms": None,
         "replicas": [_replica("qwen2.5-7b", 0, "STARTING", 4201, gpus=[4])],
         "decisions": [_decision("qwen2.5-7b", 4.0, 0, 1, "up", "a request arrived for a model at zero")]},
        {"name": "smollm2-135m-instruct", "server": "llamacpp", "source": "builtin:smollm2-135m-instruct",
         "ready": False, "pinned": False, "override": None, "rps_10s": 0.0, "rps_60s": 0.0, "inflight": 0,
         "queued": 0, "idle_s": 1900.0, "idle_ttl_s": 600.0, "last_cold_start_s": 1.4, "min_replicas": 0,
         "max_replicas": 1, "ttft_p50_ms": 41.0, "replicas": [],
         "decisions": [_decision("smollm2-135m-instruct", 600.0, 1, 0, "down", "idle 10m00s >= ttl 10m00s")]},
    ],
    "routes": [
        {"name": "general", "model": "assistant", "tag": "", "target": "llama-3.1-70b",
         "fallbacks": ["qwen2.5-7b", "openai"], "regulated": False, "fired": {"qwen2.5-7b": 12, "openai": 3}},
        {"name": "health-records", "model": "assistant", "tag": "phi", "target": "llama-3.1-70b",
         "fallbacks": ["qwen2.5-7b"], "regulated": True, "fired": {"qwen2.5-7b": 0}},
    ],
    "usage": [
        {"key": "team-search", "requests": 18233, "prompt_tokens": 9120331, "completion_tokens": 1203002,
         "tokens": 10323333},
        {"key": "batch-etl", "requests": 412, "prompt_tokens": 88210, "completion_tokens": 40113, "tokens": 128323},
    ],
}

GPUS = {
    "source": "nvml", "error": None,
    "gpus": [{"index": i, "name": "NVIDIA H100 80GB HBM3", "kind": "H100", "total_bytes": 80 * GiB,
              "used_bytes": used * GiB, "utilization_pct": util,
              "replicas": [{"replica": r, "state": s, "memory_fraction": 0.9, "used_bytes": 35 * GiB}
                           for r, s in placed]}
             for i, used, util, placed in [
                 (0, 71, 64, [("llama-3.1-70b#0", "READY")]), (1, 71, 61, [("llama-3.1-70b#0", "READY")]),
                 (2, 70, 58, [("llama-3.1-70b#1", "READY")]), (3, 70, 57, [("llama-3.1-70b#1", "READY")]),
                 (4, 9, 3, [("qwen2.5-7b#0", "STARTING")]), (5, 0, 0, [])]],
    "cpu": {"cores": 16, "used": 0, "replicas": []},
}

# A box without NVIDIA's driver whose CPU engines are budgeted twice its cores.
CPU_ONLY = {
    "source": "nvml", "error": "NVMLError_LibraryNotFound: NVML Shared Library Not Found", "gpus": [],
    "cpu": {"cores": 2, "used": 4, "replicas": [
        {"replica": f"smollm2-135m-instruct#{i}", "cores": 2, "state": "READY"} for i in range(2)]},
}

LOG = {"replica": "llama-3.1-70b#0", "file": "/var/log/appliance/replicas/llama-3.1-70b-0.log",
       "lines": [f"INFO 10:0{i}:00 engine: step {i}: 7 running, 0 waiting, KV cache 41.{i}%"
                 for i in range(8)]}


DAEMON_LOG = {"source": "/var/log/appliance/appliance.log",
              "lines": ["2026-11-30 08:59:58 INFO appliance.api: listening on 127.0.0.1:8000",
                        "2026-11-30 09:00:00 INFO appliance.fleet: llama-3.1-70b#1 READY in 94.2s"]}


class FakeAdmin:
    """Answers from the tables above; records what it was asked to do."""

    where = "unix:/var/lib/appliance/admin.sock"

    def __init__(self, down: str | None = None, fail: str | None = None, gpus: dict = GPUS) -> None:
        self.down, self.fail, self.gpus_answer = down, fail, gpus
        self.calls: list[tuple] = []

    async def _answer(self, value: dict, into):
        """The answer as the real client gives it: decoded from JSON into its Struct."""
        if self.down:
            raise DaemonDown(self.down)
        return msgspec.json.decode(msgspec.json.encode(value), type=into)

    async def status(self) -> DaemonStatus:
        return await self._answer(STATUS, DaemonStatus)

    async def gpus(self) -> GpusStatus:
        return await self._answer(self.gpus_answer, GpusStatus)

    async def log(self, model: str, index: int, lines: int) -> ReplicaLog:
        return await self._answer(LOG, ReplicaLog)

    async def daemon_log(self, lines: int) -> DaemonLog:
        return await self._answer(DAEMON_LOG, DaemonLog)

    async def _act(self, into, *call):
        self.calls.append(call)
        if self.fail:
            raise AdminError(self.fail)
        model = next(m for m in STATUS["models"] if m["name"] == call[1])
        if into is ModelStatus:
            return await self._answer(model, into)
        return await self._answer(next(r for r in model["replicas"] if r["index"] == call[2]), into)

    async def scale(self, model: str, replicas: int | None) -> ModelStatus:
        return await self._act(ModelStatus, "scale", model, replicas)

    async def model_action(self, model: str, action: str) -> ModelStatus:
        return await self._act(ModelStatus, action, model)

    async def replica_action(self, model: str, index: int, action: str) -> ReplicaStatus:
        return await self._act(ReplicaStatus, action, model, index)

    async def reload(self) -> ReloadReport:
        self.calls.append(("reload",))
        if self.fail:
            raise AdminError(self.fail)
        return ReloadReport(config="/etc/appliance/appliance.toml", added=["new"])

    async def close(self) -> None:
        pass
