"""`appliance serve` with one test-only addition: SIGUSR1 blocks the event loop.

A hung event loop is what systemd's watchdog must catch. This wrapper, used only
by tests/test_systemd_notify.py, installs a SIGUSR1 handler on the daemon's loop
that sleeps synchronously for $TEST_BLOCK_S seconds, a real blocked loop (SIGSTOP
would stop every thread, so it would prove nothing). Around the block it sends
X-TEST-BLOCK=begin / end to $NOTIFY_SOCKET from the loop itself, so the test reads,
in order, exactly which notifications were sent while the loop was blocked.
No production code carries this hook.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time

import appliance.daemon.server as server

_serve = server.serve


async def _blocking_serve(cfg, app=None, **kw):
    address = os.environ["NOTIFY_SOCKET"]  # read before the daemon removes it
    block_s = float(os.environ["TEST_BLOCK_S"])
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)

    def mark(what: str) -> None:
        sock.sendto(f"X-TEST-BLOCK={what}".encode(), address)

    def block() -> None:
        mark("begin")
        time.sleep(block_s)
        mark("end")

    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, block)
    return await _serve(cfg, app, **kw)


server.serve = _blocking_serve

if __name__ == "__main__":
    from appliance.cli.main import main

    main()
