"""Long store work shows progress (issue 19): plain lines every few seconds when stderr is
not a terminal (journald, CI), a final line for a long run, nothing with --quiet; --json
output on stdout stays one document."""

from __future__ import annotations

import io
import json

from appliance.cli.progress import ByteProgress

from .test_store import gguf, run


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_plain_progress_lines_every_interval_and_a_final_line():
    out, clock = io.StringIO(), Clock()
    with ByteProgress("importing m", 4 * 1024**3, stream=out, clock=clock, every_s=5) as progress:
        for _ in range(4):
            clock.now += 3
            progress(1024**3)
    lines = out.getvalue().splitlines()
    # At 6 s (2 GiB) and 12 s (4 GiB) a line each, then how it ended.
    assert lines == [
        "importing m: 2.0 GiB of 4.0 GiB (50%), 341.3 MiB/s",
        "importing m: 4.0 GiB of 4.0 GiB (100%), 341.3 MiB/s",
        "importing m: 4.0 GiB in 12s (341.3 MiB/s)",
    ]


def test_quiet_progress_and_short_work_print_nothing():
    out, clock = io.StringIO(), Clock()
    with ByteProgress("verifying m", 10, stream=out, clock=clock, quiet=True) as progress:
        clock.now += 60
        progress(10)
    with ByteProgress("verifying m", 10, stream=out, clock=clock) as progress:
        progress(10)  # done within the first interval: no noise
    assert out.getvalue() == ""


def test_import_and_verify_json_stay_one_document_with_progress_on(tmp_path):
    src = gguf(tmp_path / "m.gguf")
    imported = run(tmp_path, "models", "import", str(src), "--json")
    assert json.loads(imported.stdout)[0]["name"] == "m"
    verified = run(tmp_path, "models", "verify", "m", "--json", "--quiet")
    assert json.loads(verified.stdout)[0]["state"] == "ready" and verified.stderr == ""
