"""One engine cannot read another engine's memory, nor the daemon's: each replica enters
its own Landlock domain at its spawn (appliance/fleet/landlock.py, process.py), and the
kernel lets a process in a domain ptrace only processes in the same domain or one nested
in it. ptrace(PTRACE_ATTACH, PTRACE_SEIZE), process_vm_readv, pidfd_getfd and opening
/proc/PID/mem or /proc/PID/environ all go through that one ptrace access check, so two
sibling replicas (and the daemon, in no domain) are closed to each other whatever the
uid's rules (no Yama here; the tests may run as root, whose CAP_SYS_PTRACE Landlock does
not honour). An engine's own processes (vLLM's workers, NCCL's handle exchange) share
its domain and stay open to each other.

The second test is the same probe with Landlock taken from the daemon (a seccomp filter
in its launcher answers the Landlock calls ENOSYS, a kernel without it): then the probe
reads the other engine's memory and its key, which is what the first test guards.

The third is the daemon run as root by hand, keeping its capabilities (CAP_SYS_ADMIN and
CAP_PERFMON open another's /proc/PID/environ under Landlock): its engines hold none
(appliance/fleet/capabilities.py) and stay closed to each other as under the unit."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from .conftest import FAKE_ENGINE, PY, fake_model, wait_until

# `probe.py TARGET_MODEL -- ENGINE...`: what hostile code in an engine would try on the
# other replica (found by its command line, which /proc shows anyone) and on the daemon
# (its parent), and on a process of its own; PROBE {"other": {...}, "daemon": {...},
# "own": {...}} in its log, then it runs the engine.
# Each attempt is "ok" or the errno; one that worked is undone (detached, closed).
PROBE = r"""
import ctypes, errno, json, os, subprocess, sys, time

libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
PTRACE_ATTACH, PTRACE_DETACH, PTRACE_SEIZE, PTRACE_INTERRUPT = 16, 17, 0x4206, 0x4207
WALL = 0x40000000
SYS_PIDFD_OPEN, SYS_PIDFD_GETFD = 434, 438  # the generic numbers, x86_64's and aarch64's

class Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]

def attempt(call):
    try:
        call()
        return "ok"
    except OSError as exc:
        return errno.errorcode[exc.errno]

def checked(result):
    if result == -1:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return result

def trace(pid, request):  # attached: stopped, waited for, let go
    checked(libc.ptrace(request, pid, None, None))
    if request == PTRACE_SEIZE:
        checked(libc.ptrace(PTRACE_INTERRUPT, pid, None, None))
    os.waitpid(pid, WALL)
    checked(libc.ptrace(PTRACE_DETACH, pid, None, None))

def some_address(pid):  # a mapped one where the maps are readable (they are ptrace's too)
    try:
        return int(open(f"/proc/{pid}/maps").readline().split("-")[0], 16)
    except OSError:
        return 0x10000

def read_memory(pid):
    buf = ctypes.create_string_buffer(16)
    local, remote = Iovec(ctypes.addressof(buf), 16), Iovec(some_address(pid), 16)
    checked(libc.process_vm_readv(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0))

def take_fd(pid):
    pidfd = checked(libc.syscall(SYS_PIDFD_OPEN, pid, 0))
    try:
        os.close(checked(libc.syscall(SYS_PIDFD_GETFD, pidfd, 0, 0)))
    finally:
        os.close(pidfd)

def environ(pid):
    text = open(f"/proc/{pid}/environ", "rb").read()
    return "key" if b"ENGINE_API_KEY=" in text else "ok"

def probe(pid):
    seen = {
        "ptrace_attach": attempt(lambda: trace(pid, PTRACE_ATTACH)),
        "ptrace_seize": attempt(lambda: trace(pid, PTRACE_SEIZE)),
        "process_vm_readv": attempt(lambda: read_memory(pid)),
        "pidfd_getfd": attempt(lambda: take_fd(pid)),
        "proc_mem": attempt(lambda: os.close(os.open(f"/proc/{pid}/mem", os.O_RDONLY))),
    }
    try:
        seen["proc_environ"] = environ(pid)
    except OSError as exc:
        seen["proc_environ"] = errno.errorcode[exc.errno]
    return seen

def find(model):
    for entry in os.listdir("/proc"):
        try:
            argv = open(f"/proc/{entry}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if entry.isdigit() and b"--model" in argv and argv[argv.index(b"--model") + 1] == model.encode():
            return int(entry)
    return None

sep = sys.argv.index("--")
deadline, other = time.monotonic() + 20, None
while other is None and time.monotonic() < deadline:
    other = find(sys.argv[1])
    time.sleep(0.05)
own = subprocess.Popen(["sleep", "60"])  # one of its own processes, as vLLM's workers are
seen = {"other": probe(other), "daemon": probe(os.getppid()), "own": probe(own.pid)}
own.kill()
own.wait()
caps = [line.split() for line in open("/proc/self/status") if line.startswith("Cap")]
print("CAPS " + json.dumps({name.rstrip(":"): value for name, value in caps}), flush=True)
print("PROBE " + json.dumps(seen), flush=True)
os.execv(sys.argv[sep + 1], sys.argv[sep + 1:])
"""

# The unit's capability set: none (CapabilityBoundingSet=). The tests may run as root, and
# an engine holding CAP_SYS_ADMIN or CAP_PERFMON (root's) still reads another's
# /proc/PID/environ and maps under Landlock (seen on Linux 6.18: only the attach-mode
# checks, mem, ptrace, process_vm_readv, pidfd_getfd, refuse it), so the daemon runs here
# as the unit runs it, without any.
AS_THE_UNIT = ["setpriv", "--bounding-set=-all", "--inh-caps=-all"] if os.geteuid() == 0 else []

CLOSED = {"ptrace_attach": "EPERM", "ptrace_seize": "EPERM", "process_vm_readv": "EPERM",
          "pidfd_getfd": "EPERM", "proc_mem": "EACCES", "proc_environ": "EACCES"}
OPEN = {"ptrace_attach": "ok", "ptrace_seize": "ok", "process_vm_readv": "ok",
        "pidfd_getfd": "ok", "proc_mem": "ok", "proc_environ": "key"}

# The daemon's launcher for a kernel without Landlock: its three calls answer ENOSYS
# (tests/test_landlock.py's filter), then the daemon's command runs.
WITHOUT_LANDLOCK = r"""
import ctypes, errno, os, sys
from appliance.cbpf import JEQ_K, LD_W_ABS, RET_K, Program, assemble
from appliance.fleet.sandbox import SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO

program = Program(assemble([(LD_W_ABS, None, None, 0), (JEQ_K, "no", None, 444), (JEQ_K, "no", None, 445),
                            (JEQ_K, "no", "yes", 446), "yes", (RET_K, None, None, SECCOMP_RET_ALLOW),
                            "no", (RET_K, None, None, SECCOMP_RET_ERRNO | errno.ENOSYS)]))
libc = ctypes.CDLL(None, use_errno=True)
assert libc.prctl(38, ctypes.c_ulong(1), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)) == 0
assert libc.prctl(22, ctypes.c_ulong(2), ctypes.c_ulong(program.address), ctypes.c_ulong(0), ctypes.c_ulong(0)) == 0
os.execv(sys.argv[1], sys.argv[1:])
"""


def probing_model(tmp: Path, name: str, target: str) -> str:
    probe = tmp / "memory_probe.py"
    probe.write_text(PROBE)
    argv = [PY, str(probe), target, "--", PY, str(FAKE_ENGINE), "--port", "{port}", "--model", name]
    command = ", ".join(f'"{a}"' for a in argv)
    return f'[[models]]\nname = "{name}"\nserver = "openai"\ncommand = [{command}]\n'


def probe_report(log_dir: Path, what: str = "PROBE") -> dict:
    for log in (log_dir / "replicas").glob("*.log"):
        for line in log.read_text().splitlines():
            if line.startswith(what + " "):
                return json.loads(line.removeprefix(what + " "))
    return {}


def _daemon_holds_capabilities() -> bool:
    status = Path("/proc/self/status").read_text()
    return any(line.startswith("CapEff:") and int(line.split()[1], 16) for line in status.splitlines())


NONE = "0" * 16

# Root's capabilities kept whole (run by hand), and kept but for CAP_SETPCAP (what empties a
# bounding set): then the engine's bounding set stays, and no_new_privs with its permitted
# set emptied is what keeps its exec as uid 0 from taking it.
WITH_CAPABILITIES = {"all": ([], True), "all_but_setpcap": (["setpriv", "--bounding-set=-setpcap"], False)}


@pytest.mark.skipif(not _daemon_holds_capabilities(), reason="no capability here for the daemon to keep")
@pytest.mark.parametrize("kept", WITH_CAPABILITIES)
def test_an_engine_holds_no_capability_even_when_the_daemon_holds_them(daemons, tmp_path, kept):
    launcher, bounding_emptied = WITH_CAPABILITIES[kept]
    d = daemons.start(fake_model("target") + probing_model(tmp_path, "prober", "target"), launcher=launcher)
    seen = wait_until(lambda: probe_report(tmp_path / "log"), 30, what="the probe's report")
    caps = probe_report(tmp_path / "log", "CAPS")  # written before the report
    sets = ("CapEff", "CapPrm", "CapInh", "CapAmb")
    assert {name: caps[name] for name in sets} == dict.fromkeys(sets, NONE)
    assert (caps["CapBnd"] == NONE) is bounding_emptied
    assert seen == {"other": CLOSED, "daemon": CLOSED, "own": OPEN}  # the sibling's key above all
    assert "the daemon holds capabilities" in d.log_text()


def test_an_engine_cannot_read_another_engines_memory_nor_the_daemons(daemons, tmp_path):
    d = daemons.start(fake_model("target") + probing_model(tmp_path, "prober", "target"), launcher=AS_THE_UNIT)
    seen = wait_until(lambda: probe_report(tmp_path / "log"), 30, what="the probe's report")
    assert seen == {"other": CLOSED, "daemon": CLOSED, "own": OPEN}  # its own: what NCCL's handle exchange uses
    assert d.status()["engines_landlocked"] is True
    assert "the daemon holds capabilities" not in d.log_text()  # none under the unit: no warning
    wait_until(lambda: d.replicas("prober")[0]["state"] == "READY", 30, what="the prober serving")
    with d.client() as c:  # both still serve
        for model in ("target", "prober"):
            resp = c.post("/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": "hi"}]})
            assert resp.status_code == 200, resp.text


def _yama_scope() -> str:
    try:
        return Path("/proc/sys/kernel/yama/ptrace_scope").read_text().strip()
    except FileNotFoundError:
        return "0"  # no Yama: the classic same-uid rule


@pytest.mark.skipif(_yama_scope() != "0", reason="Yama closes ptrace between siblings here on its own")
def test_without_landlock_an_engine_reads_another_engines_memory_and_key(daemons, tmp_path):
    launcher = tmp_path / "without_landlock.py"
    launcher.write_text(WITHOUT_LANDLOCK)
    d = daemons.start(fake_model("target") + probing_model(tmp_path, "prober", "target"),
                      launcher=[*AS_THE_UNIT, PY, str(launcher)])
    seen = wait_until(lambda: probe_report(tmp_path / "log"), 30, what="the probe's report")
    assert seen["other"] == OPEN  # the gap the Landlock domain closes
    assert seen["daemon"] == CLOSED  # undumpable (appliance/undumpable.py), Landlock or not
    assert d.status()["engines_landlocked"] is False
    assert "without their Landlock ruleset" in d.log_text()
