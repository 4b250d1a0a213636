"""The daemon and its workers made non-dumpable (prctl PR_SET_DUMPABLE 0), each as it starts.

Engines run as the daemon's user and may run code nobody reviewed. Without Yama's
ptrace_scope, a process of the same uid may ptrace another, read its memory
(process_vm_readv, /proc/PID/mem: the admin token, provider keys, API keys and prompts in
flight) or take its file descriptors (pidfd_getfd: the listening socket, the databases).
A non-dumpable process is one only CAP_SYS_PTRACE (root) may do that to: the kernel makes
its /proc/PID files root's and refuses the rest. It writes no core dump either (one would
hold the same keys and prompts).

execve makes a process dumpable again, so each process sets it itself, first thing: the
daemon in `serve` before it reads anything secret, a worker at the top of its main. The
engines it starts are dumpable (they hold only their own key).
"""

from __future__ import annotations

import ctypes
import os

PR_SET_DUMPABLE = 4


def make_undumpable() -> None:
    """This process: no ptrace, memory read, fd taken or core dump but by root. OSError
    if the kernel refuses (it does not: the call cannot fail for 0)."""
    libc = ctypes.CDLL(None, use_errno=True)
    words = [ctypes.c_ulong(0)] * 4
    if libc.prctl(ctypes.c_int(PR_SET_DUMPABLE), *words) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"prctl(PR_SET_DUMPABLE, 0): {os.strerror(code)}")
