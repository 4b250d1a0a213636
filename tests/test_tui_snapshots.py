"""The TUI's main screens at 80x24 with fixed admin-API answers (tests/tui_fake.py).
Update after an intended change: pytest tests/test_tui_snapshots.py --snapshot-update"""

from __future__ import annotations

import pytest

from tui.app import ApplianceTUI

from .tui_fake import CPU_ONLY, FakeAdmin

SIZE = (80, 24)


def app(interval: float = 3600, **kw) -> ApplianceTUI:
    return ApplianceTUI(FakeAdmin(**kw), interval=interval)  # one poll: nothing moves under the camera


@pytest.mark.parametrize("keys", [["1"], ["2"], ["3"], ["4"], ["5"]],
                         ids=["overview", "models", "routes", "logs", "usage"])
def test_each_view(snap_compare, keys):
    assert snap_compare(app(), terminal_size=SIZE, press=keys)


def test_a_replica_selected_with_the_unload_confirmation(snap_compare):
    assert snap_compare(app(), terminal_size=SIZE, press=["2", "down", "u"])


def test_the_daemon_is_down(snap_compare):
    assert snap_compare(app(interval=1, down="the daemon is not running (nothing answers at "
                                 "unix:/var/lib/appliance/admin.sock)"), terminal_size=SIZE)


def test_the_key_help(snap_compare):
    assert snap_compare(app(), terminal_size=SIZE, press=["2", "question_mark"])


def test_models_filtered_and_sorted(snap_compare):
    assert snap_compare(app(), terminal_size=SIZE, press=["2", "o", "o", "o", "o", "slash", *"llama"])


def test_a_cpu_only_box_over_committed(snap_compare):
    assert snap_compare(app(gpus=CPU_ONLY), terminal_size=SIZE)
