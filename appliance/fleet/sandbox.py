"""The engines' sandbox: a seccomp filter that keeps an engine off the daemon's port.

An engine runs as the daemon's user and may run code the operator never read (vLLM
with trust_remote_code). The kernel lets any process of the same uid join a
SO_REUSEPORT group: an engine that set SO_REUSEPORT on a socket and bound the daemon's
public port would be handed a share of its connections (API keys, prompts). So every
engine process gets, between fork and exec, PR_SET_NO_NEW_PRIVS (what installing a
filter needs without CAP_SYS_ADMIN) and a classic-BPF seccomp filter, which its threads
and children inherit and none of them can remove:

- setsockopt(SOL_SOCKET, SO_REUSEPORT) returns 0 without doing it: an engine that sets
  it on its own socket (vLLM's API server does) keeps working, alone on its port;
- setsockopt(SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF/EBPF) fails with EPERM;
- io_uring_setup fails with ENOSYS: a ring sets socket options without a setsockopt call
  the filter sees, and libraries take ENOSYS as io_uring absent;
- a call of another ABI (x32 on x86_64, i386 by int 0x80, arm32) fails with ENOSYS: the
  numbers checked are x86_64's and aarch64's own, another ABI's setsockopt is not 54/208.

Everything else is allowed. The filter's bytes are built in the daemon before the fork
(`EngineSandbox`); the child only makes the two prctl calls (`apply`).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
import platform
import struct
import sys
from dataclasses import dataclass

from appliance.cbpf import JEQ_K, JSET_K, LD_W_ABS, RET_K, Instruction, Program, assemble

log = logging.getLogger("appliance.supervisor")

PR_SET_SECCOMP = 22
PR_SET_NO_NEW_PRIVS = 38
SECCOMP_MODE_FILTER = 2

SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000  # the call is skipped and returns -(the low 16 bits)

# struct seccomp_data: int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6].
# The filter reads an argument's low 32 bits (little-endian: its first word), all the
# kernel reads of an int argument: high bits set around it change nothing.
_NR, _ARCH = 0, 4


def _arg_low(index: int) -> int:
    return 16 + 8 * index


# The generic socket constants (asm-generic/socket.h), the same on x86_64 and aarch64.
SOL_SOCKET = 1
SO_REUSEPORT = 15
SO_ATTACH_REUSEPORT_CBPF = 51
SO_ATTACH_REUSEPORT_EBPF = 52
IO_URING_SETUP = 425  # the same number on every architecture since Linux 5.1

AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_AARCH64 = 0xC00000B7
X32_SYSCALL_BIT = 0x40000000


@dataclass(frozen=True)
class _Abi:
    arch: int  # seccomp_data.arch
    setsockopt: int
    foreign_bit: int = 0  # a number with this bit is another ABI's (x32) under the same arch


ABIS = {
    "x86_64": _Abi(AUDIT_ARCH_X86_64, setsockopt=54, foreign_bit=X32_SYSCALL_BIT),
    "aarch64": _Abi(AUDIT_ARCH_AARCH64, setsockopt=208),
}


def _abi_block(name: str, abi: _Abi) -> list[Instruction | str]:
    foreign: list[Instruction | str] = [(JSET_K, "enosys", None, abi.foreign_bit)] if abi.foreign_bit else []
    return [
        name,
        (LD_W_ABS, None, None, _NR),
        *foreign,
        (JEQ_K, "setsockopt", None, abi.setsockopt),
        (JEQ_K, "enosys", "allow", IO_URING_SETUP),
    ]


def filter_program() -> bytes:
    """The filter, for x86_64 and aarch64 alike (each ABI's own numbers, told by arch)."""
    arches: list[Instruction | str] = [(LD_W_ABS, None, None, _ARCH)]
    for name, abi in ABIS.items():
        arches.append((JEQ_K, name, None, abi.arch))
    arches.append((RET_K, None, None, SECCOMP_RET_ERRNO | errno.ENOSYS))  # any other ABI
    blocks = [item for name, abi in ABIS.items() for item in _abi_block(name, abi)]
    return assemble(
        [
            *arches,
            *blocks,
            "setsockopt",
            (LD_W_ABS, None, None, _arg_low(1)),
            (JEQ_K, None, "allow", SOL_SOCKET),
            (LD_W_ABS, None, None, _arg_low(2)),
            (JEQ_K, "pretend", None, SO_REUSEPORT),
            (JEQ_K, "eperm", None, SO_ATTACH_REUSEPORT_CBPF),
            (JEQ_K, "eperm", "allow", SO_ATTACH_REUSEPORT_EBPF),
            "allow",
            (RET_K, None, None, SECCOMP_RET_ALLOW),
            "enosys",
            (RET_K, None, None, SECCOMP_RET_ERRNO | errno.ENOSYS),
            "eperm",
            (RET_K, None, None, SECCOMP_RET_ERRNO | errno.EPERM),
            "pretend",
            (RET_K, None, None, SECCOMP_RET_ERRNO | 0),  # skipped, and "succeeded"
        ]
    )


# An engine whose filter the kernel refused after the daemon's probe said it would take
# it: not started unguarded (the daemon promised the filter), the reason in its log.
EXIT_UNSANDBOXED = 126


class EngineSandbox:
    """The filter, ready in the daemon's memory before any fork; `apply` installs it in
    the child between fork and exec. `enforced` False: not installed (`reason` says why)."""

    def __init__(self) -> None:
        self._libc: ctypes.CDLL | None = None
        self._program = Program(filter_program())  # kept: the child reads it
        self._refusal = b"--- appliance: the kernel refused the engine's seccomp filter; not started\n"
        self.reason = self._why_not()
        self.enforced = not self.reason

    def _why_not(self) -> str:
        machine = platform.machine()
        if not sys.platform.startswith("linux") or machine not in ABIS or struct.calcsize("P") != 8:
            return f"no filter for this machine ({sys.platform} {machine})"
        try:
            self._libc = ctypes.CDLL(None, use_errno=True)
        except OSError as exc:
            return f"libc not loaded: {exc}"
        # A filter pointer of NULL: a kernel with seccomp filters reads it (EFAULT) and
        # installs nothing; one without answers EINVAL (ENOSYS, EPERM under another filter).
        ctypes.set_errno(0)
        if self._prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, 0) == 0 or ctypes.get_errno() != errno.EFAULT:
            return f"the kernel takes no seccomp filter ({os.strerror(ctypes.get_errno())})"
        return ""

    def _prctl(self, option: int, *args: int) -> int:
        """prctl(option, args..., 0...): its five arguments always given (unsigned long)."""
        assert self._libc is not None
        words = [ctypes.c_ulong(a) for a in (*args, 0, 0, 0, 0)[:4]]
        return int(self._libc.prctl(ctypes.c_int(option), *words))

    def apply(self) -> None:
        """In the child, after fork and before exec: two prctl calls, nothing else (the
        filter's bytes were built before the fork). If the kernel refuses now, the reason
        goes to the engine's log (fd 2) and the child exits without running the engine."""
        if not self.enforced:
            return
        installed = self._prctl(PR_SET_NO_NEW_PRIVS, 1) == 0 and (
            self._prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, self._program.address) == 0
        )
        if not installed:
            os.write(2, self._refusal)
            os._exit(EXIT_UNSANDBOXED)


@functools.cache
def engine_sandbox() -> EngineSandbox:
    """The daemon's one sandbox, probed once. A kernel without seccomp filters (built
    without CONFIG_SECCOMP_FILTER, or another filter forbids adding one) starts engines
    anyway, with one WARNING naming what is not enforced: refusing would leave such a
    machine with no local models at all, for a guard against a threat (an engine running
    hostile code as the daemon's user) the operator can also meet by trusting only the
    models they run; /admin/status says it (`engines_sandboxed`)."""
    sandbox = EngineSandbox()
    if not sandbox.enforced:
        log.warning(
            "engines run without their seccomp sandbox (%s): an engine may join the daemon's "
            "SO_REUSEPORT port group and use io_uring",
            sandbox.reason,
        )
    return sandbox
