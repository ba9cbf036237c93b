"""Worker processes that read, check and name files in parallel; placing stays in one process."""

from __future__ import annotations

import json
import logging
import os
import signal
import time
import warnings
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.context import ForkContext, ForkProcess
from multiprocessing.process import BaseProcess
from pathlib import Path

from pydicom import config as pydicom_config

from dumpwatch import failpoints, keys, linux
from dumpwatch.outcomes import Failed, Outcome, Prepared
from dumpwatch.prepare import Job, prepare

log = logging.getLogger(__name__)

Result = Prepared | Failed

_job: Job | None = None


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
    linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)
    # The parent decides when to stop: Ctrl-C reaches the whole process group, and systemd
    # sends SIGTERM to every process of the unit; the parent finishes the files in hand.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if nice:
        os.nice(nice)  # beside storescp, receiving comes first: a scanner waits on it
    quiet_pydicom()


def _fork_context(processes: list[BaseProcess]) -> ForkContext:
    """The fork context, whose worker processes are also listed in `processes`.

    The pool's own list of its processes is private; this way dumpwatch learns through the
    public API (the executor's mp_context, Process.exitcode) whether a worker died, and how,
    even one that died idle, with no future to fail."""
    class Process(ForkProcess):  # the fork context's Process, listing itself
        def start(self) -> None:
            super().start()
            processes.append(self)

    class Context(ForkContext):
        """A fork context of its own, whose Process is the one above."""

    Context.Process = Process
    return Context()


def _prepare_chunk(paths: list[str]) -> list[Result]:
    assert _job is not None
    return [prepare(path, _job) for path in paths]


class Workers:
    """Runs prepare() over chunks of paths: in `count` processes, or in this one if count is 1
    and no pool is asked for.

    A worker process that dies (the out-of-memory killer, a crash in a C library) takes the
    pool with it: every chunk in it fails. Their files are then prepared again one at a time
    in a fresh pool (retry_alone), so that a death is the file's own: a file that stops the
    reading process alone is quarantined, and no file can stop the sorting.
    """

    def __init__(self, job: Job, count: int, always_pool: bool = False, nice: int = 0,
                 state: Path | None = None):
        """always_pool: in worker processes even if count is 1 (a crash there is survived),
        started now, not with the first file; state: the folder for the record of lone tries."""
        self.job = job
        self.count = count
        self.always_pool = always_pool
        self.nice = nice
        self.suspects = Suspects(state, job.anonymiser.key if job.anonymiser else None)
        self.pool: ProcessPoolExecutor | None = None
        self.processes: list[BaseProcess] = []  # the pool's worker processes
        self._broken = False  # a future or a submit failed with BrokenProcessPool
        if count > 1 or always_pool:
            self._start()

    def _start(self) -> None:
        # fork: the workers start at once with pydicom already imported; they are made
        # before any thread exists in this process, except for a fresh pool after a worker
        # died (serve's watcher runs then: the workers need only logging, which re-makes its
        # locks after a fork, and pydicom).
        self.processes = []
        self._broken = False
        self.pool = ProcessPoolExecutor(self.count, mp_context=_fork_context(self.processes),
                                        initializer=_start_worker, initargs=(self.job, os.getpid(), self.nice))
        if self.always_pool:  # start the workers now, not with the first file
            self._submit(int).result()

    def run(self, chunks: Iterable[list[str]]) -> Iterator[list[Result]]:
        """Results chunk by chunk, as they complete; at most a few chunks are in flight."""
        if self.pool is None:
            for paths in chunks:
                yield [prepare(path, self.job) for path in paths]
            return
        todo = iter(chunks)
        running: dict[Future, list[str]] = {}
        orphans: list[str] = []  # the files of the chunks a dead worker's pool failed
        limit = 2 * self.count + 1
        while True:
            while not self.broken and len(running) < limit:
                chunk = next(todo, None)
                if chunk is None:
                    break
                try:
                    running[self.submit(chunk)] = chunk
                except BrokenProcessPool:
                    orphans += chunk
            if not running:
                if not self.broken:
                    return
                results = self.retry_alone(orphans)
                orphans = []
                if results:
                    yield results
                continue
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            # In the order they were sent (wait() gives a set): with one worker, the files are
            # then placed in the order they were listed, and a run is the same run each time.
            for future in [f for f in running if f in finished]:
                chunk = running.pop(future)
                try:
                    results = future.result()
                except BrokenProcessPool:
                    orphans += chunk
                    continue
                yield results

    def retry_alone(self, paths: list[str]) -> list[Result]:
        """After a worker died, with paths at the pool: a fresh pool, and each file alone in it.

        The pool fails every chunk it holds when one worker dies, and cannot tell whose file
        killed it; alone, a file that kills its worker again is the cause. Call it once no
        chunk is in flight.
        """
        how = self.death()
        log.error("a worker process died (%s) with %d files in hand: trying each of them alone",
                  how, len(paths))
        self.restart()
        return [self._alone(path) for path in paths]

    def _alone(self, path: str) -> Result:
        before = self.suspects.begin(path)  # recorded before the try: it may end this process too
        if before >= 2:
            self.suspects.end(path)
            log.error("%s: dumpwatch stopped twice while reading it alone: to the quarantine",
                      self.job.shown(path))
            return Failed(path, Outcome.QUARANTINED, "it stopped dumpwatch itself twice while it was read alone")
        failpoints.hit("alone", path)
        assert self.pool is not None
        try:
            result = self._submit(_prepare_chunk, [path]).result()[0]
        except BrokenProcessPool:
            how = self.death()
            log.error("%s stopped its reading process again, alone (%s): to the quarantine",
                      self.job.shown(path), how)
            self.restart()
            result = Failed(path, Outcome.QUARANTINED,
                            f"it stopped the reading process twice (the second time alone: {how})")
        self.suspects.end(path)
        return result

    def death(self) -> str:
        """How the worker process that broke the pool ended, e.g. "killed by signal 9, SIGKILL"."""
        for _ in range(100):  # the pool's own thread may be reaping it at this moment
            for process in list(self.processes):
                code = _exitcode(process)
                if code:
                    return _ended(code)
            time.sleep(0.01)
        return "it ended"

    def restart(self) -> None:
        """A fresh pool in place of a broken one."""
        self.close()
        failpoints.disarm()
        self._start()

    @property
    def broken(self) -> bool:
        """True once a worker process has died: the pool takes no more work. Seen by a future
        or a submit that failed with BrokenProcessPool, or by a worker's exit status (one
        that died idle)."""
        if self.pool is None:
            return False
        if not self._broken and any(_exitcode(p) is not None for p in list(self.processes)):
            self._broken = True
        return self._broken

    def _failed(self, future: Future) -> None:
        if not future.cancelled() and isinstance(future.exception(), BrokenProcessPool):
            self._broken = True

    def submit(self, chunk: list[str]) -> Future:
        """prepare() the chunk in a worker process; the future holds its results. Raises
        BrokenProcessPool once a worker has died: see retry_alone."""
        return self._submit(_prepare_chunk, chunk)

    def _submit(self, function, *args) -> Future:
        assert self.pool is not None
        try:
            future = self.pool.submit(function, *args)
        except BrokenProcessPool:
            self._broken = True
            raise
        future.add_done_callback(self._failed)
        return future

    def close(self) -> None:
        if self.pool is not None:
            if self.broken:
                # A worker died: the executor ends the others with SIGTERM, which workers
                # ignore (the parent decides when they stop). They hold nothing that needs
                # a clean end (their staged copies are removed at the next start): kill them.
                for process in list(self.processes):
                    if _exitcode(process) is None:
                        process.kill()
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _exitcode(process: BaseProcess) -> int | None:
    """The process's exit status, None while it runs (or if its object was closed)."""
    try:
        return process.exitcode
    except ValueError:  # closed by its pool once it was joined
        return None


def _ended(code: int) -> str:
    if code < 0:
        try:
            return f"killed by signal {-code}, {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


class Suspects:
    """Files being tried alone after a worker died: one small record each in the state folder,
    written (and synced) before the try, removed after it.

    If dumpwatch itself ends during the try (the out-of-memory killer may choose it, and a
    supervisor may stop the whole service when one of its processes is killed), the next run
    finds the record: a file whose lone tries twice ended with dumpwatch is quarantined without
    a third, so no restart loops on it. A record is named by a keyed hash of the file's path
    and holds only its identity: the state folder never holds what anonymising removes.
    """

    STALE = 7 * 86400  # seconds: a record left by a try that ended with dumpwatch, then unused

    def __init__(self, folder: Path | None, key: bytes | None):
        self.folder = folder  # None: a dry run, records in memory only
        self.key = key or b"dumpwatch suspects"
        self.memory: dict[str, dict] = {}
        if folder is not None:
            try:
                for old in folder.glob("suspect-*"):
                    if time.time() - old.lstat().st_mtime > self.STALE:
                        old.unlink()
            except OSError:
                pass

    def _name(self, path: str) -> str:
        return "suspect-" + keys.digest(self.key, "suspect", path)[:16].hex() + ".json"

    def begin(self, path: str) -> int:
        """Record a lone try of path; return how many began before it and never ended."""
        try:
            st = os.lstat(path)
            identity = [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]
        except OSError:
            identity = None  # prepare() says what is wrong with it
        name = self._name(path)
        record = self._read(name)
        before = int(record.get("tries", 0)) if record.get("id") == identity else 0
        if before < 2:
            self._write(name, {"id": identity, "tries": before + 1})
        return before

    def end(self, path: str) -> None:
        name = self._name(path)
        self.memory.pop(name, None)
        if self.folder is not None:
            try:
                os.unlink(self.folder / name)
            except FileNotFoundError:
                pass

    def _read(self, name: str) -> dict:
        if self.folder is None:
            return self.memory.get(name, {})
        try:
            record = json.loads((self.folder / name).read_text())
        except (OSError, ValueError):
            return {}
        return record if isinstance(record, dict) else {}

    def _write(self, name: str, record: dict) -> None:
        if self.folder is None:
            self.memory[name] = record
            return
        temporary = self.folder / f"{name}.{os.getpid()}.part"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
        try:
            os.write(fd, json.dumps(record).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, self.folder / name)
        folder = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
