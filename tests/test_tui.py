"""`appliance tui` driven by Textual's Pilot against a real daemon (fake engine)
over its admin socket: each action changes the daemon's state; errors become
notifications; a daemon that is down is said so, and found once it is up."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tui.app import ApplianceTUI
from tui.client import AdminClient

from .conftest import DaemonFactory, fake_model
from .tui_fake import FakeAdmin

SIZE = (80, 24)
SCALING = "[models.autoscaling]\nmin_replicas = 1\nmax_replicas = 3\n"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    factory = DaemonFactory(tmp_path_factory.mktemp("tui"))
    # "other" starts at zero and stays where the operator puts it (no minimum, no idle TTL).
    d = factory.start(fake_model("fake", extra=SCALING)
                      + fake_model("other", extra=SCALING.replace("min_replicas = 1", "min_replicas = 0")))
    d.socket = str(factory.tmp / "state" / "admin.sock")
    yield d
    factory.cleanup()


def model(d, name="fake") -> dict:
    return next(m for m in d.status()["models"] if m["name"] == name)


def kept(d, name="fake") -> list[dict]:
    return [r for r in model(d, name)["replicas"] if not r["retiring"]]


async def until(predicate, timeout: float = 20, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await asyncio.to_thread(predicate)
        if value:
            return value
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def tui(d, interval: float = 0.2) -> ApplianceTUI:
    return ApplianceTUI(AdminClient(socket=d.socket), interval=interval)


async def on_row(app: ApplianceTUI, pilot, key: str) -> None:
    """Move the models table's cursor onto a row ('m:fake', 'r:fake:0')."""
    await pilot.press("2")
    table = app.query_one("#models-table")
    deadline = time.monotonic() + 10
    while key not in [r.key.value for r in table.ordered_rows]:
        assert time.monotonic() < deadline, f"no row {key}"
        await pilot.pause(0.1)
    table.move_cursor(row=[r.key.value for r in table.ordered_rows].index(key))
    await pilot.pause()


async def test_scale_up_then_down_with_a_confirmation(daemon):
    app = tui(daemon)
    async with app.run_test(size=SIZE) as pilot:
        await on_row(app, pilot, "m:fake")
        await pilot.press("s", "2", "enter")
        await until(lambda: len(kept(daemon)) == 2 and model(daemon)["override"] == 2, what="2 replicas")
        await pilot.press("s", "1", "enter")
        await pilot.press("y")  # fewer replicas stop serving: confirmed
        await until(lambda: len(kept(daemon)) == 1, what="back to 1 replica")
        await pilot.press("s", *"auto", "enter")
        await until(lambda: model(daemon)["override"] is None, what="autoscaling again")


async def test_pin_and_unpin(daemon):
    app = tui(daemon)
    async with app.run_test(size=SIZE) as pilot:
        await on_row(app, pilot, "m:other")
        await pilot.press("p")
        await until(lambda: model(daemon, "other")["pinned"], what="pinned")
        await until(lambda: app.query_one("#models-table").get_cell("m:other", "PIN") == "yes",
                    what="the table shows the pin")
        await pilot.press("p")
        await until(lambda: not model(daemon, "other")["pinned"], what="unpinned")


async def test_load_then_unload_after_a_confirmation(daemon):
    app = tui(daemon)
    async with app.run_test(size=SIZE) as pilot:
        await on_row(app, pilot, "m:other")
        await pilot.press("l")
        await until(lambda: [r["state"] for r in kept(daemon, "other")] == ["READY"], what="loaded")
        await pilot.press("u", "n")  # declined: nothing happens
        await pilot.pause(0.5)
        assert len(kept(daemon, "other")) == 1
        await pilot.press("u", "y")
        await until(lambda: model(daemon, "other")["replicas"] == [], what="unloaded")


async def test_restart_and_drain_a_replica(daemon):
    before = kept(daemon)[0]
    app = tui(daemon)
    async with app.run_test(size=SIZE) as pilot:
        await on_row(app, pilot, f"r:fake:{before['index']}")
        await pilot.press("r", "y")
        await until(lambda: any(r["pid"] not in (None, before["pid"]) and r["state"] == "READY"
                                for r in kept(daemon)), what="a new engine process")
        [restarted] = kept(daemon)
        await pilot.press("d", "y")
        # Drained and gone (the autoscaler may add a new replica for min_replicas: another pid).
        await until(lambda: all(r["pid"] != restarted["pid"] or r["retiring"]
                                for r in model(daemon)["replicas"]), what="drained")
    await until(lambda: any(r["state"] == "READY" for r in kept(daemon)), what="fake serving again")


async def test_a_daemon_error_is_a_notification_not_a_crash(daemon):
    httpx.post(f"{daemon.url}/admin/models/other/load", json={}, timeout=10)
    [replica] = await until(lambda: kept(daemon, "other"), what="other loaded")
    app = tui(daemon, interval=3600)  # the table keeps what it first saw
    async with app.run_test(size=SIZE) as pilot:
        await on_row(app, pilot, f"r:other:{replica['index']}")
        httpx.post(f"{daemon.url}/admin/models/other/unload", json={}, timeout=10)
        await until(lambda: model(daemon, "other")["replicas"] == [], what="gone")
        await pilot.press("r", "y")  # restart a replica the daemon no longer has
        await until(lambda: [n for n in app._notifications if "failed" in (n.title or "")],
                    what="a notification")
        [note] = app._notifications
        assert note.severity == "error" and f"other#{replica['index']}" in note.message
        assert app.is_running


async def test_the_log_view_follows_the_chosen_replica(daemon):
    app = tui(daemon)
    async with app.run_test(size=SIZE) as pilot:
        index = kept(daemon)[0]["index"]
        await on_row(app, pilot, f"r:fake:{index}")
        await pilot.press("4")
        log = app.query_one("#log")
        await until(lambda: any("fake_engine" in line for line in log.lines), what="the replica's log")
        assert app.log_replica == ("fake", index)


async def test_a_daemon_that_is_down_is_said_so_then_found(tmp_path):
    factory = DaemonFactory(tmp_path)
    socket = tmp_path / "state" / "admin.sock"
    app = ApplianceTUI(AdminClient(socket=str(socket)), interval=0.2)
    try:
        async with app.run_test(size=SIZE) as pilot:
            banner = app.query_one("#banner")
            await until(lambda: banner.has_class("down"), what="the down banner")
            text = str(banner.render())
            assert "DAEMON NOT REACHABLE" in text and "not running" in text
            await asyncio.to_thread(factory.start, fake_model("fake"))
            await until(lambda: not banner.has_class("down"), what="the daemon found")
            await until(lambda: app.query_one("#models-table").row_count == 2, what="its model shown")
            await pilot.pause()
    finally:
        factory.cleanup()


async def test_errors_from_actions_never_crash_the_ui():
    app = ApplianceTUI(FakeAdmin(fail="Model 'x' is not configured"), interval=3600)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("2", "l", "p", "u", "y")
        await pilot.pause(0.3)
        messages = [n.message for n in app._notifications]
        assert messages.count("Model 'x' is not configured") == 3
        assert app.is_running
