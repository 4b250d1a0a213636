"""The operator's terminal UI: the whole box at a glance, and the admin actions.

It only talks to the daemon's admin API (``tui.client``), polled once a second
in a worker so input never waits on the network. Daemon errors become
notifications; an unreachable daemon becomes a banner, and polling goes on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable

from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.css.query import NoMatches
from textual.widgets import DataTable, Footer, Log, Static, TabbedContent, TabPane

from appliance.status import DaemonStatus, GpusStatus, ModelAction, ModelStatus, ReplicaAction, ReplicaLog
from tui import views
from tui.client import Admin, AdminError, DaemonDown
from tui.screens import ConfirmScreen, ScaleScreen

TABS = ("overview", "models", "routes", "logs", "usage")
# The key bindings that act on the models tab's selection (appliance/status.py's vocabulary;
# "pin" toggles pin and unpin).
MODEL_ACTIONS = {"scale", ModelAction.LOAD, ModelAction.UNLOAD, ModelAction.PIN, *ReplicaAction}
LOG_ACTIONS = {"prev_replica", "next_replica", "follow"}
LOG_LINES = 200


class ApplianceTUI(App):
    TITLE = "appliance"
    ENABLE_COMMAND_PALETTE = False
    CSS = """
    #top { height: 1; background: $boost; padding: 0 1; }
    #banner { display: none; height: auto; border: heavy $error; padding: 0 1; }
    #banner.down { display: block; }
    Screen { overflow: hidden; }
    TabbedContent { height: 1fr; }
    ContentSwitcher { height: 1fr; }
    TabPane { padding: 0; height: 1fr; }
    VerticalScroll { padding: 0 1; }
    #models-table { height: 1fr; min-height: 5; }
    #model-detail { height: 9; border-top: solid $accent; padding: 0 1; }
    #log-title { height: 1; padding: 0 1; background: $boost; }
    #log { height: 1fr; }
    """
    BINDINGS = [
        Binding("q", "quit", "Quit"),
        Binding("s", "scale", "Scale"),
        Binding("l", "load", "Load"),
        Binding("u", "unload", "Unload"),
        Binding("p", "pin", "Pin/unpin"),
        Binding("r", "restart", "Restart"),
        Binding("d", "drain", "Drain"),
        Binding("left_square_bracket", "prev_replica", "Prev replica"),
        Binding("right_square_bracket", "next_replica", "Next replica"),
        Binding("f", "follow", "Follow on/off"),
        *(Binding(str(i + 1), f"show_tab('{tab}')", tab.title(), show=False) for i, tab in enumerate(TABS)),
    ]

    def __init__(self, admin: Admin, interval: float = 1.0) -> None:
        super().__init__()
        self.admin = admin
        self.interval = interval
        self.status: DaemonStatus | None = None
        self.gpus: GpusStatus | None = None
        self.down: str | None = None
        self.log_replica: tuple[str, int] | None = None
        self.log_lines: list[str] = []
        self.follow = True
        self._polling = False

    # --- layout ------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Static(views.header(None, self.admin.where), id="top")
        yield Static("", id="banner")
        with TabbedContent(initial="models"):
            with TabPane("1 Overview", id="overview"), VerticalScroll():
                yield Static("Waiting for the daemon...", id="overview-body")
            with TabPane("2 Models", id="models"):
                yield DataTable(id="models-table", cursor_type="row")
                yield Static("", id="model-detail")
            with TabPane("3 Routes", id="routes"), VerticalScroll():
                yield Static("Waiting for the daemon...", id="routes-body")
            with TabPane("4 Logs", id="logs"):
                yield Static("No replica chosen", id="log-title")
                yield Log(id="log", max_lines=5000)
            with TabPane("5 Usage", id="usage"), VerticalScroll():
                yield Static("Waiting for the daemon...", id="usage-body")
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one("#models-table", DataTable)
        for col in views.MODEL_COLUMNS:
            table.add_column(col, key=col)
        table.focus()
        self.poll()
        self.set_interval(self.interval, self.poll)

    async def on_unmount(self) -> None:
        await self.admin.close()

    # --- polling: a worker, so input never waits ------------------------------------------

    def poll(self) -> None:
        if not self._polling:
            self._polling = True
            self.run_worker(self._poll(), group="poll", exit_on_error=False)

    async def _poll(self) -> None:
        try:
            status = await self.admin.status()
            gpus = await self.admin.gpus() if self.active_tab == "overview" or self.gpus is None else self.gpus
            log = None
            if self.active_tab == "logs":
                self._choose_log_replica(status)
                if self.log_replica is not None:
                    try:
                        log = await self.admin.log(*self.log_replica, LOG_LINES)
                    except AdminError as exc:  # shown where the file's name goes
                        log = ReplicaLog(replica="%s#%d" % self.log_replica, file=str(exc))
        except DaemonDown as exc:
            self._show_down(str(exc))
        except AdminError as exc:
            self._show_down(f"the daemon refused: {exc}")
        except Exception as exc:  # never let a poll take the UI down
            self._show_down(f"{type(exc).__name__}: {exc}")
        else:
            self.status, self.gpus = status, gpus
            self._show_down(None)
            self._render_all()
            if log is not None:
                self._render_log(log)
        finally:
            self._polling = False

    def _show_down(self, message: str | None) -> None:
        if message == self.down:
            return
        self.down = message
        banner = self.query_one("#banner", Static)
        if message is None:
            banner.remove_class("down")
            return
        shown = "; the views show its last answer" if self.status is not None else ""
        banner.update(
            Text.assemble(
                ("DAEMON NOT REACHABLE", "bold reverse"), f"  {message}. ", f"Retrying every {self.interval:g}s{shown}."
            )
        )
        banner.add_class("down")
        top = self.query_one("#top", Static)
        top.update(Text.assemble(("appliance", "bold"), "  ", ("DOWN", "bold reverse"), f"  {self.admin.where}"))

    # --- rendering -----------------------------------------------------------------------

    @property
    def active_tab(self) -> str:
        return self.query_one(TabbedContent).active

    def _render_all(self) -> None:
        status = self.status
        if status is None:
            return
        self.query_one("#top", Static).update(views.header(status, self.admin.where))
        self.query_one("#overview-body", Static).update(views.overview(status, self.gpus))
        self.query_one("#routes-body", Static).update(views.routes(status))
        self.query_one("#usage-body", Static).update(views.usage(status))
        self._render_models()

    def _render_models(self) -> None:
        table = self.query_one("#models-table", DataTable)
        rows = views.model_rows(self.status) if self.status is not None else []
        keys = [key for key, _ in rows]
        current = [row.key.value for row in table.ordered_rows]
        if keys == current:
            for key, cells in rows:
                for col, value in zip(views.MODEL_COLUMNS, cells, strict=False):
                    table.update_cell(key, col, value)
        else:
            selected = self.selected_key
            table.clear()
            for key, cells in rows:
                table.add_row(*cells, key=key)
            if selected in keys:
                table.move_cursor(row=keys.index(selected))
        self._render_detail()

    def _render_detail(self) -> None:
        if self.status is None:
            return
        model, _ = self.selection()
        self.query_one("#model-detail", Static).update(views.model_detail(self.status, model))

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        with contextlib.suppress(NoMatches):  # a highlight still queued while the app closes
            self._render_detail()

    def on_tabbed_content_tab_activated(self, event: TabbedContent.TabActivated) -> None:
        self.refresh_bindings()
        tab = self.active_tab
        if tab == "models":
            self.query_one("#models-table", DataTable).focus()
        elif tab == "logs":
            self.query_one("#log", Log).focus()
        else:  # arrows and page keys scroll the view
            self.query_one(f"#{tab} VerticalScroll", VerticalScroll).focus()
        self.poll()

    # --- selection ---------------------------------------------------------------------------

    @property
    def selected_key(self) -> str | None:
        table = self.query_one("#models-table", DataTable)
        if table.row_count == 0:
            return None
        try:
            return table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        except Exception:
            return None

    def selection(self) -> tuple[str | None, int | None]:
        """The model and replica index (None on a model row) under the cursor."""
        key = self.selected_key
        if not key:
            return None, None
        if key.startswith("r:"):
            model, _, index = key[2:].rpartition(":")
            return model, int(index)
        return key[2:], None

    def _model(self, name: str) -> ModelStatus | None:
        return next((m for m in self.status.models if m.name == name), None) if self.status is not None else None

    def _replica(self) -> tuple[str, int] | None:
        """The replica a replica action applies to: the cursor's, or the model's only one."""
        model, index = self.selection()
        if model is None:
            return None
        if index is not None:
            return model, index
        m = self._model(model)
        replicas = m.replicas if m is not None else []
        if len(replicas) == 1:
            return model, replicas[0].index
        self.notify(f"{model} has {len(replicas)} replicas: move the cursor onto one (down arrow)", severity="warning")
        return None

    # --- actions ----------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple) -> bool | None:
        if action in MODEL_ACTIONS:
            return self._tab_is("models")
        if action in LOG_ACTIONS:
            return self._tab_is("logs")
        return True

    def _tab_is(self, tab: str) -> bool:
        try:
            return self.active_tab == tab
        except Exception:
            return False

    def action_show_tab(self, tab: str) -> None:
        self.query_one(TabbedContent).active = tab

    def _selected_model(self) -> str | None:
        model, _ = self.selection()
        if model is None:
            self.notify("No model selected", severity="warning")
        return model

    def action_scale(self) -> None:
        model = self._selected_model()
        if model is None:
            return
        m = self._model(model)
        if m is None:
            return
        current = sum(1 for r in m.replicas if not r.retiring)

        def chosen(value) -> None:
            if value == "":
                return
            label = f"scale {model} to {'auto' if value is None else value}"
            if value is not None and value < current:
                self._confirm(
                    f"Scale {model} down from {current} to {value} replica(s)? "
                    "Replicas taken away stop serving (drained first).",
                    label,
                    lambda: self.admin.scale(model, value),
                )
            else:
                self._run(label, lambda: self.admin.scale(model, value))

        self.push_screen(ScaleScreen(model, current, m.max_replicas), chosen)

    def action_load(self) -> None:
        model = self._selected_model()
        if model is not None:
            self._run(f"load {model}", lambda: self.admin.model_action(model, ModelAction.LOAD))

    def action_unload(self) -> None:
        model = self._selected_model()
        if model is not None:
            self._confirm(
                f"Unload {model}? All its replicas drain and stop; its next request starts it again.",
                f"unload {model}",
                lambda: self.admin.model_action(model, ModelAction.UNLOAD),
            )

    def action_pin(self) -> None:
        model = self._selected_model()
        if model is None:
            return
        m = self._model(model)
        action = ModelAction.UNPIN if m is not None and m.pinned else ModelAction.PIN
        self._run(f"{action} {model}", lambda: self.admin.model_action(model, action))

    def action_restart(self) -> None:
        target = self._replica()
        if target is not None:
            model, index = target
            self._confirm(
                f"Restart {model}#{index}? It stops serving until its engine is ready again.",
                f"restart {model}#{index}",
                lambda: self.admin.replica_action(model, index, ReplicaAction.RESTART),
            )

    def action_drain(self) -> None:
        target = self._replica()
        if target is not None:
            model, index = target
            self._confirm(
                f"Drain {model}#{index}? It takes no new requests, finishes the ones in flight, then stops.",
                f"drain {model}#{index}",
                lambda: self.admin.replica_action(model, index, ReplicaAction.DRAIN),
            )

    def _confirm(self, question: str, label: str, call: Callable[[], Awaitable]) -> None:
        def answered(yes: bool | None) -> None:
            if yes:
                self._run(label, call)

        self.push_screen(ConfirmScreen(question), answered)

    def _run(self, label: str, call: Callable[[], Awaitable]) -> None:
        async def work() -> None:
            try:
                answer = await call()
            except (AdminError, DaemonDown) as exc:
                self.notify(str(exc), title=f"{label}: failed", severity="error", timeout=8)
                return
            except Exception as exc:  # never crash on an action
                self.notify(f"{type(exc).__name__}: {exc}", title=f"{label}: failed", severity="error")
                return
            # The daemon's own words (clamped, waiting for capacity, ...), not a bare "done".
            self.notify(getattr(answer, "said", None) or label, title=label)
            self.poll()

        self.run_worker(work(), group="actions", exit_on_error=False)

    # --- logs --------------------------------------------------------------------------------

    def _all_replicas(self, status: DaemonStatus | None) -> list[tuple[str, int]]:
        return [(m.name, r.index) for m in status.models for r in m.replicas] if status is not None else []

    def _choose_log_replica(self, status: DaemonStatus) -> None:
        replicas = self._all_replicas(status)
        if self.log_replica in replicas:
            return
        model, index = self.selection()
        mine = [r for r in replicas if r[0] == model and (index is None or r[1] == index)]
        self.log_replica = (mine or replicas or [None])[0]

    def _step_replica(self, step: int) -> None:
        replicas = self._all_replicas(self.status)
        if not replicas:
            self.notify("No replicas", severity="warning")
            return
        at = replicas.index(self.log_replica) if self.log_replica in replicas else -step
        self.log_replica = replicas[(at + step) % len(replicas)]
        self.log_lines = []
        self.query_one("#log", Log).clear()
        self.poll()

    def action_prev_replica(self) -> None:
        self._step_replica(-1)

    def action_next_replica(self) -> None:
        self._step_replica(1)

    def action_follow(self) -> None:
        self.follow = not self.follow
        log = self.query_one("#log", Log)
        log.auto_scroll = self.follow
        if self.follow:
            log.scroll_end(animate=False)
        self.notify("following the log" if self.follow else "paused: scroll freely, f to follow again")

    def _render_log(self, data: ReplicaLog) -> None:
        title = self.query_one("#log-title", Static)
        title.update(
            Text.assemble((data.replica, "bold"), f"  {'following' if self.follow else 'paused'}  {data.file}")
        )
        lines = data.lines
        log = self.query_one("#log", Log)
        old = self.log_lines
        if lines == old:
            return
        for k in range(min(len(old), len(lines)), 0, -1):
            if old[-k:] == lines[:k]:
                log.write_lines(lines[k:])
                break
        else:
            log.clear()
            log.write_lines(lines)
        self.log_lines = lines
