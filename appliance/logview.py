"""`appliance logs`: where the daemon's and the replicas' logs are, and following them.

The daemon logs to stderr: under systemd that is the journal (journalctl -u
appliance); without systemd, server.log_file if the config sets one. Each
replica's engine logs to <log_dir>/replicas/<model>-<n>.log, rotated to .log.1
when it reaches supervisor.log_max_bytes; following survives the rotation.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

from appliance.config import Config

UNIT = "appliance.service"
SYSTEMD_RUNNING = Path("/run/systemd/system")  # sd_booted(3)


class LogError(Exception):
    """No such log; the message says where it was looked for and what to do."""


def journal_command(
    lines: int, follow: bool, systemd_dir: Path = SYSTEMD_RUNNING, as_json: bool = False
) -> list[str] | None:
    """The journalctl call that shows the daemon's log, when systemd runs it."""
    if not systemd_dir.is_dir() or shutil.which("journalctl") is None:
        return None
    argv = ["journalctl", "-u", UNIT, "-n", str(lines), *(["-f"] if follow else ["--no-pager"])]
    return [*argv, "-o", "json"] if as_json else argv


def daemon_log_file(cfg: Config) -> Path:
    if not cfg.server.log_file:
        raise LogError(
            "the daemon logs to stderr only: run it under systemd (journalctl -u appliance), "
            "or set server.log_file in the config to have a file to follow"
        )
    path = Path(cfg.server.log_file)
    if not path.is_file():
        raise LogError(f"no daemon log at {path} (server.log_file) yet: has the daemon started?")
    return path


def replica_log_files(cfg: Config, selectors: Iterable[str]) -> list[tuple[str, Path]]:
    """MODEL#N: that replica; MODEL: all its replicas; all: every replica."""
    folder = Path(cfg.paths.log_dir) / "replicas"
    found: list[tuple[str, Path]] = []
    for sel in selectors:
        if sel == "all":
            paths = sorted(folder.glob("*.log"))
        elif "#" in sel:
            model, _, index = sel.rpartition("#")
            paths = [folder / f"{model.replace('/', '_')}-{index}.log"]
            paths = [p for p in paths if p.is_file()]
        else:
            paths = sorted(
                p for p in folder.glob(f"{sel.replace('/', '_')}-*.log") if p.stem.rpartition("-")[2].isdigit()
            )
        if not paths:
            known = ", ".join(_label(p) for p in sorted(folder.glob("*.log"))) or "none yet"
            raise LogError(f"no replica log for {sel!r} in {folder} (replica logs there: {known})")
        found += [(_label(p), p) for p in paths if (_label(p), p) not in found]
    return found


def _label(path: Path) -> str:
    model, _, index = path.stem.rpartition("-")
    return f"{model}#{index}"


class Tail:
    """One file followed like `tail -F`: survives rotation (a new file under the
    name) and truncation, and only ever yields whole lines."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: BinaryIO | None = None
        self._ino: int | None = None
        self._partial = b""

    def last_lines(self, count: int) -> list[str]:
        file = self._open()
        block = 1 << 16
        size = os.fstat(file.fileno()).st_size
        start = size
        data = b""
        while start > 0 and data.count(b"\n") <= count:
            start = max(0, start - block)
            file.seek(start)
            data = file.read(size - start)
        file.seek(size)
        lines = data.split(b"\n")
        self._partial = lines.pop()  # after the last newline: not a whole line yet
        if start > 0:
            lines = lines[1:]  # the first one may be cut
        return [_text(line) for line in deque(lines, maxlen=count)] if count > 0 else []

    def poll(self) -> list[str]:
        file = self._file
        if file is None:
            if not self.path.exists():
                return []
            file = self._open()
        out = self._read(file)
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return out  # rotated away, the new file not there yet
        if st.st_ino != self._ino or st.st_size < file.tell():
            file.close()
            self._file = None
            if self._partial:  # the old file's unterminated last line
                out.append(_text(self._partial))
                self._partial = b""
            out += self._read(self._open())
        return out

    def _open(self) -> BinaryIO:
        file = self._file = open(self.path, "rb")  # noqa: SIM115 - kept open while following
        self._ino = os.fstat(file.fileno()).st_ino
        return file

    def _read(self, file: BinaryIO) -> list[str]:
        data = self._partial + file.read()
        *lines, self._partial = data.split(b"\n")
        return [_text(line) for line in lines]

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


# C0 controls but tab, DEL and C1 (0x9b is CSI to some terminals).
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")


def printable(line: str) -> str:
    """A log line as a terminal shows it without obeying it: an engine logs what clients
    sent (vLLM its prompts), and an escape sequence in one would retitle, clear or write
    the clipboard of the operator's terminal; control characters are written as \\xNN."""
    if line.isprintable():
        return line
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", line)


def _text(line: bytes) -> str:
    return line.decode("utf-8", "replace").rstrip("\r")


def show(
    files: list[tuple[str, Path]],
    lines: int,
    follow: bool,
    echo: Callable[[str], None],
    interval: float = 0.25,
    as_json: bool = False,
) -> None:
    """Print the last lines of each file, then (follow) what is appended, until interrupted;
    as_json: one JSON object a line, {"source": ..., "line": ...}."""
    prefix = len(files) > 1

    def out(label: str, line: str) -> None:
        if as_json:
            echo(json.dumps({"source": label, "line": line}))
        else:
            echo(f"{label} | {printable(line)}" if prefix else printable(line))

    tails = [(label, Tail(path)) for label, path in files]
    try:
        for label, tail in tails:
            for line in tail.last_lines(lines):
                out(label, line)
        while follow:
            quiet = True
            for label, tail in tails:
                for line in tail.poll():
                    quiet = False
                    out(label, line)
            if quiet:
                time.sleep(interval)
    finally:
        for _, tail in tails:
            tail.close()
