"""The engines' Landlock ruleset: an engine process cannot open the daemon's secrets, nor
another model's weights.

An engine runs as the daemon's user and may run code the operator never read (vLLM with
trust_remote_code): as that user it could read the state database (audit rows, key
hashes), the admin token, the providers' keys, and the other replicas' private
directories (their engine keys: a side door to another engine around the daemon's
policy). So every engine process gets, between fork and exec and after its seccomp
filter (sandbox.py), a Landlock domain its threads and children inherit and none of them
can leave: every filesystem access right this kernel's Landlock knows (read, write,
execute, list, make, remove, refer, truncate, device ioctl) is handled, and allowed
everywhere except beneath the protected paths (`engine_keep_out`) and in the cache
directory (`engine_read_only`: an engine may only read and list there). The store's hub,
every model's blobs and snapshots, is protected: a tenant's engine running
trust_remote_code must not copy another tenant's private fine-tune. Each spawn allows
back, read-only, the model it serves and its adapters (`store_reads`: a GGUF's blob, an
HF snapshot and the blobs its links name), as the store holds them at the spawn: a model
imported later gets no rule, and a blob two models share (one inode) is either's.

Landlock only allow-lists, so the ruleset is the complement, built in the daemon before
the fork (`EngineLandlock.ruleset`): from / down to each protected path, every entry of
each ancestor directory that is neither protected nor an ancestor of a protected path
gets a rule (a directory: all the rights beneath it; any other file: the rights a file
takes); beneath a read-only path the rules hold only READ_FILE and READ_DIR, so the
store's manifest and hub, kept out inside it, get none; the engine's own directories
(its private directory, its HOME) get every right, and its own model's files in the
store (`own_reads`) READ_FILE and READ_DIR, even inside a protected or read-only tree
(Landlock judges a file where its links resolve: the blob, which has its rule). The walk
opens each entry by O_PATH relative to its directory's descriptor, never following a
link: a link is given no rule (what it points at is governed where it lies), and a link
where an ancestor was is not descended. `store_reads` reads a snapshot's links
(readlink) and allows only a regular file in the same model's blobs folder.

From ABI 6 (Linux 6.12) the domain is also scoped: an engine cannot signal a process
outside it (kill the daemon, stop a worker or another engine) nor connect to an abstract
unix socket made outside it.

Known limits: an entry made later directly in an ancestor directory (a new file in /tmp
when the engines' root or the state directory is in /tmp) has no rule, so the engine can
neither make nor use it (EACCES). Landlock cannot lift that: a rule is for a directory
and everything beneath it, and there is no rule that denies, so granting the right to
make entries in /tmp would grant it in the protected directory beneath too (a link
planted where the daemon writes), and the new file could still not be opened, as read
and write would need the same rule. Engines write under the TMPDIR and HOME the daemon
gives them; `ruleset` logs once which shared temp directories are so closed. Connecting
to a unix socket (the admin socket, a vLLM replica's socket) is not a filesystem access
Landlock mediates (up to ABI 7), nor is stat: the admin socket's token
(appliance/socket_token.py) is what engines cannot read.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import logging
import os
import stat
import struct
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.fleet.engine_access import private_root
from appliance.socket_token import token_path

if TYPE_CHECKING:
    from appliance.config import Config

log = logging.getLogger("appliance.supervisor")

# The syscalls' numbers: the same on x86_64 and aarch64 (the generic table since 5.13).
SYS_LANDLOCK_CREATE_RULESET = 444
SYS_LANDLOCK_ADD_RULE = 445
SYS_LANDLOCK_RESTRICT_SELF = 446
LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_RULE_PATH_BENEATH = 1
PR_SET_NO_NEW_PRIVS = 38

# LANDLOCK_ACCESS_FS_*: ABI 1 knows the first thirteen; REFER came with ABI 2, TRUNCATE
# with 3, IOCTL_DEV with 5 (4, 6 and 7 added network, scopes and logging, not files).
EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
TRUNCATE, IOCTL_DEV = 1 << 14, 1 << 15
ABI1_RIGHTS = (1 << 13) - 1
REFER = 1 << 13
FILE_RIGHTS = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV  # what a rule on a non-directory may hold
# The store's weights are loaded, never run (mmap is not Landlock's): no EXECUTE there.
READ_ONLY_RIGHTS = READ_FILE | READ_DIR


# LANDLOCK_SCOPE_* (ABI 6): an engine may not signal a process outside its domain (the
# daemon, its workers, another engine) nor connect to an abstract unix socket made outside
# it (the daemon's port claim); its own processes' sockets and signals stay its own.
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1
SCOPES_SINCE_ABI = 6


def ruleset_attr(abi: int, rights: int) -> bytes:
    """struct landlock_ruleset_attr as this ABI reads it: handled_access_fs; from ABI 6
    handled_access_net (none: ports are the seccomp filter's) and scoped."""
    if abi < SCOPES_SINCE_ABI:
        return struct.pack("=Q", rights)
    return struct.pack("=QQQ", rights, 0, SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL)


def fs_rights(abi: int) -> int:
    """Every filesystem access right a kernel of this Landlock ABI handles."""
    rights = ABI1_RIGHTS
    for since, right in ((2, REFER), (3, TRUNCATE), (5, IOCTL_DEV)):
        if abi >= since:
            rights |= right
    return rights


# In the store (appliance/store/store.py): what the integrity checks compare against,
# kept from engines inside the read-only cache directory; and its hub (every model's
# blobs and snapshots, its writers' lock, leases and staging), kept from engines but for
# the files of the model an engine serves (`store_reads`, allowed back by its spawn).
STORE_MANIFEST = ("store.db", "store.db-wal", "store.db-shm", "store.db-journal")
STORE_HUB = ("hf", "hub")  # <cache_dir>/hf/hub
STORE_MODEL_PREFIX = "models--"  # <hub>/models--ORG--NAME: one model's blobs and snapshots
ENGINE_HOMES = "engine-home"  # <cache_dir>/engine-home/<replica>: each replica's HOME


def engine_keep_out(cfg: Config, environ: Mapping[str, str] = os.environ) -> list[Path]:
    """What no engine may open: the state directory (database, lock, admin socket), the
    admin token file, the admin socket's token file (in the state directory unless
    server.admin_socket names another), the providers' key files, systemd's credentials
    directory, the engines' private root (every replica's secret; a replica's own
    directory is allowed back by its spawn), the log directory and the daemon's log file
    (other replicas' logs hold prompts; an engine writes its log through the pipe the
    daemon reads), the store's manifest, the store's hub (every model's weights, and its
    writers' files; the engine's own model is allowed back by its spawn: `store_reads`),
    and every replica's HOME (its own is allowed back by its spawn)."""
    creds = environ.get("CREDENTIALS_DIRECTORY", "")
    cache = Path(cfg.paths.cache_dir)
    paths = [Path(cfg.paths.state_dir), private_root(), Path(cfg.paths.log_dir), cache / ENGINE_HOMES]
    paths += [cache / name for name in STORE_MANIFEST] + [cache.joinpath(*STORE_HUB)]
    if cfg.server.log_file:
        paths.append(Path(cfg.server.log_file))
    if cfg.server.admin_token_file:
        paths.append(Path(cfg.server.admin_token_file))
    if cfg.server.admin_socket:
        paths.append(token_path(cfg.server.admin_socket))
    if creds:
        paths.append(Path(creds))
    for provider in cfg.providers:
        if provider.api_key_file and (creds or Path(provider.api_key_file).is_absolute()):
            paths.append(Path(creds) / provider.api_key_file)  # an absolute name replaces creds
    return paths


def engine_read_only(cfg: Config) -> list[Path]:
    """Where an engine may only read and list: the cache directory (the model store,
    which no replica may change; its hub is kept out but for each engine's own model)."""
    return [Path(cfg.paths.cache_dir)]


def store_reads(cfg: Config, paths: Iterable[Path | None]) -> list[str]:
    """What of the store's hub an engine may read, allowed back read-only by its spawn,
    each resolved: of paths (its weights, its adapters' paths), each that lies in a model's
    folder of the hub: a file (a GGUF: the blob its snapshot's link resolves to), or a
    directory (an HF snapshot: the directory, and the blob each link beneath it names in
    its own model's blobs folder, as the store makes them). Links beneath are read, never
    followed, and one that names anything else (a path out of the store, another folder,
    a link) is given nothing. A path outside the hub (the bundled model, a model or
    adapter named by its path) is given nothing here: the ruleset's other rules govern
    it, as they govern every other file."""
    hub = os.path.realpath(Path(cfg.paths.cache_dir).joinpath(*STORE_HUB)) + os.sep
    reads: list[str] = []
    for path in paths:
        if path is not None:
            reads += _reads_in_hub(hub, os.path.realpath(path))
    return list(dict.fromkeys(reads))  # the weights named twice (a path and its flag) ruled once


def named_paths(argv: Iterable[str]) -> list[Path]:
    """The absolute paths an engine's command line names (``/p`` or ``--flag=/p``): files
    the operator gave it beside its weights (llama.cpp's ``--mmproj``, a vLLM
    ``--tokenizer`` folder), read back by its spawn if they lie in the store."""
    named = []
    for arg in argv:
        value = arg.partition("=")[2] if arg.startswith("-") else arg
        if value.startswith("/"):
            named.append(Path(value))
    return named


def _in_models(hub: str, real: str) -> bool:
    """real (resolved) lies in a model's folder of the hub (not its writers' files)."""
    return real.startswith(hub) and real[len(hub) :].startswith(STORE_MODEL_PREFIX) and os.sep in real[len(hub) :]


def _reads_in_hub(hub: str, real: str) -> list[str]:
    if not _in_models(hub, real):
        return []
    try:
        mode = os.lstat(real).st_mode
    except OSError:
        return []  # gone: the engine finds it gone
    if stat.S_ISREG(mode):
        return [real]
    if not stat.S_ISDIR(mode):
        return []
    reads = [real]  # a snapshot: listed and read beneath; its links' blobs each allowed below
    blobs = os.path.join(real[: real.index(os.sep, len(hub))], "blobs", "")  # <hub>/models--X/blobs/
    try:
        if not stat.S_ISDIR(os.lstat(blobs[:-1]).st_mode):
            return reads  # a link, not a folder: no blob is named through it
    except OSError:
        return reads
    folders = [real]  # resolved: each link's target is joined to a folder that is no link
    while folders:
        with os.scandir(folders.pop()) as entries:
            for entry in entries:
                if entry.is_symlink():
                    target = os.path.normpath(os.path.join(os.path.dirname(entry.path), os.readlink(entry.path)))
                    if _is_blob(blobs, target):
                        reads.append(target)
                elif entry.is_dir(follow_symlinks=False):
                    folders.append(entry.path)
    return reads


def _is_blob(blobs: str, path: str) -> bool:
    """path names a regular file directly in the blobs folder (not a link, not beneath)."""
    if not path.startswith(blobs) or os.sep in path[len(blobs) :]:
        return False
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False  # a dangling link


class _Walk(dict):
    """A directory the walk goes into: its entries that are protected (None) or walked
    further, by name; read_only: the rules beneath it hold read rights only."""

    read_only = False


def _tree(keep_out: Iterable[Path], read_only: Iterable[Path] = ()) -> _Walk:
    """The protected and read-only paths as nested walks, None marking a protected one
    (it wins over anything named beneath it, and over a read-only path). Each is made
    absolute and its links resolved first: the walk goes where the daemon itself would
    open it."""
    root = _Walk()
    marks = [(path, False) for path in keep_out] + [(path, True) for path in read_only]
    for path, readable in marks:
        *parents, last = Path(os.path.realpath(path)).parts[1:] or [""]
        node: _Walk | None = root
        for name in parents:
            assert node is not None
            node = node.setdefault(name, _Walk())
            if node is None:
                break  # beneath a protected path already
        if node is None or not last:
            continue
        if not readable:
            node[last] = None
        elif node.setdefault(last, _Walk()) is not None:
            node[last].read_only = True
    return root


def _is_dir(fd: int) -> bool | None:
    """A directory, another file, or None for a link (O_PATH|O_NOFOLLOW opened the link)."""
    mode = os.fstat(fd).st_mode
    return None if stat.S_ISLNK(mode) else stat.S_ISDIR(mode)


class EngineLandlock:
    """The Landlock ABI of this kernel, probed once; `ruleset` builds a spawn's ruleset in
    the daemon, `restrict` enters it in the child. `enforced` False: not (`reason`)."""

    def __init__(self) -> None:
        self._libc: ctypes.CDLL | None = None
        self._refusal = b"--- appliance: the kernel refused the engine's Landlock ruleset; not started\n"
        self.abi = 0
        self.reason = self._why_not()
        self.enforced = not self.reason
        self.rights = fs_rights(self.abi)
        self._told_closed = False

    def _why_not(self) -> str:
        if not sys.platform.startswith("linux"):
            return f"no Landlock on {sys.platform}"
        try:
            self._libc = ctypes.CDLL(None, use_errno=True)
        except OSError as exc:
            return f"libc not loaded: {exc}"
        abi = self._syscall(SYS_LANDLOCK_CREATE_RULESET, None, 0, LANDLOCK_CREATE_RULESET_VERSION)
        if abi < 1:
            code = ctypes.get_errno()
            return f"the kernel has no Landlock ({errno.errorcode.get(code, code)}: {os.strerror(code)})"
        self.abi = abi
        return ""

    def _syscall(self, number: int, *args: object) -> int:
        assert self._libc is not None
        ctypes.set_errno(0)
        return int(self._libc.syscall(ctypes.c_long(number), *args))

    def ruleset(
        self,
        keep_out: Iterable[Path],
        own: Iterable[Path],
        read_only: Iterable[Path] = (),
        own_reads: Iterable[str] = (),
    ) -> int | None:
        """A ruleset fd (O_CLOEXEC; the caller closes it after the spawn) allowing every
        right everywhere but beneath keep_out and read_only (there: reading and listing,
        but keep_out), in own, and reading (and listing) own_reads (`store_reads`: its
        model's files in the store); None when not enforced."""
        if not self.enforced:
            return None
        keep_out = list(keep_out)
        if not self._told_closed:
            self._told_closed = True
            _tell_closed_temp_dirs(keep_out)
        attr = ctypes.create_string_buffer(ruleset_attr(self.abi, self.rights))
        fd = self._syscall(SYS_LANDLOCK_CREATE_RULESET, attr, ctypes.c_size_t(len(attr.raw)), ctypes.c_uint32(0))
        if fd < 0:
            raise OSError(ctypes.get_errno(), "cannot create the engine's Landlock ruleset")
        try:
            root = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                self._allow_around(fd, root, _tree(keep_out, read_only), self.rights)
            finally:
                os.close(root)
            for path in own:
                with contextlib.suppress(FileNotFoundError):
                    self._allow_path(fd, path, self.rights)
            for read in own_reads:  # resolved already (store_reads)
                with contextlib.suppress(FileNotFoundError):  # removed since: the engine finds it gone
                    self._allow_path(fd, read, self.rights & READ_ONLY_RIGHTS, resolve=False)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _allow_around(self, ruleset: int, directory: int, protected: _Walk, rights: int) -> None:
        """Rules (of rights) for every entry of directory but the protected ones; down
        into those with protected or read-only paths beneath them (a read-only one with
        nothing protected beneath gets its one rule). An unlistable directory allows
        nothing else."""
        try:
            names = os.listdir(directory)
        except PermissionError:
            names = list(protected)
        for name in names:
            if name not in protected:
                self._allow_entry(ruleset, directory, name, rights)
                continue
            below = protected[name]
            if below is None:
                continue  # protected: no rule
            below_rights = rights & READ_ONLY_RIGHTS if below.read_only else rights
            if below.read_only and not below:
                self._allow_entry(ruleset, directory, name, below_rights)
                continue
            try:
                child = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=directory)
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EACCES):
                    raise
                continue  # gone, or a link or a file where an ancestor was: no rule, not followed
            try:
                self._allow_around(ruleset, child, below, below_rights)
            finally:
                os.close(child)

    def _allow_entry(self, ruleset: int, directory: int, name: str, rights: int) -> None:
        try:
            fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=directory)
        except FileNotFoundError:
            return  # removed since listed
        try:
            self._add_rule(ruleset, fd, rights)
        finally:
            os.close(fd)

    def _allow_path(self, ruleset: int, path: Path | str, rights: int, resolve: bool = True) -> None:
        fd = os.open(os.path.realpath(path) if resolve else path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            self._add_rule(ruleset, fd, rights)
        finally:
            os.close(fd)

    def _add_rule(self, ruleset: int, fd: int, rights: int) -> None:
        kind = _is_dir(fd)
        if kind is None:
            return  # a link: what it points at has its own rule, or none
        if not kind:
            rights &= FILE_RIGHTS
        attr = ctypes.create_string_buffer(struct.pack("=Qi", rights, fd))  # struct landlock_path_beneath_attr
        if (
            self._syscall(
                SYS_LANDLOCK_ADD_RULE,
                ctypes.c_int(ruleset),
                ctypes.c_int(LANDLOCK_RULE_PATH_BENEATH),
                attr,
                ctypes.c_uint32(0),
            )
            != 0
        ):
            raise OSError(ctypes.get_errno(), "cannot add a rule to the engine's Landlock ruleset")

    def restrict(self, ruleset: int) -> None:
        """In the child, after fork and before exec (after the seccomp step): no_new_privs
        (set already when the seccomp filter went in; set here too for a kernel that took
        none) and landlock_restrict_self, nothing else. If the kernel refuses, the reason
        goes to the engine's log (fd 2) and the child exits without running the engine."""
        assert self._libc is not None
        nnp = self._libc.prctl(
            ctypes.c_int(PR_SET_NO_NEW_PRIVS),
            ctypes.c_ulong(1),
            ctypes.c_ulong(0),
            ctypes.c_ulong(0),
            ctypes.c_ulong(0),
        )
        if (
            nnp != 0
            or self._libc.syscall(ctypes.c_long(SYS_LANDLOCK_RESTRICT_SELF), ctypes.c_int(ruleset), ctypes.c_uint32(0))
            != 0
        ):
            os.write(2, self._refusal)
            os._exit(EXIT_UNCONFINED)


SHARED_TEMP_DIRS = ("/tmp", "/var/tmp", "/dev/shm")


def closed_temp_dirs(keep_out: Iterable[Path]) -> list[str]:
    """The shared temp directories above a protected path: an engine can make no new entry
    directly in them (the module's known limit)."""
    real = [os.path.realpath(path) for path in keep_out]
    return [d for d in SHARED_TEMP_DIRS if any(p.startswith(os.path.realpath(d) + "/") for p in real)]


def _tell_closed_temp_dirs(keep_out: list[Path]) -> None:
    if closed := closed_temp_dirs(keep_out):
        log.info(
            "engines cannot make new entries directly in %s (a protected path is beneath it: the state "
            "directory or the engines' root); they write under their TMPDIR and HOME. docs/operations.md "
            '"Engines cannot open the daemon\'s secrets" says how to lift it',
            ", ".join(closed),
        )


EXIT_UNCONFINED = 126  # as the seccomp step's: the daemon promised the ruleset


@functools.cache
def engine_landlock() -> EngineLandlock:
    """The daemon's one Landlock probe. A kernel without it (older than 5.13, or built or
    booted without it: ENOSYS, EOPNOTSUPP) starts engines anyway with one WARNING, the
    seccomp step's policy (sandbox.py): /admin/status says it (`engines_landlocked`)."""
    landlock = EngineLandlock()
    if not landlock.enforced:
        log.warning(
            "engines run without their Landlock ruleset (%s): an engine may read the state database, "
            "the admin token, the providers' keys, the other replicas' keys, every model's weights "
            "and the other engines' memory",
            landlock.reason,
        )
    return landlock
