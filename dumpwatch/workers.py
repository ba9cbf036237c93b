"""Worker processes that read, check and name files in parallel; placing stays in one process."""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import warnings
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait

from pydicom import config as pydicom_config

from dumpwatch.pipeline import Failed, Job, Prepared, prepare

Result = Prepared | Failed

_job: Job | None = None
_PR_SET_PDEATHSIG = 1
_prctl = getattr(ctypes.CDLL(None, use_errno=True), "prctl", None)


def quiet_pydicom() -> None:
    """Read values as they are: pydicom's checks of each value against its VR only warn about
    odd but readable headers (e.g. GE's long private SH values), and cost time per file."""
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    warnings.filterwarnings("ignore", module=r"pydicom(\..*)?")
    logging.getLogger("pydicom").setLevel(logging.ERROR)


def _start_worker(job: Job, parent: int, nice: int) -> None:
    global _job
    _job = job
    # A worker must not outlive its parent: after a kill -9 of dumpwatch, an orphan would
    # hold the locks it inherited, and the restarted dumpwatch could not start.
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)
    # The parent decides when to stop: Ctrl-C reaches the whole process group, and systemd
    # sends SIGTERM to every process of the unit; the parent finishes the files in hand.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if nice:
        os.nice(nice)  # beside storescp, receiving comes first: a scanner waits on it
    quiet_pydicom()


def _prepare_chunk(paths: list[str]) -> list[Result]:
    assert _job is not None
    return [prepare(path, _job) for path in paths]


class Workers:
    """Runs prepare() over chunks of paths: in `count` processes, or in this one if count is 1."""

    def __init__(self, job: Job, count: int, always_pool: bool = False, nice: int = 0):
        self.job = job
        self.count = count
        self.pool: ProcessPoolExecutor | None = None
        if count > 1 or always_pool:
            # fork: the workers start at once with pydicom already imported; they are made
            # before any thread exists in this process.
            self.pool = ProcessPoolExecutor(count, mp_context=multiprocessing.get_context("fork"),
                                            initializer=_start_worker, initargs=(job, os.getpid(), nice))
            if always_pool:  # a server: start the workers now, not with the first file
                self.pool.submit(int).result()

    def run(self, chunks: Iterable[list[str]]) -> Iterator[list[Result]]:
        """Results chunk by chunk, as they complete; at most a few chunks are in flight."""
        if self.pool is None:
            for chunk in chunks:
                yield [prepare(path, self.job) for path in chunk]
            return
        todo = iter(chunks)
        running: set[Future] = set()
        limit = 2 * self.count + 1
        while True:
            while len(running) < limit:
                chunk = next(todo, None)
                if chunk is None:
                    break
                running.add(self.pool.submit(_prepare_chunk, chunk))
            if not running:
                return
            finished, running = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                yield future.result()

    @property
    def broken(self) -> bool:
        """True once a worker process has died: the pool takes no more work."""
        return bool(getattr(self.pool, "_broken", False))  # CPython's executor marks itself so

    def submit(self, chunk: list[str]) -> Future:
        """prepare() the chunk in a worker process; the future holds its results."""
        assert self.pool is not None
        return self.pool.submit(_prepare_chunk, chunk)

    def close(self) -> None:
        if self.pool is not None:
            if self.broken:
                # A worker died: the executor ends the others with SIGTERM, which workers
                # ignore (the parent decides when they stop). They hold nothing that needs
                # a clean end (their staged copies are removed at the next start): kill them.
                processes = getattr(self.pool, "_processes", None) or {}
                for process in list(processes.values()):
                    if process.is_alive():
                        process.kill()
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
