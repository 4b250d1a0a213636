"""bench/gateway_overhead.py --stream, in its shortest run: every chunk the engine streams
reaches the client through every side (direct, the floor on ASGI and on RSGI, the naive
proxy, the appliance)
with its send stamp, so the table it prints is measured on whole streams. No timing is
judged here (shared machines); the bench itself reports the figures."""

from __future__ import annotations

import json
import math
import subprocess

from .conftest import PY, ROOT


def test_stream_bench_receives_every_chunk_through_every_side() -> None:
    out = subprocess.run(
        [PY, str(ROOT / "bench" / "gateway_overhead.py"), "--stream", "--concurrency", "none",
         "--streams", "3", "--chunks", "5", "--pacing-ms", "1", "--duration", "0.1", "--no-pin", "--rsgi", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=240, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout[out.stdout.index("\n{") + 1:])
    assert report["unary"] == []
    [scenario] = report["stream"]
    assert list(scenario["sides"]) == ["direct", "raw", "rsgi", "naive", "appliance"]
    for side, r in scenario["sides"].items():
        assert r["errors"] == 0, (side, r["first_error"])
        assert r["chunks"] == r["expected"] == r["rounds"] * 3 * 5, side
        assert not math.isnan(r["transit_p99_ms"]), f"{side} lost the engine's send stamps"
    assert "| appliance / floor |" in out.stdout
