"""The daemon's periodic jobs (appliance/periodic.py): one owner, on the daemon's loop."""

from __future__ import annotations

import asyncio

import pytest

from appliance.periodic import Periodic


async def _until(check, what: str) -> None:
    for _ in range(2000):
        if check():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


async def test_a_job_runs_again_and_again_until_closed_and_not_after():
    runs = []
    jobs = Periodic()
    jobs.every(0.01, "count", lambda: runs.append(1))
    await _until(lambda: len(runs) >= 3, "three runs")
    await jobs.close()
    after = len(runs)
    await asyncio.sleep(0.05)
    assert len(runs) == after


async def test_a_failing_job_is_logged_and_runs_again(caplog):
    runs = []

    async def flaky() -> None:
        runs.append(1)
        if len(runs) == 1:
            raise RuntimeError("disk on fire")

    jobs = Periodic()
    jobs.every(0.01, "flaky", flaky)
    await _until(lambda: len(runs) >= 3, "runs after the failure")
    await jobs.close()
    assert "periodic job flaky failed" in caplog.text and "disk on fire" in caplog.text


async def test_a_slow_job_never_runs_twice_at_once():
    running, most = 0, 0

    async def slow() -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        try:
            await asyncio.sleep(0.03)  # three intervals
        finally:
            running -= 1

    jobs = Periodic()
    jobs.every(0.01, "slow", slow)
    await asyncio.sleep(0.2)
    await jobs.close()
    assert most == 1 and running == 0  # closing cancelled the run in progress


async def test_close_stops_a_run_in_progress():
    started, finished = asyncio.Event(), []

    async def long() -> None:
        started.set()
        await asyncio.sleep(3600)
        finished.append(1)

    jobs = Periodic()
    jobs.every(0.01, "long", long)
    await asyncio.wait_for(started.wait(), 10)
    await asyncio.wait_for(jobs.close(), 10)
    assert not finished


def test_a_job_needs_a_positive_interval_and_a_unique_name():
    async def main() -> None:
        jobs = Periodic()
        with pytest.raises(ValueError, match="interval"):
            jobs.every(0, "zero", lambda: None)
        jobs.every(1, "once", lambda: None)
        with pytest.raises(ValueError, match="already"):
            jobs.every(1, "once", lambda: None)
        await jobs.close()

    asyncio.run(main())
