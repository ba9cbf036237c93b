"""The chain: read, anonymise and name a file (in a worker), then place or quarantine it and
journal the outcome (in the sorter). Nothing wrong with one file stops the others."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import io
import itertools
import logging
import os
import pwd
import signal
import stat
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmwrite
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt, wait_exponential

from dumpwatch import failpoints, keys, rebuild
from dumpwatch.anonymise import Anonymiser, empty_fields, leak
from dumpwatch.config import Config
from dumpwatch.dicomfile import DicomFile, NotRegular, read_dicom
from dumpwatch.elements import meta_end
from dumpwatch.errors import Incomplete, Rejected
from dumpwatch.fsops import (
    AT_FDCWD,
    copy_file,
    copy_range,
    make_folder,
    move_noreplace,
    set_owner_mode,
    write_all,
    write_new,
)
from dumpwatch.identity import Placed
from dumpwatch.journal import Entry, Journal, now, printable
from dumpwatch.keys import load_key
from dumpwatch.naming import Name, Template, friendly_name, header_text, naming_tags
from dumpwatch.state import StateFolder
from dumpwatch.tree import Decision, Tree

log = logging.getLogger(__name__)
# A log record about one file's outcome, which sort-once's summary also gives (counted by
# reason): sort-once keeps such records off stderr unless -v; serve and log files keep them.
PER_FILE = {"per_file": True}

_TRANSIENT = {errno.EAGAIN, errno.EBUSY, errno.EIO, errno.ESTALE, errno.ETIMEDOUT, errno.ENOLCK}


def is_transient(exc: BaseException) -> bool:
    """OS errors worth another try; a missing permission or a full disk will not heal in seconds."""
    return isinstance(exc, OSError) and exc.errno in _TRANSIENT


def _before_sleep(state: RetryCallState) -> None:
    # The error's reason only: an OSError's text names the file, and a file's name may hold
    # what anonymising removes.
    exc = state.outcome.exception() if state.outcome else None
    wait = state.next_action.sleep if state.next_action else 0.0
    log.warning("retrying in %.1f s after: %s", wait, os_reason(exc) if isinstance(exc, OSError) else exc)


retrying = Retrying(
    retry=retry_if_exception(is_transient),
    stop=stop_after_attempt(5),
    wait=wait_exponential(multiplier=0.2, max=5),
    before_sleep=_before_sleep,
    reraise=True,
)


def retry_transient(call, *args):
    """call(*args); if it fails with a transient OS error, again under the retry policy.

    The first try goes without tenacity's bookkeeping: it is on every file's path.
    """
    try:
        return call(*args)
    except OSError as exc:
        if not is_transient(exc):
            raise
        log.warning("retrying after: %s", os_reason(exc))
        return retrying(call, *args)


def os_reason(exc: OSError) -> str:
    """A one-line reason for an OS error, e.g. 'No space left on device'."""
    text = exc.strerror or str(exc)
    if exc.errno == errno.ENOSPC:
        return f"disk full ({text})"
    return text


def disk_full(reason: str) -> bool:
    """True if a file was left for want of space (os_reason's words for ENOSPC, anywhere in
    the reason): serve then pauses rather than try each file again."""
    return "disk full (" in reason


@dataclass(frozen=True)
class Job:
    """What a worker needs to prepare files; sent once to each worker process."""

    template: Template
    wanted: frozenset[int] | None  # header tags to read; None: all (to anonymise)
    reserved: frozenset[str]
    anon_fields: tuple[int, ...]  # DcmServer's list, when no profile is set
    anonymiser: Anonymiser | None
    file_mode: int
    gid: int | None
    staging: str | None  # folder on dir_out's filesystem for files dumpwatch writes itself
    out_device: int
    copy: bool
    dry_run: bool
    incomplete_timeout: float
    staging_id: tuple[int, int] | None = None  # (st_dev, st_ino) of the staging folder the sorter proved

    def shown(self, path: str | None) -> str | None:
        """A received file's path as the log shows it: when anonymising, a keyed token (its
        name holds its original SOPInstanceUID, or a patient's name)."""
        if path is None or self.anonymiser is None:
            return path
        return keys.path_token(self.anonymiser.key, path)


@dataclass
class Prepared:
    """A file read, checked and named, ready to be placed."""

    source: str
    sha256: str  # of the received file
    out_sha256: str  # of the bytes to place (differs when anonymised)
    size: int  # of the bytes to place
    dev: int
    ino: int
    source_size: int  # the source as read: moved only if it is still that file
    mtime_ns: int
    sop_uid: str
    series_uid: str
    name: Name
    body_size: int  # of the data set to place: the bytes after the file meta group
    identity: str | None = None  # of that data set, taken in a dry run (no staged copy to read)
    staged: str | None = None  # a copy written to the staging folder, to place instead of source
    fresh: bool = False  # written moments ago: its writeback was started early


@dataclass
class Failed:
    """A file that will not be placed now: 'quarantine', 'left' for a later try, or 'gone'."""

    source: str
    action: str
    reason: str
    sha256: str | None = None
    sop_uid: str | None = None


@dataclass
class Outcome:
    source: str
    outcome: str  # sorted, duplicate, quarantined, left, gone
    detail: str  # where it went, or why


# -- in a worker --------------------------------------------------------------------------


def _writeback_seconds() -> float:
    """How old dirty data can get before the kernel's flusher writes it (default 30 + 5 s)."""
    total = 0.0
    for name, default in (("dirty_expire_centisecs", 3000), ("dirty_writeback_centisecs", 500)):
        try:
            total += int(Path("/proc/sys/vm", name).read_text()) / 100
        except (OSError, ValueError):
            total += default / 100
    return total + 5  # and a margin for the write itself


WRITEBACK_SECONDS = _writeback_seconds()

_staging_fds: dict[tuple[str, tuple[int, int] | None], int] = {}
_STAGING_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}  # the staging folder's
_counter = itertools.count()


def prepare(path: str, job: Job) -> Prepared | Failed:
    """Read, check, anonymise and name one file; stage a copy when it cannot simply be moved."""
    try:
        dicom = retry_transient(read_dicom, path, job.wanted)
    except FileNotFoundError:
        return Failed(path, "gone", "vanished before it was read")
    except Incomplete as exc:
        return _incomplete(path, str(exc), job)
    except NotRegular as exc:
        return Failed(path, "quarantine" if not job.copy else "left", str(exc))
    except Rejected as exc:
        return Failed(path, "quarantine", str(exc))
    except OSError as exc:
        return Failed(path, "left", os_reason(exc))
    except Exception as exc:
        # A file damaged in a way no reader expects (sequences nested thousands deep, a broken
        # zlib stream): a reason for the quarantine, never a crash on every run.
        log.warning("cannot read %s", job.shown(path), exc_info=True)
        return Failed(path, "quarantine", f"unreadable file: {type(exc).__name__}: {str(exc)[:150]}")
    try:
        failpoints.hit("read", path)
        return _prepare_read(dicom, job)
    except Rejected as exc:
        return Failed(path, "quarantine", str(exc), dicom.sha256)
    except OSError as exc:
        return Failed(path, "left", os_reason(exc), dicom.sha256)
    except Exception as exc:
        log.exception("bug while sorting %s", job.shown(path))
        return Failed(path, "quarantine", f"internal error: {exc!r}", dicom.sha256)
    finally:
        dicom.close()


STILL_ARRIVING = "incomplete, may still be arriving"  # a reason to leave a file that is no problem yet
MEDIA_DIRECTORY = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage: a DICOMDIR


def _incomplete(path: str, reason: str, job: Job) -> Failed:
    """A short file may still be arriving; quarantine it once it has been still for long enough."""
    try:
        age = time.time() - os.lstat(path).st_mtime
    except FileNotFoundError:
        return Failed(path, "gone", "vanished before it was read")
    except OSError as exc:
        return Failed(path, "left", os_reason(exc))
    if age < job.incomplete_timeout:
        return Failed(path, "left", f"{STILL_ARRIVING}: {reason}")
    return Failed(path, "quarantine", f"truncated: {reason}")


def _prepare_read(dicom: DicomFile, job: Job) -> Prepared:
    ds = dicom.ds
    if str(ds.file_meta.get("MediaStorageSOPClassUID", "")).strip(" \0") == MEDIA_DIRECTORY:
        # Copied from a CD or DVD with the images: it lacks a SOPInstanceUID, and saying only that
        # would send an operator looking for a damaged image.
        raise Rejected(f"a DICOMDIR (MediaStorageSOPClassUID {MEDIA_DIRECTORY}): the directory index of a DICOM "
                       "medium, not an image")
    sop_uid = (header_text(ds, "SOPInstanceUID") or "").strip(" \0")
    if not sop_uid:
        raise Rejected("no SOPInstanceUID (0008,0018)")
    series_uid = (header_text(ds, "SeriesInstanceUID") or "").strip(" \0")
    if "InstanceNumber" in job.template.keywords and not _positive(header_text(ds, "InstanceNumber")):
        ds = dicom.full_header()  # the number is nested somewhere (Philips): search all of it
    # Anonymise before naming: a path never holds a value that anonymising removed.
    header = None
    if job.anonymiser is not None:
        if dicom.trailing:  # elements after the pixel data are anonymised too: read it all
            ds = dicom.whole()
        found = job.anonymiser.apply(ds)
        sop_uid = (header_text(ds, "SOPInstanceUID") or "").strip(" \0")  # the journal never
        series_uid = (header_text(ds, "SeriesInstanceUID") or "").strip(" \0")  # holds the originals
        header = _encode_header(dicom)
        leaked = leak(header, found.needles)  # the pixel data is copied as it came
        if leaked:
            raise Rejected(f"leak check: the original value of {leaked} is still in the anonymised file")
    elif empty_fields(ds, job.anon_fields):
        header = _encode_header(dicom)
    name = friendly_name(ds, job.template, job.reserved)
    prepared = Prepared(dicom.path, dicom.sha256, dicom.sha256, dicom.size, dicom.st.st_dev,
                        dicom.st.st_ino, dicom.size, dicom.st.st_mtime_ns, sop_uid, series_uid, name,
                        dicom.body_size)
    if job.dry_run:
        if header is not None:
            _digest_of(dicom, header, prepared, identity=True)
        return prepared
    # A file with more than one link is also another name's file (a link made in the dump to
    # someone's image elsewhere): moving it would put that inode in the tree, and the chmod
    # and chgrp below would change it for its other name. It is copied; the dump's link goes.
    if header is not None or job.copy or dicom.st.st_dev != job.out_device or dicom.st.st_nlink > 1:
        _stage(dicom, prepared, header, job)
    else:
        # Moved as it is. storescp never fsyncs: a file written moments ago may not be on disk
        # yet, and must be before it has a name in the tree; the sorter syncs once per batch.
        # Start writing a fresh file back now, without waiting: that sync then finds little
        # left to write. Its age is its ctime, which no copy tool can set back.
        prepared.fresh = time.time() - dicom.st.st_ctime < WRITEBACK_SECONDS
        if prepared.fresh and _sync_file_range is not None:
            _sync_file_range(dicom.fd, 0, 0, _SYNC_FILE_RANGE_WRITE)
        set_owner_mode(dicom.fd, job.file_mode, job.gid, dicom.st)
    failpoints.hit("prepared")
    return prepared


def _positive(text: str | None) -> bool:
    try:
        return float((text or "").split("\\")[0]) > 0
    except ValueError:
        return False


def _encode_header(dicom: DicomFile) -> bytes:
    """The changed header, in the file's own encoding; the pixel data is copied after it as is."""
    buffer = io.BytesIO()
    # In the data set's own encoding, not the one its file meta names: they differ when the
    # meta names the wrong VR (read as it is), and the pixel data after it is copied as it is.
    implicit, little = dicom.ds.original_encoding
    dcmwrite(buffer, dicom.ds, enforce_file_format=False, implicit_vr=implicit, little_endian=little,
             force_encoding=True)
    return buffer.getvalue()


def _digest_of(dicom: DicomFile, header: bytes, prepared: Prepared, identity: bool = False) -> None:
    """The sha256, size and data set size of the bytes to place: the changed header, then
    the file's own bytes from its pixel data on; with identity, their data-set identity too."""
    digests = [hashlib.sha256(header)]
    start, syntax = meta_end(header, len(header)) or (0, "")
    if identity:
        digests.append(hashlib.sha256(syntax.encode("ascii", "replace") + b"\0" + memoryview(header)[start:]))
    if dicom.data is not None:
        for digest in digests:
            digest.update(memoryview(dicom.data)[dicom.tail :])
    else:
        offset = dicom.tail
        while chunk := os.pread(dicom.fd, 1 << 20, offset):
            for digest in digests:
                digest.update(chunk)
            offset += len(chunk)
    prepared.out_sha256, prepared.size = digests[0].hexdigest(), len(header) + dicom.size - dicom.tail
    prepared.body_size = prepared.size - start
    if identity:
        prepared.identity = digests[1].hexdigest()


def _stage(dicom: DicomFile, prepared: Prepared, header: bytes | None, job: Job) -> None:
    """Write the bytes to place into the staging folder, fsynced, under a name with our pid."""
    assert job.staging is not None
    fd = _staging_fds.get((job.staging, job.staging_id))
    if fd is None:
        # The folder the sorter proved, or none: a worker opens it by its name, which a swap
        # of .dumpwatch since could point elsewhere.
        fd = os.open(job.staging, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != job.staging_id:
            os.close(fd)
            raise OSError(errno.ESTALE, "the staging folder is not the one dumpwatch checked at its start")
        _staging_fds[(job.staging, job.staging_id)] = fd
    name = f"{os.getpid()}-{next(_counter)}.part"
    start = 0 if header is None else dicom.tail

    def fill(out: int) -> None:
        if header is not None:
            write_all(out, header)
        if dicom.data is not None:
            write_all(out, memoryview(dicom.data)[start:])
        else:
            copy_range(dicom.fd, out, start, dicom.size - start)

    try:
        retry_transient(write_new, fd, name, fill, job.file_mode, job.gid)
    except OSError as exc:
        if exc.errno not in _STAGING_ERRORS:
            raise
        # Say where: a full disk here is the tree's, which the dump's own may not be.
        raise OSError(exc.errno, f"{exc.strerror or exc} in the staging folder {job.staging}") from None
    prepared.staged = name
    if header is not None:
        _digest_of(dicom, header, prepared)


# -- in the sorter ------------------------------------------------------------------------


@dataclass
class _Plan:
    item: Prepared
    decision: Decision
    entry: Entry
    renames: list[Entry] = field(default_factory=list)


class Sorter:
    """Places prepared files, quarantines rejected ones, journals every outcome.

    Each batch runs under the tree lock: journal rows are written as under way, files move,
    folders are fsynced where a copy replaces a source, sources go, rows are marked done.
    A kill at any point leaves rows under way that recover() settles at the next start.
    """

    def __init__(self, cfg: Config, *, copy: bool = False, dry_run: bool = False):
        if cfg.dir_out is None:
            raise ValueError("dir_out is not set")
        self.cfg, self.copy, self.dry_run = cfg, copy, dry_run
        state = cfg.state_dir
        assert state is not None
        # Proven dumpwatch's own (not a symlink, not another user's) before anything in it is
        # used, and every name in it reached through its fd from then on: staged copies are
        # cleaned up there. The journal and staged copies name patients' files: the group may
        # read, no one else.
        self.state = StateFolder(state, cfg.dir_mode, cfg.group, create=not dry_run)
        self.tree = Tree(cfg.dir_out, cfg.extension, cfg.dir_mode, cfg.group, cfg.template,
                         lock_path=self.state.file("tree.lock", "tree lock"), dry_run=dry_run)
        self.journal: Journal | None = None
        self.staging = state / "tmp"
        self.staging_fd = -1
        staging_id = None
        self.sync_fds: dict[int, int] = {}  # device -> a folder fd on it, for syncfs
        if not dry_run:
            self.staging_fd = self.state.folder("tmp", "staging folder")
            staging_id = os.fstat(self.staging_fd).st_dev, os.fstat(self.staging_fd).st_ino
        anonymiser = None
        if cfg.profile is not None:
            key = _anonymisation_key(cfg, dry_run, self.state)
            anonymiser = Anonymiser(cfg.profile, key, cfg.subjects, cfg.anon_burned_in == "allow")
        if not dry_run:
            journal_path = cfg.journal_path
            assert journal_path is not None
            if self.state.holds(journal_path):
                self.state.check(journal_path.name, "journal")
            self.journal = Journal(journal_path, key=anonymiser.key if anonymiser else None,
                                   dir_fd=self.state.fd if self.state.holds(journal_path) else None)
        self.quarantine_id = _folder_id(str(cfg.quarantine_dir / "x")) if cfg.quarantine_dir else None
        self.job = Job(
            template=cfg.template,
            wanted=None if (cfg.anon_fields or anonymiser) else naming_tags(cfg.template),
            reserved=_reserved_names(cfg),
            anon_fields=cfg.anon_fields,
            anonymiser=anonymiser,
            file_mode=cfg.file_mode,
            gid=cfg.group,
            staging=None if dry_run else str(self.staging),
            out_device=self.tree.device,
            copy=copy,
            dry_run=dry_run,
            incomplete_timeout=cfg.incomplete_timeout,
            staging_id=staging_id,
        )

    def close(self) -> None:
        self.tree.close()
        for fd in self.sync_fds.values():
            os.close(fd)
        self.sync_fds.clear()
        if self.staging_fd >= 0:
            os.close(self.staging_fd)
            self.staging_fd = -1
        if self.journal is not None:
            self.journal.close()
            self.journal = None
        self.state.close()

    def __enter__(self) -> Sorter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- batches -------------------------------------------------------------------------

    def handle(self, results: Iterable[Prepared | Failed]) -> list[Outcome]:
        """Place, quarantine or leave each prepared file; journal each outcome.

        Ctrl-C and SIGTERM wait for the batch to end: a stop never needs recovery.
        """
        with signals_deferred():
            return self._handle(results)

    def _handle(self, results: Iterable[Prepared | Failed]) -> list[Outcome]:
        prepared, failed = [], []
        for result in results:
            (prepared if isinstance(result, Prepared) else failed).append(result)
        outcomes: list[Outcome] = []
        with self.tree.locked():
            if prepared:
                outcomes += self._place(prepared, failed)
            left = []
            for item in failed:
                if item.action == "quarantine":
                    outcomes.append(self.quarantine(item))
                elif item.action == "left":
                    left.append(Entry("left", item.source, item.sop_uid, sha256=item.sha256, reason=item.reason))
                    outcomes.append(Outcome(item.source, "left", item.reason))
                    log.warning("left %s in place: %s", self.job.shown(item.source), item.reason)
                else:
                    outcomes.append(Outcome(item.source, "gone", item.reason))
                    log.info("%s %s", self.job.shown(item.source), item.reason)
            if left and self.journal is not None:
                self.journal.record(left)
            self.tree.trim()
        return outcomes

    def _place(self, prepared: list[Prepared], failed: list[Failed]) -> list[Outcome]:
        plans: list[_Plan] = []
        for item in prepared:
            try:
                decision = self.tree.decide(item.name, item.series_uid, item.sop_uid,
                                            self._bytes_of(item), item.body_size,
                                            item.dev, item.ino)
            except Rejected as exc:
                failed.append(Failed(item.source, "quarantine", str(exc), item.sha256, item.sop_uid))
                self._unstage(item)
                continue
            except OSError as exc:  # its series folder could not be read
                planned = os.path.join(self.cfg.dir_out, *item.name.folders, item.name.stem)
                reason = _reason(exc, planned, str(self.cfg.dir_out))
                failed.append(Failed(item.source, "left", reason, item.sha256, item.sop_uid))
                self._unstage(item)
                continue
            dest = str(self.tree.path(decision.rel))
            entry = Entry(decision.outcome, item.source, item.sop_uid, item.series_uid, item.sha256, dest,
                          kept=self.copy, out_sha256=None if item.out_sha256 == item.sha256 else item.out_sha256)
            folder = decision.folder.rel
            renames = [
                Entry("renamed", str(self.tree.path((*folder, old))), dest=str(self.tree.path((*folder, new))),
                      reason="the series has several echoes")
                for old, new in decision.renames
            ]
            plans.append(_Plan(item, decision, entry, renames))
        if self.dry_run:
            return [Outcome(p.item.source, p.decision.outcome, p.entry.dest or "") for p in plans]
        assert self.journal is not None
        self.journal.begin([e for p in plans for e in (*p.renames, p.entry)])
        failpoints.hit("journal-begun")
        unsynced = self._sync_sources([p.item for p in plans if not p.item.staged])

        placed: list[_Plan] = []
        undone: list[tuple[_Plan, str, str]] = []  # (plan, outcome, reason)
        must_sync: set[tuple[str, ...]] = set()
        for plan in plans:
            item, decision = plan.item, plan.decision
            changed = _changed(item) or unsynced.get(item.source)
            try:
                if changed:
                    raise _NotPlaced(*changed)
                created = self._apply(plan)
            except (OSError, Rejected, _NotPlaced) as exc:
                outcome, reason = exc.args if isinstance(exc, _NotPlaced) else (
                    "left", _reason(exc, plan.entry.dest, str(self.cfg.dir_out), None if item.staged else item.source))
                log.error("%s %s: not placed at %s: %s", outcome, self.job.shown(item.source), plan.entry.dest, reason,
                          extra=PER_FILE)
                self.tree.forget(decision.folder)
                self._unstage(item)
                undone.append((plan, outcome, reason))
                self.journal.forget([r.id for r in plan.renames if not os.path.lexists(r.dest or "")])
                plan.renames = [r for r in plan.renames if os.path.lexists(r.dest or "")]
                continue
            failpoints.hit("placed")
            placed.append(plan)
            if item.staged and not self.copy:
                must_sync.add(decision.folder.rel)
                must_sync.update(rel[:-1] for rel in created)

        if must_sync:  # copies must be durable before their sources go
            self.tree.sync(must_sync)
        outcomes, finished = [], []
        stuck: list[Entry] = []  # placed, but their sources cannot be removed
        forgotten: list[int | None] = []
        renamed = {r.source: r.dest for p in plans for r in p.renames}  # the echo renames carried out
        for plan in placed:
            item, decision = plan.item, plan.decision
            if decision.outcome == "duplicate" or decision.already:
                self._unstage(item)  # its copy was not needed
                while plan.entry.dest in renamed:  # its twin got "_01" later in this batch
                    plan.entry.dest = renamed[plan.entry.dest]
                if decision.outcome == "duplicate" and not self.tree.still_holds(decision, plan.entry.dest or ""):
                    # Its twin was not placed after all (in this batch), or a hand removed or
                    # replaced it since it was proven: keep this one in the dump, and look at
                    # the folder afresh when it is tried again.
                    self.tree.forget(decision.folder)
                    undone.append((plan, "left", "the identical file it matched is not there any more"))
                    continue
            if not self.copy:
                if item.staged or decision.outcome == "duplicate" or decision.already:
                    failpoints.hit("unlink-source")
                    problem = self._remove_source(item, decision)
                    if problem:
                        # In the tree, yet still in the dump (a dump shared with the sticky bit,
                        # a file of another user): say so and go on; a person must remove it.
                        reason = f"in the tree at {plan.entry.dest}, but it cannot be removed from here: {problem}"
                        log.error("%s: %s", self.job.shown(item.source), reason, extra=PER_FILE)
                        stuck.append(Entry("left", item.source, item.sop_uid, sha256=item.sha256, reason=reason))
                        if decision.outcome == "duplicate" or decision.already:
                            forgotten.append(plan.entry.id)  # nothing new happened to it
                            outcomes.append(Outcome(item.source, "left", reason))
                            continue
                if self.quarantine_id and _folder_id(item.source) == self.quarantine_id:
                    _remove(item.source + ".reason.txt")  # sorted out of the quarantine: its reason is moot
            outcomes.append(Outcome(item.source, decision.outcome, plan.entry.dest or ""))
            finished.append(plan.entry)
            log.info("%s %s -> %s", decision.outcome, self.job.shown(item.source), plan.entry.dest)
        failpoints.hit("sources-removed")
        finished += [e for p in plans for e in p.renames]  # those not carried out were forgotten above
        gone = [plan.entry.id for plan, outcome, _ in undone if outcome == "gone"]
        left = []
        for plan, outcome, reason in undone:
            outcomes.append(Outcome(plan.item.source, outcome, reason))
            if outcome != "gone":
                plan.entry.reason = reason
                left.append(plan.entry)
        self.journal.finish(finished, left)
        self.journal.forget([*gone, *forgotten])
        self.journal.record(stuck)
        return outcomes

    def _bytes_of(self, item: Prepared) -> Placed:
        """Where the bytes item would place can be read: its staged copy, or its source as
        long as it is the file the worker read; in a dry run that rewrote the header, only
        their identity (they were never written)."""
        if item.identity is not None:
            return Placed(-1, "", identity=item.identity)
        if item.staged:
            return Placed(self.staging_fd, item.staged)
        return Placed(AT_FDCWD, item.source, (item.dev, item.ino, item.source_size, item.mtime_ns))

    def _apply(self, plan: _Plan) -> list[tuple[str, ...]]:
        """Place one file; if the dump and the tree turn out to be two mounts, as a copy."""
        item = plan.item
        source = (self.staging_fd, item.staged) if item.staged else (AT_FDCWD, item.source)
        try:
            return retry_transient(self.tree.apply, plan.decision, source)
        except OSError as exc:
            if exc.errno != errno.EXDEV or item.staged:
                raise
        # Two bind mounts of one filesystem share a device number, yet rename between them
        # fails: copy the file into the staging folder (fsynced), and place the copy.
        name = f"{os.getpid()}-{next(_counter)}.part"
        copy_file(item.source, self.staging_fd, name, self.cfg.file_mode, self.cfg.group)
        item.staged = name
        return retry_transient(self.tree.apply, plan.decision, (self.staging_fd, name))

    def _sync_sources(self, items: list[Prepared]) -> dict[str, tuple[str, str]]:
        """Put the data of files about to be renamed into the tree on disk first.

        storescp never fsyncs, and ext4 does not order a rename to a new name after the data
        it names: without this, a power cut could leave an empty file in the tree. One syncfs
        per filesystem and batch: an fdatasync per file cost a disk cache flush each, and beside
        storescp those flushes slowed receiving by half (docs/benchmarks.md). The folder fds
        stay open: syncfs reports a failed writeback only to fds opened before it happened.
        Returns {source: ("left", reason)} for files whose data could not be written.
        """
        failed: dict[str, tuple[str, str]] = {}
        by_device: dict[int, list[Prepared]] = {}
        for item in items:
            by_device.setdefault(item.dev, []).append(item)
        for dev, group in by_device.items():
            fd = self._device_fd(dev, group[0].source)
            if fd >= 0 and _syncfs is not None:
                if _syncfs(fd) == 0:
                    continue
                err = ctypes.get_errno()
                if err not in (errno.ENOSYS, errno.EINVAL):
                    reason = f"cannot write it to disk: {os.strerror(err)}"
                    log.error("syncing the filesystem of %s failed: %s", os.path.dirname(group[0].source),
                              os.strerror(err), extra=PER_FILE)
                    failed.update((item.source, ("left", reason)) for item in group)
                    continue
            for item in group:  # no syncfs: one file at a time
                try:
                    fd = os.open(item.source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                except OSError:
                    continue  # gone or changed: the placing step says so
                try:
                    os.fdatasync(fd)
                except OSError as exc:
                    failed[item.source] = ("left", f"cannot write it to disk: {os_reason(exc)}")
                finally:
                    os.close(fd)
        return failed

    def watch_device(self, folder: Path | str) -> None:
        """Open the sync fd of folder's filesystem now (serve: the dump), so that syncfs
        reports every failed writeback from this moment on."""
        try:
            self._device_fd(os.stat(folder).st_dev, os.path.join(folder, "x"))
        except OSError:
            pass

    def _device_fd(self, dev: int, path: str) -> int:
        fd = self.sync_fds.get(dev, -1)
        if fd < 0:
            try:
                fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError:
                return -1
            if os.fstat(fd).st_dev != dev:
                os.close(fd)
                return -1
            self.sync_fds[dev] = fd
        return fd

    def _remove_source(self, item: Prepared, decision: Decision) -> str | None:
        """Remove a source that is now in the tree (or was a duplicate of a file there).

        Returns why it could not be removed, or None.
        """
        try:
            if decision.already and os.lstat(item.source).st_nlink < 2:
                return None  # the tree's own file, reached by another path: nothing to remove
            os.unlink(item.source)
        except FileNotFoundError:
            pass
        except OSError as exc:
            return os_reason(exc)
        return None

    def _unstage(self, item: Prepared) -> None:
        if item.staged and self.staging_fd >= 0:
            try:
                os.unlink(item.staged, dir_fd=self.staging_fd)
            except FileNotFoundError:
                pass
            item.staged = None

    def discard(self, results: Iterable[Prepared | Failed]) -> None:
        """Results that will not be placed now (sorting paused): their files wait in the dump."""
        for result in results:
            if isinstance(result, Prepared):
                self._unstage(result)

    def restart(self) -> int:
        """After a batch failed half-way (the journal could not be written): forget what was
        known of the tree, and settle the rows left under way, as at a start."""
        self.tree.forget()
        return self.recover()

    # -- quarantine ----------------------------------------------------------------------

    def quarantine(self, item: Failed) -> Outcome:
        """Move (or with --copy, copy) a rejected file to the quarantine, its reason beside it."""
        qdir = self.cfg.quarantine_dir
        assert qdir is not None
        if self.dry_run:
            return Outcome(item.source, "quarantined", item.reason)
        assert self.journal is not None
        try:
            st = os.lstat(item.source)
        except FileNotFoundError:
            return Outcome(item.source, "gone", "vanished before it could be quarantined")
        except OSError as exc:
            return self._left(item, _unquarantined(item, exc, qdir))
        try:
            make_folder(qdir, self.cfg.dir_mode & 0o2770, self.cfg.group)  # originals: never world-readable
            qfd = os.open(qdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            return self._left(item, _unquarantined(item, exc, qdir))
        try:
            if item.sha256 is None and stat.S_ISREG(st.st_mode):
                item.sha256 = _sha256(item.source)
            base = _quarantine_base(item.source)
            if self.job.anonymiser is not None and _folder_id(item.source) != self.quarantine_id:
                base = keys.name_token(self.job.anonymiser.key, base)  # the journal names it
            name, reason_fd = _quarantine_slot(qfd, base, item.sha256, st)
            failpoints.hit("quarantine-slot")
            dest = str(qdir / name)
            entry = Entry("quarantined", item.source, item.sop_uid, sha256=item.sha256, dest=dest,
                          reason=item.reason, kept=self.copy)
            if reason_fd == _HERE:  # sort-once over the quarantine: a rejected file stays where it is
                self.journal.record([entry])
                return Outcome(item.source, "quarantined", f"{item.reason} (stays in the quarantine)")
            if reason_fd == _SAME_BYTES:
                if not self.copy:
                    os.unlink(item.source)
                self.journal.record([entry])
                log.warning("%s is already quarantined as %s: %s", self.job.shown(item.source), dest, item.reason)
                return Outcome(item.source, "quarantined", item.reason)
            try:
                self.journal.begin([entry])
                failpoints.hit("quarantine-reserved")
                text = (f"{item.reason}\nfile: {printable(item.source)}\nsha256: {item.sha256 or '-'}\n"
                        f"quarantined: {now()} by dumpwatch\n")
                write_all(reason_fd, text.encode("utf-8", "backslashreplace"))
                os.fsync(reason_fd)
                self._move_to_quarantine(item.source, qfd, name)
                failpoints.hit("quarantined")
            except OSError as exc:
                _remove_at(qfd, name + ".reason.txt")
                entry.reason = _unquarantined(item, exc, qdir)
                if entry.id is not None:
                    self.journal.finish([], [entry])
                else:
                    self.journal.record([Entry("left", item.source, item.sop_uid, sha256=item.sha256,
                                               reason=entry.reason)])
                log.error("left %s in place: %s", self.job.shown(item.source), entry.reason, extra=PER_FILE)
                return Outcome(item.source, "left", entry.reason)
            finally:
                os.close(reason_fd)
            self.journal.finish([entry])
        except OSError as exc:
            return self._left(item, _unquarantined(item, exc, qdir))
        finally:
            os.close(qfd)
        log.warning("quarantined %s: %s", self.job.shown(item.source), item.reason)
        return Outcome(item.source, "quarantined", item.reason)

    def _left(self, item: Failed, reason: str) -> Outcome:
        log.error("left %s in place: %s", self.job.shown(item.source), reason, extra=PER_FILE)
        if self.journal is not None:
            self.journal.record([Entry("left", item.source, item.sop_uid, sha256=item.sha256, reason=reason)])
        return Outcome(item.source, "left", reason)

    def _move_to_quarantine(self, source: str, qfd: int, name: str) -> None:
        if self.copy:
            copy_file(source, qfd, name, 0o640, self.cfg.group)
            return
        try:
            move_noreplace(AT_FDCWD, source, qfd, name, os.fstat(qfd).st_dev)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            copy_file(source, qfd, name, 0o640, self.cfg.group)  # another filesystem: copy,
            os.fsync(qfd)  # make the copy's name durable,
            try:
                os.unlink(source)  # and only then remove the source
            except FileNotFoundError:
                pass
            except OSError:
                _remove_at(qfd, name)  # it stays in the dump: one place only
                raise

    # -- recovery ------------------------------------------------------------------------

    def recover(self) -> int:
        """Settle the moves a killed dumpwatch left under way; remove its staged copies.

        Returns how many journal rows it settled.
        """
        if self.journal is None:
            return 0
        settled = 0
        with self.tree.locked():  # every live writer finishes its rows before it lets go
            # Echo renames first: settling one points the rows of the renamed file at its new name.
            for renames in (True, False):
                done, forget = [], []
                for row in self.journal.pending():
                    if (row["outcome"] == "renamed") != renames:
                        continue
                    if _settle(row):
                        done.append(Entry(row["outcome"], row["source"], dest=row["dest"], id=row["id"]))
                    else:
                        forget.append(row["id"])
                        if row["outcome"] == "quarantined" and row["dest"]:
                            _remove(row["dest"] + ".reason.txt")
                self.journal.finish(done)
                self.journal.forget(forget)
                settled += len(done) + len(forget)
                if done or forget:
                    log.warning("settled %d interrupted steps: %d completed, %d undone", len(done) + len(forget),
                                len(done), len(forget))
            self._clean_staging()
            self._check_journal()
        return settled

    def _check_journal(self) -> None:
        """A journal without a row beside a tree that holds files was deleted (SQLite makes a
        new one without a word), or the tree was filled without dumpwatch: say so, loudly, and
        rebuild what the tree tells (dumpwatch.rebuild)."""
        assert self.journal is not None
        rebuilding = self.journal.rebuild_under_way()
        root, extension, reserved = str(self.cfg.dir_out), self.cfg.extension, self.job.reserved
        if rebuilding is None:
            if not self.journal.empty() or next(rebuild.tree_files(root, extension, reserved), None) is None:
                return
            log.error("the journal %s is new, but the sorted tree %s holds files: the journal was deleted (its "
                      "history is lost) or the tree was filled without dumpwatch; rebuilding a row per file from "
                      "the tree", self.journal.path, root)
            rebuilding = self.journal.begin_rebuild()
        else:
            log.error("going on with rebuilding the journal %s from the tree %s (a start was stopped half-way)",
                      self.journal.path, root)
        started = time.monotonic()
        changed = self.job.anonymiser is not None or bool(self.job.anon_fields)
        count = rebuild.rebuild(self.journal, root, extension, reserved, changed)
        self.journal.finish_rebuild(rebuilding, count)
        log.error("rebuilt %d journal rows from the tree %s in %.0f s (marked '%s'): the history before is lost",
                  count, root, time.monotonic() - started, rebuild.REBUILT)

    def tidy(self) -> None:
        """Remove staged copies whose writer has died: a killed run's workers may still have
        been exiting when the next run started (serve: at every sweep; sort-once: at the end)."""
        if self.staging_fd >= 0:
            self._clean_staging()

    def _clean_staging(self) -> None:
        with os.scandir(self.staging_fd) as entries:
            for entry in entries:
                pid = entry.name.split("-", 1)[0]
                try:
                    old = time.time() - entry.stat(follow_symlinks=False).st_mtime > 86400
                except FileNotFoundError:
                    continue
                if old or not pid.isdigit() or not _alive(int(pid)):
                    _remove_at(self.staging_fd, entry.name)  # by the fd: never by a path a link redirects


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
    held: list[int] = []
    before = {signum: signal.signal(signum, lambda signum, _: held.append(signum))
              for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in before.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        for signum in dict.fromkeys(held):
            signal.raise_signal(signum)


_libc = ctypes.CDLL(None, use_errno=True)
_syncfs = getattr(_libc, "syncfs", None)
_sync_file_range = getattr(_libc, "sync_file_range", None)
if _sync_file_range is not None:
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
_SYNC_FILE_RANGE_WRITE = 2


class _NotPlaced(Exception):
    """(outcome, reason) for a file that must not be placed now."""


def _reason(exc: BaseException, dest: str | None = None, root: str | None = None, source: str | None = None) -> str:
    """Why a file could not be placed at dest (in the tree at root), moved from source."""
    text = os_reason(exc) if isinstance(exc, OSError) else str(exc)
    return f"cannot place it: {text}{_denied(exc, dest, root, source)}"


def _unquarantined(item: Failed, exc: OSError, qdir: Path) -> str:
    where = _denied(exc, str(qdir / "x"), None, item.source)
    return f"cannot quarantine it ({item.reason}): {os_reason(exc)}{where}"


def _denied(exc: BaseException, dest: str | None, root: str | None = None, source: str | None = None) -> str:
    """Where a refusal came from, as " (user U may not write in F)"; "" if not one, or not found.

    The error cannot say: the tree's folders are opened one by one, by fd, so it names one
    component at most; and a move is refused by the folder it takes the file out of (the
    dump) as often as by the one it puts it in.
    """
    if not isinstance(exc, OSError) or exc.errno not in (errno.EACCES, errno.EPERM):
        return ""
    problem = (_blocking_folder(dest, root) if dest else None) or (_source_problem(source) if source else None)
    return f" (user {_user()} {problem})" if problem else ""


def _blocking_folder(dest: str, root: str | None) -> str | None:
    """What this process may not do on the way to dest: read a folder (each one from root
    down is opened), or write in the nearest existing one."""
    folder = os.path.dirname(dest)
    while folder and not os.path.lexists(folder):  # also where a folder above may not be searched
        parent = os.path.dirname(folder)
        if parent == folder:
            return None
        folder = parent
    if not folder:
        return None
    chain = [folder]
    if root and _inside(folder, root):
        while chain[-1] != root:
            chain.append(os.path.dirname(chain[-1]))
    for above in reversed(chain):
        if not _may(above, os.R_OK | os.X_OK):
            return f"may not read {above}"
    return None if _may(folder, os.W_OK | os.X_OK) else f"may not write in {folder}"


def _source_problem(source: str) -> str | None:
    """Why a file may not be taken out of its folder: the folder is not ours to write in, or
    is sticky (a shared dump) and the file is another user's."""
    folder = os.path.dirname(source)
    if not _may(folder, os.W_OK | os.X_OK):
        return f"may not write in {folder}"
    try:
        st, file_st = os.stat(folder), os.lstat(source)
    except OSError:
        return None
    if st.st_mode & stat.S_ISVTX and os.geteuid() not in (0, st.st_uid, file_st.st_uid):
        return f"may not move another user's file out of {folder}, a folder with the sticky bit"
    return None


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _may(path: str, mode: int) -> bool:
    """os.access as this process is (its effective ids, where the system can tell)."""
    return os.access(path, mode, effective_ids=os.access in os.supports_effective_ids)


def _user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def _changed(item: Prepared) -> tuple[str, str] | None:
    """If the source is not the file that was read any more: (outcome, reason)."""
    try:
        st = os.lstat(item.source)
    except FileNotFoundError:
        return "gone", "vanished while it was being sorted"
    except OSError as exc:
        return "left", os_reason(exc)
    if (st.st_ino, st.st_size, st.st_mtime_ns) != (item.ino, item.source_size, item.mtime_ns):
        return "left", "changed while it was being sorted: it will be read again"
    return None


def _folder_id(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(os.path.dirname(os.path.abspath(path)))
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _settle(row) -> bool:
    """Finish the move a journal row describes, if it got far enough; True if it did."""
    source, dest = row["source"], row["dest"]
    if not dest or not os.path.lexists(dest):
        return False
    if row["outcome"] == "renamed":
        if source and os.path.lexists(source) and _same_inode(source, dest):
            os.unlink(source)
        return True
    if row["outcome"] != "quarantined":
        expected = row["out_sha256"] or row["sha256"]
        if _sha256(dest) != expected:
            return False  # the name was taken by something else since: not ours
    if source and not row["kept"] and source != dest and os.path.lexists(source):
        if _same_inode(source, dest) or (row["sha256"] and _sha256(source) == row["sha256"]):
            try:
                os.unlink(source)
            except FileNotFoundError:
                pass
            except OSError as exc:  # the next sweep finds it, and says why it stays
                log.error("%s is in the tree at %s but cannot be removed: %s", source, dest, os_reason(exc))
    return True


def _same_inode(a: str, b: str) -> bool:
    try:
        sa, sb = os.lstat(a), os.lstat(b)
    except FileNotFoundError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _sha256(path: str, dir_fd: int | None = None) -> str | None:
    """sha256 of a regular file; None if it is not one or cannot be read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    with open(fd, "rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _alive(pid: int) -> bool:
    """True if the process runs (a zombie does not: it is dead, only not yet reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


_HERE, _SAME_BYTES = -2, -1
_QUARANTINE_NAME_MAX = 255 - len(".reason.txt") - len(".999999")


def _quarantine_base(source: str) -> str:
    """The file's own name, readable (odd bytes as \\xNN) and short enough for ".N.reason.txt"."""
    base = printable(os.path.basename(source.rstrip("/"))) or "unnamed"
    encoded = base.encode("utf-8")
    if len(encoded) > _QUARANTINE_NAME_MAX:
        base = encoded[:_QUARANTINE_NAME_MAX].decode("utf-8", "ignore")
    if base.endswith(".reason.txt"):  # else the reason file of a file named like its stem overwrites it
        base += "_"
    return base


def _quarantine_slot(qfd: int, base: str, sha256: str | None, st: os.stat_result) -> tuple[str, int]:
    """A name in the quarantine and its reason file, opened for writing: (name, fd).

    Instead of an fd: _HERE if the file is in the quarantine already (sort-once run over
    it), _SAME_BYTES if another file there holds the same bytes. Quarantining runs under
    the tree lock, so a reason file without its file is a leftover of a kill: reused.
    """
    for number in range(0, 1_000_000):
        name = base if number == 0 else f"{base}.{number}"
        try:
            there = os.stat(name, dir_fd=qfd, follow_symlinks=False)
        except FileNotFoundError:
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
            return name, os.open(name + ".reason.txt", flags, 0o640, dir_fd=qfd)
        if (there.st_dev, there.st_ino) == (st.st_dev, st.st_ino):
            return name, _HERE
        if sha256 is not None and there.st_size == st.st_size and _sha256(name, qfd) == sha256:
            return name, _SAME_BYTES
    raise OSError(errno.ENOSPC, "no free name in the quarantine")


def _remove_at(dir_fd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except OSError:
        pass


def _anonymisation_key(cfg: Config, dry_run: bool, state: StateFolder) -> bytes:
    """The site's secret; a dry run never makes one (it changes nothing), so it borrows a
    passing key if there is none yet: its new UIDs and pseudonyms are then not the real ones."""
    path = cfg.anon_key_path
    assert path is not None
    if dry_run and not os.path.lexists(path):
        log.warning("no anonymisation key at %s yet: this dry run shows pseudonyms of a passing key", path)
        return os.urandom(32)
    if state.holds(path) and state.fd >= 0:  # the default place: through the proven folder
        state.check(path.name, "anonymisation key")
        return load_key(path, dir_fd=state.fd)
    return load_key(path)


def _reserved_names(cfg: Config) -> frozenset[str]:
    """Top-level names below dir_out that hold other things (a DcmServer-style nested dump)."""
    names = set()
    assert cfg.dir_out is not None
    out = os.path.abspath(cfg.dir_out)
    for other in (cfg.dir_dump, cfg.quarantine_dir):
        if other is not None:
            rel = os.path.relpath(os.path.abspath(other), out)
            if not rel.startswith(".."):
                names.add(rel.split(os.sep)[0])
    return frozenset(names)


def chunked(items: Iterable[str], size: int) -> Iterable[list[str]]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk

