"""The Linux calls Python's os module lacks, bound once from the C library: renameat2,
syncfs, sync_file_range and prctl. Where the C library lacks one (an old glibc, musl), its
wrapper says so and the caller takes its slower way."""

from __future__ import annotations

import ctypes
import os

PR_SET_PDEATHSIG = 1  # prctl: the signal this process gets when its parent dies
PR_SET_CHILD_SUBREAPER = 36  # prctl: orphans below this process become its children
_RENAME_NOREPLACE = 1
_SYNC_FILE_RANGE_WRITE = 2

_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = getattr(_libc, "renameat2", None)
if _renameat2 is not None:
    _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_syncfs = getattr(_libc, "syncfs", None)
_sync_file_range = getattr(_libc, "sync_file_range", None)
if _sync_file_range is not None:
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
_prctl = getattr(_libc, "prctl", None)


def rename_noreplace(src_dir_fd: int, src: str, dst_dir_fd: int, dst: str) -> int | None:
    """renameat2(RENAME_NOREPLACE): 0, or the errno it failed with; None if the C library lacks it."""
    if _renameat2 is None:
        return None
    if _renameat2(src_dir_fd, os.fsencode(src), dst_dir_fd, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
        return 0
    return ctypes.get_errno()


def syncfs(fd: int) -> int | None:
    """Write the whole filesystem of fd to disk: 0, or the errno; None if the C library lacks it."""
    if _syncfs is None:
        return None
    return 0 if _syncfs(fd) == 0 else ctypes.get_errno()


def start_writeback(fd: int) -> None:
    """Start writing fd's dirty pages to disk, without waiting (sync_file_range); a no-op
    where the C library lacks it."""
    if _sync_file_range is not None:
        _sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)


def prctl(option: int, value: int) -> None:
    """prctl(option, value); OSError if it fails. A no-op where the C library lacks it."""
    if _prctl is not None and _prctl(option, value, 0, 0, 0) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


# ioprio_set(2) has no wrapper in the C library: the system call by number, per architecture.
_IOPRIO_SET = {"x86_64": 251, "aarch64": 30, "armv7l": 314, "i686": 289, "ppc64le": 273, "s390x": 282,
               "riscv64": 30}.get(os.uname().machine)
_IOPRIO_WHO_PROCESS = 1  # a thread, by its id
_IOPRIO_CLASS_IDLE = 3  # disk time only when no one else wants it


def ioprio_idle(tid: int) -> bool:
    """Put thread tid in the idle I/O class (ionice -c3); False where it cannot be done."""
    if _IOPRIO_SET is None:
        return False
    _libc.syscall.restype = ctypes.c_long
    result = _libc.syscall(ctypes.c_long(_IOPRIO_SET), ctypes.c_int(_IOPRIO_WHO_PROCESS), ctypes.c_int(tid),
                           ctypes.c_int(_IOPRIO_CLASS_IDLE << 13))
    return result == 0
