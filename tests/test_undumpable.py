"""The daemon and its workers are non-dumpable (appliance/undumpable.py): a process of
their user without CAP_SYS_PTRACE (an engine running code nobody reviewed) cannot read
their memory. Through the real daemon, with workers.

The tests may run as root, whom neither check would stop (CAP_SYS_PTRACE), and the kernel
refuses a process that lacks a capability its target holds: so as root the daemon and the
probe both run without CAP_SYS_PTRACE (setpriv, dropped from the bounding set before exec),
and the one difference between the daemon and an engine is that the engine is dumpable."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from .conftest import fake_model, wait_until
from .test_workers import worker_pids

WITHOUT_CAP_SYS_PTRACE = (
    ["setpriv", "--bounding-set=-sys_ptrace", "--inh-caps=-sys_ptrace"] if os.geteuid() == 0 else []
)

# Run as `python -c PROBE PID...`: for each pid, whether /proc/PID/mem opened, as a debugger
# or process_vm_readv would need: {"pid": "opened" | "refused"}.
PROBE = r"""
import json, os, sys
effective = int(open("/proc/self/status").read().split("CapEff:")[1].split()[0], 16)
assert not effective & (1 << 19), "the probe holds CAP_SYS_PTRACE"
seen = {}
for pid in sys.argv[1:]:
    try:
        os.close(os.open(f"/proc/{pid}/mem", os.O_RDONLY))
        seen[pid] = "opened"
    except PermissionError:
        seen[pid] = "refused"
print(json.dumps(seen))
"""


def memory_access(*pids: int) -> dict[int, str]:
    """{pid: "opened" | "refused"}: /proc/PID/mem, as this user without CAP_SYS_PTRACE."""
    argv = [*WITHOUT_CAP_SYS_PTRACE, sys.executable, "-c", PROBE, *map(str, pids)]
    out = subprocess.run(argv, capture_output=True, text=True, check=True)
    return {int(pid): result for pid, result in json.loads(out.stdout).items()}


def test_the_daemons_and_its_workers_memory_is_closed_to_their_own_user_without_cap_sys_ptrace(daemons):
    d = daemons.start(fake_model("fake"), server="workers = 2", launcher=WITHOUT_CAP_SYS_PTRACE)
    workers = wait_until(lambda: len(found := worker_pids(d.proc.pid)) == 2 and found, 30, what="the two workers")
    engine = d.replicas("fake")[0]["pid"]
    seen = memory_access(d.proc.pid, *workers.values(), engine)
    assert seen == {d.proc.pid: "refused", **{pid: "refused" for pid in workers.values()},
                    engine: "opened"}  # the engine (exec made it dumpable): the probe can read its own user's
