"""Which files in the dump are finished: events, sweeps, stillness, open files, room in hand.

Events make it fast and sweeps make it complete. A file counts as finished when storescp has
closed it (inotify), or, when a sweep found it or polling saw it change (NFS/SMB dumps), once
it has stood still for stable_seconds and no process has it open. Whether it is whole is the
worker's question, not this one's.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import time
from pathlib import Path
from typing import NamedTuple

from watchdog.events import FileClosedEvent, FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from dumpwatch.dumplock import LOCK_NAME
from dumpwatch.errors import ServeFailed
from dumpwatch.fsops import identity

log = logging.getLogger(__name__)


# -- what the watchdog thread hands over ------------------------------------------------


class Closed(NamedTuple):
    """Its writer closed the file (inotify): it is finished."""

    path: str


class Changed(NamedTuple):
    """Polling: the file was made or changed just now."""

    path: str


class SweepNow(NamedTuple):
    """Events were lost: list the dump."""

    reason: str


class _Closed(FileSystemEventHandler):
    """Runs on watchdog's thread: hands the path over, nothing else (an exception here would
    end the thread and, silently, the watching)."""

    def __init__(self, todo: queue.SimpleQueue):
        self.todo = todo

    def on_closed(self, event: FileSystemEvent) -> None:
        self.todo.put(Closed(os.fsdecode(event.src_path)))


class _Changed(FileSystemEventHandler):
    """Polling mode: note when each file last changed; the loop waits for it to settle."""

    def __init__(self, todo: queue.SimpleQueue):
        self.todo = todo

    def on_created(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self.todo.put(Changed(os.fsdecode(event.src_path)))

    on_modified = on_created


class _OverflowAlarm(logging.Handler):
    """watchdog logs a lost-events warning when the kernel's inotify queue overflows: sweep."""

    def __init__(self, todo: queue.SimpleQueue):
        super().__init__(logging.WARNING)
        self.todo = todo

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" in record.getMessage().lower():
            self.todo.put(SweepNow("inotify queue overflow"))


# -- deciding -----------------------------------------------------------------------------


class Arrivals:
    """The dump's files, from arriving to finished; it hands each finished file over once.

    The watchdog thread puts Closed, Changed and SweepNow on todo; the loop passes them on to
    finish(), note() and sweep(), calls settle() as time passes, and takes the finished files
    with take_finished(). A file stays in hand until the loop says it is done(): never handed
    over twice at once.
    """

    def __init__(self, dump: Path, todo: queue.SimpleQueue, *, polling: bool, stable_seconds: float,
                 in_hand: int):
        self.dump = dump
        self.todo = todo
        self.polling = polling
        self.stable_seconds = stable_seconds
        self.in_hand = in_hand
        self.held: set[str] = set()  # handed over and not yet done
        self.finished: list[str] = []  # handed over since the loop last took them
        # path -> (when it was last seen to change, (inode, size, mtime) then): files that are
        # finished once they have stood still for stable_seconds and no process has them open.
        self.changed: dict[str, tuple[float, tuple | None]] = {}
        self.backlog = False  # files were let go for want of room: sweep when there is room
        self.told = False  # the backlog was logged; it ends when a sweep finds room for all
        self.observer: BaseObserver | None = None
        self.dump_id: tuple[int, int] | None = None
        self.alarm = _OverflowAlarm(todo)

    # -- watching ------------------------------------------------------------------------

    def start(self) -> None:
        """Watch the dump: from now on its events come on todo."""
        if self.polling:
            self.observer = PollingObserver(timeout=self.stable_seconds / 2)
        else:
            self.observer = Observer()
        handler = _Changed(self.todo) if self.polling else _Closed(self.todo)
        # moves out of the dump would delay events
        watch_filter: list[type[FileSystemEvent]] | None = None if self.polling else [FileClosedEvent]
        self.observer.schedule(handler, str(self.dump), recursive=False, event_filter=watch_filter)
        logging.getLogger("watchdog").addHandler(self.alarm)
        self.observer.start()
        self.dump_id = identity(self.dump)

    def stop(self) -> None:
        logging.getLogger("watchdog").removeHandler(self.alarm)
        if self.observer is not None:
            self.observer.stop()
            self.observer.join(timeout=10)

    def check(self) -> None:
        """Raise ServeFailed if the watching cannot go on."""
        assert self.observer is not None
        if not self.observer.is_alive() or not all(e.is_alive() for e in self.observer.emitters):
            raise ServeFailed(f"the watcher of {self.dump} stopped")
        if identity(self.dump) != self.dump_id:  # inotify watches the folder, not its name
            raise ServeFailed(f"the dump {self.dump} was removed or replaced; starting again makes it anew")

    # -- room in hand --------------------------------------------------------------------

    def count(self) -> int:
        """Files noted, waiting or at a worker. At in_hand, the dump itself is the queue:
        an event finds no room and is let go (the file stays in the dump), and a sweep takes
        more once half are done. So memory stays flat however far sorting falls behind."""
        return len(self.held) + len(self.changed)

    def unread(self, quiet: float) -> bool:
        """Whether a file may be arriving whose series is not known yet: one in hand, one let
        wait for room, or one written in the last `quiet` seconds (by its mtime: a file that
        has stood still that long, held open by a hung sender, would be late whatever its
        series, and must not hold every other series open)."""
        if self.held or self.backlog:
            return True
        clock = time.time()
        return any(signature is None or clock - signature[2] / 1e9 < quiet for _, signature in self.changed.values())

    def _room(self) -> int:
        """Files in hand at most for a new arrival: once some wait in the dump, half, so that
        the sweep for those comes (at half) before newer files take their place."""
        return self.in_hand // 2 if self.backlog else self.in_hand

    def _let_wait(self) -> None:
        """A file finds no room in hand: it waits in the dump. Said once a backlog."""
        if not self.told:
            self.told = True
            log.info("%d files in hand (in_hand %d): newer files wait in the dump until there is room",
                     self.count(), self.in_hand)
        self.backlog = True

    def want_more(self) -> bool:
        """Files wait in the dump for room, and half of those in hand are done: sweep."""
        return self.backlog and self.count() < self.in_hand // 2

    def _ours(self, path: str) -> bool:
        return os.path.dirname(path) == str(self.dump) and os.path.basename(path) != LOCK_NAME

    # -- from arriving to finished -------------------------------------------------------

    def finish(self, path: str) -> None:
        """path is finished (closed by its writer, or due to be tried again): hand it over,
        if there is room in hand."""
        if path in self.held or not self._ours(path):
            return
        if path not in self.changed and self.count() >= self._room():
            self._let_wait()  # it stays in the dump; a sweep takes it when there is room
            return
        self.changed.pop(path, None)  # closed by its writer: finished now
        self.held.add(path)
        self.finished.append(path)

    def take_finished(self) -> list[str]:
        """The files handed over since the last call, in the order they finished."""
        finished, self.finished = self.finished, []
        return finished

    def done(self, path: str) -> None:
        """path left hand: placed, quarantined, left in the dump or set aside."""
        self.held.discard(path)

    def note(self, path: str, moment: float) -> None:
        """Polling: path changed just now."""
        if path in self.held or not self._ours(path):
            return
        if path not in self.changed and self.count() >= self._room():
            self._let_wait()  # as in finish
            return
        try:
            self.changed[path] = (moment, _signature(os.lstat(path)))
        except FileNotFoundError:
            self.changed.pop(path, None)
        except OSError:
            self.changed[path] = (moment, None)

    def sweep(self, waiting: set[str]) -> None:
        """Note every file in the dump that is not in hand, nor waiting to be tried again.

        A sweep finds files whose events were missed, but also files storescp is still
        writing: a non-image object cut at an element boundary looks whole. So a swept file
        goes to a worker only once it has stood still for stable_seconds and no process has
        it open; a file that is closed meanwhile comes by its event at once.

        The listing is read as it comes, never held whole, and a sweep takes no more files
        than there is room for in hand (the in_hand key); if it stops short, another follows
        once half of those are done.
        """
        self.backlog = False
        moment, clock = time.monotonic(), time.time()
        room = self.in_hand - self.count()
        try:
            with os.scandir(self.dump) as listing:
                for entry in listing:
                    if entry.name == LOCK_NAME or entry.is_dir(follow_symlinks=False):
                        continue
                    path = entry.path
                    if path in waiting or path in self.held or path in self.changed:
                        continue
                    if room <= 0:
                        self._let_wait()
                        break
                    room -= 1
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except OSError:
                        self.finish(path)  # the worker says what is wrong with it
                        continue
                    # On a local disk the file's mtime and our clock agree: a file still since
                    # long enough is checked at once. Polling (NFS, SMB): the server's clock may
                    # differ, so only a file seen standing still here counts.
                    still_since = moment if self.polling else moment - max(0.0, clock - st.st_mtime)
                    self.changed[path] = (still_since, _signature(st))
            self.told = self.backlog  # room for every file in the dump: the backlog is over
        except OSError as exc:
            if exc.errno == errno.ENOENT:  # made anew by the next start; storescp needs it back
                raise ServeFailed(
                    f"the dump {self.dump} was removed or replaced; starting again makes it anew") from None
            log.error("cannot list the dump %s: %s", self.dump, exc.strerror)

    def settle(self, moment: float) -> None:
        """Hand over each noted file that has stood still for stable_seconds and is open in no
        process. Its stillness is measured by this machine's clock only."""
        ready = []
        for path, (since, signature) in list(self.changed.items()):
            if moment - since < self.stable_seconds:
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
                self.finish(path)

    def next_settle(self, moment: float) -> float | None:
        """When settle() may next hand a noted file over; None if none is noted."""
        if not self.changed:
            return None
        first = min(since for since, _ in self.changed.values())
        return max(first + self.stable_seconds, moment + 0.05)


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
