"""The engines' Landlock ruleset (appliance/fleet/landlock.py): an engine process started
the way every replica is cannot open the daemon's secrets (state database, admin token,
another replica's key), through a link either, cannot change the model store nor open its
manifest, cannot read another model's weights in the store (one imported after it
started either), cannot read another replica's log nor write its HOME, and still reads
its own key and model and writes its TMPDIR and HOME."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from appliance.config import parse_config
from appliance.fleet.engine_access import open_access
from appliance.fleet.landlock import (
    SCOPES_SINCE_ABI,
    EngineLandlock,
    closed_temp_dirs,
    engine_keep_out,
    engine_read_only,
    store_reads,
)
from appliance.fleet.replica import Replica
from appliance.fleet.replica_state import Crash
from appliance.store.records import Incoming, SourceFile
from appliance.store.store import Store
from engines import adapter_for
from engines.base import Lora

from .conftest import FAKE_ENGINE, PY, fake_model, wait_until

# What hostile code in an engine would try before serving: `probe.py OUT_NAME MODEL --
# ENGINE...` opens each file of the daemon's it can name and reports what the kernel
# said (PROBE {...} in its log), then runs the engine. Another replica's key: the
# replicas' directories are siblings in the engines' root (r0, r1...), waited for.
PROBE = r"""
import errno, json, os, sys, time
from pathlib import Path

def attempt(call):
    try:
        call()
        return "ok"
    except OSError as exc:
        return errno.errorcode[exc.errno]

def claim_connect():
    import socket
    names = [line.split()[-1] for line in open("/proc/net/unix") if "@appliance-port:" in line]
    with socket.socket(socket.AF_UNIX) as s:
        s.connect("\0" + names[0][1:])

def admin_without_token(method, path):
    import socket
    sock = tmp / "state" / "admin.sock"
    deadline = time.monotonic() + 20
    while not sock.exists() and time.monotonic() < deadline:  # the daemon opens it after the engines start
        time.sleep(0.05)
    body = b"{}" if method == "POST" else b""
    head = (f"{method} {path} HTTP/1.1\r\nHost: appliance\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(sock))
        s.sendall(head + body)
        return s.recv(64).split(b" ")[1].decode()

def create_new_entry(folder):  # made after the engine started, in a directory above a protected path
    path = folder / f"made-by-engine-{os.getpid()}"
    try:
        open(path, "x").close()
    finally:
        if path.exists():
            os.unlink(path)

def other_replicas_log():  # another model's, written by the daemon from its engine's output
    log = tmp / "log" / "replicas" / "first-0.log"
    deadline = time.monotonic() + 20
    while not log.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return open(log).read(1)

sep = sys.argv.index("--")
tmp, model = Path(sys.argv[1]), Path(sys.argv[2])
own = Path(os.environ["TMPDIR"]).parent
via_root_link = str(tmp / "planted-root") + str(tmp / "state" / "appliance.db")
hub = tmp / "cache" / "hf" / "hub"
store = json.loads((tmp / "handoff" / "store.json").read_text())  # the hub itself is not listable
snapshot, blob = Path(store["own_snapshot"]), Path(store["own_blob"])
(tmp / "handoff" / "spawned").write_text("")  # the test imports a model now, after this spawn
deadline = time.monotonic() + 20
while not (tmp / "handoff" / "later.json").exists() and time.monotonic() < deadline:
    time.sleep(0.05)
store |= json.loads((tmp / "handoff" / "later.json").read_text())
others = []
deadline = time.monotonic() + 20
while not others and time.monotonic() < deadline:
    others = [own.parent / f"r{i}" / "api-key" for i in range(10)
              if f"r{i}" != own.name and (own.parent / f"r{i}" / "api-key").exists()]
    time.sleep(0.05)
seen = {
    "state_db": attempt(lambda: open(tmp / "state" / "appliance.db", "rb").read(1)),
    "state_dir": attempt(lambda: os.listdir(tmp / "state")),
    "admin_token": attempt(lambda: open(tmp / "secrets" / "admin-token").read()),
    "other_key": attempt(lambda: open(others[0]).read()) if others else "none",
    "engines_root": attempt(lambda: os.listdir(own.parent)),
    "link_to_db": attempt(lambda: open(tmp / "planted-db", "rb").read(1)),
    "through_link_to_root": attempt(lambda: open(via_root_link, "rb").read(1)),
    "own_key": attempt(lambda: open(own / "api-key").read()),
    "model": attempt(lambda: open(model / "weights.bin", "rb").read()),
    "tmpdir": attempt(lambda: open(Path(os.environ["TMPDIR"]) / "scratch", "w").write("x")),
    "signal_daemon": attempt(lambda: os.kill(os.getppid(), 0)),
    "port_claim": attempt(claim_connect),
    "socket_token": attempt(lambda: open(tmp / "state" / "admin.sock.token").read()),
    "admin_status_without_token": admin_without_token("GET", "/admin/status"),
    "admin_unload_without_token": admin_without_token("POST", "/admin/models/first/unload"),
    "new_entry_in_tmp": attempt(lambda: create_new_entry(Path("/tmp"))),
    "new_entry_in_parent_of_state": attempt(lambda: create_new_entry(tmp)),
    # The model store: read only, its manifest not even that.
    "store_model": attempt(lambda: open(blob, "rb").read()),
    "store_listing": attempt(lambda: os.listdir(snapshot)),
    # Another model's weights: its snapshot, its file through its link, its blob; and a
    # model imported after this engine started. A blob shared with its own (one inode,
    # two names) it may read by either name.
    "other_listing": attempt(lambda: os.listdir(store["other_snapshot"])),
    "other_model": attempt(lambda: open(Path(store["other_snapshot"]) / "weights.bin", "rb").read()),
    "other_blob": attempt(lambda: open(store["other_blob"], "rb").read()),
    "later_listing": attempt(lambda: os.listdir(store["later_snapshot"])),
    "later_model": attempt(lambda: open(Path(store["later_snapshot"]) / "weights.bin", "rb").read()),
    "later_blob": attempt(lambda: open(store["later_blob"], "rb").read()),
    "twin_blob": attempt(lambda: open(store["twin_blob"], "rb").read()),
    "twin_listing": attempt(lambda: os.listdir(store["twin_snapshot"])),
    "hub_listing": attempt(lambda: os.listdir(hub)),
    "blob_write": attempt(lambda: open(blob, "r+b").write(b"x")),
    "blob_remove": attempt(lambda: os.unlink(blob)),
    "blob_replace": attempt(lambda: os.rename(snapshot / "weights.bin", snapshot / "moved")),
    "plant_weights": attempt(lambda: open(blob.parent / ("0" * 64), "x").close()),
    "store_db": attempt(lambda: open(tmp / "cache" / "store.db", "rb").read(1)),
    "store_lock": attempt(lambda: open(hub / ".lock", "rb").close()),
    # Logs and HOMEs: another replica's are not this one's to read or write.
    "other_log": attempt(other_replicas_log),
    "log_dir": attempt(lambda: os.listdir(tmp / "log")),
    "other_home": attempt(lambda: open(tmp / "cache" / "engine-home" / "first-0" / "planted.py", "x").close()),
    "shared_home": attempt(lambda: open(tmp / "cache" / "engine-home" / "planted.py", "x").close()),
    "own_home": attempt(lambda: open(Path(os.environ["HOME"]) / "cache", "w").write("x")),
    "home_is_own": "ok" if Path(os.environ["HOME"]) == tmp / "cache" / "engine-home" / "prober-0" else os.environ["HOME"],
}
print("PROBE " + json.dumps(seen), flush=True)
os.execv(sys.argv[sep + 1], sys.argv[sep + 1:])
"""
KEPT_FROM_SECRETS = {"state_db": "EACCES", "state_dir": "EACCES", "admin_token": "EACCES", "other_key": "EACCES",
                     "engines_root": "EACCES", "link_to_db": "EACCES", "through_link_to_root": "EACCES",
                     "own_key": "ok", "model": "ok", "tmpdir": "ok",
                     # Connecting to the admin socket is not Landlock's to refuse; its token is.
                     "socket_token": "EACCES", "admin_status_without_token": "401",
                     "admin_unload_without_token": "401",
                     # Landlock's known limit: no new entry directly in a directory above a
                     # protected path (tmp_path, /tmp: the state directory is beneath both).
                     "new_entry_in_tmp": "EACCES", "new_entry_in_parent_of_state": "EACCES",
                     # The store: its model read through its snapshot's link, nothing changed in
                     # it, its manifest (what the integrity checks compare against) not opened.
                     "store_model": "ok", "store_listing": "ok", "hub_listing": "EACCES", "blob_write": "EACCES", "blob_remove": "EACCES",
                     "blob_replace": "EACCES", "plant_weights": "EACCES", "store_db": "EACCES", "store_lock": "EACCES",
                     # Only its own model in the store: no other tenant's weights, nor one imported later.
                     "other_listing": "EACCES", "other_model": "EACCES", "other_blob": "EACCES",
                     "later_listing": "EACCES", "later_model": "EACCES", "later_blob": "EACCES",
                     "twin_blob": "ok", "twin_listing": "EACCES",
                     # Another replica's log (prompts) and HOME (code it would load): not this one's.
                     "other_log": "EACCES", "log_dir": "EACCES", "other_home": "EACCES", "shared_home": "EACCES",
                     "own_home": "ok", "home_is_own": "ok"}
# Scoped from Landlock ABI 6 (Linux 6.12): no signal to the daemon, no connecting to its
# abstract port-claim socket; before it, both still work.
SCOPED = EngineLandlock().abi >= SCOPES_SINCE_ABI
KEPT_FROM_SECRETS |= {"signal_daemon": "EPERM" if SCOPED else "ok", "port_claim": "EPERM" if SCOPED else "ok"}


def probing_model(tmp: Path, name: str, model: Path, source: str) -> str:
    probe = tmp / "probe.py"
    probe.write_text(PROBE)
    argv = [PY, str(probe), str(tmp), str(model), "--", PY, str(FAKE_ENGINE), "--port", "{port}", "--model", name]
    command = ", ".join(f'"{a}"' for a in argv)
    return f'[[models]]\nname = "{name}"\nserver = "openai"\nsource = "{source}"\ncommand = [{command}]\n'


def probe_report(log_dir: Path) -> dict:
    for log in (log_dir / "replicas").glob("*.log"):
        for line in log.read_text().splitlines():
            if line.startswith("PROBE "):
                return json.loads(line.removeprefix("PROBE "))
    return {}


def import_model(cache: Path, name: str, weights: bytes) -> dict[str, str]:
    """A one-file model imported into the store: its snapshot and its blob."""
    source = cache / "models" / name / "weights.bin"
    source.parent.mkdir(parents=True)
    source.write_bytes(weights)
    store = Store(cache)
    try:
        record, _ = store.add(Incoming(name, str(source), [SourceFile("weights.bin", len(weights),
                                                                       lambda: open(source, "rb"))]))
        store.accept_license(name, "test")
        snapshot = store.snapshot_dir(record)
        return {"snapshot": str(snapshot), "blob": str(snapshot.parent.parent / "blobs" / record.files[0]["sha256"])}
    finally:
        store.close()


def test_an_engine_cannot_open_the_daemons_secrets_and_still_serves(daemons, tmp_path):
    secrets = tmp_path / "secrets"
    secrets.mkdir(mode=0o700)
    (secrets / "admin-token").write_text("t" * 32 + "\n")
    (secrets / "admin-token").chmod(0o600)
    # The prober serves "stored"; "other" is another tenant's; "twin" holds the same bytes
    # as "stored" (the store keeps them once: a second name of its blob).
    own = import_model(tmp_path / "cache", "stored", b"weights")
    other = import_model(tmp_path / "cache", "other", b"private")
    twin = import_model(tmp_path / "cache", "twin", b"weights")
    assert os.path.samefile(own["blob"], twin["blob"]) and not os.path.samefile(own["blob"], other["blob"])
    handoff = tmp_path / "handoff"  # made before the engine starts: the engine reads what is put in it later
    handoff.mkdir()
    (handoff / "store.json").write_text(json.dumps({
        "own_snapshot": own["snapshot"], "own_blob": own["blob"], "other_snapshot": other["snapshot"],
        "other_blob": other["blob"], "twin_snapshot": twin["snapshot"], "twin_blob": twin["blob"]}))
    # Links planted in an ancestor of the state directory (the test's tmp): one to the
    # database, one to / (a walk that followed it would allow everything).
    (tmp_path / "planted-db").symlink_to(tmp_path / "state" / "appliance.db")
    (tmp_path / "planted-root").symlink_to("/")
    d = daemons.start(fake_model("first") + probing_model(tmp_path, "prober", Path(own["snapshot"]), "store:stored"),
                      server=f'admin_token_file = "{secrets / "admin-token"}"', wait=False)
    wait_until(lambda: (handoff / "spawned").exists(), 30, what="the prober's engine started")
    later = import_model(tmp_path / "cache", "later", b"imported after the engine started")
    paths = {"later_snapshot": later["snapshot"], "later_blob": later["blob"]}
    (handoff / "later.json.tmp").write_text(json.dumps(paths))
    (handoff / "later.json.tmp").rename(handoff / "later.json")
    seen = wait_until(lambda: probe_report(tmp_path / "log"), 30, what="the probe's report")
    d.wait_ready()
    assert seen == KEPT_FROM_SECRETS
    assert (tmp_path / "state" / "appliance.db").is_file()  # there, and denied
    assert (tmp_path / "cache" / "store.db").is_file() and (tmp_path / "log" / "replicas" / "first-0.log").is_file()
    assert (tmp_path / "cache" / "engine-home" / "prober-0" / "cache").read_text() == "x"
    assert d.replicas("first")[0]["state"] == "READY"  # the unload was refused
    assert "engines cannot make new entries directly in /tmp " in d.log_text()  # the limit, said once
    wait_until(lambda: d.replicas("prober")[0]["state"] == "READY", 30, what="the prober serving")
    with d.client() as c:
        resp = c.post("/v1/chat/completions", json={"model": "prober", "messages": [{"role": "user", "content": "hi"}]})
        assert resp.status_code == 200, resp.text
    assert d.status()["engines_landlocked"] is True


def test_what_engines_are_kept_from_names_every_secret_the_config_names(tmp_path):
    cfg = parse_config(
        f'[server]\nadmin_token_file = "{tmp_path}/token"\n[paths]\nstate_dir = "{tmp_path}/state"\n'
        '[[providers]]\nname = "a"\nbase_url = "https://a.example"\napi_key_file = "a-key"\n'
        f'[[providers]]\nname = "b"\nbase_url = "https://b.example"\napi_key_file = "{tmp_path}/b-key"\n'
    )
    kept = engine_keep_out(cfg, {"CREDENTIALS_DIRECTORY": f"{tmp_path}/creds"})
    assert {tmp_path / "state", tmp_path / "token", tmp_path / "creds", tmp_path / "creds" / "a-key",
            tmp_path / "b-key"} <= set(kept)
    assert any(p.name.startswith("appliance-engines-") for p in kept)  # every replica's private directory


def test_what_engines_are_kept_from_in_the_store_is_its_manifest_its_hub_and_every_home(tmp_path):
    cfg = parse_config(f'[paths]\nstate_dir = "{tmp_path}/state"\ncache_dir = "{tmp_path}/cache"\n'
                       f'log_dir = "{tmp_path}/logs"\n[server]\nlog_file = "{tmp_path}/daemon.log"\n')
    kept, hub = set(engine_keep_out(cfg, {})), tmp_path / "cache" / "hf" / "hub"
    assert {tmp_path / "cache" / name for name in ("store.db", "store.db-wal", "store.db-shm", "engine-home")} <= kept
    assert hub in kept  # every model's weights, the lock, leases and staging: its own model allowed back by its spawn
    assert {tmp_path / "logs", tmp_path / "daemon.log"} <= kept
    assert engine_read_only(cfg) == [tmp_path / "cache"]  # the rest of the store: read rights only


def test_what_an_engine_reads_back_of_the_store_is_its_snapshot_and_the_blobs_its_links_resolve_to_there(tmp_path):
    cfg = parse_config(f'[paths]\nstate_dir = "{tmp_path}/state"\ncache_dir = "{tmp_path}/cache"\n')
    hub = tmp_path / "cache" / "hf" / "hub"
    blobs, snap = hub / "models--org--m" / "blobs", hub / "models--org--m" / "snapshots" / "rev"
    (snap / "sub").mkdir(parents=True)
    (hub / ".staging").mkdir()
    blobs.mkdir()
    for blob in ("a", "b"):
        (blobs / blob).write_text(blob)
    (hub / ".staging" / "x").write_text("staged")
    (snap / "config.json").symlink_to("../../blobs/a")
    (snap / "sub" / "tokenizer.json").symlink_to("../../../blobs/b")
    (snap / "README.md").write_text("a file of the snapshot's own")  # read beneath the snapshot's rule
    # Links the walk gives nothing: out of the store, into its staging, to a directory, dangling.
    (snap / "escape").symlink_to("/etc/hostname")
    (snap / "staged").symlink_to("../../../.staging/x")
    (snap / "folder").symlink_to("../../blobs")
    (snap / "dangling").symlink_to("../../blobs/gone")
    assert sorted(store_reads(cfg, [snap])) == sorted(str(p) for p in (snap, blobs / "a", blobs / "b"))
    assert store_reads(cfg, [snap / "config.json"]) == [str(blobs / "a")]  # a GGUF: the blob its link resolves to
    # Outside a model's folder of the hub: nothing (the ruleset's other rules govern it).
    (tmp_path / "cache" / "models").mkdir()
    assert store_reads(cfg, [None, tmp_path / "elsewhere.gguf", tmp_path / "cache" / "models", hub / ".staging" / "x",
                             snap / "escape", hub / "models--org--m", hub]) == []


async def test_a_replicas_spawn_reads_back_its_store_model_its_adapters_and_files_its_command_names(tmp_path):
    cache = tmp_path / "cache"
    model, adapter = import_model(cache, "base", b"weights"), import_model(cache, "sql-lora", b"adapter")
    mmproj = import_model(cache, "base-mmproj", b"projector")  # named by the operator's --mmproj=
    import_model(cache, "other", b"another tenant's")
    cfg = parse_config(f'[paths]\nstate_dir = "{tmp_path}/state"\ncache_dir = "{cache}"\n'
                       '[[models]]\nname = "base"\nserver = "openai"\nsource = "store:base"\n'
                       f'command = ["engine", "{{port}}", "--mmproj={mmproj["snapshot"]}"]\n')
    spawned: list[tuple[Path, ...]] = []

    class Recorder:
        async def spawn(self, argv, env, log_path, redact="", cpus=frozenset(), own_dirs=(), own_reads=()):
            spawned.append(own_reads)
            raise OSError("recorded, not started")

    replica = Replica(cfg=cfg, model=cfg.models[0], index=0, adapter=adapter_for("openai"), runner=Recorder(),
                      session=None, log_dir=tmp_path)
    replica.access = open_access()
    replica.loras = (Lora("sql", Path(adapter["snapshot"]), 0),)
    try:
        with pytest.raises(Crash, match="recorded"):
            await replica._spawn()
    finally:
        replica.access.close()
    assert sorted(spawned[0]) == sorted((model["snapshot"], model["blob"], adapter["snapshot"], adapter["blob"],
                                         mmproj["snapshot"], mmproj["blob"]))


def test_the_shared_temp_dirs_engines_cannot_make_entries_in_are_those_above_a_protected_path():
    # A daemon run by hand: its engines' root in /tmp; under the unit, in /run (PrivateTmp).
    assert closed_temp_dirs([Path("/home/op/.local/state/appliance"), Path("/tmp/appliance-engines-1-x")]) == ["/tmp"]
    assert closed_temp_dirs([Path("/var/lib/appliance"), Path("/run/appliance/appliance-engines-1-x")]) == []
    assert closed_temp_dirs([Path("/var/tmp/a/state"), Path("/dev/shm/k")]) == ["/var/tmp", "/dev/shm"]
    assert closed_temp_dirs([Path("/tmpfoo/state")]) == []  # a sibling named alike is not beneath


def test_what_engines_are_kept_from_names_the_admin_sockets_token_wherever_the_socket_is(tmp_path):
    cfg = parse_config(f'[server]\nadmin_socket = "{tmp_path}/run/admin.sock"\n'
                       f'[paths]\nstate_dir = "{tmp_path}/state"\n')
    assert tmp_path / "run" / "admin.sock.token" in engine_keep_out(cfg, {})


# A kernel without Landlock, made here by a seccomp filter that answers its three calls
# ENOSYS (what a kernel built without it answers) in a process that then starts an
# engine the daemon's way: started anyway, one WARNING, not reported enforced.
WITHOUT_LANDLOCK = r"""
import asyncio, ctypes, errno, json, logging, sys
from pathlib import Path
from appliance.cbpf import JEQ_K, LD_W_ABS, RET_K, Program, assemble
from appliance.fleet.sandbox import SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO

program = Program(assemble([(LD_W_ABS, None, None, 0), (JEQ_K, "no", None, 444), (JEQ_K, "no", None, 445),
                            (JEQ_K, "no", "yes", 446), "yes", (RET_K, None, None, SECCOMP_RET_ALLOW),
                            "no", (RET_K, None, None, SECCOMP_RET_ERRNO | errno.ENOSYS)]))
libc = ctypes.CDLL(None, use_errno=True)
assert libc.prctl(38, ctypes.c_ulong(1), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)) == 0
assert libc.prctl(22, ctypes.c_ulong(2), ctypes.c_ulong(program.address), ctypes.c_ulong(0), ctypes.c_ulong(0)) == 0
logging.basicConfig(stream=sys.stderr, format="%(levelname)s %(message)s")
from appliance.fleet.landlock import engine_landlock
from appliance.fleet.process import SubprocessRunner

async def main():
    tmp = Path(sys.argv[1])
    runner = SubprocessRunner(1 << 20, keep_out=lambda: [tmp / "state"])
    proc = await runner.spawn([sys.executable, "-c", "print('served')"], {"PATH": "/usr/bin:/bin"}, tmp / "e.log")
    return await proc.wait(), proc.tail(1)

code, tail = asyncio.run(main())
print(json.dumps({"enforced": engine_landlock().enforced, "reason": engine_landlock().reason, "exit": code,
                  "tail": tail}))
"""


def test_a_kernel_without_landlock_starts_engines_with_one_warning(tmp_path):
    script = tmp_path / "without.py"
    script.write_text(WITHOUT_LANDLOCK)
    done = subprocess.run([PY, str(script), str(tmp_path)], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).parent.parent)
    seen = json.loads(done.stdout)
    assert seen == {"enforced": False, "reason": seen["reason"], "exit": 0, "tail": ["served"]}
    assert "ENOSYS" in seen["reason"]
    warnings = [line for line in done.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1 and "without their Landlock ruleset" in warnings[0]
