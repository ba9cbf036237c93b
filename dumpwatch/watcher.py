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
import heapq
import logging
import os
import queue
import sqlite3
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
from dumpwatch.dumplock import LOCK_NAME, DumpLock
from dumpwatch.pipeline import Outcome, Sorter, disk_full, os_reason
from dumpwatch.workers import Workers

log = logging.getLogger(__name__)

RETRY_FIRST, RETRY_MAX = 1.0, 60.0  # seconds before a file left in place is tried again
GATHER = 0.01  # seconds to gather arriving files into one chunk for a worker
CHUNK = 32  # files in a chunk at most
NICE = 19  # serve yields the CPU to storescp, which a scanner is waiting on
PAUSE_FIRST, PAUSE_MAX = 10.0, 60.0  # seconds sorting pauses when the journal cannot be written
LEFT_SHOWN, LEFT_REASON_MAX = 3, 300  # reasons for files left in the dump that the lock holds, and their length


class ServeFailed(Exception):
    """The observer or a worker died: exit non-zero, so that the supervisor restarts us."""


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
        self.paused_until = 0.0  # sorting waits until then: the journal could not be written
        self.pause = PAUSE_FIRST
        try:
            self.sorter = Sorter(cfg)
            self.sorter.watch_device(self.dump)
            try:
                self.sorter.recover()
            except (sqlite3.Error, OSError) as exc:
                self._pause(exc)  # a full disk: wait for space rather than fail at every start
            self.workers = Workers(self.sorter.job, cfg.worker_count, always_pool=True, state=cfg.state_dir)
            # The tree's folders are opened by fd from its root: moved away, the tree would go on
            # filling where it went; removed, every file would fail. So it is watched as the dump is.
            self.out = Path(os.path.abspath(cfg.dir_out))
            self.out_id = _identity(self.out)
        except BaseException:
            self.lock.close()
            raise
        self.todo: queue.SimpleQueue = queue.SimpleQueue()
        self.pending: deque[str] = deque()  # paths waiting for a worker
        self.busy: set[str] = set()  # paths pending or at a worker: never handled twice at once
        self.retries: list[tuple[float, str]] = []  # (due, path) heap of files left to try again
        self.retry_wait: dict[str, float] = {}
        self.left: dict[str, tuple[str, int]] = {}  # path -> (why it was left, times in a row), for status
        # path -> (when it was last seen to change, (inode, size, mtime) then): files that are
        # finished once they have stood still for stable_seconds and no process has them open.
        self.changed: dict[str, tuple[float, tuple | None]] = {}
        self.running: dict[Future, list[str]] = {}  # chunks at the workers
        self.orphans: list[str] = []  # files of chunks that failed with a dead worker
        self.limit = 2 * self.workers.count  # chunks at the workers at once
        self.submit_at = 0.0
        self.stats = _Stats()
        self.observer = None
        self.dump_id: tuple[int, int] | None = None
        self.alarm = _OverflowAlarm(self.todo)
        self.backlog = False  # files were let go for want of room: sweep when there is room

    # -- the loop ------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Sort until stop is set. Raises ServeFailed if the observer dies, or if worker
        processes die as soon as they start (a worker that dies later is replaced)."""
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
                if self.workers.broken:
                    self._worker_died()
                moment = time.monotonic()
                if self.paused_until:
                    if moment < self.paused_until or not self._resume():
                        self._take(min(1.0, max(0.0, self.paused_until - moment)), stop)
                        continue
                    next_sweep = moment  # everything in the dump, at once
                if moment >= next_sweep:
                    self._sweep()
                    next_sweep = moment + self.cfg.sweep_interval
                elif self.backlog and self._in_hand() < self.cfg.in_hand // 2:
                    log.info("more files wait in the dump than in_hand (%d): taking more", self.cfg.in_hand)
                    self._sweep()
                self._due_retries(moment)
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
        self._check_tree()
        lost = self.sorter.journal.lost() if self.sorter.journal else ""
        if lost:
            raise ServeFailed(f"the journal {self.sorter.journal.path} {lost} while serve ran (its history is gone "
                              "with it); starting again makes a new one and rebuilds what it can from the tree")

    def _worker_died(self) -> None:
        """A worker process died (the out-of-memory killer, a crash in a C library), and every
        chunk at the pool failed with it. Their files are tried again, each alone in a fresh
        pool: a file that stops its reading process alone goes to the quarantine, the others
        are sorted, and serve goes on (an exit would only bring the same file back at the
        restart). New arrivals wait in hand meanwhile."""
        while self.running:  # the pool fails all it holds at once
            self._take(1.0, None)
        orphans, self.orphans = self.orphans, []
        try:
            results = self.workers.retry_alone(orphans)
        except BrokenProcessPool:
            raise ServeFailed("worker processes die as they start") from None
        if results:
            self._handle(results)

    def call_soon(self, function) -> None:
        """Run function() on the loop's thread, between batches (safe from a signal handler)."""
        self.todo.put(("call", function))

    def _check_tree(self) -> None:
        if _identity(self.out) != self.out_id:
            raise ServeFailed(f"the sorted tree {self.out} was moved, removed or replaced; starting again makes "
                              "it anew (the files wait in the dump)")

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
            first = min(since for since, _ in self.changed.values())
            deadline = min(deadline, max(first + self.cfg.stable_seconds, moment + 0.05))
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
                self._note(value, time.monotonic())
            elif kind == "done":
                chunk = self.running.pop(value, [])
                try:
                    results += value.result()
                except BrokenProcessPool:
                    self.orphans += chunk  # tried again, each alone, by _worker_died
            elif kind == "sweep":
                log.warning("sweeping the dump: %s", value)
                self._sweep()
            elif kind == "call":
                value()
            try:
                item = self.todo.get_nowait()
            except queue.Empty:
                break
        if results:
            self._handle(results)

    # -- feeding the workers ------------------------------------------------------------

    def _in_hand(self) -> int:
        """Files noted, waiting or at a worker. At cfg.in_hand, the dump itself is the queue:
        an event finds no room and is let go (the file stays in the dump), and a sweep takes
        more once half are done. So memory stays flat however far sorting falls behind."""
        return len(self.busy) + len(self.changed)

    def _room(self) -> int:
        """Files in hand at most for a new arrival: once some wait in the dump, half, so that
        the sweep for those comes (at half) before newer files take their place."""
        return self.cfg.in_hand // 2 if self.backlog else self.cfg.in_hand

    def _let_wait(self) -> None:
        """A new arrival finds no room in hand: it waits in the dump. Said once a backlog."""
        if not self.backlog:
            log.info("%d files in hand (in_hand %d): newer files wait in the dump until there is room",
                     self._in_hand(), self.cfg.in_hand)
        self.backlog = True

    def _want(self, path: str) -> None:
        if path in self.busy or os.path.dirname(path) != str(self.dump) or os.path.basename(path) == LOCK_NAME:
            return
        if path not in self.changed and self._in_hand() >= self._room():
            self._let_wait()  # it stays in the dump; a sweep takes it when there is room
            return
        self.changed.pop(path, None)  # closed by its writer: finished now
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
            try:
                future = self.workers.submit(chunk)
            except BrokenProcessPool:
                self.orphans += chunk
                return
            self.running[future] = chunk
            future.add_done_callback(lambda f: self.todo.put(("done", f)))

    def _sweep(self) -> None:
        """Every file in the dump that is not in hand: at start-up, then every sweep_interval.

        A sweep finds files whose events were missed, but also files storescp is still
        writing: a non-image object cut at an element boundary looks whole. So a swept file
        goes to a worker only once it has stood still for stable_seconds and no process has
        it open; a file that is closed meanwhile comes by its event at once.

        The listing is read as it comes, never held whole, and a sweep takes no more files
        than there is room for in hand (the in_hand key); if it stops short, another follows
        once half of those are done.
        """
        self.sorter.tidy()  # staged copies of workers that died, after a kill
        self.backlog = False
        if self.left:  # files taken from the dump by someone else are no longer waiting
            self.left = {path: why for path, why in self.left.items() if os.path.lexists(path)}
            self._note_left()
        waiting = {path for _, path in self.retries}
        moment, clock = time.monotonic(), time.time()
        polling = self.cfg.observer == "polling"
        room = self.cfg.in_hand - self._in_hand()
        try:
            with os.scandir(self.dump) as listing:
                for entry in listing:
                    if entry.name == LOCK_NAME or entry.is_dir(follow_symlinks=False):
                        continue
                    path = entry.path
                    if path in waiting or path in self.busy or path in self.changed:
                        continue
                    if room <= 0:
                        self.backlog = True
                        break
                    room -= 1
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except OSError:
                        self._want(path)  # the worker says what is wrong with it
                        continue
                    # On a local disk the file's mtime and our clock agree: a file still since
                    # long enough is checked at once. Polling (NFS, SMB): the server's clock may
                    # differ, so only a file seen standing still here counts.
                    still_since = moment if polling else moment - max(0.0, clock - st.st_mtime)
                    self.changed[path] = (still_since, _signature(st))
        except OSError as exc:
            if exc.errno == errno.ENOENT:  # made anew by the next start; storescp needs it back
                raise ServeFailed(
                    f"the dump {self.dump} was removed or replaced; starting again makes it anew") from None
            log.error("cannot list the dump %s: %s", self.dump, exc.strerror)

    def _note(self, path: str, moment: float) -> None:
        """Polling: path changed just now."""
        if path in self.busy or os.path.dirname(path) != str(self.dump) or os.path.basename(path) == LOCK_NAME:
            return
        if path not in self.changed and self._in_hand() >= self._room():
            self._let_wait()  # as in _want
            return
        try:
            self.changed[path] = (moment, _signature(os.lstat(path)))
        except FileNotFoundError:
            self.changed.pop(path, None)
        except OSError:
            self.changed[path] = (moment, None)

    def _settled(self, moment: float) -> None:
        """Hand over each noted file that has stood still for stable_seconds and is open in no
        process. Its stillness is measured by this machine's clock only."""
        ready = []
        for path, (since, signature) in list(self.changed.items()):
            if moment - since < self.cfg.stable_seconds:
                continue
            try:
                now_signature = _signature(os.lstat(path))
            except FileNotFoundError:
                del self.changed[path]
                continue
            except OSError:
                now_signature = None
            if now_signature != signature or now_signature is None:
                self.changed[path] = (moment, now_signature)  # written since: wait again
            else:
                ready.append(path)
        if not ready:
            return
        held = open_elsewhere(ready)
        for path in ready:
            if path in held:  # a writer stalled, or a copy under way: look again later
                self.changed[path] = (moment, self.changed[path][1])
            else:
                self._want(path)

    def _due_retries(self, moment: float) -> None:
        while self.retries and self.retries[0][0] <= moment:
            _, path = heapq.heappop(self.retries)
            self._want(path)

    # -- placing ------------------------------------------------------------------------

    def _handle(self, results: list) -> None:
        if self.paused_until:
            self._set_aside(results)
            return
        try:
            self._check_tree()  # at once before placing: not one file into a tree moved away
        except ServeFailed:
            self._set_aside(results)
            raise
        try:
            outcomes: list[Outcome] = self.sorter.handle(results)
        except (sqlite3.Error, OSError) as exc:
            self._set_aside(results)
            self._pause(exc)
            return
        moment = time.monotonic()
        full, noted = "", False
        for outcome in outcomes:
            self.busy.discard(outcome.source)
            self.stats.handled += 1
            if outcome.outcome == "left":
                wait = min(self.retry_wait.get(outcome.source, RETRY_FIRST / 2) * 2, RETRY_MAX)
                self.retry_wait[outcome.source] = wait
                heapq.heappush(self.retries, (moment + wait, outcome.source))
                reason, tries = self.left.get(outcome.source, ("", 0))
                self.left[outcome.source] = (outcome.detail, tries + 1 if reason == outcome.detail else 1)
                noted = True
                if disk_full(outcome.detail):
                    full = outcome.detail
            else:
                self.retry_wait.pop(outcome.source, None)
                noted |= self.left.pop(outcome.source, None) is not None
        if noted:
            self._note_left()
        if full:
            # The tree's disk is full (the staging folder, most often, when the dump is on
            # another disk): no file can be placed until there is room. That is a pause, as
            # when the journal cannot be written, and `status` must say so.
            self._pause(full)

    def _note_left(self) -> None:
        """Why files wait in the dump, for `dumpwatch status`: a few reasons, most files first."""
        by_reason: dict[str, list[int]] = {}
        for reason, tries in self.left.values():
            files_tries = by_reason.setdefault(reason, [0, 0])
            files_tries[0] += 1
            files_tries[1] = max(files_tries[1], tries)
        ranked = sorted(by_reason.items(), key=lambda item: (-item[1][0], item[0]))[:LEFT_SHOWN]
        self.lock.note_left([{"reason": reason[:LEFT_REASON_MAX], "files": files, "tries": tries}
                             for reason, (files, tries) in ranked])

    # -- pausing ------------------------------------------------------------------------

    def _pause(self, exc: BaseException | str) -> None:
        """The journal (or the tree) cannot be written, most often because the disk is full.
        Exiting would only restart into the same wall, until the supervisor gives up: wait
        instead, and try again. The files wait in the dump; nothing is lost."""
        if isinstance(exc, OSError):
            reason = os_reason(exc)
        elif isinstance(exc, sqlite3.Error):
            reason = f"the journal {self.cfg.journal_path} cannot be written: {exc}"
        else:
            reason = str(exc)
        log.error("sorting paused for %.0f s: %s; the files wait in the dump", self.pause, reason)
        self.lock.note_paused(reason)
        self.paused_until = time.monotonic() + self.pause
        self.pause = min(self.pause * 2, PAUSE_MAX)

    def _resume(self) -> bool:
        try:
            settled = self.sorter.restart()
        except (sqlite3.Error, OSError) as exc:
            self._pause(exc)
            return False
        log.warning("sorting again after the pause (%d interrupted steps settled)", settled)
        self.lock.note_paused("")
        self.paused_until, self.pause = 0.0, PAUSE_FIRST
        self.retries.clear()  # files left for want of space may go now: all are tried at once
        self.retry_wait.clear()
        return True

    def _set_aside(self, results: list) -> None:
        """Results not placed: their files stay in the dump, for the sweep after the pause."""
        self.sorter.discard(results)
        for result in results:
            self.busy.discard(result.source)


def _signature(st: os.stat_result) -> tuple:
    return st.st_ino, st.st_size, st.st_mtime_ns


def open_elsewhere(paths: list[str]) -> set[str]:
    """Which of paths some process has open (by its /proc/PID/fd links). Processes this
    user may not look into (another user's, unless root) are not seen; neither are other
    machines' (a dump on NFS): for those, standing still is the only sign."""
    wanted = {os.path.realpath(path): path for path in paths}  # /proc names the real path
    found: set[str] = set()
    me = os.getpid()
    try:
        pids = [name for name in os.listdir("/proc") if name.isdigit() and int(name) != me]
    except OSError:
        return found
    for pid in pids:
        folder = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(folder)
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"{folder}/{fd}")
            except OSError:
                continue
            if target in wanted:
                found.add(wanted[target])
    return found


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
