"""The engines' seccomp sandbox (appliance/fleet/sandbox.py): an engine process, and
every process it starts, cannot join a SO_REUSEPORT group (the daemon's port) nor open
an io_uring; the same code outside the sandbox can, and engines still serve."""

from __future__ import annotations

import errno
import json
import platform
import socket
import struct
import subprocess
from pathlib import Path

import pytest

from appliance.fleet.process import SubprocessRunner, descendants

from .conftest import PY, fake_model

# What hostile code in an engine would try: join a SO_REUSEPORT listener of the same uid
# on PORT, steer that group with a BPF program, open an io_uring; then the same in a
# process it starts (the filter is inherited, not only installed): `probe.py PORT [child]`.
PROBE = r"""
import ctypes, errno, json, socket, struct, subprocess, sys

def attempt(call):
    try:
        call()
        return "ok"
    except OSError as exc:
        return errno.errorcode[exc.errno]

port = int(sys.argv[1])
s = socket.socket()
seen = {"setsockopt": attempt(lambda: s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1))}
seen["reuseport_reads"] = s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)
seen["bind"] = attempt(lambda: s.bind(("127.0.0.1", port)))
ret0 = ctypes.create_string_buffer(struct.pack("=HBBI", 0x06, 0, 0, 0))  # BPF "ret 0"
fprog = struct.pack("@HP", 1, ctypes.addressof(ret0))  # struct sock_fprog
steered = socket.socket()
steered.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # (the kernel's condition for a group program)
seen["attach_cbpf"] = attempt(lambda: steered.setsockopt(socket.SOL_SOCKET, 51, fprog))
libc = ctypes.CDLL(None, use_errno=True)
params = ctypes.create_string_buffer(120)
ring = libc.syscall(ctypes.c_long(425), ctypes.c_uint(8), params)  # io_uring_setup
seen["io_uring_setup"] = "ok" if ring >= 0 else errno.errorcode[ctypes.get_errno()]
if sys.argv[2:] != ["child"]:
    out = subprocess.run([sys.executable, __file__, str(port), "child"], capture_output=True, text=True,
                         check=True).stdout
    seen["child"] = json.loads(out)
print(json.dumps(seen), flush=True)
"""
JOINED = {"setsockopt": "ok", "reuseport_reads": 1, "bind": "ok", "attach_cbpf": "ok", "io_uring_setup": "ok"}
KEPT_OUT = {"setsockopt": "ok", "reuseport_reads": 0, "bind": "EADDRINUSE", "attach_cbpf": "EPERM",
            "io_uring_setup": "ENOSYS"}


@pytest.fixture
def reuseport_listener():
    """The daemon's public socket as the workers will hold it: SO_REUSEPORT, listening."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.fixture
def probe(tmp_path: Path) -> Path:
    path = tmp_path / "probe.py"
    path.write_text(PROBE)
    return path


def probe_outside(probe: Path, port: int) -> dict:
    return json.loads(subprocess.run([PY, str(probe), str(port)], capture_output=True, text=True,
                                     check=True).stdout)


async def probe_as_engine(runner: SubprocessRunner, argv: list[str], log: Path, **kw) -> dict:
    """argv started the way every engine replica is (SubprocessRunner.spawn); what it printed last."""
    proc = await runner.spawn(argv, {"PATH": "/usr/bin:/bin"}, log, **kw)
    assert await proc.wait() == 0, proc.tail(20)
    return json.loads(proc.tail(1)[0])


async def test_an_engine_cannot_join_a_reuseport_group_the_same_code_outside_joins(reuseport_listener, probe,
                                                                                   tmp_path):
    assert probe_outside(probe, reuseport_listener) == {**JOINED, "child": JOINED}  # any process of this uid
    seen = await probe_as_engine(SubprocessRunner(log_max_bytes=1 << 20), [PY, str(probe), str(reuseport_listener)],
                                 tmp_path / "engine.log")
    assert seen == {**KEPT_OUT, "child": KEPT_OUT}  # its setsockopt "succeeds", and does nothing


async def test_an_engine_started_on_given_cpus_is_sandboxed_too(reuseport_listener, probe, tmp_path):
    seen = await probe_as_engine(SubprocessRunner(log_max_bytes=1 << 20),
                                 [PY, str(probe), str(reuseport_listener), "child"], tmp_path / "engine.log",
                                 cpus=frozenset({0}))
    assert seen == KEPT_OUT


def seccomp_mode(pid: int) -> str:
    status = Path(f"/proc/{pid}/status").read_text()
    return next(line.split()[1] for line in status.splitlines() if line.startswith("Seccomp:"))


def test_an_engine_that_sets_reuseport_on_its_own_socket_still_serves(daemons):
    d = daemons.start(fake_model("vllm-like", "--reuse-port"))
    [replica] = d.replicas("vllm-like")
    assert replica["state"] == "READY"
    assert seccomp_mode(replica["pid"]) == "2"  # filtered
    assert all(seccomp_mode(pid) == "2" for pid in descendants(replica["pid"]))
    with d.client() as c:
        resp = c.post("/v1/chat/completions",
                      json={"model": "vllm-like", "messages": [{"role": "user", "content": "hi"}]})
        assert resp.status_code == 200, resp.text
    assert d.status()["engines_sandboxed"] is True


# --- the filter's other ABI: read by a BPF interpreter, since this machine runs one ABI ----


def run_filter(program: bytes, nr: int, arch: int, args: tuple[int, ...] = ()) -> int:
    """The classic-BPF program's verdict on one seccomp_data, as the kernel computes it
    (the instructions the filter uses: ld abs, jeq, jset, ret)."""
    data = struct.pack("<iIQ6Q", nr, arch, 0, *(list(args) + [0] * (6 - len(args))))
    insns = [struct.unpack("=HBBI", program[i:i + 8]) for i in range(0, len(program), 8)]
    pc, acc = 0, 0
    while True:
        code, jt, jf, k = insns[pc]
        if code == 0x20:
            acc = struct.unpack_from("<I", data, k)[0]
            pc += 1
        elif code in (0x15, 0x45):
            hit = acc == k if code == 0x15 else bool(acc & k)
            pc += 1 + (jt if hit else jf)
        else:
            assert code == 0x06
            return k


def test_each_abi_is_checked_with_its_own_numbers_and_any_other_abi_is_enosys():
    from appliance.fleet import sandbox

    prog = sandbox.filter_program()
    allow, errno_of = sandbox.SECCOMP_RET_ALLOW, lambda e: sandbox.SECCOMP_RET_ERRNO | e
    x86, arm = sandbox.AUDIT_ARCH_X86_64, sandbox.AUDIT_ARCH_AARCH64
    reuseport = (3, socket.SOL_SOCKET, socket.SO_REUSEPORT)
    assert run_filter(prog, 54, x86, reuseport) == errno_of(0)
    assert run_filter(prog, 208, arm, reuseport) == errno_of(0)
    assert run_filter(prog, 54, arm, reuseport) == allow  # aarch64's 54 is not setsockopt
    assert run_filter(prog, 208, arm, (3, socket.SOL_SOCKET, 52)) == errno_of(errno.EPERM)
    # the level and name as the kernel reads them (an int): high bits change nothing
    assert run_filter(prog, 54, x86, (3, (7 << 32) | 1, (9 << 32) | 15)) == errno_of(0)
    assert run_filter(prog, 54, x86, (3, socket.SOL_SOCKET, socket.SO_REUSEADDR)) == allow
    assert run_filter(prog, 425, arm) == errno_of(errno.ENOSYS)
    assert run_filter(prog, 0x40000000 | 54, x86, reuseport) == errno_of(errno.ENOSYS)  # x32
    assert run_filter(prog, 366, 0x40000003, reuseport) == errno_of(errno.ENOSYS)  # i386 setsockopt
    assert run_filter(prog, 39, x86) == allow


async def test_a_machine_without_seccomp_filters_starts_engines_unsandboxed_and_says_so(
        reuseport_listener, probe, tmp_path, monkeypatch, caplog):
    from appliance.fleet import sandbox

    monkeypatch.setattr(platform, "machine", lambda: "riscv64")  # no filter written for it
    sandbox.engine_sandbox.cache_clear()
    try:
        bare = sandbox.engine_sandbox()
    finally:
        sandbox.engine_sandbox.cache_clear()
    assert not bare.enforced and "riscv64" in bare.reason
    [warning] = [r for r in caplog.records if "seccomp" in r.getMessage()]
    assert warning.levelname == "WARNING" and "SO_REUSEPORT" in warning.getMessage()
    seen = await probe_as_engine(SubprocessRunner(log_max_bytes=1 << 20, sandbox=bare),
                                 [PY, str(probe), str(reuseport_listener), "child"], tmp_path / "engine.log")
    assert seen == JOINED  # started anyway, as before the sandbox


async def test_an_engine_whose_filter_the_kernel_refuses_does_not_run_unguarded(probe, tmp_path, monkeypatch):
    from appliance.fleet import sandbox

    # A program the kernel's checker rejects (no return at its end): prctl fails in the child.
    monkeypatch.setattr(sandbox, "filter_program", lambda: struct.pack("=HBBI", 0x20, 0, 0, 0))
    refused = sandbox.EngineSandbox()
    assert refused.enforced  # the kernel takes filters: the daemon expects this one to hold
    proc = await SubprocessRunner(log_max_bytes=1 << 20, sandbox=refused).spawn(
        [PY, str(probe), "1"], {"PATH": "/usr/bin:/bin"}, tmp_path / "engine.log")
    assert await proc.wait() == sandbox.EXIT_UNSANDBOXED
    assert "refused the engine's seccomp filter" in proc.tail(1)[0]
