"""systemd's notify protocol (sd_notify(3)): one datagram per message to $NOTIFY_SOCKET.

READY=1 once the API listens, STATUS= with what is loading, WATCHDOG=1 from the
event loop, STOPPING=1 when the drain starts. Everything is a no-op when the
daemon does not run under systemd (no NOTIFY_SOCKET). A notification that cannot
be sent is logged, never raised: systemd must not be able to crash the daemon.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import MutableMapping

log = logging.getLogger("appliance.sdnotify")

# What systemd hands the main process; engines must not inherit them (they would
# notify on the daemon's behalf, or ping its watchdog).
_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class Notifier:
    def __init__(self, address: str | None, watchdog_usec: int = 0) -> None:
        self.address = address
        self.watchdog_usec = watchdog_usec
        self._sock: socket.socket | None = None

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] | None = None) -> Notifier:
        """Read (and remove, so child processes do not see them) systemd's variables."""
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        usec = 0
        pid = env.get("WATCHDOG_PID")
        if not pid or pid == str(os.getpid()):
            try:
                usec = int(env.get("WATCHDOG_USEC") or 0)
            except ValueError:
                log.warning("ignoring WATCHDOG_USEC=%r: not a number", env.get("WATCHDOG_USEC"))
        for name in _VARS:
            env.pop(name, None)
        return cls(address, max(usec, 0))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between pings: half of systemd's WatchdogSec, or None when off."""
        return self.watchdog_usec / 2e6 if self.enabled and self.watchdog_usec else None

    def send(self, *fields: str) -> bool:
        if self.address is None:
            return False
        target = self.address
        if target.startswith("@"):  # abstract namespace
            target = "\0" + target[1:]
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(fields).encode(), target)
            return True
        except OSError as exc:
            log.warning("sd_notify to %s failed: %s", self.address, exc)
            return False

    def ready(self, status: str = "") -> bool:
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def reloading(self, status: str = "") -> bool:
        """RELOADING=1 with the monotonic time systemd matches it against (Type=notify-reload,
        systemd 253+; older ones read RELOADING=1 alone). READY=1 ends the reload."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", *([f"STATUS={_one_line(status)}"] if status else []))

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={_one_line(text)}")

    def stopping(self, status: str = "", extend_s: float = 0.0) -> bool:
        fields = ["STOPPING=1"]
        if status:
            fields.append(f"STATUS={_one_line(status)}")
        if extend_s > 0:
            # Ask for the time the drain and the engines' stop need, even when the
            # unit's TimeoutStopSec is shorter than the config's timeouts.
            fields.append(f"EXTEND_TIMEOUT_USEC={int(extend_s * 1e6)}")
        return self.send(*fields)

    async def watchdog(self) -> None:
        """Ping WATCHDOG=1 from the event loop until cancelled. It is a task on
        the daemon's loop on purpose: when the loop hangs, the pings stop and
        systemd restarts the daemon."""
        interval = self.watchdog_interval
        if interval is None:
            return
        while True:
            self.send("WATCHDOG=1")
            await asyncio.sleep(interval)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _one_line(text: str) -> str:
    return " ".join(text.split())
