"""The state folder, <dir_out>/.dumpwatch: proven dumpwatch's own before anything in it is used.

Anyone who may write dir_out (the group) could put a symlink, or a folder of their own, in
its place; dumpwatch would then clean "staged copies" out of another folder and write its
journal and lock there. So the folder is opened once, without following a symlink, and
must belong to the user dumpwatch runs as (or to root); every name in it is then reached
through that folder's descriptor, never through its path again.
"""

from __future__ import annotations

import errno
import os
import pwd
import stat
from pathlib import Path

from dumpwatch.errors import ConfigError
from dumpwatch.fsops import make_folder, set_owner_mode

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafeState(ConfigError):
    """The state folder, or a name in it, is not dumpwatch's own: a person must look."""


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _check_owner(path: Path, st: os.stat_result) -> None:
    """Ours, or root's. Root's: only root can have made it (a first run under sudo), and root
    is trusted anyway. Anyone else's is theirs to fill with links and swaps; and dumpwatch run
    as root there would lend that user root's hand (the lock and the journal are chmodded)."""
    me = os.geteuid()
    if st.st_uid in (me, 0):
        return
    owner = _user(st.st_uid)
    if me == 0:
        raise UnsafeState(f"{path} is owned by {owner}, not by root: run dumpwatch as {owner}")
    raise UnsafeState(f"{path} is owned by {owner}, not by {_user(me)} who runs dumpwatch, nor by root; "
                      f"if it is dumpwatch's state folder, chown it to {_user(me)}")


def _open_folder(parent_fd: int, name: str, path: Path, what: str, mode: int, gid: int | None,
                 create: bool) -> int:
    """Open (or make) parent/name as a folder of ours, never through a symlink; -1 if it is
    missing and create is False."""
    if create:
        try:
            os.mkdir(name, 0o700, dir_fd=parent_fd)
        except FileExistsError:
            pass
        except OSError as exc:  # named by its whole path, not by the bare name given to mkdir
            raise OSError(exc.errno, exc.strerror, str(path)) from None
        else:
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
            set_owner_mode(fd, mode, gid)
            return fd
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    except FileNotFoundError:
        if create:
            raise
        return -1
    except OSError as exc:
        # O_DIRECTORY | O_NOFOLLOW on a symlink fails with ENOTDIR (or ELOOP): ask which it was.
        if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
            raise
        _refuse(parent_fd, name, path, what)
        raise
    st = os.fstat(fd)
    try:
        _check_owner(path, st)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _refuse(parent_fd: int, name: str, path: Path, what: str) -> None:
    """Raise UnsafeState if parent/name is a symlink, or not what it should be."""
    try:
        st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeState(f"{path} is a symlink, not dumpwatch's {what}; remove it")
    folder = what.endswith("folder")
    if stat.S_ISDIR(st.st_mode) != folder:
        kind = "a folder" if folder else "a file"
        raise UnsafeState(f"{path} is not {kind}, so not dumpwatch's {what}; remove it")


class StateFolder:
    """The open state folder. fd is -1 in a dry run that finds none (it makes nothing)."""

    def __init__(self, path: Path, mode: int, gid: int | None, create: bool = True):
        """mode: the state folder's (the caller keeps others out); dir_out, if it is made
        here, gets mode as given too, as the tree would give it."""
        self.path = path
        self.mode, self.gid = mode, gid
        if create:
            make_folder(path.parent, mode, gid)  # dir_out: the site's, followed as configured
        try:
            parent = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            if create:
                raise
            self.fd = -1
            return
        try:
            self.fd = _open_folder(parent, path.name, path, "state folder", mode & 0o2770, gid, create)
        finally:
            os.close(parent)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def holds(self, path: Path) -> bool:
        """True if path names an entry of this folder."""
        return os.path.abspath(path.parent) == os.path.abspath(self.path)

    def folder(self, name: str, what: str) -> int:
        """A folder in it (tmp/), made if missing, opened without following a symlink."""
        return _open_folder(self.fd, name, self.path / name, what, self.mode & 0o2770, self.gid, True)

    def check(self, name: str, what: str) -> None:
        """Refuse a symlink, or a folder, in the place of the file name; its opener then
        opens it with O_NOFOLLOW through self.fd, which a link made since cannot pass."""
        if self.fd >= 0:
            _refuse(self.fd, name, self.path / name, what)

    def file(self, name: str, what: str) -> Path:
        """check(), and the path by which to open the file (for code that takes a path):
        through this folder's fd, so that a folder swapped in since cannot redirect it."""
        self.check(name, what)
        if self.fd < 0:
            return self.path / name
        return Path(fd_path(self.fd, self.path)) / name


_PROC = os.path.isdir("/proc/self/fd")


def fd_path(fd: int, fallback: Path) -> str:
    """A path that reaches the folder fd is open on, whatever its name now (Linux's /proc);
    without /proc, fallback: the folder's name, as checked when it was opened."""
    return f"/proc/self/fd/{fd}" if _PROC else str(fallback)
