"""Classic BPF, assembled: the one place the kernel's `struct sock_filter` is written.

Two programs use it: the engines' seccomp filter (appliance/fleet/sandbox.py) and the
workers' reuseport steering (appliance/dataplane/listener.py). An instruction is
(code, jump if true, jump if false, k); a jump names a label (a str item in the program
marks the next instruction with it), None is the next instruction. Classic BPF jumps
only forward, at most 255 instructions on.
"""

from __future__ import annotations

import ctypes
import struct

# linux/filter.h
LD_W_ABS = 0x20  # BPF_LD|BPF_W|BPF_ABS: A = the word at k
MOD_K = 0x94  # BPF_ALU|BPF_MOD|BPF_K: A = A % k
JEQ_K = 0x15  # BPF_JMP|BPF_JEQ|BPF_K: A == k
JSET_K = 0x45  # BPF_JMP|BPF_JSET|BPF_K: A & k
RET_K = 0x06  # BPF_RET|BPF_K: return k

Instruction = tuple[int, str | None, str | None, int]


def assemble(program: list[Instruction | str]) -> bytes:
    """struct sock_filter[] of the program, its labels resolved to jump offsets."""
    labels: dict[str, int] = {}
    instructions: list[Instruction] = []
    for item in program:
        if isinstance(item, str):
            labels[item] = len(instructions)
        else:
            instructions.append(item)

    def offset(at: int, label: str | None) -> int:
        if label is None:
            return 0
        distance = labels[label] - at - 1
        if not 0 <= distance <= 255:
            raise ValueError(f"a classic BPF jump to {label} is {distance} instructions on (0 to 255)")
        return distance

    return b"".join(
        struct.pack("=HBBI", code, offset(at, jt), offset(at, jf), k)
        for at, (code, jt, jf, k) in enumerate(instructions)
    )


class SockFprog(ctypes.Structure):
    """struct sock_fprog: the length in instructions and where they are."""

    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class Program:
    """An assembled program held in memory the kernel can read (for prctl, it must stay
    alive until the call; setsockopt copies it)."""

    def __init__(self, code: bytes) -> None:
        self.code = ctypes.create_string_buffer(code, len(code))
        self.fprog = SockFprog(len(code) // 8, ctypes.addressof(self.code))

    @property
    def address(self) -> int:
        return ctypes.addressof(self.fprog)

    def __bytes__(self) -> bytes:
        return bytes(self.fprog)
