"""Daemon logging: stderr, one event per line, level first, no colour, request ids.

    INFO appliance.api: serving smollm2-135m-instruct on http://127.0.0.1:8000/v1
    WARNING appliance.proxy [req 5f0c…]: stream from smollm2#0 broke: ClientPayloadError

Under systemd (JOURNAL_STREAM names our stderr) each line starts with its syslog
priority (``<4>WARNING ...``), which journald strips and files as the entry's
priority, so ``journalctl -u appliance -p warning`` works. Off a terminal, a
traceback's newlines are escaped so that one event stays one line, and control
characters (a client's request id or path in a line) are written as ``\\xNN``. A log line
emitted while a request is handled carries that request's X-Request-Id; nothing
is logged per request by default.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import re
import sys
import time
from contextvars import ContextVar
from pathlib import Path
from typing import TextIO

_REQUEST_ID: ContextVar[str | None] = ContextVar("appliance_request_id", default=None)

# Python level -> syslog priority (sd-daemon(3)): <3> err, <4> warning, <6> info, <7> debug.
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}


def bind_request_id(request_id: str) -> None:
    """Tag every log line of the current request (its task) with this id."""
    _REQUEST_ID.set(request_id)


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        rid = _REQUEST_ID.get()
        record.request = f" [req {rid}]" if rid else ""
        return True


# C0 controls but tab and newline, DEL and C1 (0x9b is CSI to some terminals).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def escape_controls(text: str) -> str:
    """Control characters as \\xNN: a log line carries what clients sent (a request id,
    a path), which the operator's terminal must not obey nor journald file as a blob."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


class LineFormatter(logging.Formatter):
    """One line per event; optionally a syslog priority prefix for journald."""

    def __init__(self, fmt: str, *, one_line: bool, priority_prefix: bool) -> None:
        super().__init__(fmt)
        self.one_line = one_line
        self.priority_prefix = priority_prefix

    def format(self, record: logging.LogRecord) -> str:
        if not hasattr(record, "request"):
            record.request = ""
        text = super().format(record)
        if self.one_line:
            text = text.replace("\r", "").replace("\n", "\\n")
        if not text.isprintable():
            text = escape_controls(text)
        if self.priority_prefix:
            level = max((lv for lv in _PRIORITY if lv <= record.levelno), default=logging.DEBUG)
            text = f"<{_PRIORITY[level]}>{text}"
        return text


def stderr_is_journal(stream: TextIO, environ=os.environ) -> bool:
    """True when systemd connected this stream to the journal (JOURNAL_STREAM=dev:inode)."""
    value = environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in value.split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def setup_logging(level: str = "info", log_file: str | None = None, stream: TextIO | None = None) -> None:
    stream = stream or sys.stderr
    tty = stream.isatty()
    handler = logging.StreamHandler(stream)
    if tty:
        fmt = "%(asctime)s %(levelname)-7s %(name)s%(request)s: %(message)s"
    else:
        # journald stamps each line itself; keep lines short and grep-able.
        fmt = "%(levelname)s %(name)s%(request)s: %(message)s"
    handler.setFormatter(LineFormatter(fmt, one_line=not tty, priority_prefix=stderr_is_journal(stream)))
    handlers: list[logging.Handler] = [handler]
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        # Reopened when logrotate moves it away.
        to_file = logging.handlers.WatchedFileHandler(log_file, encoding="utf-8")
        to_file.setFormatter(
            LineFormatter(
                "%(asctime)s %(levelname)s %(name)s%(request)s: %(message)s", one_line=True, priority_prefix=False
            )
        )
        handlers.append(to_file)
    for h in handlers:
        h.addFilter(RequestIdFilter())
    root = logging.getLogger()
    root.handlers[:] = handlers
    root.setLevel(level.upper())
    # Granian's own logger is loud at info; ours says what matters.
    logging.getLogger("_granian").setLevel(logging.WARNING)
    logging.getLogger("granian").setLevel(logging.WARNING)


class OncePer:
    """Logs a recurring event once per ``every_s`` for each distinct text (its numbers
    ignored), with how many times it recurred meanwhile: a refusal that repeats for every
    request says so once, not once per request."""

    _DIGITS = re.compile(r"\d+")

    def __init__(self, every_s: float = 60.0, clock=time.monotonic, most: int = 256) -> None:
        self.every_s, self.clock, self.most = every_s, clock, most
        self._seen: dict[str, tuple[float, int]] = {}  # shape -> (last logged, recurrences since)

    def log(self, logger: logging.Logger, level: int, text: str) -> None:
        shape, now = self._DIGITS.sub("#", text), self.clock()
        last, since = self._seen.get(shape, (None, 0))
        if last is not None and now - last < self.every_s:
            self._seen[shape] = (last, since + 1)
            return
        if len(self._seen) >= self.most:
            self._seen.clear()  # bounded: forgetting only costs a line logged again
        self._seen[shape] = (now, 0)
        logger.log(level, "%s%s", text, f" (and {since} more like it since)" if since else "")
