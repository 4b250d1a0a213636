"""The one table of bench/gateway_overhead.py's run, in issue 20's shape: a column per side,
a row per measure (unary req/s and CPU per request at each concurrency; for each stream
scenario chunks/s, CPU per relayed chunk, added time to first chunk and relay delay),
and the appliance against the floor of the stack (a ratio; for the delays, the appliance's
minus the floor's at the same percentile: over_floor). Markdown, so it pastes into the docs.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead_procs import side_label  # noqa: E402

def _num(value: float, digits: int = 0) -> str:
    return "—" if value != value else f"{value:,.{digits}f}"  # NaN: not measured


def _unary_rows(results: list[dict], cols: list[str]) -> list[tuple[str, dict[str, str], str]]:
    rows = []
    for row in results:
        c = row["concurrency"]
        ratio_rps = ratio_cpu = ""
        if "appliance" in row and "raw" in row:
            a, f = row["appliance"], row["raw"]
            ratio_rps = f"{a['rps'] / f['rps']:.2f}"
            ratio_cpu = f"{a['cpu_us_per_req'] / max(f['cpu_us_per_req'], 1e-9):.2f}"
        rows.append((f"unary, c={c}: req/s", {s: _num(row[s]["rps"]) for s in cols if s in row}, ratio_rps))
        rows.append((f"unary, c={c}: CPU µs per request",
                     {s: _num(row[s]["cpu_us_per_req"]) for s in cols if s in row and s != "direct"}, ratio_cpu))
    return rows


def over_floor(a: dict, f: dict, measure: str, digits: int) -> str:
    """The appliance's own share of a delay (time to first chunk, or transit): its p50 / p99
    minus the floor's at the same percentile, in the same run. What the stack itself adds
    under load (the machine's queueing, Granian, aiohttp, the burst of chunks of streams
    paced together) is in both, and cancels; direct's own transit at load is no floor
    to this."""
    p50, p99 = (a[f"{measure}_{q}_ms"] - f[f"{measure}_{q}_ms"] for q in ("p50", "p99"))
    return f"{p50:+.{digits}f} / {p99:+.{digits}f} ms"


def _stream_rows(scenarios: list[dict], cols: list[str]) -> list[tuple[str, dict[str, str], str]]:
    rows = []
    for sc in scenarios:
        what = f"{sc['streams']} streams × {sc['chunks']} chunks, {sc['pacing_ms']:g} ms apart"
        sides = sc["sides"]
        d, a, f = sides.get("direct"), sides.get("appliance"), sides.get("raw")
        both = a is not None and f is not None

        def added(r: dict, key: str, d=d) -> float:
            return r[key] - d[key] if d is not None else float("nan")

        rows.append((f"{what}: chunks/s", {s: _num(r["chunks_per_s"]) for s, r in sides.items()},
                     f"{a['chunks_per_s'] / f['chunks_per_s']:.2f}" if both else ""))
        rows.append((f"{what}: CPU µs per relayed chunk",
                     {s: _num(r["cpu_us_per_chunk"], 1) for s, r in sides.items() if s != "direct"},
                     f"{a['cpu_us_per_chunk'] / max(f['cpu_us_per_chunk'], 1e-9):.2f}" if both else ""))
        rows.append((f"{what}: added time to first chunk p50 / p99, ms",
                     {s: f"{_num(added(r, 'ttft_p50_ms'), 1)} / {_num(added(r, 'ttft_p99_ms'), 1)}"
                      for s, r in sides.items() if s != "direct"},
                     over_floor(a, f, "ttft", 1) if both else ""))
        rows.append((f"{what}: relay delay p50 / p99, ms",
                     {s: f"{_num(added(r, 'transit_p50_ms'), 2)} / {_num(added(r, 'transit_p99_ms'), 2)}"
                      for s, r in sides.items() if s != "direct"},
                     over_floor(a, f, "transit", 2) if both else ""))
    return rows


def print_summary(results: list[dict], scenarios: list[dict], order: list[str]) -> None:
    """The run in one markdown table; "—" where a side has no such measure."""
    seen = {s for row in results for s in row if isinstance(row[s], dict)}
    seen |= {s for sc in scenarios for s in sc["sides"]}
    cols = [s for s in order if s in seen and not s.startswith("ep-") and s not in ("batch", "commit", "fsync",
                                                                                     "traced")]
    rows = _unary_rows(results, cols) + _stream_rows(scenarios, cols)
    print("| | " + " | ".join(side_label(s) for s in cols) + " | appliance / floor |")
    print("|---" * (len(cols) + 2) + "|")
    for what, cells, ratio in rows:
        print(f"| {what} | " + " | ".join(cells.get(s, "—") for s in cols) + f" | {ratio or '—'} |")
