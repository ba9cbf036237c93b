"""The sorted tree: deciding where each file goes, under a lock, and placing it there.

A batch asks decide() for each file (its series folder, echo suffix and free name, or the
twin it duplicates: the rules are dumpwatch.folder's, on pictures of the folders that
dumpwatch.foldercache reads and checks against the disk), then apply() carries each
decision out with renames that cannot overwrite, and sync() makes them durable.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from dumpwatch import failpoints
from dumpwatch.folder import Folder, Known
from dumpwatch.foldercache import FolderCache, open_below
from dumpwatch.fsops import TreeBlocked, make_dirs, make_folder, move_noreplace, set_owner_mode
from dumpwatch.identity import Placed
from dumpwatch.naming import Name, Template, is_safe_component

log = logging.getLogger(__name__)


@dataclass
class Decision:
    """Where one file goes, as decide() pictured it; apply() carries it out."""

    outcome: str  # "sorted" or "duplicate"
    folder: Folder
    name: str
    renames: list[tuple[str, str]]  # echo-1 files to rename first, within the folder
    already: bool = False  # the source is this very file already (an interrupted move)
    match: Known | None = None  # a duplicate's twin in the tree, as proven; a new file's own picture

    @property
    def rel(self) -> tuple[str, ...]:
        return (*self.folder.rel, self.name)


class TreeChanged(OSError):
    """A folder changed on disk between deciding and placing: decide again."""


class Tree:
    """Decides names under a lock shared by every dumpwatch process writing the same tree."""

    def __init__(self, root: Path, extension: str, dir_mode: int, gid: int | None, template: Template,
                 lock_path: Path | None = None, dry_run: bool = False):
        self.root = root
        self.suffix = "." + extension
        self.dir_mode, self.gid, self.dry_run = dir_mode, gid, dry_run
        if not dry_run:
            make_folder(root, dir_mode, gid)
        self.root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC) if root.is_dir() else -1
        self.device = os.fstat(self.root_fd).st_dev if self.root_fd >= 0 else -1
        self.cache = FolderCache(self.root_fd, self.suffix, template, dry_run)
        self.lock_fd = -1
        self.token = b""
        if lock_path is not None and not dry_run:
            make_folder(lock_path.parent, dir_mode & 0o2770, gid)
            # O_NOFOLLOW: a symlink planted here must not get the mode below (the key, say)
            self.lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o660)
            set_owner_mode(self.lock_fd, 0o660, gid)  # every writer of the tree takes this lock
        self._batches = 0

    def close(self) -> None:
        for fd in (self.root_fd, self.lock_fd):
            if fd >= 0:
                os.close(fd)
        self.root_fd = self.lock_fd = self.cache.root_fd = -1

    def path(self, rel: tuple[str, ...]) -> Path:
        return self.root.joinpath(*rel)

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the tree for a batch. If another process wrote since, forget what we knew."""
        if self.lock_fd < 0:
            yield
            return
        fcntl.flock(self.lock_fd, fcntl.LOCK_EX)
        try:
            if os.pread(self.lock_fd, 64, 0) != self.token:
                self.forget()
            self._batches += 1
            self.token = f"{os.getpid()} {id(self)} {self._batches}".encode().ljust(64)
            os.pwrite(self.lock_fd, self.token, 0)
            yield
        finally:
            fcntl.flock(self.lock_fd, fcntl.LOCK_UN)

    def trim(self) -> None:
        """After a batch: keep the pictures of folders within memory's bound (foldercache.CACHED_NAMES)."""
        self.cache.trim()

    def forget(self, folder: Folder | None = None) -> None:
        """Drop cached knowledge (all of it, or one folder's) after a surprise."""
        self.cache.forget(folder)

    # -- deciding ------------------------------------------------------------------------

    def decide(self, name: Name, series_uid: str, sop_uid: str, source: Placed, body_size: int,
               dev: int, ino: int) -> Decision:
        """Where a file goes: its series folder, echo suffix, and a free name or its duplicate.

        source: where the bytes to place can be read, to compare their data set with a file
        of the same instance and size in the folder (only then: a first sort reads nothing
        more); body_size: the size of that data set (the bytes after the file meta group),
        dev and ino: the received file's. Updates
        the in-memory picture as if the decision were carried out; if it is not, call
        forget(decision.folder).
        """
        folder = self.cache.series_folder(name.folders, series_uid)
        try:
            echo = name.echo or 1
            renames = folder.echo_renames(echo, self.suffix)
            twin = self.cache.twin(folder, sop_uid, source, body_size, dev, ino)
            if twin is not None:
                file_name, how, known = twin
                return Decision("sorted" if how == "inode" else "duplicate", folder, file_name, renames,
                                already=how == "inode", match=known)
            known = Known(None, 0, 0, sop_uid, echo, body_size, source)
            return Decision("sorted", folder, folder.new_file(name, known, self.suffix), renames, match=known)
        except BaseException:
            self.forget(folder)  # its picture may hold renames that will not happen
            raise

    # -- placing -------------------------------------------------------------------------

    def apply(self, decision: Decision, source: tuple[int, str]) -> list[tuple[str, ...]]:
        """Carry out a decision: make folders, rename echo-1 files, move source into place.

        source is (dir fd, name) of the file to move: the received file itself, or a staged
        copy. Returns the folders it created, below the root. Raises TreeChanged if the
        folder is not as it was when the decision was made (changed by hand meanwhile).
        """
        for name in decision.rel:
            if not is_safe_component(name):
                raise TreeBlocked(f"refusing the unsafe name {name!r}")
        if decision.outcome == "duplicate" and not decision.renames:
            return []  # nothing to place
        folder = decision.folder
        fd, created = make_dirs(self.root_fd, folder.rel, self.dir_mode, self.gid)
        try:
            if created:
                if folder.stamp is not None:  # it was there when the decision was made
                    raise TreeChanged(0, f"{self.path(folder.rel)} was moved or removed while this file was"
                                         " being sorted")
                self._restamp(folder, fd)  # new, and so as the decision pictured it: empty
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino, st.st_mtime_ns) != folder.stamp:
                raise TreeChanged(0, f"{self.path(folder.rel)} changed while this file was being sorted")
            while decision.renames:  # each one done is dropped: a retry does not redo it
                old, new = decision.renames[0]
                move_noreplace(fd, folder.disk.pop(new, old), fd, new, self.device)
                decision.renames.pop(0)
                self._restamp(folder, fd)
                failpoints.hit("renamed")
                log.info("renamed %s -> %s: the series has several echoes", self.path((*folder.rel, old)), new)
            if decision.outcome == "sorted" and not decision.already:
                move_noreplace(source[0], source[1], fd, decision.name, self.device)
                self._restamp(folder, fd)
                placed = os.stat(decision.name, dir_fd=fd, follow_symlinks=False)
                known = decision.match  # (a later decision of this batch may have renamed it already)
                if known is not None:
                    known.ino, known.ctime_ns, known.size = placed.st_ino, placed.st_ctime_ns, placed.st_size
                    known.source = None  # moved: the file in the tree is read if need be
        finally:
            os.close(fd)
        return created

    @staticmethod
    def still_holds(decision: Decision, dest: str) -> bool:
        """Does dest still hold the twin a duplicate was matched with? Checked again just
        before the duplicate's source is removed: meanwhile a hand may have removed the twin
        or moved another series' folder into its place (its inode would be another)."""
        known = decision.match
        if known is None or known.ino is None:  # a twin planned in this batch and not placed
            return False
        try:
            st = os.lstat(dest)
        except OSError:
            return False
        return (st.st_ino, st.st_size) == (known.ino, known.size)

    @staticmethod
    def _restamp(folder: Folder, fd: int) -> None:
        """The folder changed by our own hand: its picture is still right."""
        st = os.fstat(fd)
        folder.stamp = (st.st_dev, st.st_ino, st.st_mtime_ns)

    def sync(self, folders: set[tuple[str, ...]]) -> None:
        """fsync these folders (and so the names placed in them) before sources are removed."""
        for rel in sorted(folders, key=len, reverse=True):
            fd = open_below(self.root_fd, rel)
            if fd >= 0:
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)

