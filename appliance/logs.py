"""Daemon logging: stderr, one event per line, level first, colour only on a terminal."""

from __future__ import annotations

import logging
import sys


def setup_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if sys.stderr.isatty():
        fmt = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
    else:
        # journald stamps each line itself; keep lines short and grep-able.
        fmt = "%(levelname)s %(name)s: %(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Granian's own logger is loud at info; ours says what matters.
    logging.getLogger("_granian").setLevel(logging.WARNING)
    logging.getLogger("granian").setLevel(logging.WARNING)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
