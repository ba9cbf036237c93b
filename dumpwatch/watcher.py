"""`dumpwatch serve`: watch the dump folder and sort each finished file within moments.

Events make it fast and sweeps make it complete. The watchdog handler only hands paths
over; one loop batches them to the worker processes and places the results, so no file
is ever handled twice at once. A file counts as finished when storescp has closed it
(inotify) or when it has stopped changing (polling, for NFS/SMB dumps), and then only if
it is whole: a short file waits, and goes to the quarantine once `incomplete_timeout`
has passed.
"""

from __future__ import annotations

import errno
import fcntl
import heapq
import json
import logging
import os
import queue
import socket
import threading
import time
from collections import deque
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

from watchdog.events import FileClosedEvent, FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from dumpwatch.config import Config
from dumpwatch.journal import now
from dumpwatch.pipeline import Outcome, Sorter
from dumpwatch.workers import Workers

log = logging.getLogger(__name__)

LOCK_NAME = ".dumpwatch.lock"  # in the dump: one serve per dump
RETRY_FIRST, RETRY_MAX = 1.0, 60.0  # seconds before a file left in place is tried again
GATHER = 0.01  # seconds to gather arriving files into one chunk for a worker
CHUNK = 32  # files in a chunk at most
NICE = 19  # serve yields the CPU to storescp, which a scanner is waiting on


class AlreadyServing(Exception):
    """Another dumpwatch serve holds the dump."""


class ServeFailed(Exception):
    """The observer or a worker died: exit non-zero, so that the supervisor restarts us."""


# -- the lock --------------------------------------------------------------------------


@dataclass
class LockInfo:
    pid: int
    host: str
    since: str  # UTC, ISO 8601

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, since {self.since}"


def read_lock(dump: Path) -> LockInfo | None:
    """Who holds the dump's lock, or None if no serve is running on it."""
    path = dump / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            return _lock_info(os.pread(fd, 4096, 0))  # held: a serve is running
        fcntl.lockf(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _lock_info(data: bytes) -> LockInfo:
    try:
        fields = json.loads(data or b"{}")
        return LockInfo(int(fields["pid"]), str(fields["host"]), str(fields["since"]))
    except (ValueError, KeyError, TypeError):
        return LockInfo(0, "?", "?")


class DumpLock:
    """An exclusive lock on the dump, naming its holder, released when the process ends.

    A POSIX record lock (lockf), not flock: forked worker processes do not inherit it, so a
    serve killed with SIGKILL never leaves it held.
    """

    def __init__(self, dump: Path):
        self.path = dump / LOCK_NAME
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o664)
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                os.close(self.fd)
                raise
            holder = _lock_info(os.pread(self.fd, 4096, 0))
            os.close(self.fd)
            raise AlreadyServing(f"another dumpwatch serve is watching {dump} ({holder.describe()})") from None
        self.info = LockInfo(os.getpid(), socket.gethostname(), now())
        data = json.dumps(self.info.__dict__).encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # releases the lock; the file stays, naming the last holder
            self.fd = -1


# -- watching ---------------------------------------------------------------------------


class _Closed(FileSystemEventHandler):
    """Runs on watchdog's thread: hands the path over, nothing else (an exception here would
    end the thread and, silently, the watching)."""

    def __init__(self, todo: queue.SimpleQueue):
        self.todo = todo

    def on_closed(self, event: FileSystemEvent) -> None:
        self.todo.put(("path", os.fsdecode(event.src_path)))


class _Changed(FileSystemEventHandler):
    """Polling mode: note when each file last changed; the loop waits for it to settle."""

    def __init__(self, todo: queue.SimpleQueue):
        self.todo = todo

    def on_created(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self.todo.put(("changed", os.fsdecode(event.src_path)))

    on_modified = on_created


class _OverflowAlarm(logging.Handler):
    """watchdog logs a lost-events warning when the kernel's inotify queue overflows: sweep."""

    def __init__(self, todo: queue.SimpleQueue):
        super().__init__(logging.WARNING)
        self.todo = todo

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" in record.getMessage().lower():
            self.todo.put(("sweep", "inotify queue overflow"))


@dataclass
class _Stats:
    started: float = field(default_factory=time.monotonic)
    handled: int = 0


class Server:
    """The serve loop. Construct it before any thread starts (the workers are forked)."""

    def __init__(self, cfg: Config):
        if cfg.dir_dump is None or cfg.dir_out is None:
            raise ValueError("dir_dump and dir_out must be set to serve")
        self.cfg = cfg
        self.dump = Path(os.path.abspath(cfg.dir_dump))
        self.dump.mkdir(parents=True, exist_ok=True)
        self.lock = DumpLock(self.dump)
        # Receiving comes first: a scanner waits on storescp, while sorting may lag a moment
        # and catch up. So serve (and the workers it forks) yields the CPU to storescp.
        os.nice(NICE)
        try:
            self.sorter = Sorter(cfg)
            self.sorter.recover()
            self.workers = Workers(self.sorter.job, cfg.worker_count, always_pool=True)
        except BaseException:
            self.lock.close()
            raise
        self.todo: queue.SimpleQueue = queue.SimpleQueue()
        self.pending: deque[str] = deque()  # paths waiting for a worker
        self.busy: set[str] = set()  # paths pending or at a worker: never handled twice at once
        self.retries: list[tuple[float, str]] = []  # (due, path) heap of files left to try again
        self.retry_wait: dict[str, float] = {}
        self.changed: dict[str, float] = {}  # polling: path -> when it last changed
        self.running: set[Future] = set()
        self.limit = 2 * self.workers.count  # chunks at the workers at once
        self.submit_at = 0.0
        self.stats = _Stats()
        self.observer = None
        self.dump_id: tuple[int, int] | None = None
        self.alarm = _OverflowAlarm(self.todo)

    # -- the loop ------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Sort until stop is set. Raises ServeFailed if the observer or a worker dies."""
        polling = self.cfg.observer == "polling"
        self.observer = PollingObserver(timeout=self.cfg.stable_seconds / 2) if polling else Observer()
        handler = _Changed(self.todo) if polling else _Closed(self.todo)
        watch_filter = None if polling else [FileClosedEvent]  # moves out of the dump would delay events
        self.observer.schedule(handler, str(self.dump), recursive=False, event_filter=watch_filter)
        logging.getLogger("watchdog").addHandler(self.alarm)
        self.observer.start()
        self.dump_id = _identity(self.dump)
        log.info("watching %s (%s); sorting into %s", self.dump, self.cfg.observer, self.cfg.dir_out)
        next_sweep = 0.0  # sweep at once: files that arrived while no one watched
        try:
            while not stop.is_set():
                self._check_health()
                moment = time.monotonic()
                if moment >= next_sweep:
                    self._sweep()
                    next_sweep = moment + self.cfg.sweep_interval
                self._due_retries(moment)
                if polling:
                    self._settled(moment)
                if self.pending and (len(self.pending) >= CHUNK or moment >= self.submit_at):
                    self._submit()
                self._take(self._timeout(next_sweep), stop)
            log.info("stopping: finishing the files in hand")
            self.pending.clear()
            while self.running:
                self._take(1.0, None)
        finally:
            logging.getLogger("watchdog").removeHandler(self.alarm)
            self.observer.stop()
            self.observer.join(timeout=10)

    def _check_health(self) -> None:
        """Raise ServeFailed if watching or working cannot go on."""
        assert self.observer is not None
        if not self.observer.is_alive() or not all(e.is_alive() for e in self.observer.emitters):
            raise ServeFailed(f"the watcher of {self.dump} stopped")
        if _identity(self.dump) != self.dump_id:  # inotify watches the folder, not its name
            raise ServeFailed(f"the dump {self.dump} was removed or replaced; starting again makes it anew")
        if self.workers.broken:
            raise ServeFailed("a worker process died")

    def close(self) -> None:
        self.workers.close()
        self.sorter.close()
        self.lock.close()

    def _timeout(self, next_sweep: float) -> float:
        moment = time.monotonic()
        deadline = min(next_sweep, self.retries[0][0] if self.retries else next_sweep)
        if self.pending and len(self.running) < self.limit:
            deadline = min(deadline, self.submit_at)
        if self.changed:
            deadline = min(deadline, moment + 0.2)
        return max(0.0, min(deadline - moment, 1.0))

    def _take(self, timeout: float, stop: threading.Event | None) -> None:
        """Wait for the next thing to do, then drain what else is waiting."""
        try:
            item = self.todo.get(timeout=timeout)
        except queue.Empty:
            return
        results: list = []
        while True:
            kind, value = item
            if kind == "path":
                self._want(value)
            elif kind == "changed":
                self.changed[value] = time.monotonic()
            elif kind == "done":
                self.running.discard(value)
                try:
                    results += value.result()
                except BrokenProcessPool:
                    raise ServeFailed("a worker process died") from None
            elif kind == "sweep":
                log.warning("sweeping the dump: %s", value)
                self._sweep()
            try:
                item = self.todo.get_nowait()
            except queue.Empty:
                break
        if results:
            self._handle(results)

    # -- feeding the workers ------------------------------------------------------------

    def _want(self, path: str) -> None:
        if path in self.busy or os.path.dirname(path) != str(self.dump) or os.path.basename(path) == LOCK_NAME:
            return
        self.busy.add(path)
        if not self.pending:
            # Gather what arrives in the next moments into one chunk: one round trip to a
            # worker and one journal batch for many files. A file at a time cost the CPU
            # storescp needs while a scanner sends.
            self.submit_at = time.monotonic() + GATHER
        self.pending.append(path)

    def _submit(self) -> None:
        while self.pending and len(self.running) < self.limit:
            chunk = [self.pending.popleft() for _ in range(min(len(self.pending), CHUNK))]
            future = self.workers.submit(chunk)
            self.running.add(future)
            future.add_done_callback(lambda f: self.todo.put(("done", f)))

    def _sweep(self) -> None:
        """Every file in the dump that is not in hand: at start-up, then every sweep_interval."""
        try:
            with os.scandir(self.dump) as entries:
                names = [e.path for e in entries if e.name != LOCK_NAME and not e.is_dir(follow_symlinks=False)]
        except OSError as exc:
            log.error("cannot list the dump %s: %s", self.dump, exc.strerror)
            if exc.errno == errno.ENOENT:
                self.dump.mkdir(parents=True, exist_ok=True)  # removed: storescp needs it back
            return
        waiting = {path for _, path in self.retries}
        polling = self.cfg.observer == "polling"
        for path in sorted(names):
            if path in waiting or path in self.busy:
                continue
            if polling:
                self.changed.setdefault(path, time.monotonic())  # finished once it proves still
            else:
                self._want(path)

    def _settled(self, moment: float) -> None:
        """Polling: a file is finished once it has not changed for stable_seconds."""
        for path, changed in list(self.changed.items()):
            if moment - changed < self.cfg.stable_seconds:
                continue
            try:
                age = time.time() - os.lstat(path).st_mtime
            except FileNotFoundError:
                del self.changed[path]
                continue
            if age >= self.cfg.stable_seconds:
                del self.changed[path]
                self._want(path)
            else:  # written since: wait again
                self.changed[path] = moment

    def _due_retries(self, moment: float) -> None:
        while self.retries and self.retries[0][0] <= moment:
            _, path = heapq.heappop(self.retries)
            self._want(path)

    # -- placing ------------------------------------------------------------------------

    def _handle(self, results: list) -> None:
        outcomes: list[Outcome] = self.sorter.handle(results)
        moment = time.monotonic()
        for outcome in outcomes:
            self.busy.discard(outcome.source)
            self.stats.handled += 1
            if outcome.outcome == "left":
                wait = min(self.retry_wait.get(outcome.source, RETRY_FIRST / 2) * 2, RETRY_MAX)
                self.retry_wait[outcome.source] = wait
                heapq.heappush(self.retries, (moment + wait, outcome.source))
            else:
                self.retry_wait.pop(outcome.source, None)


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def serve(cfg: Config, stop: threading.Event) -> None:
    """Run `dumpwatch serve` until stop is set; raises ServeFailed or AlreadyServing."""
    server = Server(cfg)
    try:
        server.run(stop)
    finally:
        server.close()
