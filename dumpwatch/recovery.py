"""After a kill: settle the moves the journal shows under way, remove dead writers' staged
copies, and rebuild the journal from the tree if it was lost."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from dumpwatch import rebuild
from dumpwatch.fsops import file_sha256, remove_if_there, same_inode
from dumpwatch.journal import Entry, Journal
from dumpwatch.outcomes import Outcome
from dumpwatch.reasons import os_reason

log = logging.getLogger(__name__)


def settle_interrupted(journal: Journal) -> int:
    """Finish or undo each move a killed dumpwatch left under way; how many rows it settled.
    Run under the tree lock: every live writer finishes its rows before it lets go."""
    settled = 0
    # Echo renames first: settling one points the rows of the renamed file at its new name.
    for renames in (True, False):
        done, forget = [], []
        for row in journal.pending():
            if (row["outcome"] == Outcome.RENAMED) != renames:
                continue
            if _settle(row):
                done.append(Entry(row["outcome"], row["source"], dest=row["dest"], id=row["id"]))
            else:
                forget.append(row["id"])
                if row["outcome"] == Outcome.QUARANTINED and row["dest"]:
                    remove_if_there(row["dest"] + ".reason.txt")
        journal.finish(done)
        journal.forget(forget)
        settled += len(done) + len(forget)
        if done or forget:
            log.warning("settled %d interrupted steps: %d completed, %d undone", len(done) + len(forget),
                        len(done), len(forget))
    return settled


def _settle(row) -> bool:
    """Finish the move a journal row describes, if it got far enough; True if it did."""
    source, dest = row["source"], row["dest"]
    if not dest or not os.path.lexists(dest):
        return False
    if row["outcome"] == Outcome.RENAMED:
        if source and os.path.lexists(source) and same_inode(source, dest):
            os.unlink(source)
        return True
    if row["outcome"] != Outcome.QUARANTINED:
        expected = row["out_sha256"] or row["sha256"]
        if file_sha256(dest) != expected:
            return False  # the name was taken by something else since: not ours
    if source and not row["kept"] and source != dest and os.path.lexists(source):
        if same_inode(source, dest) or (row["sha256"] and file_sha256(source) == row["sha256"]):
            try:
                os.unlink(source)
            except FileNotFoundError:
                pass
            except OSError as exc:  # the next sweep finds it, and says why it stays
                log.error("%s is in the tree at %s but cannot be removed: %s", source, dest, os_reason(exc))
    return True


def check_journal(journal: Journal, root: str, extension: str, reserved: frozenset[str], changed: bool) -> None:
    """A journal without a row beside a tree that holds files was deleted (SQLite makes a
    new one without a word), or the tree was filled without dumpwatch: say so, loudly, and
    rebuild what the tree tells (dumpwatch.rebuild). changed: files are anonymised or
    otherwise rewritten as they are sorted."""
    rebuilding = journal.rebuild_under_way()
    if rebuilding is None:
        if not journal.empty() or next(rebuild.tree_files(root, extension, reserved), None) is None:
            return
        log.error("the journal %s is new, but the sorted tree %s holds files: the journal was deleted (its "
                  "history is lost) or the tree was filled without dumpwatch; rebuilding a row per file from "
                  "the tree", journal.path, root)
        rebuilding = journal.begin_rebuild()
    else:
        log.error("going on with rebuilding the journal %s from the tree %s (a start was stopped half-way)",
                  journal.path, root)
    started = time.monotonic()
    count = rebuild.rebuild(journal, root, extension, reserved, changed)
    journal.finish_rebuild(rebuilding, count)
    log.error("rebuilt %d journal rows from the tree %s in %.0f s (marked '%s'): the history before is lost",
              count, root, time.monotonic() - started, rebuild.REBUILT)


def clean_staging(staging_fd: int) -> None:
    """Remove staged copies whose writer has died, or that are older than a day."""
    with os.scandir(staging_fd) as entries:
        for entry in entries:
            pid = entry.name.split("-", 1)[0]
            try:
                old = time.time() - entry.stat(follow_symlinks=False).st_mtime > 86400
            except FileNotFoundError:
                continue
            if old or not pid.isdigit() or not _alive(int(pid)):
                try:
                    os.unlink(entry.name, dir_fd=staging_fd)  # by the fd: never by a path a link redirects
                except OSError:
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
