"""Reading model files: each copied and hashed in one pass, reads paced and stoppable, and
the stat fingerprint that says whether a file changed since it was last hashed."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from appliance.store.records import Readable

CHUNK = 4 << 20


def write_all(fd: int, data: memoryview) -> None:
    while data:
        written = os.write(fd, data)
        data = data[written:]


def copy_and_hash(
    src: Readable,
    dest: Path,
    write: Callable[[int, memoryview], None] = write_all,
    progress: Callable[[int], None] | None = None,
) -> tuple[str, int]:
    """Stream src into dest and hash it in the same pass (one read of the source);
    progress is told each chunk's size."""
    h = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    size = 0
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        while n := src.readinto(buf):
            h.update(view[:n])
            write(fd, view[:n])
            size += n
            if progress is not None:
                progress(n)
        os.fsync(fd)
    finally:
        os.close(fd)
    return h.hexdigest(), size


class Interrupted(Exception):
    """A throttled read was stopped (the daemon is stopping)."""


class Throttle:
    """Paces a read to bytes_per_s on average (0: unlimited); once stop is set, the next
    chunk raises Interrupted. clock and sleep are seams for tests; sleep(s) waits up to s
    seconds and returns True when stopped (threading.Event.wait)."""

    def __init__(
        self,
        bytes_per_s: float = 0,
        stop: threading.Event | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], bool] | None = None,
    ) -> None:
        self.bytes_per_s = bytes_per_s
        self.stop = stop or threading.Event()
        self.clock = clock
        self.sleep = sleep or self.stop.wait
        self._start: float | None = None
        self._done = 0

    def __call__(self, n: int) -> None:
        """n more bytes were read."""
        if self.stop.is_set():
            raise Interrupted
        if not self.bytes_per_s:
            return
        now = self.clock()
        if self._start is None:
            self._start = now
        self._done += n
        ahead = self._done / self.bytes_per_s - (now - self._start)
        if ahead > 0 and self.sleep(ahead):
            raise Interrupted


# Told the size of each chunk read: a Throttle paces the reads, a progress bar counts them.
PerChunk = Callable[[int], None]


class Hasher(Protocol):
    def __call__(self, path: Path, throttle: PerChunk | None = None) -> str: ...


def hash_file(path: Path, throttle: PerChunk | None = None) -> str:
    h = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
            if throttle is not None:
                throttle(n)
    return h.hexdigest()


def fingerprint(st: os.stat_result) -> str:
    """What changes when a file is written, truncated, chmod-ed, renamed or replaced. The
    kernel sets ctime to its clock on every such change; nobody can set it back (short of
    setting the system clock back). Text, not integers: inode and device numbers may not
    fit SQLite's signed 64 bits."""
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"
