"""Filesystem steps that never overwrite, never follow a symlink below dir_out, and can be fsynced."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

from dumpwatch import linux
from dumpwatch.errors import Rejected
from dumpwatch.naming import is_safe_component

log = logging.getLogger(__name__)

AT_FDCWD = -100
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

_noreplace_unsupported: set[int] = set()  # st_dev of filesystems that refused RENAME_NOREPLACE


class TreeBlocked(Rejected):
    """Something in dir_out (a symlink, a file) stands where a folder must be."""


def move_noreplace(src_dir_fd: int, src: str, dst_dir_fd: int, dst: str, device: int) -> None:
    """Rename src to dst atomically; FileExistsError if dst exists. Never replaces.

    Uses renameat2(RENAME_NOREPLACE), or link + unlink where the filesystem lacks it;
    after a kill between those two, both names hold the same inode, which the journal's
    recovery and the duplicate check both recognise.
    """
    if device not in _noreplace_unsupported:
        code = linux.rename_noreplace(src_dir_fd, src, dst_dir_fd, dst)
        if code == 0:
            return
        if code is not None and code not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(code, os.strerror(code), dst)
        log.info("this filesystem has no RENAME_NOREPLACE; using link and unlink")
        _noreplace_unsupported.add(device)
    os.link(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd, follow_symlinks=False)
    os.unlink(src, dir_fd=src_dir_fd)


def open_dir(parent_fd: int, name: str) -> int:
    """Open a folder below parent without following a symlink."""
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise TreeBlocked(f"{name!r} in the sorted tree is not a folder (a symlink or a file)") from None
        raise


def make_dirs(root_fd: int, names: tuple[str, ...], mode: int, gid: int | None) -> tuple[int, list[tuple[str, ...]]]:
    """Open root/names..., creating what is missing with mode and group.

    Returns the deepest folder's fd (the caller closes it) and the folders it created,
    as paths below root, so that a caller can fsync their parents.
    """
    fd = os.dup(root_fd)
    created: list[tuple[str, ...]] = []
    try:
        for depth, name in enumerate(names):
            if not is_safe_component(name):
                raise TreeBlocked(f"unsafe folder name {name!r}")
            try:
                child = open_dir(fd, name)
            except FileNotFoundError:
                try:
                    os.mkdir(name, 0o700, dir_fd=fd)
                except FileExistsError:
                    pass  # made at the same moment by another dumpwatch
                child = open_dir(fd, name)
                set_owner_mode(child, mode, gid)
                created.append(names[: depth + 1])
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd, created


def make_folder(path: Path, mode: int, gid: int | None) -> None:
    """mkdir -p, giving the folders it creates (only those) the mode and group."""
    missing = []
    folder = path
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=0o700)
        except FileExistsError:
            continue
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            set_owner_mode(fd, mode, gid)
        finally:
            os.close(fd)


_warned: set[str] = set()


def set_owner_mode(fd: int, mode: int, gid: int | None, st: os.stat_result | None = None) -> None:
    """Give fd the configured mode and group; a refusal is logged once, never fatal."""
    st = st or os.fstat(fd)
    try:
        if gid is not None and st.st_gid != gid:
            os.fchown(fd, -1, gid)
        if st.st_mode & 0o7777 != mode:
            os.fchmod(fd, mode)
    except PermissionError as exc:
        key = f"{exc.errno}"
        if key not in _warned:
            _warned.add(key)
            log.warning("cannot set mode %04o / group %s on sorted files: %s", mode, gid, exc.strerror)


def write_new(dir_fd: int, name: str, fill: Callable[[int], None], mode: int, gid: int | None) -> None:
    """Create a new file (never an existing one), let fill(fd) write it, fsync it.

    On any error the partial file is removed.
    """
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    try:
        fill(fd)
        set_owner_mode(fd, mode, gid)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        try:
            os.unlink(name, dir_fd=dir_fd)
        except OSError:
            pass
        raise
    os.close(fd)


def copy_file(source: str, dir_fd: int, name: str, mode: int, gid: int | None) -> None:
    """Copy the file at source (never through a symlink) to a new file, fsynced."""
    fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        write_new(dir_fd, name, lambda out: copy_range(fd, out, 0, size), mode, gid)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def copy_range(src_fd: int, dst_fd: int, offset: int, count: int) -> None:
    """Copy count bytes from src_fd at offset to the end of dst_fd, in the kernel where it can."""
    while count > 0:
        try:
            done = os.copy_file_range(src_fd, dst_fd, count, offset)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            done = os.write(dst_fd, os.pread(src_fd, min(count, 1 << 20), offset))
        if done == 0:
            raise OSError(errno.EIO, "source file shrank while it was copied")
        offset += done
        count -= done


def entries_below(root: str, unlistable: Callable[[str, OSError], None],
                  wanted: Callable[[str, os.DirEntry], bool] = lambda folder, entry: True) -> Iterator[str]:
    """The path of every entry below root that is not a folder, depth first and in name
    order, never through a symlink. `wanted(folder, entry)` picks the entries (of any kind)
    that are yielded or entered; a folder that cannot be listed is given to `unlistable`."""
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as listing:
                entries = sorted(listing, key=lambda entry: entry.name)
        except OSError as exc:
            unlistable(folder, exc)
            continue
        folders = []
        for entry in entries:
            if not wanted(folder, entry):
                continue
            if entry.is_dir(follow_symlinks=False):
                folders.append(entry.path)
            else:
                yield entry.path
        stack.extend(reversed(folders))


def file_sha256(path: str, dir_fd: int | None = None) -> str | None:
    """sha256 of a regular file (never through a symlink); None if it is not one or cannot be read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    with open(fd, "rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


def folder_id(path: str) -> tuple[int, int] | None:
    """identity() of the folder holding path."""
    return identity(os.path.dirname(os.path.abspath(path)))


def same_inode(a: str, b: str) -> bool:
    """True if the names a and b are links to one file."""
    try:
        sa, sb = os.lstat(a), os.lstat(b)
    except FileNotFoundError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def remove_if_there(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def identity(path: Path | str) -> tuple[int, int] | None:
    """(device, inode) of the folder at path, None if it is gone: a folder moved away, or
    removed and made anew, has another, though its name is the same."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino
