"""The admin socket's token: what a request on ``server.admin_socket`` must carry.

Opening the socket is not enough: an engine runs as the daemon's user, and connecting to
a pathname unix socket is not a filesystem access Landlock mediates (fleet/landlock.py),
so the socket's mode alone let any engine administer. The daemon makes a fresh random
token at each start and writes it next to the socket, ``<admin_socket>.token``, mode
0640: its owner and group (the socket's: both are made by the daemon in one directory)
may read it, as they may open the socket; engines may not (the state directory, and the
token file wherever the socket is, are in their Landlock deny list).

The daemon writes it atomically and follows no link: a temp name made with
O_CREAT|O_EXCL|O_NOFOLLOW, then renamed over the token's name (a rename replaces a link
there, never writes through it); a link or anything but a regular file found at the
token's name is refused all the same, as a planted one. It removes the file at exit if
the file is still the one it wrote. Clients (the CLI, the TUI) read it with O_NOFOLLOW.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path

SUFFIX = ".token"
MODE = 0o640  # the socket's owner and group read it; others nothing
LIMIT = 4096


def token_path(socket_path: str | Path) -> Path:
    """Where the token of the admin socket at socket_path lies."""
    return Path(os.fspath(socket_path) + SUFFIX)


def new_token() -> str:
    """A fresh socket token: 256 random bits."""
    return secrets.token_urlsafe(32)


def write_token(socket_path: str | Path, token: str) -> tuple[int, int]:
    """Write token at token_path(socket_path), atomically, following no link; the
    file's (st_dev, st_ino), for remove_token. OSError says why not."""
    path = token_path(socket_path)
    folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _refuse_unless_a_file(folder, path)
        temp = f".{path.name}.{secrets.token_hex(8)}"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=folder)
        try:
            os.fchmod(fd, MODE)  # whatever the umask: the group must read it
            os.write(fd, token.encode() + b"\n")
            st = os.fstat(fd)
        finally:
            os.close(fd)
        try:
            os.rename(temp, path.name, src_dir_fd=folder, dst_dir_fd=folder)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(temp, dir_fd=folder)
            raise
    finally:
        os.close(folder)
    return st.st_dev, st.st_ino


def _refuse_unless_a_file(folder: int, path: Path) -> None:
    """A stale token (a daemon killed by SIGKILL) is replaced; a link or anything but a
    regular file where the token goes was put there by someone else: refused."""
    try:
        st = os.stat(path.name, dir_fd=folder, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(st.st_mode):
        kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a regular file"
        raise OSError(f"{path} is {kind}: the admin socket's token is not written there (remove it)")


def remove_token(socket_path: str | Path, written: tuple[int, int]) -> None:
    """Remove the token file if it is still the one written (st_dev, st_ino)."""
    path = token_path(socket_path)
    with contextlib.suppress(OSError):
        st = os.stat(path, follow_symlinks=False)
        if (st.st_dev, st.st_ino) == written:
            os.unlink(path)


def read_token(socket_path: str | Path) -> str:
    """The token of the admin socket at socket_path; "" when there is no token file
    (no daemon, or one that was killed before it wrote it). PermissionError when this
    user may not read it; OSError for a link or anything but a small regular file."""
    path = token_path(socket_path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return ""
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > LIMIT:
            raise OSError(f"{path} is not the admin socket's token file (a regular file of at most {LIMIT} bytes)")
        return os.read(fd, LIMIT).decode(errors="replace").strip()
    finally:
        os.close(fd)
