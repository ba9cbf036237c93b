"""What makes a placed file survive a power cut: the data of files about to be renamed into
the tree written to disk first, once per filesystem and batch; and a batch that Ctrl-C or
SIGTERM cannot cut in half."""

from __future__ import annotations

import errno
import logging
import os
import signal
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from dumpwatch import linux
from dumpwatch.outcomes import PER_FILE, Prepared
from dumpwatch.reasons import os_reason

log = logging.getLogger(__name__)


class SourceSync:
    """syncfs of the dump's filesystem before its files get a name in the tree.

    storescp never fsyncs, and ext4 does not order a rename to a new name after the data it
    names: without this, a power cut could leave an empty file in the tree. One syncfs per
    filesystem and batch: an fdatasync per file cost a disk cache flush each, and beside
    storescp those flushes slowed receiving by half (docs/benchmarks.md). The folder fds stay
    open: syncfs reports a failed writeback only to fds opened before it happened.
    """

    def __init__(self) -> None:
        self.fds: dict[int, int] = {}  # device -> a folder fd on it, for syncfs

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def watch(self, folder: Path | str) -> None:
        """Open the sync fd of folder's filesystem now (serve: the dump), so that syncfs
        reports every failed writeback from this moment on."""
        try:
            self._fd(os.stat(folder).st_dev, os.path.join(folder, "x"))
        except OSError:
            pass

    def sync(self, items: Iterable[Prepared]) -> dict[str, str]:
        """Put the data of items on disk; {source: reason} for those whose data could not be."""
        failed: dict[str, str] = {}
        by_device: dict[int, list[Prepared]] = {}
        for item in items:
            by_device.setdefault(item.dev, []).append(item)
        for dev, group in by_device.items():
            fd = self._fd(dev, group[0].source)
            code = linux.syncfs(fd) if fd >= 0 else None
            if code == 0:
                continue
            if code is not None and code not in (errno.ENOSYS, errno.EINVAL):
                log.error("syncing the filesystem of %s failed: %s", os.path.dirname(group[0].source),
                          os.strerror(code), extra=PER_FILE)
                failed.update((item.source, f"cannot write it to disk: {os.strerror(code)}") for item in group)
                continue
            failed.update(_sync_each(group))  # no syncfs: one file at a time
        return failed

    def _fd(self, dev: int, path: str) -> int:
        fd = self.fds.get(dev, -1)
        if fd < 0:
            try:
                fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError:
                return -1
            if os.fstat(fd).st_dev != dev:
                os.close(fd)
                return -1
            self.fds[dev] = fd
        return fd


def _sync_each(items: list[Prepared]) -> dict[str, str]:
    failed = {}
    for item in items:
        try:
            fd = os.open(item.source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue  # gone or changed: the placing step says so
        try:
            os.fdatasync(fd)
        except OSError as exc:
            failed[item.source] = f"cannot write it to disk: {os_reason(exc)}"
        finally:
            os.close(fd)
    return failed


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends (in the main thread; elsewhere a no-op).

    By handlers that note a signal, then send it again: a signal mask holds it only in this
    thread, and the kernel gives a signal sent to the process to any thread that does not
    block it, such as the worker pool's own threads.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[signal.Signals] = []
    before = {signum: signal.signal(signum, lambda signum, _: held.append(signal.Signals(signum)))
              for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in before.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        for signum in dict.fromkeys(held):
            signal.raise_signal(signum)
