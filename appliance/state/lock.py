"""One daemon per state directory.

`appliance serve` takes an exclusive ``flock`` on ``<state_dir>/daemon.lock`` before
anything starts (no engine, no database write) and holds it for its life; the file says
the holder's pid. A second daemon on the same state directory would run its own engines
on the same GPUs, charge budgets twice and write the same replica logs: it exits at once
naming the first one's pid. The kernel drops the lock when its holder dies, SIGKILL
included, so a restart after a crash just works; the lock's file descriptor is
close-on-exec, so an engine that outlived its daemon does not hold it.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from typing import BinaryIO

LOCK_FILE = "daemon.lock"


class StateDirBusy(Exception):
    """One line: which state directory, which pid holds it, what to do."""


def hold_state_dir(state_dir: str | Path) -> BinaryIO:
    """The held lock (keep it referenced for the daemon's life), or StateDirBusy/OSError."""
    path = Path(state_dir) / LOCK_FILE
    path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)  # no other user reads the state
    f = open(path, "a+b")  # noqa: SIM115 - held for the daemon's life; open() is close-on-exec
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(f)
        f.close()
        raise StateDirBusy(
            f"another appliance daemon (pid {holder}) is running on state directory "
            f"{path.parent}; stop it first, or give this one its own paths.state_dir"
        ) from None
    except BaseException:
        f.close()
        raise
    f.truncate(0)
    f.write(f"{os.getpid()}\n".encode())
    f.flush()
    return f


def _holder(f: BinaryIO, wait_s: float = 1.0) -> str:
    """The pid the holder wrote (it writes it right after taking the lock)."""
    deadline = time.monotonic() + wait_s
    while True:
        f.seek(0)
        pid = f.read(32).decode(errors="replace").strip()
        if pid.isdigit() or time.monotonic() > deadline:
            return pid or "unknown"
        time.sleep(0.02)
