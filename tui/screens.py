"""Modal screens: a yes/no confirmation, how many replicas, and the key help."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Static

CSS = """
ConfirmScreen, ScaleScreen { align: center middle; }
#dialog { width: 64; max-width: 100%; height: auto; border: heavy $accent; padding: 0 1;
          background: $panel; }
#dialog Label { width: 100%; margin: 0 0 1 0; }
#dialog Horizontal { height: auto; align-horizontal: right; }
#dialog Button { margin: 0 0 0 1; min-width: 10; }
#dialog Input { margin: 0 0 1 0; }
"""


class ConfirmScreen(ModalScreen[bool]):
    """Yes or no for an action that stops serving; y / n / Esc from the keyboard."""

    DEFAULT_CSS = CSS
    BINDINGS = [Binding("y", "answer(True)", "Yes"), Binding("n,escape", "answer(False)", "No")]

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label(self.question)
            with Horizontal():
                yield Button("Yes (y)", id="yes", variant="error")
                yield Button("No (n)", id="no", variant="primary")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


class ScaleScreen(ModalScreen["int | None | str"]):
    """A replica count, or 'auto' for the autoscaler; dismissed with "" when cancelled."""

    DEFAULT_CSS = CSS
    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, model: str, current: int, maximum: int) -> None:
        super().__init__()
        self.model, self.current, self.maximum = model, current, maximum

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label(
                f"Scale {self.model}: {self.current} replica(s) now, at most {self.maximum}.\n"
                "A number, or 'auto' to hand it back to the autoscaler. Enter to apply, Esc to cancel."
            )
            yield Input(placeholder="replicas or auto", id="replicas")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        text = event.value.strip().lower()
        if text == "auto":
            self.dismiss(None)
        elif text.isdigit():
            self.dismiss(int(text))
        else:
            self.notify("A number of replicas, or 'auto'", severity="warning")

    def action_cancel(self) -> None:
        self.dismiss("")


class HelpScreen(ModalScreen[None]):
    """`?`: every key, grouped by the view it works in (the app builds the list from its bindings)."""

    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    #help { width: 72; max-width: 100%; height: 90%; border: heavy $accent; background: $panel; padding: 0 1; }
    """
    BINDINGS = [Binding("escape,question_mark,q", "close", "Close")]

    def __init__(self, keys: dict[str, list[tuple[str, str]]]) -> None:
        super().__init__()
        self.keys = keys

    def compose(self) -> ComposeResult:
        table = Table(box=None, padding=(0, 1), show_header=False)
        table.add_column(no_wrap=True, style="bold")
        table.add_column()
        for where, keys in self.keys.items():
            table.add_row(Text(where, style="bold underline"), "")
            for key, does in keys:
                table.add_row(f"  {key}", does)
        with VerticalScroll(id="help"):
            yield Static(table)
            yield Label("Esc, ? or q closes this help.")

    def on_mount(self) -> None:
        self.query_one("#help").border_title = "Keys"
        self.query_one("#help").focus()

    def action_close(self) -> None:
        self.dismiss(None)
