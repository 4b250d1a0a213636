"""Engines hold no capability, whatever the daemon holds.

Under the unit the daemon has none (`CapabilityBoundingSet=`), so neither have its
engines. Run by hand as root it holds all of them, and an engine that kept them would
step around its other guards: CAP_SYS_ADMIN or CAP_PERFMON read another engine's
`/proc/PID/environ` (its key) and `maps` under Landlock, CAP_DAC_OVERRIDE reads any file
Landlock leaves it, CAP_SYS_PTRACE the daemon's memory without Landlock. So each engine,
between fork and exec and before its seccomp filter and Landlock ruleset, gives up:

- its bounding set, cap by cap up to /proc/sys/kernel/cap_last_cap (PR_CAPBSET_DROP,
  which needs CAP_SETPCAP): an exec as uid 0 is granted the bounding set, so with it
  empty the engine's exec, and every exec below it, gets nothing;
- its ambient set (PR_CAP_AMBIENT_CLEAR_ALL), which an exec would otherwise keep;
- its effective, permitted and inheritable sets (capset to zero; root's exec keeps the
  inheritable set whole) with PR_SET_NO_NEW_PRIVS set first: an exec that would grant
  more than the (now empty) permitted set gets that set instead, so uid 0 regains
  nothing even where CAP_SETPCAP was not held and the bounding set could not be emptied;
- with CAP_SETPCAP, SECBIT_NOROOT and SECBIT_NOROOT_LOCKED: the kernel stops treating
  uid 0 as privileged at exec, for good. It adds nothing to the two locks above; it is
  set where allowed (CAP_SETPCAP is what sets securebits), and only skipped where it is not.

The plan is read from /proc/self/status in the daemon before the fork (a child is born
with its parent's sets): a set already empty is nothing to do, so under the unit (whose
`SystemCallFilter=~@privileged` refuses capset) the child only sets no_new_privs. A step
the plan needs that the kernel refuses fails the start: the engine would hold what the
daemon promised it does not.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from appliance.fleet.sandbox import EXIT_UNSANDBOXED, PR_SET_NO_NEW_PRIVS

log = logging.getLogger("appliance.supervisor")

PR_CAPBSET_DROP = 24
PR_GET_SECUREBITS = 27
PR_SET_SECUREBITS = 28
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
SECBIT_NOROOT = 1 << 0
SECBIT_NOROOT_LOCKED = 1 << 1
CAP_SETPCAP = 8
LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


@dataclass(frozen=True)
class HeldCapabilities:
    """One process's capability sets, as /proc/PID/status shows them (bit n: cap n)."""

    effective: int = 0
    permitted: int = 0
    inheritable: int = 0
    bounding: int = 0
    ambient: int = 0

    @property
    def any_held(self) -> bool:
        """Whether the process may use a capability now or after an exec as uid 0."""
        return bool(self.effective | self.permitted | self.inheritable | self.ambient) or (
            os.geteuid() == 0 and bool(self.bounding)
        )


def held_capabilities(status: Path = Path("/proc/self/status")) -> HeldCapabilities:
    """This process's sets; none where /proc cannot say (nothing then to give up)."""
    fields = {"CapEff": 0, "CapPrm": 0, "CapInh": 0, "CapBnd": 0, "CapAmb": 0}
    try:
        for line in status.read_text().splitlines():
            name, _, value = line.partition(":")
            if name in fields:
                fields[name] = int(value.strip(), 16)
    except (OSError, ValueError):
        return HeldCapabilities()
    return HeldCapabilities(fields["CapEff"], fields["CapPrm"], fields["CapInh"], fields["CapBnd"], fields["CapAmb"])


def last_cap() -> int:
    """The highest capability this kernel knows (CAP_CHECKPOINT_RESTORE, 40, on 6.x)."""
    try:
        return int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    except (OSError, ValueError):
        return 63  # every bit CapBnd can show: a drop past the kernel's last is EINVAL, skipped


class EngineCapabilities:
    """The calls, ready in the daemon's memory before any fork; `drop` makes them in the
    child between fork and exec, from the plan `held_capabilities()` gave before it."""

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._prctl_call, self._capset = self._libc.prctl, self._libc.capset  # looked up before any fork
        self._last = last_cap()
        self._header = _CapHeader(LINUX_CAPABILITY_VERSION_3, 0)
        self._none = (_CapData * 2)()  # capset's two words of each set, all zero
        self._refusal = b"--- appliance: the kernel refused to take the engine's capabilities; not started\n"

    def _prctl(self, option: int, *args: int) -> int:
        words = [ctypes.c_ulong(a) for a in (*args, 0, 0, 0, 0)[:4]]
        return int(self._prctl_call(ctypes.c_int(option), *words))

    def drop(self, held: HeldCapabilities) -> None:
        """In the child, before its seccomp filter and Landlock ruleset: prctl and capset
        calls only. If a needed one fails, the reason goes to the engine's log (fd 2) and
        the child exits without running the engine."""
        if not self._dropped(held):
            os.write(2, self._refusal)
            os._exit(EXIT_UNSANDBOXED)

    def _dropped(self, held: HeldCapabilities) -> bool:
        setpcap = bool(held.effective >> CAP_SETPCAP & 1)
        if setpcap:
            self._lock_out_root()
            for cap in range(self._last + 1):
                if held.bounding >> cap & 1 and self._prctl(PR_CAPBSET_DROP, cap) != 0:
                    return False
        if held.ambient and self._prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL) != 0:
            return False
        if self._prctl(PR_SET_NO_NEW_PRIVS, 1) != 0:
            return False
        if held.effective | held.permitted | held.inheritable:
            return int(self._capset(ctypes.byref(self._header), self._none)) == 0
        return True

    def _lock_out_root(self) -> None:
        """SECBIT_NOROOT(_LOCKED), kept with the bits already set; a refusal (another
        lock set before) changes nothing the empty bounding set does not already give."""
        bits = self._prctl(PR_GET_SECUREBITS)
        if bits >= 0:
            self._prctl(PR_SET_SECUREBITS, bits | SECBIT_NOROOT | SECBIT_NOROOT_LOCKED)


@functools.cache
def engine_capabilities() -> EngineCapabilities:
    """The daemon's one set of calls, made once."""
    return EngineCapabilities()


def warn_of_held_capabilities() -> None:
    """At `serve`: a daemon that holds capabilities (root by hand, outside the unit) starts
    with one WARNING, not refused: containers, CI and tests run as root, the docs' by-hand
    start with the unit's credentials is root's, and its engines hold none either way.
    What is left is the daemon's own power (a flaw in it is root's) and its engines' uid 0
    (root's files, without capabilities), which running it as the unit does removes."""
    held = held_capabilities()
    if held.any_held:
        log.warning(
            "the daemon holds capabilities (CapEff %x: run as root outside the unit?); its engines are "
            "started without any, as uid %d, and read only what that uid owns or others may read (not a "
            "store owned by the service user); run it under the unit, or as the service user, instead",
            held.effective,
            os.geteuid(),
        )
