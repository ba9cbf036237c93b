"""The quarantine: where a rejected file goes, with its reason in a file beside it, moved
(or with --copy, copied) under a name that never replaces another; journalled write-ahead
like a placement."""

from __future__ import annotations

import errno
import logging
import os
import stat
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from dumpwatch import failpoints, keys
from dumpwatch.config import Config
from dumpwatch.fsops import AT_FDCWD, copy_file, file_sha256, folder_id, make_folder, move_noreplace, write_all
from dumpwatch.journal import Entry, Journal
from dumpwatch.outcomes import PER_FILE, Failed, Handled, Outcome
from dumpwatch.prepare import Job
from dumpwatch.reasons import not_quarantined
from dumpwatch.text import now, printable

log = logging.getLogger(__name__)

_NAME_MAX = 255 - len(".reason.txt") - len(".999999")


class Holds(Enum):
    """What the quarantine holds at a slot's name already."""

    NOTHING = "nothing"  # a free name: its reason file is open for writing
    THIS_FILE = "this file"  # the file is in the quarantine already (sort-once run over it)
    SAME_BYTES = "same bytes"  # another file there holds the same bytes


@dataclass
class Slot:
    name: str
    holds: Holds
    reason_fd: int = -1  # open for writing when holds is NOTHING


class Quarantine:
    def __init__(self, cfg: Config, journal: Journal | None, job: Job, copy: bool, dry_run: bool):
        assert cfg.quarantine_dir is not None
        self.dir: Path = cfg.quarantine_dir
        self.cfg, self.journal, self.job, self.copy, self.dry_run = cfg, journal, job, copy, dry_run
        self.id = folder_id(str(self.dir / "x"))

    def holds(self, path: str) -> bool:
        """True if path is a file in the quarantine (sort-once may run over it)."""
        return self.id is not None and folder_id(path) == self.id

    def put(self, item: Failed) -> Handled:
        """Move (or with --copy, copy) a rejected file to the quarantine, its reason beside it."""
        if self.dry_run:
            return Handled(item.source, Outcome.QUARANTINED, item.reason)
        try:
            st = os.lstat(item.source)
        except FileNotFoundError:
            return Handled(item.source, Outcome.GONE, "vanished before it could be quarantined")
        except OSError as exc:
            return self.left(item, not_quarantined(item.reason, item.source, exc, self.dir))
        try:
            make_folder(self.dir, self.cfg.dir_mode & 0o2770, self.cfg.group)  # originals: never world-readable
            qfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            return self.left(item, not_quarantined(item.reason, item.source, exc, self.dir))
        try:
            return self._into(item, qfd, st)
        except OSError as exc:
            return self.left(item, not_quarantined(item.reason, item.source, exc, self.dir))
        finally:
            os.close(qfd)

    def _into(self, item: Failed, qfd: int, st: os.stat_result) -> Handled:
        assert self.journal is not None
        if item.sha256 is None and stat.S_ISREG(st.st_mode):
            item.sha256 = file_sha256(item.source)
        base = _base_name(item.source)
        if self.job.anonymiser is not None and not self.holds(item.source):
            base = keys.name_token(self.job.anonymiser.key, base)  # the journal names it
        slot = _slot(qfd, base, item.sha256, st)
        failpoints.hit("quarantine-slot")
        dest = str(self.dir / slot.name)
        entry = Entry(Outcome.QUARANTINED, item.source, item.sop_uid, sha256=item.sha256, dest=dest,
                      reason=item.reason, kept=self.copy, size=st.st_size)
        if slot.holds is Holds.THIS_FILE:  # sort-once over the quarantine: a rejected file stays where it is
            self.journal.record([entry])
            return Handled(item.source, Outcome.QUARANTINED, f"{item.reason} (stays in the quarantine)")
        if slot.holds is Holds.SAME_BYTES:
            if not self.copy:
                os.unlink(item.source)
            self.journal.record([entry])
            log.warning("%s is already quarantined as %s: %s", self.job.shown(item.source), dest, item.reason)
            return Handled(item.source, Outcome.QUARANTINED, item.reason)
        try:
            self.journal.begin([entry])
            failpoints.hit("quarantine-reserved")
            text = (f"{item.reason}\nfile: {printable(item.source)}\nsha256: {item.sha256 or '-'}\n"
                    f"quarantined: {now()} by dumpwatch\n")
            write_all(slot.reason_fd, text.encode("utf-8", "backslashreplace"))
            os.fsync(slot.reason_fd)
            self._move(item.source, qfd, slot.name)
            failpoints.hit("quarantined")
        except OSError as exc:
            return self._not_moved(item, entry, qfd, slot.name, exc)
        finally:
            os.close(slot.reason_fd)
        self.journal.finish([entry])
        log.warning("quarantined %s: %s", self.job.shown(item.source), item.reason)
        return Handled(item.source, Outcome.QUARANTINED, item.reason)

    def _not_moved(self, item: Failed, entry: Entry, qfd: int, name: str, exc: OSError) -> Handled:
        assert self.journal is not None
        _remove_at(qfd, name + ".reason.txt")
        entry.reason = not_quarantined(item.reason, item.source, exc, self.dir)
        if entry.id is not None:
            self.journal.finish([], [entry])
        else:
            self.journal.record([Entry(Outcome.LEFT, item.source, item.sop_uid, sha256=item.sha256,
                                       reason=entry.reason)])
        log.error("left %s in place: %s", self.job.shown(item.source), entry.reason, extra=PER_FILE)
        return Handled(item.source, Outcome.LEFT, entry.reason)

    def left(self, item: Failed, reason: str) -> Handled:
        """item stays in the dump, for reason: logged and journalled."""
        log.error("left %s in place: %s", self.job.shown(item.source), reason, extra=PER_FILE)
        if self.journal is not None:
            self.journal.record([Entry(Outcome.LEFT, item.source, item.sop_uid, sha256=item.sha256, reason=reason)])
        return Handled(item.source, Outcome.LEFT, reason)

    def _move(self, source: str, qfd: int, name: str) -> None:
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


def _base_name(source: str) -> str:
    """The file's own name, readable (odd bytes as \\xNN) and short enough for ".N.reason.txt"."""
    base = printable(os.path.basename(source.rstrip("/"))) or "unnamed"
    encoded = base.encode("utf-8")
    if len(encoded) > _NAME_MAX:
        base = encoded[:_NAME_MAX].decode("utf-8", "ignore")
    if base.endswith(".reason.txt"):  # else the reason file of a file named like its stem overwrites it
        base += "_"
    return base


def _slot(qfd: int, base: str, sha256: str | None, st: os.stat_result) -> Slot:
    """A name in the quarantine for the file st, and what that name holds already.

    Quarantining runs under the tree lock, so a reason file without its file is a leftover
    of a kill: reused.
    """
    for number in range(0, 1_000_000):
        name = base if number == 0 else f"{base}.{number}"
        try:
            there = os.stat(name, dir_fd=qfd, follow_symlinks=False)
        except FileNotFoundError:
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
            return Slot(name, Holds.NOTHING, os.open(name + ".reason.txt", flags, 0o640, dir_fd=qfd))
        if (there.st_dev, there.st_ino) == (st.st_dev, st.st_ino):
            return Slot(name, Holds.THIS_FILE)
        if sha256 is not None and there.st_size == st.st_size and file_sha256(name, qfd) == sha256:
            return Slot(name, Holds.SAME_BYTES)
    raise OSError(errno.ENOSPC, "no free name in the quarantine")


def _remove_at(dir_fd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except OSError:
        pass
