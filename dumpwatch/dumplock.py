"""The dump's lock: one serve per dump, and what it tells `dumpwatch status` (who holds it,
why sorting is paused, why files wait). Reading it needs no watchdog."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

from dumpwatch.text import now

LOCK_NAME = ".dumpwatch.lock"  # in the dump: one serve per dump
LOCK_PATIENCE = 2.0  # seconds a start waits for a lock held only for a moment
LOCK_MAX = 1 << 16  # bytes of the lock file read back: its holder, and why files wait


class AlreadyServing(Exception):
    """Another dumpwatch serve holds the dump."""


@dataclass
class LockInfo:
    pid: int
    host: str
    since: str  # UTC, ISO 8601
    paused: str = ""  # why sorting is paused (a full disk), for `dumpwatch status`
    # Why files are left in the dump, most files first: [{"reason", "files", "tries"}], tries
    # being the most times one of them was left for that reason in a row.
    left: list = field(default_factory=list)

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, since {self.since}"


def read_lock(dump: Path) -> LockInfo | None:
    """Who holds the dump's lock, or None if no serve is running on it."""
    path = dump / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return None  # a symlink is never our lock
        raise
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            return _lock_info(os.pread(fd, LOCK_MAX, 0))  # held: a serve is running
        fcntl.lockf(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _lock_info(data: bytes) -> LockInfo:
    try:
        fields = json.loads(data or b"{}")
        left = [{"reason": str(item["reason"]), "files": int(item["files"]), "tries": int(item["tries"])}
                for item in fields.get("left", [])]
        return LockInfo(int(fields["pid"]), str(fields["host"]), str(fields["since"]), str(fields.get("paused", "")),
                        left)
    except (ValueError, KeyError, TypeError, AttributeError):
        return LockInfo(0, "?", "?")


class DumpLock:
    """An exclusive lock on the dump, naming its holder, released when the process ends.

    A POSIX record lock (lockf), not flock: forked worker processes do not inherit it, so a
    serve killed with SIGKILL never leaves it held.
    """

    def __init__(self, dump: Path):
        self.path = dump / LOCK_NAME
        # Anyone who can write to the dump could plant a symlink here: never follow one, and
        # never write to anything but a plain file.
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o664)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise OSError(exc.errno, f"{self.path} is a symlink, not dumpwatch's lock; remove it") from None
            raise
        if not stat.S_ISREG(os.fstat(self.fd).st_mode):
            os.close(self.fd)
            raise OSError(errno.EINVAL, f"{self.path} is not a plain file, not dumpwatch's lock; remove it")
        # `dumpwatch status` takes the lock shared for a moment to see whether it is held:
        # a start at that moment tries again rather than take status for a running serve.
        deadline = time.monotonic() + LOCK_PATIENCE
        while True:
            try:
                fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    os.close(self.fd)
                    raise
            if time.monotonic() >= deadline:
                holder = _lock_info(os.pread(self.fd, LOCK_MAX, 0))
                os.close(self.fd)
                raise AlreadyServing(f"another dumpwatch serve is watching {dump} ({holder.describe()})")
            time.sleep(0.05)
        self.info = LockInfo(os.getpid(), socket.gethostname(), now())
        self._write()

    def note_paused(self, reason: str) -> None:
        """Tell `dumpwatch status` why sorting is paused ("" once it goes on)."""
        self.info.paused = reason
        self._note()

    def note_left(self, left: list[dict]) -> None:
        """Tell `dumpwatch status` why files wait in the dump (LockInfo.left)."""
        if left != self.info.left:
            self.info.left = left
            self._note()

    def _note(self) -> None:
        try:
            self._write()
        except OSError:
            pass  # a full disk: the log says it too

    def _write(self) -> None:
        data = json.dumps(self.info.__dict__).encode()
        os.pwrite(self.fd, data, 0)
        os.ftruncate(self.fd, len(data))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # releases the lock; the file stays, naming the last holder
            self.fd = -1

