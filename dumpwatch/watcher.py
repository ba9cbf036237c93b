"""`dumpwatch serve`: watch the dump folder and sort each finished file within moments.

Arrivals (arrivals.py) says when a file is finished; the loop here batches finished files to
the worker processes and places the results, so no file is ever handled twice at once. A
finished file is sorted only if it is whole: a short file waits, and goes to the quarantine
once `incomplete_timeout` has passed. A file left in the dump is tried again later; a journal
or tree that cannot be written pauses sorting.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import NamedTuple

from dumpwatch.actions import Actions, queue_after
from dumpwatch.arrivals import Arrivals, Changed, Closed, SweepNow
from dumpwatch.config import Config
from dumpwatch.dumplock import DumpLock
from dumpwatch.errors import ServeFailed
from dumpwatch.fsops import identity
from dumpwatch.outcomes import Handled, Outcome
from dumpwatch.reasons import STILL_ARRIVING, disk_full
from dumpwatch.retries import Pause, Retries
from dumpwatch.sorter import Sorter
from dumpwatch.workers import Workers

log = logging.getLogger(__name__)

GATHER = 0.01  # seconds to gather arriving files into one chunk for a worker
CHUNK = 32  # files in a chunk at most
NICE = 19  # serve yields the CPU to storescp, which a scanner is waiting on
COMPLETION_EVERY = 1.0  # seconds between looks for series and studies that became complete


class Done(NamedTuple):
    """A chunk came back from the workers (on the pool's thread)."""

    future: Future


class Call(NamedTuple):
    """Run function() on the loop's thread (from a signal handler)."""

    function: Callable[[], object]


class Chunks:
    """Finished files on their way to the worker processes: gathered into chunks of CHUNK files
    at most, two chunks per worker at once; a chunk's results come back as Done on todo."""

    def __init__(self, workers: Workers, todo: queue.SimpleQueue):
        self.workers = workers
        self.todo = todo
        self.pending: deque[str] = deque()  # finished paths waiting for a worker
        self.running: dict[Future, list[str]] = {}  # chunks at the workers
        self.orphans: list[str] = []  # files of chunks that failed with a dead worker
        self.limit = 2 * workers.count  # chunks at the workers at once
        self.submit_at = 0.0

    def add(self, paths: list[str]) -> None:
        if paths and not self.pending:
            # Gather what arrives in the next moments into one chunk: one round trip to a
            # worker and one journal batch for many files. A file at a time cost the CPU
            # storescp needs while a scanner sends.
            self.submit_at = time.monotonic() + GATHER
        self.pending.extend(paths)

    def next_submit(self) -> float | None:
        """When submit() may next send a chunk; None if nothing waits, or the workers are full."""
        return self.submit_at if self.pending and len(self.running) < self.limit else None

    def submit(self, moment: float) -> None:
        """Send what waits, once a chunk is full or the gathering moment has passed."""
        if not self.pending or (len(self.pending) < CHUNK and moment < self.submit_at):
            return
        while self.pending and len(self.running) < self.limit:
            chunk = [self.pending.popleft() for _ in range(min(len(self.pending), CHUNK))]
            try:
                future = self.workers.submit(chunk)
            except BrokenProcessPool:
                self.orphans += chunk
                return
            self.running[future] = chunk
            future.add_done_callback(lambda f: self.todo.put(Done(f)))

    def received(self, future: Future) -> list:
        """The results of a chunk that came back (none if its worker died)."""
        chunk = self.running.pop(future, [])
        try:
            return future.result()
        except BrokenProcessPool:
            self.orphans += chunk  # tried again, each alone, by Server._worker_died
            return []


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
        self.pause = Pause(self.lock, cfg.journal_path)
        try:
            self.sorter = Sorter(cfg, receiving=True)
            self.sorter.watch_device(self.dump)
            try:
                self.sorter.recover()
            except (sqlite3.Error, OSError) as exc:
                self.pause.begin(exc)  # a full disk: wait for space rather than fail at every start
            self.workers = Workers(self.sorter.job, cfg.worker_count, always_pool=True, state=cfg.state_dir)
            # The tree's folders are opened by fd from its root: moved away, the tree would go on
            # filling where it went; removed, every file would fail. So it is watched as the dump is.
            self.out = Path(os.path.abspath(cfg.dir_out))
            self.out_id = identity(self.out)
        except BaseException:
            self.lock.close()
            raise
        self.todo: queue.SimpleQueue = queue.SimpleQueue()
        self.arrivals = Arrivals(self.dump, self.todo, polling=cfg.observer == "polling",
                                 stable_seconds=cfg.stable_seconds, in_hand=cfg.in_hand)
        self.chunks = Chunks(self.workers, self.todo)
        self.retries = Retries(self.lock)
        self.actions: Actions | None = None
        journal = self.sorter.journal
        if journal is not None and (cfg.hooks or cfg.channels):
            try:
                # Hook runs and notices are queued with the completions that call for them.
                journal.after_completion = functools.partial(queue_after, cfg)
                self.actions = Actions(cfg, journal.connect(), lambda: self.lock.info)
            except BaseException:
                self.close()
                raise
        self.left_series: dict[str, str] = {}  # files left in the dump -> their series, when known
        self.arriving: set[str] = set()  # files left in the dump as still arriving: series not known
        self.next_completion = 0.0

    # -- the loop ------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Sort until stop is set. Raises ServeFailed if the observer dies, or if worker
        processes die as soon as they start (a worker that dies later is replaced)."""
        self.arrivals.start()
        if self.actions is not None:
            self.actions.start()
        log.info("watching %s (%s); sorting into %s", self.dump, self.cfg.observer, self.cfg.dir_out)
        next_sweep = 0.0  # sweep at once: files that arrived while no one watched
        try:
            while not stop.is_set():
                self._check_health()
                if self.workers.broken:
                    self._worker_died()
                moment = time.monotonic()
                if self.pause.until:
                    if moment < self.pause.until or not self._resume():
                        self._take(min(1.0, max(0.0, self.pause.until - moment)))
                        continue
                    next_sweep = moment  # everything in the dump, at once
                if moment >= next_sweep:
                    self._sweep()
                    next_sweep = moment + self.cfg.sweep_interval
                elif self.arrivals.want_more():
                    log.info("more files wait in the dump than in_hand (%d): taking more", self.cfg.in_hand)
                    self._sweep()
                for path in self.retries.due_now(moment):
                    self.arrivals.finish(path)
                self.arrivals.settle(moment)
                self.chunks.add(self.arrivals.take_finished())
                self.chunks.submit(moment)
                self._take(self._timeout(next_sweep))
                self._complete(time.monotonic())
            log.info("stopping: finishing the files in hand")
            self.chunks.pending.clear()
            while self.chunks.running:
                self._take(1.0)
        finally:
            self.arrivals.stop()

    def _check_health(self) -> None:
        """Raise ServeFailed if watching or working cannot go on."""
        self.arrivals.check()
        self._check_tree()
        journal = self.sorter.journal
        lost = journal.lost() if journal else ""
        if journal and lost:
            raise ServeFailed(f"the journal {journal.path} {lost} while serve ran (its history is gone "
                              "with it); starting again makes a new one and rebuilds what it can from the tree")

    def _worker_died(self) -> None:
        """A worker process died (the out-of-memory killer, a crash in a C library), and every
        chunk at the pool failed with it. Their files are tried again, each alone in a fresh
        pool: a file that stops its reading process alone goes to the quarantine, the others
        are sorted, and serve goes on (an exit would only bring the same file back at the
        restart). New arrivals wait in hand meanwhile."""
        while self.chunks.running:  # the pool fails all it holds at once
            self._take(1.0)
        orphans, self.chunks.orphans = self.chunks.orphans, []
        try:
            results = self.workers.retry_alone(orphans)
        except BrokenProcessPool:
            raise ServeFailed("worker processes die as they start") from None
        if results:
            self._handle(results)

    def call_soon(self, function: Callable[[], object]) -> None:
        """Run function() on the loop's thread, between batches (safe from a signal handler)."""
        self.todo.put(Call(function))

    def _check_tree(self) -> None:
        if identity(self.out) != self.out_id:
            raise ServeFailed(f"the sorted tree {self.out} was moved, removed or replaced; starting again makes "
                              "it anew (the files wait in the dump)")

    def close(self) -> None:
        if self.actions is not None:
            self.actions.stop()
        self.workers.close()
        self.sorter.close()
        self.lock.close()

    def _timeout(self, next_sweep: float) -> float:
        moment = time.monotonic()
        due = self.retries.next_due()
        deadline = next_sweep if due is None else min(next_sweep, due)
        for then in (self.chunks.next_submit(), self.arrivals.next_settle(moment)):
            if then is not None:
                deadline = min(deadline, then)
        return max(0.0, min(deadline - moment, 1.0))

    def _take(self, timeout: float) -> None:
        """Wait for the next thing to do, then drain what else is waiting."""
        try:
            item = self.todo.get(timeout=timeout)
        except queue.Empty:
            return
        results: list = []
        while True:
            match item:
                case Closed(path):
                    self.arrivals.finish(path)
                case Changed(path):
                    self.arrivals.note(path, time.monotonic())
                case Done(future):
                    results += self.chunks.received(future)
                case SweepNow(reason):
                    log.warning("sweeping the dump: %s", reason)
                    self._sweep()
                case Call(function):
                    function()
            try:
                item = self.todo.get_nowait()
            except queue.Empty:
                break
        self.chunks.add(self.arrivals.take_finished())
        if results:
            self._handle(results)

    def _sweep(self) -> None:
        """Every file in the dump that is not in hand: at start-up, then every sweep_interval."""
        self.sorter.tidy()  # staged copies of workers that died, after a kill
        self.retries.forget_taken()
        self.arrivals.sweep(self.retries.waiting())

    # -- placing ------------------------------------------------------------------------

    def _handle(self, results: list) -> None:
        if self.pause.until:
            self._set_aside(results)
            return
        try:
            self._check_tree()  # at once before placing: not one file into a tree moved away
        except ServeFailed:
            self._set_aside(results)
            raise
        try:
            outcomes: list[Handled] = self.sorter.handle(results)
        except (sqlite3.Error, OSError) as exc:
            self._set_aside(results)
            self.pause.begin(exc)
            return
        full = ""
        for outcome in outcomes:
            self.arrivals.done(outcome.source)
            self.left_series.pop(outcome.source, None)
            self.arriving.discard(outcome.source)
            if outcome.outcome == Outcome.LEFT and outcome.series_uid:
                self.left_series[outcome.source] = outcome.series_uid
            elif outcome.outcome == Outcome.LEFT and outcome.detail.startswith(STILL_ARRIVING):
                self.arriving.add(outcome.source)  # short: read again soon, its series not known yet
            if outcome.outcome == Outcome.LEFT and disk_full(outcome.detail):
                full = outcome.detail
        self.retries.record(outcomes, time.monotonic())
        if full:
            # The tree's disk is full (the staging folder, most often, when the dump is on
            # another disk): no file can be placed until there is room. That is a pause, as
            # when the journal cannot be written, and `status` must say so.
            self.pause.begin(full)

    def _complete(self, moment: float) -> None:
        """Mark complete the series and studies idle long enough, once a second. While any file
        is in hand its series is not known yet: none completes. A file left in the dump holds
        its own series open."""
        journal = self.sorter.journal
        if moment < self.next_completion or journal is None or self.pause.until:
            return
        self.next_completion = moment + COMPLETION_EVERY
        waiting = self.retries.waiting()
        self.left_series = {p: s for p, s in self.left_series.items() if p in waiting}
        self.arriving &= waiting
        busy = (self.arrivals.unread(self.cfg.series_idle) or self.chunks.pending or self.chunks.running
                or self.chunks.orphans or self.arriving)
        try:
            hold = busy or journal.completions_held()  # a sort-once into this tree: its files are not seen here
            done = journal.complete(self.cfg.series_idle, self.cfg.study_idle,
                                    None if hold else set(self.left_series.values()))
        except sqlite3.Error as exc:
            self.pause.begin(exc)
            return
        if done and self.actions is not None:
            self.actions.poke()
        for item in done:
            again = " again" if item.again else ""
            if item.kind == "series":
                log.info("series complete%s: %s: %d files, %s", again, item.folder, item.files, item.verdict)
            else:
                log.info("study complete%s: %s: %d files", again, item.folder, item.files)

    def _resume(self) -> bool:
        try:
            settled = self.sorter.restart()
        except (sqlite3.Error, OSError) as exc:
            self.pause.begin(exc)
            return False
        log.warning("sorting again after the pause (%d interrupted steps settled)", settled)
        self.pause.end()
        self.retries.at_once()
        return True

    def _set_aside(self, results: list) -> None:
        """Results not placed: their files stay in the dump, for the sweep after the pause."""
        self.sorter.discard(results)
        for result in results:
            self.arrivals.done(result.source)
