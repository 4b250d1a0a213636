"""The key map: each key's action, and the views it works in (the footer, the help
screen and ``check_action`` follow ``applies``, so what a key says is what it does)."""

from __future__ import annotations

from textual.binding import Binding, BindingType

from appliance.status import ModelAction, ReplicaAction
from tui import views

# The views, in the order of their number keys; the app opens on the first.
TABS = ("overview", "models", "routes", "logs", "usage")
# The views that are tables: `/` filters their rows, `o` / `O` (or a header click) sort them.
TABLE_COLUMNS = {"models": views.MODEL_COLUMNS, "routes": views.ROUTE_COLUMNS, "usage": views.USAGE_COLUMNS}
TABLE_ACTIONS = {"filter", "clear_filter", "sort_next", "sort_reverse"}
# The key bindings that act on the models tab's selection (appliance/status.py's vocabulary;
# "pin" toggles pin and unpin).
MODEL_ACTIONS = {"scale", ModelAction.LOAD, ModelAction.UNLOAD, ModelAction.PIN, *ReplicaAction}
LOG_ACTIONS = {"prev_log", "next_log", "follow"}

BINDINGS: list[BindingType] = [
    Binding("q", "quit", "Quit"),
    Binding("question_mark", "help", "Help"),
    Binding("slash", "filter", "Filter"),
    Binding("escape", "clear_filter", "Clear filter", show=False),
    Binding("o", "sort_next", "Sort"),
    Binding("O", "sort_reverse", "Reverse sort", show=False),
    Binding("s", "scale", "Scale"),
    Binding("l", "load", "Load"),
    Binding("u", "unload", "Unload"),
    Binding("p", "pin", "Pin/unpin"),
    Binding("r", "restart", "Restart"),
    Binding("d", "drain", "Drain"),
    Binding("R", "reload", "Reload config", show=False),  # in docs/tui.md; the footer is full
    Binding("left_square_bracket", "prev_log", "Prev log"),
    Binding("right_square_bracket", "next_log", "Next log (daemon, replicas)"),
    Binding("f", "follow", "Follow on/off"),
    *(Binding(str(i + 1), f"show_tab('{tab}')", tab.title(), show=False) for i, tab in enumerate(TABS)),
]


def applies(action: str, view: str) -> bool:
    """Whether a key's action works in a view (the footer and the help screen follow this)."""
    if action in MODEL_ACTIONS:
        return view == "models"
    if action in LOG_ACTIONS:
        return view == "logs"
    if action in TABLE_ACTIONS:
        return view in TABLE_COLUMNS
    return True
