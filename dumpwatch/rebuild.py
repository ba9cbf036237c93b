"""Journal rows rebuilt from the sorted tree, for a journal found new beside a tree that holds files.

A deleted journal is made anew at the next start, empty: the history is gone, and `where`
finds nothing of the files in the tree. What the tree still tells is rebuilt: a 'sorted'
row per file, with its place, SOPInstanceUID, SeriesInstanceUID and sha256, dated by its
mtime (when storescp wrote it), marked as rebuilt. What only the journal knew is not: the
dump names files had, duplicates, quarantined and left files, echo renames.

Each file is read once, its header and its hash (about the cost of sorting it), in one
pass at start-up: sorting waits meanwhile, while storescp receives on into the dump. Rows
are written in batches, and a file that has a row already is skipped, so a start stopped
half-way goes on where it was.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import time
from collections.abc import Iterator

from pydicom import dcmread

from dumpwatch.fsops import entries_below
from dumpwatch.journal import Entry, Journal
from dumpwatch.text import time_text

log = logging.getLogger(__name__)

REBUILT = "rebuilt from the tree: the journal had no record of it"
BATCH = 1000  # rows a transaction
PROGRESS = 10_000  # files between progress lines in the log


def tree_files(root: str, extension: str, reserved: frozenset[str], unreadable: list[str] | None = None
               ) -> Iterator[str]:
    """Every sorted file below root, as the tree sees them: not hidden, named *.<extension>,
    never through a symlink, not in the top-level folders that hold other things (reserved).
    Folders that cannot be listed are skipped, and named in unreadable."""
    suffix = "." + extension

    def wanted(folder: str, entry: os.DirEntry) -> bool:
        if entry.name.startswith(".") or (folder == root and entry.name in reserved):
            return False
        return entry.is_dir(follow_symlinks=False) or (entry.name.endswith(suffix)
                                                       and entry.is_file(follow_symlinks=False))

    def unlistable(folder: str, exc: OSError) -> None:
        if unreadable is not None:
            unreadable.append(f"{folder}: {exc.strerror}")

    return entries_below(root, unlistable, wanted)


def rebuild(journal: Journal, root: str, extension: str, reserved: frozenset[str], changed: bool) -> int:
    """Write a rebuilt row for each file of the tree without one; returns how many.

    changed: the sorter changes files as it places them (anonymising): the hash of a placed
    file is then not the received file's, and goes in out_sha256 only.
    """
    count, batch, started = 0, [], time.monotonic()
    unreadable: list[str] = []
    for path in tree_files(root, extension, reserved, unreadable):
        if journal.has_dest(path):
            continue
        entry = _entry(path, changed)
        if entry is None:
            continue
        batch.append(entry)
        count += 1
        if len(batch) >= BATCH:
            journal.record(batch)
            batch = []
        if count % PROGRESS == 0:
            log.warning("rebuilding the journal: %d files so far (%.0f s)", count, time.monotonic() - started)
    journal.record(batch)
    for folder in unreadable:
        log.error("cannot list %s to rebuild the journal rows of its files", folder)
    return count


def _entry(path: str, changed: bool) -> Entry | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        log.error("cannot read %s to rebuild its journal row: %s", path, exc.strerror)
        return None
    with open(fd, "rb") as stream:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        try:
            sha256 = hashlib.file_digest(stream, "sha256").hexdigest()
        except OSError as exc:
            log.error("cannot read %s to rebuild its journal row: %s", path, exc.strerror)
            return None
        stream.seek(0)
        try:
            ds = dcmread(stream, stop_before_pixels=True, specific_tags=["SOPInstanceUID", "SeriesInstanceUID"])
            sop_uid = str(ds.get("SOPInstanceUID", "")).strip(" \0") or None
            series_uid = str(ds.get("SeriesInstanceUID", "")).strip(" \0") or None
        except Exception:  # a file in the tree that is not what dumpwatch put there: its place is still worth a row
            sop_uid = series_uid = None
    return Entry("sorted", sop_uid=sop_uid, series_uid=series_uid, sha256=None if changed else sha256,
                 out_sha256=sha256 if changed else None, dest=path, reason=REBUILT, time=time_text(st.st_mtime))
