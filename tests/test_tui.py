"""`appliance tui` driven by Textual's Pilot against a real daemon (fake engine)
over its admin socket: each action changes the daemon's state; errors become
notifications; a daemon that is down is said so, and found once it is up."""

from __future__ import annotations

import asyncio
import io
import time

import httpx
import pytest
from rich.console import Console

from tui.app import ApplianceTUI
from tui.client import AdminClient

from .conftest import DaemonFactory, fake_model
from .tui_fake import CPU_ONLY, FakeAdmin

SIZE = (80, 24)
SCALING = "[models.autoscaling]\nmin_replicas = 1\nmax_replicas = 3\n"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    factory = DaemonFactory(tmp_path_factory.mktemp("tui"))
    # "other" starts at zero and stays where the operator puts it (no minimum, no idle TTL).
    d = factory.start(fake_model("fake", extra=SCALING)
                      + fake_model("other", extra=SCALING.replace("min_replicas = 1", "min_replicas = 0")),
                      server=f'log_file = "{factory.tmp / "appliance.log"}"')
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
        await until(lambda: app.query_one("#models-table").get_cell("m:other", "PIN").plain == "yes",
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
        # The daemon's own words for what it did, not a bare "done".
        [note] = [n for n in app._notifications if n.title == f"restart fake#{before['index']}"]
        assert note.message.startswith(f"restarting fake#{before['index']}: ") and "starts again" in note.message
        [restarted] = kept(daemon)
        await pilot.press("d", "y")
        said = await until(lambda: [n.message for n in app._notifications if n.title.startswith("drain ")],
                           what="the drain's notification")
        assert said[0].startswith(f"draining fake#{restarted['index']}: no new requests; it stops")
        # Drained and gone (the autoscaler may add a new replica for min_replicas: another pid).
        await until(lambda: all(r["pid"] != restarted["pid"] or r["retiring"]
                                for r in model(daemon)["replicas"]), what="drained")
    await until(lambda: any(r["state"] == "READY" for r in kept(daemon)), what="fake serving again")


async def test_an_action_is_notified_in_the_daemons_own_words(daemon):
    """Scale beyond max_replicas: the notification says it was clamped, and why (the
    answer's `said`), not "done"."""
    app = tui(daemon)
    try:
        async with app.run_test(size=SIZE) as pilot:
            await on_row(app, pilot, "m:other")
            await pilot.press("s", "9", "enter")
            [note] = await until(lambda: [n for n in app._notifications if n.title == "scale other to 9"],
                                 what="the scale's notification")
            assert note.message.startswith("clamped to 3 because max_replicas = 3; "), note.message
            assert note.severity == "information"
    finally:
        httpx.post(f"{daemon.url}/admin/models/other/unload", json={}, timeout=10)
        await until(lambda: model(daemon, "other")["replicas"] == [], what="other unloaded again")


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
        assert app.log_source == ("fake", index)


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


async def test_the_daemon_log_is_one_of_the_logs(daemon):
    app = tui(daemon)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("4")
        await until(lambda: app.log_source is not None, what="a log chosen")
        await pilot.press("left_square_bracket")  # before the first replica: the daemon's own log
        assert app.log_source == "daemon"
        log = app.query_one("#log")
        await until(lambda: any("appliance" in line for line in log.lines), what="the daemon's log")
        assert "appliance.log" in str(app.query_one("#log-title").render())


# --- the conventions of nvitop, k9s and htop, on fixed answers (tests/tui_fake.py) ------------


def fake_tui(**kw) -> ApplianceTUI:
    return ApplianceTUI(FakeAdmin(**kw), interval=3600)


def rows(app: ApplianceTUI, view: str = "models") -> list[str]:
    return [r.key.value for r in app.query_one(f"#{view}-table").ordered_rows]


def shown(app, widget: str) -> str:
    """A Static's words as the terminal shows them, without styles."""
    console = Console(width=100, record=True, file=io.StringIO())
    console.print(app.query_one(widget).content)
    return console.export_text()


async def test_the_app_opens_on_the_overview():
    app = fake_tui()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert app.active_tab == "overview"
        await until(lambda: "llama-3.1-70b" in shown(app, "#overview-body"), what="the overview filled")
        assert "GPU0" in shown(app, "#overview-body")


async def test_a_gpu_replicas_detail_shows_the_memory_nvml_measured():
    app = fake_tui()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("2")
        await until(lambda: "#0 " in shown(app, "#model-detail"), what="the detail filled")
        detail = shown(app, "#model-detail")
        assert "GPU 0,1" in detail and "GPU mem 70.0 GiB" in detail  # 35 GiB on each of its 2 GPUs


async def test_question_mark_lists_every_key_binding_per_view():
    app = fake_tui()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("question_mark")
        await pilot.pause()
        keys = app.keys_per_view()
        listed = {does for found in keys.values() for _, does in found}
        assert {b.description for b in app.BINDINGS} <= listed  # every binding, none forgotten
        assert ("s", "Scale") in keys["Models"] and ("f", "Follow on/off") in keys["Logs"]
        assert ("s", "Scale") not in keys["Logs"] and ("o", "Sort") in keys["Usage"]
        text = shown(app.screen, "#help Static")
        assert "Pin/unpin" in text and "Models" in text
        await pilot.press("escape")
        assert app.screen is app.screen_stack[0]


async def test_slash_filters_the_current_table_and_escape_clears_it():
    app = fake_tui()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("2", "slash", *"qwen")
        await pilot.pause()
        assert rows(app) == ["m:qwen2.5-7b", "r:qwen2.5-7b:0"]
        await pilot.press("enter", "escape")
        await pilot.pause()
        assert len(rows(app)) == 6
        await pilot.press("3", "slash", *"health")
        await pilot.pause()
        assert rows(app, "routes") == ["route:health-records"]
        await pilot.press(*"x" * 3)
        await pilot.pause()
        assert rows(app, "routes") == []
        assert "No routes match the filter 'healthxxx' (Esc clears it)." in shown(app, "#routes-note")


async def test_o_sorts_the_models_and_capital_o_reverses():
    app = fake_tui()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("2", "o", "o", "o", "o")  # MODEL, STATE, REPL, RPS: highest first
        await pilot.pause()
        table = app.query_one("#models-table")
        assert str(table.columns["RPS"].label) == "RPS ▼"
        by_rps = ["m:llama-3.1-70b", "m:qwen2.5-7b", "m:smollm2-135m-instruct"]
        assert [k for k in rows(app) if k.startswith("m:")] == by_rps
        assert rows(app)[1:3] == ["r:llama-3.1-70b:0", "r:llama-3.1-70b:1"]  # replicas stay with their model
        await pilot.press("O")
        await pilot.pause()
        assert [k for k in rows(app) if k.startswith("m:")] == by_rps[::-1]


async def test_a_header_click_sorts_by_it():
    app = fake_tui()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("2")
        await pilot.pause()
        await pilot.click("#models-table", offset=(44, 0))  # the QUEUE header
        await pilot.pause()
        assert "QUEUE" in str(app.query_one("#models-table").ordered_columns[4].label)
        assert rows(app)[0] == "m:qwen2.5-7b"  # 2 queued, the others none


async def test_a_header_click_sorts_the_routes_and_usage_tables_too():
    app = fake_tui()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("5")
        await until(lambda: rows(app, "usage"), what="the usage table filled")
        assert rows(app, "usage") == ["key:team-search", "key:batch-etl"]  # the daemon's order
        await pilot.click("#usage-table", offset=(2, 0))  # KEY: a to z
        await pilot.pause()
        assert rows(app, "usage") == ["key:batch-etl", "key:team-search"]
        assert str(app.query_one("#usage-table").ordered_columns[0].label) == "KEY ▲"
        await pilot.click("#usage-table", offset=(2, 0))  # again: reversed
        await pilot.pause()
        assert rows(app, "usage") == ["key:team-search", "key:batch-etl"]
        assert str(app.query_one("#usage-table").ordered_columns[0].label) == "KEY ▼"
        await pilot.press("3")
        await until(lambda: rows(app, "routes"), what="the routes table filled")
        await pilot.press("o")  # ROUTE
        await pilot.pause()
        assert rows(app, "routes") == ["route:general", "route:health-records"]
        await pilot.press("O")
        await pilot.pause()
        assert rows(app, "routes") == ["route:health-records", "route:general"]
        assert app.orders["usage"].column == 0 and app.orders["models"].column is None  # each its own


@pytest.mark.parametrize("said", [
    "CPU-only: no NVIDIA GPU (the NVIDIA driver is not installed)",  # not NVML's error code
    "4/2 cores\n  WARNING over-committed: 4 cores budgeted, the machine has 2",
], ids=["cpu-only-line", "over-commit-warning"])
async def test_a_cpu_only_over_committed_box_says_so_in_words(said):
    app = fake_tui(gpus=CPU_ONLY)
    async with app.run_test(size=SIZE) as pilot:
        await until(lambda: "CPU-only" in shown(app, "#overview-body"), what="the overview filled")
        text = shown(app, "#overview-body")
        assert said in text and "NVMLError" not in text
        await pilot.pause()


async def test_r_reloads_the_config_after_a_confirmation():
    admin = FakeAdmin()
    app = ApplianceTUI(admin, interval=3600)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("R", "n")  # asked first: no, nothing sent
        await pilot.pause(0.2)
        assert ("reload",) not in admin.calls
        await pilot.press("R", "y")
        await until(lambda: ("reload",) in admin.calls, what="the reload sent")
        await until(lambda: any(n.message.startswith("config reloaded: 1 models added") for n in app._notifications),
                    what="what it did, said")


async def test_a_name_that_reads_as_markup_is_shown_as_it_is_not_a_crash():
    """Table cells were read as Rich markup: a key named "[/]" crashed the usage tab
    (MarkupError), "[reverse]..." styled the row, a route's " [tag]" vanished; a filter
    typed as markup crashed the note that names it."""
    from . import tui_fake

    class Marked(tui_fake.FakeAdmin):
        async def status(self):
            marked = {**tui_fake.STATUS, "usage": [{**u, "key": name} for u, name
                                                   in zip(tui_fake.STATUS["usage"], ["[/]", "[reverse]x"])]}
            return await self._answer(marked, tui_fake.DaemonStatus)

    app = ApplianceTUI(Marked(), interval=3600)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("5")
        await until(lambda: rows(app, "usage"), what="the usage table filled")
        table = app.query_one("#usage-table")
        cells = [table.get_row(key)[0] for key in ("key:[/]", "key:[reverse]x")]
        assert [str(c) for c in cells] == ["[/]", "[reverse]x"]
        # A filter that reads as markup and matches nothing is named as typed.
        await pilot.press("slash", *"[/]zz")
        await pilot.pause()
        assert rows(app, "usage") == []
        assert "No keys match the filter '[/]zz'" in shown(app, "#usage-note")
        assert app.is_running


async def test_a_fatal_replicas_detail_says_no_restart_is_coming_and_the_keys_that_fix_it():
    """The daemon gave up on a FATAL replica: the detail says so and how to act from the
    keyboard (its log, then a restart), as `appliance status` names the commands."""
    from . import tui_fake

    class Fatal(tui_fake.FakeAdmin):
        async def status(self):
            first = {**tui_fake.STATUS["models"][0], "ready": False, "replicas": [tui_fake._replica(
                "llama-3.1-70b", 0, "FATAL", 0,
                last_error="gave up after 6 crashes within 300s (supervisor.max_crashes = 5); last: engine exited")]}
            status = {**tui_fake.STATUS, "ready": False, "models": [first, *tui_fake.STATUS["models"][1:]]}
            return await self._answer(status, tui_fake.DaemonStatus)

    app = ApplianceTUI(Fatal(), interval=3600)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("2")
        await until(lambda: "FATAL" in shown(app, "#model-detail"), what="the detail filled")
        detail = " ".join(shown(app, "#model-detail").split())
        assert "no restart is coming" in detail
        assert "its log: 4 then ]" in detail and "press r on #0 in this table to restart it" in detail
