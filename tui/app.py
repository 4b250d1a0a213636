"""The operator's terminal UI: the whole box at a glance, and the admin actions.

It only talks to the daemon's admin API (``tui.client``), polled once a second
in a worker so input never waits on the network. Daemon errors become
notifications; an unreachable daemon becomes a banner, and polling goes on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Awaitable, Callable

from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.css.query import NoMatches
from textual.widgets import DataTable, Footer, Input, Log, Static, TabbedContent, TabPane

from appliance.status import DaemonStatus, GpusStatus, ModelAction, ModelStatus, ReplicaAction
from tui import views
from tui.client import Admin, AdminError, DaemonDown
from tui.keys import BINDINGS as KEY_BINDINGS
from tui.keys import TABLE_COLUMNS, TABS, applies
from tui.screens import ConfirmScreen, HelpScreen, ScaleScreen

TABLE_IDS = {view: f"{view}-table" for view in TABLE_COLUMNS}
# The logs view shows the daemon's own log or one replica's (model, index); `[` `]` step through them.
DAEMON = "daemon"
LogSource = str | tuple[str, int]
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
    #routes-table, #usage-table { height: auto; max-height: 1fr; }
    .note { height: auto; padding: 0 1; }
    #model-detail { height: 9; border-top: solid $accent; padding: 0 1; }
    #log-title { height: 1; padding: 0 1; background: $boost; }
    #log { height: 1fr; }
    #filter { display: none; height: 1; border: none; padding: 0 1; background: $boost; }
    #filter.shown { display: block; }
    """
    BINDINGS = KEY_BINDINGS

    def __init__(self, admin: Admin, interval: float = 1.0) -> None:
        super().__init__()
        self.admin = admin
        self.interval = interval
        self.status: DaemonStatus | None = None
        self.gpus: GpusStatus | None = None
        self.down: str | None = None
        self.log_source: LogSource | None = None
        self.log_lines: list[str] = []
        self.follow = True
        self.orders = {view: views.Order() for view in TABLE_COLUMNS}  # each table's sort and filter
        self._polling = False

    # --- layout ------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Static(views.header(None, self.admin.where), id="top")
        yield Static("", id="banner")
        with TabbedContent(initial=TABS[0]):
            with TabPane("1 Overview", id="overview"), VerticalScroll():
                yield Static("Waiting for the daemon...", id="overview-body")
            with TabPane("2 Models", id="models"):
                yield DataTable(id="models-table", cursor_type="row")
                yield Static("", id="model-detail")
            with TabPane("3 Routes", id="routes"):
                yield DataTable(id="routes-table", cursor_type="row")
                yield Static("Waiting for the daemon...", id="routes-note", classes="note")
            with TabPane("4 Logs", id="logs"):
                yield Static("No replica chosen", id="log-title")
                yield Log(id="log", max_lines=5000)
            with TabPane("5 Usage", id="usage"):
                yield DataTable(id="usage-table", cursor_type="row")
                yield Static("Waiting for the daemon...", id="usage-note", classes="note")
        yield Input(placeholder="filter: type to narrow the rows, Enter to keep, Esc to clear", id="filter")
        yield Footer()

    def on_mount(self) -> None:
        for view in TABLE_COLUMNS:
            self._columns(view)
        self._focus_view()
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
            # (The models' detail shows each GPU replica's memory as NVML measures it.)
            fresh = self.active_tab in ("overview", "models") or self.gpus is None
            gpus = await self.admin.gpus() if fresh else self.gpus
            log = None
            if self.active_tab == "logs":
                self._choose_log_source(status)
                log = await self._fetch_log()
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
                self._render_log(*log)
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
        self._fill("models", views.model_rows(status, self.orders["models"]))
        self._render_detail()
        routes = self._fill("routes", views.route_rows(status, self.orders["routes"]))
        note = views.empty_note("routes", "No routes configured.", len(status.routes), routes, self.orders["routes"])
        self.query_one("#routes-note", Static).update(note)
        keys = self._fill("usage", views.usage_rows(status, self.orders["usage"]))
        note = views.empty_note("keys", "No API keys configured.", len(status.usage), keys, self.orders["usage"])
        self.query_one("#usage-note", Static).update(note)

    def _table(self, view: str) -> DataTable:
        return self.query_one(f"#{TABLE_IDS[view]}", DataTable)

    def _columns(self, view: str) -> None:
        """(Re)label a table's columns: the sorted one carries its arrow."""
        table = self._table(view)
        table.clear(columns=True)
        columns = TABLE_COLUMNS[view]
        for column, title in zip(columns, views.titles(columns, self.orders[view]), strict=True):
            table.add_column(title, key=column.title)

    def _fill(self, view: str, rows: list[tuple[str, tuple]]) -> int:
        """Show rows (key, cells) in a view's table, its cursor kept on the same row; how many."""
        table = self._table(view)
        # A plain string cell is read as Rich markup by the table: names (a key's, a
        # route's) are shown as they are, never styled or refused as markup ("[/]").
        rows = [(key, tuple(Text(c) if isinstance(c, str) else c for c in cells)) for key, cells in rows]
        keys = [key for key, _ in rows]
        if keys == [row.key.value for row in table.ordered_rows]:
            for key, cells in rows:
                for column, value in zip(TABLE_COLUMNS[view], cells, strict=False):
                    table.update_cell(key, column.title, value)
            return len(rows)
        selected = self._cursor_key(table)
        table.clear()
        for key, cells in rows:
            table.add_row(*cells, key=key)
        if selected in keys:
            table.move_cursor(row=keys.index(selected))
        return len(rows)

    def _render_detail(self) -> None:
        if self.status is None:
            return
        model, _ = self.selection()
        self.query_one("#model-detail", Static).update(views.model_detail(self.status, model, self.gpus))

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        with contextlib.suppress(NoMatches):  # a highlight still queued while the app closes
            self._render_detail()

    def on_tabbed_content_tab_activated(self, event: TabbedContent.TabActivated) -> None:
        self.refresh_bindings()
        self._show_filter(open_it=False)
        self._focus_view()
        self.poll()

    def _focus_view(self) -> None:
        tab = self.active_tab
        if tab in TABLE_IDS:
            self._table(tab).focus()
        elif tab == "logs":
            self.query_one("#log", Log).focus()
        else:  # arrows and page keys scroll the view
            self.query_one(f"#{tab} VerticalScroll", VerticalScroll).focus()

    # --- selection ---------------------------------------------------------------------------

    @property
    def selected_key(self) -> str | None:
        return self._cursor_key(self._table("models"))

    @staticmethod
    def _cursor_key(table: DataTable) -> str | None:
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
        try:
            return applies(action, self.active_tab)
        except NoMatches:  # before the tabs exist
            return False

    def action_help(self) -> None:
        self.push_screen(HelpScreen(self.keys_per_view()))

    def keys_per_view(self) -> dict[str, list[tuple[str, str]]]:
        """Every key binding, grouped by where it works: made from BINDINGS, so it cannot drift."""
        bindings = [b for b in self.BINDINGS if isinstance(b, Binding)]

        def keys(where: Callable[[str], bool]) -> list[tuple[str, str]]:
            return [(self._keys_shown(b), b.description) for b in bindings if where(b.action.split("(")[0])]

        everywhere = keys(lambda action: all(applies(action, view) for view in TABS))
        shown = {"Anywhere": everywhere}
        for view in TABS:
            shown[view.title()] = [k for k in keys(functools.partial(applies, view=view)) if k not in everywhere]
        shown["Dialogs"] = [
            (self._keys_shown(b), f"{b.description} ({screen.__name__.removesuffix('Screen').lower()})")
            for screen in (ConfirmScreen, ScaleScreen)
            for b in screen.BINDINGS
            if isinstance(b, Binding)
        ]
        return {where: found for where, found in shown.items() if found}

    def _keys_shown(self, binding: Binding) -> str:
        """'n,escape' as 'n esc'."""
        return " ".join(self.get_key_display(dataclasses.replace(binding, key=k)) for k in binding.key.split(","))

    # --- filter and sort: the table of the current view ---------------------------------------

    def _show_filter(self, open_it: bool) -> None:
        """The filter line: open while typing, and shown while the current table is filtered."""
        box = self.query_one("#filter", Input)
        order = self.orders.get(self.active_tab)
        box.set_class(order is not None and (open_it or bool(order.filter)), "shown")
        if order is not None and box.value != order.filter:
            box.value = order.filter
        if open_it:
            box.focus()

    def action_filter(self) -> None:
        self._show_filter(open_it=True)

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id == "filter" and self.active_tab in self.orders:
            self._arrange(dataclasses.replace(self.orders[self.active_tab], filter=event.value))

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "filter":
            self._show_filter(open_it=False)
            self._focus_view()

    def action_clear_filter(self) -> None:
        self._arrange(dataclasses.replace(self.orders[self.active_tab], filter=""))
        self._show_filter(open_it=False)
        self._focus_view()

    def action_sort_next(self) -> None:
        view = self.active_tab
        self._arrange(self.orders[view].next_column(len(TABLE_COLUMNS[view])))

    def action_sort_reverse(self) -> None:
        order = self.orders[self.active_tab]
        self._arrange(dataclasses.replace(order, reverse=not order.reverse, column=order.column or 0))

    def on_data_table_header_selected(self, event: DataTable.HeaderSelected) -> None:
        """A click on a header sorts its table by it; a second click reverses."""
        view = next(v for v, table_id in TABLE_IDS.items() if table_id == event.data_table.id)
        order = self.orders[view]
        same = order.column == event.column_index
        self._arrange(dataclasses.replace(order, column=event.column_index, reverse=same and not order.reverse), view)

    def _arrange(self, order: views.Order, view: str | None = None) -> None:
        view = view or self.active_tab
        sorted_by = self.orders[view].column, self.orders[view].reverse
        self.orders[view] = order
        if sorted_by != (order.column, order.reverse):
            self._columns(view)
        self._render_all()

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

    def action_reload(self) -> None:
        self._confirm(
            "Reload the config file? What changed is applied without a restart; an invalid file changes nothing.",
            "reload",
            self.admin.reload,
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
                self.notify(str(exc), title=f"{label}: failed", severity="error", timeout=8, markup=False)
                return
            except Exception as exc:  # never crash on an action
                self.notify(f"{type(exc).__name__}: {exc}", title=f"{label}: failed", severity="error", markup=False)
                return
            # The daemon's own words (clamped, waiting for capacity, ...), not a bare "done".
            # The daemon's words, shown as they are (never read as markup).
            self.notify(getattr(answer, "said", None) or label, title=label, markup=False)
            self.poll()

        self.run_worker(work(), group="actions", exit_on_error=False)

    # --- logs --------------------------------------------------------------------------------

    def _log_sources(self, status: DaemonStatus | None) -> list[LogSource]:
        replicas = [(m.name, r.index) for m in status.models for r in m.replicas] if status is not None else []
        return [DAEMON, *replicas]

    def _choose_log_source(self, status: DaemonStatus) -> None:
        """Keep the chosen log while it exists; else the replica under the models' cursor,
        else the first replica, else the daemon's own log."""
        sources = self._log_sources(status)
        if self.log_source in sources:
            return
        model, index = self.selection()
        replicas = sources[1:]
        mine = [r for r in replicas if r[0] == model and (index is None or r[1] == index)]
        self.log_source = (mine or replicas or [DAEMON])[0]

    async def _fetch_log(self) -> tuple[str, str, list[str]] | None:
        """(title, file, lines) of the chosen log; a refusal shows where the file's name goes."""
        source = self.log_source
        if source is None:
            return None
        title = "appliance daemon" if source == DAEMON else "%s#%d" % source
        try:
            if isinstance(source, tuple):
                replica = await self.admin.log(*source, LOG_LINES)
                return title, replica.file, replica.lines
            daemon = await self.admin.daemon_log(LOG_LINES)
            return title, daemon.source, daemon.lines
        except AdminError as exc:
            return title, str(exc), []

    def _step_log(self, step: int) -> None:
        sources = self._log_sources(self.status)
        at = sources.index(self.log_source) if self.log_source in sources else -step
        self.log_source = sources[(at + step) % len(sources)]
        self.log_lines = []
        self.query_one("#log", Log).clear()
        self.poll()

    def action_prev_log(self) -> None:
        self._step_log(-1)

    def action_next_log(self) -> None:
        self._step_log(1)

    def action_follow(self) -> None:
        self.follow = not self.follow
        log = self.query_one("#log", Log)
        log.auto_scroll = self.follow
        if self.follow:
            log.scroll_end(animate=False)
        self.notify("following the log" if self.follow else "paused: scroll freely, f to follow again")

    def _render_log(self, name: str, file: str, lines: list[str]) -> None:
        title = self.query_one("#log-title", Static)
        title.update(Text.assemble((name, "bold"), f"  {'following' if self.follow else 'paused'}  {file}"))
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
