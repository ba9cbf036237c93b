"""The sorted tree: which folder a series owns, which name a file gets, and placing it there.

The tree belongs to its users: they delete, rename and move files and folders by hand
while dumpwatch runs. So what is kept in memory of a folder is only a guide, checked
against the disk before it decides anything:

- a folder's picture is used only while the folder's identity and change time are those it
  had when it was read (or last changed by dumpwatch); otherwise it is read again;
- a file is called a duplicate only if the file on disk now holds the same data set: a
  remembered digest counts only while the file's inode, size and change time are those it
  had when the digest was taken;
- what a file in the tree is (its instance, series and echo) is read from its header,
  never inferred from its name, which an older template or a hand may have given it.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.datadict import keyword_dict

from dumpwatch import failpoints
from dumpwatch.dicomfile import read_prefix
from dumpwatch.fsops import TreeBlocked, make_dirs, make_folder, move_noreplace, open_dir, set_owner_mode
from dumpwatch.identity import Placed, same_data_set
from dumpwatch.naming import Name, Template, echo_number, friendly_name, header_text, is_safe_component

log = logging.getLogger(__name__)

_DUP = re.compile(r"A[0-9]*")
_DIGITS = re.compile(r"[0-9]{1,4}")  # DcmServer's collision suffix: "A", "A2", "A3"...
_FOREIGN = "?"  # the series of a folder whose files dumpwatch cannot read, or of several: never shared


@dataclass(slots=True)
class Known:
    """A file in a series folder, as its header and inode said when it was read."""

    ino: int | None  # None while it is only planned (in this batch)
    ctime_ns: int
    size: int
    sop_uid: str
    echo: int  # EchoNumbers, 1 when absent
    body_size: int  # bytes of its data set (after the file meta group)
    source: Placed | None = None  # where its bytes are, while it is only planned


@dataclass
class Folder:
    """What is known of one series folder, valid while the folder's stamp is unchanged."""

    rel: tuple[str, ...]
    series_uid: str | None  # None while the folder is new or holds no readable file
    stamp: tuple[int, int, int] | None = None  # (device, inode, mtime_ns) when read; None: absent
    taken: set[str] = field(default_factory=set)  # every name in it, of any kind
    files: dict[str, Known] = field(default_factory=dict)  # its DICOM files, by name
    by_uid: dict[str, list[str]] = field(default_factory=dict)  # SOPInstanceUID -> names
    plain: set[str] = field(default_factory=set)  # echo-1 files named as the template names them, no "_01"
    stems: dict[str, tuple[str, str]] = field(default_factory=dict)  # plain name -> (template stem, "A" suffix)
    echoes: set[int] = field(default_factory=set)
    multi: bool = False  # more than one echo: echo-1 files carry "_01"
    disk: dict[str, str] = field(default_factory=dict)  # name -> name on disk, while a rename is pending

    def add(self, name: str, known: Known) -> None:
        self.taken.add(name)
        self.files[name] = known
        self.by_uid.setdefault(known.sop_uid, []).append(name)
        self.echoes.add(known.echo)

    def rename(self, old: str, new: str) -> None:
        known = self.files.pop(old)
        self.taken.discard(old)
        self.plain.discard(old)
        self.stems.pop(old, None)
        self.taken.add(new)
        self.files[new] = known
        names = self.by_uid[known.sop_uid]
        names[names.index(old)] = new
        self.disk[new] = self.disk.pop(old, old)


@dataclass
class Decision:
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


# File names of sorted series kept in memory at most (with what their headers said, about
# 1 KB each: 20 MB); beyond, the folders used longest ago are read again from disk when needed.
CACHED_NAMES = 20_000


class Tree:
    """Decides names under a lock shared by every dumpwatch process writing the same tree."""

    def __init__(self, root: Path, extension: str, dir_mode: int, gid: int | None, template: Template,
                 lock_path: Path | None = None, dry_run: bool = False):
        self.root = root
        self.template = template
        # What is read of each file in a series folder: enough to name it as the template does.
        keywords = {k for part in template.components[-1] if not isinstance(part, str) for k in [part.keyword]}
        keywords |= {"SOPInstanceUID", "SeriesInstanceUID", "InstanceNumber", "EchoNumbers"}
        self.wanted = frozenset(keyword_dict[k] for k in keywords)
        self.suffix = "." + extension
        self.dir_mode, self.gid, self.dry_run = dir_mode, gid, dry_run
        if not dry_run:
            make_folder(root, dir_mode, gid)
        self.root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC) if root.is_dir() else -1
        self.device = os.fstat(self.root_fd).st_dev if self.root_fd >= 0 else -1
        self.folders: dict[tuple[str, ...], Folder] = {}
        self.claims: dict[tuple[tuple[str, ...], str], Folder] = {}
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
        self.root_fd = self.lock_fd = -1

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
        """After a batch: beyond CACHED_NAMES file names, forget the folders used longest ago,
        so that memory does not grow with the tree. A forgotten folder is read again from
        disk when a file comes for it."""
        if self.dry_run:  # nothing was placed: memory is all there is
            return
        total = sum(len(folder.taken) for folder in self.folders.values())
        if total <= CACHED_NAMES:
            return
        dropped = set()
        for rel, folder in list(self.folders.items())[:-1]:  # least recently used first; never the last
            if total <= CACHED_NAMES // 2:
                break
            if not folder.disk:
                total -= len(folder.taken)
                dropped.add(id(self.folders.pop(rel)))
        self.claims = {key: folder for key, folder in self.claims.items() if id(folder) not in dropped}

    def forget(self, folder: Folder | None = None) -> None:
        """Drop cached knowledge (all of it, or one folder's) after a surprise."""
        if folder is None:
            self.folders.clear()
            self.claims.clear()
            return
        if self.folders.get(folder.rel) is folder:
            del self.folders[folder.rel]
        for key in [k for k, v in self.claims.items() if v is folder]:
            del self.claims[key]

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
        folder = self._series_folder(name.folders, series_uid)
        try:
            return self._decide_in(folder, name, sop_uid, source, body_size, dev, ino)
        except BaseException:
            self.forget(folder)  # its picture may hold renames that will not happen
            raise

    def _decide_in(self, folder: Folder, name: Name, sop_uid: str, source: Placed, body_size: int,
                   dev: int, ino: int) -> Decision:
        echo = name.echo or 1
        multi = folder.multi or len(folder.echoes | {echo}) > 1
        renames = []
        if multi:  # the series has more than one echo: its echo-1 files carry "_01"
            for old in sorted(folder.plain):
                stem, dup = folder.stems[old]
                new, _ = self._free(folder, f"{stem}_01", dup)
                renames.append((old, new))
                folder.rename(old, new)
        folder.multi = multi
        same = self._same_instance(folder, sop_uid, source, body_size, dev, ino)
        if same is not None:
            file_name, how, known = same
            return Decision("sorted" if how == "inode" else "duplicate", folder, file_name, renames,
                            already=how == "inode", match=known)
        stem = name.stem
        if name.echo and name.echo > 1:
            stem += f"_{name.echo:02d}"
        elif multi:
            stem += "_01"
        file_name, dup = self._free(folder, stem)
        known = Known(None, 0, 0, sop_uid, echo, body_size, source)
        folder.add(file_name, known)
        if echo == 1 and not multi:
            folder.plain.add(file_name)
            folder.stems[file_name] = (stem, dup)
        return Decision("sorted", folder, file_name, renames, match=known)

    def _free(self, folder: Folder, stem: str, first: str = "") -> tuple[str, str]:
        """The first free name from stem, and its collision suffix: none, then "A", "A2"...
        (from `first` on). Free: nothing in the folder holds it, no file, folder, symlink or FIFO."""
        for suffix in _suffixes(first):
            if stem + suffix + self.suffix not in folder.taken:
                return stem + suffix + self.suffix, suffix
        raise OSError(f"no free name for {stem!r}")

    def _same_instance(self, folder: Folder, sop_uid: str, source: Placed, body_size: int,
                       dev: int, ino: int) -> tuple[str, str, Known] | None:
        """(name, "inode") if a file of this instance in the folder is the source itself,
        (name, "bytes") if one holds the same data set now, else None."""
        names = folder.by_uid.get(sop_uid)
        if not names:
            return None
        fd = self._open(folder.rel)
        try:
            for name in list(names):
                known = folder.files[name]
                if known.ino is None:  # planned in this batch: its source is all there is
                    if known.body_size != body_size or known.source is None:
                        continue
                    same = same_data_set(known.source, source)
                    # None: one of the two vanished or changed since it was read. If it is
                    # the planned twin, it will not be placed: this file then waits for the
                    # next batch as its duplicate, rather than be named 0001A beside a 0001
                    # that never comes. If it is this file, it is left all the same.
                    if same is not False:
                        return name, "bytes", known
                    continue
                try:
                    st = os.stat(folder.disk.get(name, name), dir_fd=fd, follow_symlinks=False) if fd >= 0 else None
                except FileNotFoundError:
                    st = None
                if st is None:  # deleted by hand: it is not there to be a duplicate of
                    self._drop(folder, name)
                    continue
                if (st.st_dev, st.st_ino) == (dev, ino):
                    return name, "inode", known
                if (st.st_ino, st.st_size, st.st_ctime_ns) != (known.ino, known.size, known.ctime_ns):
                    known = self._reread(folder, fd, name)  # changed since it was read
                    if known is None or known.sop_uid != sop_uid:
                        continue
                if known.body_size != body_size:
                    continue
                there = Placed(fd, folder.disk.get(name, name), (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
                if same_data_set(there, source):
                    return name, "bytes", known
        finally:
            if fd >= 0:
                os.close(fd)
        return None

    def _drop(self, folder: Folder, name: str) -> None:
        known = folder.files.pop(name, None)
        folder.taken.discard(name)
        folder.plain.discard(name)
        folder.stems.pop(name, None)
        if known is not None:
            folder.by_uid[known.sop_uid].remove(name)

    def _reread(self, folder: Folder, fd: int, name: str) -> Known | None:
        self._drop(folder, name)
        folder.taken.add(name)
        header = read_prefix(fd, folder.disk.get(name, name), self.wanted)
        if header is None:
            return None
        known = self._known(header)
        if known is not None:
            folder.add(name, known)
        return known

    def _known(self, header) -> Known | None:
        try:
            return self._known_of(header)
        except Exception:  # a value a hand wrote that cannot be decoded: the file says nothing
            return None

    def _known_of(self, header) -> Known | None:
        sop_uid = (header_text(header.ds, "SOPInstanceUID") or "").strip(" \0")
        if not sop_uid:
            return None
        st = header.st
        return Known(st.st_ino, st.st_ctime_ns, st.st_size, sop_uid, echo_number(header.ds) or 1, header.body_size)

    def _series_folder(self, folders: tuple[str, ...], series_uid: str) -> Folder:
        """The folder of this series: the template's, or "<name>_2", "_3"... if that holds another series."""
        key = (folders, series_uid)
        claimed = self.claims.get(key)
        if claimed is not None:
            folder = self._folder(claimed.rel)  # as it is on disk now
            if folder.series_uid == series_uid:
                self.claims[key] = folder
                return folder
            self.claims.pop(key, None)  # emptied, removed or replaced by hand since: look again
        # Its folder may be any of "<name>", "<name>_2"...: a folder moved by hand into a
        # sibling's name is that series' folder. Look at each that exists before taking the
        # first free one, or a series would be stored twice.
        parent, base = folders[:-1], folders[-1]
        last = self._last_number(parent, base)
        free = None
        for number in range(1, 10_000):
            rel = (*parent, base if number == 1 else f"{base}_{number}")
            try:
                folder = self._folder(rel)
            except (TreeBlocked, PermissionError):
                continue  # a symlink, a file or a folder it may not read: taken, and not ours
            if folder.series_uid == series_uid:
                break
            if folder.series_uid is None and free is None:
                free = folder
            if free is not None and number >= last:
                folder = free
                break
        else:
            raise OSError(f"more than 10,000 series share the folder name {base!r}")
        folder.series_uid = series_uid
        self.claims[key] = folder
        return folder

    def _last_number(self, parent: tuple[str, ...], base: str) -> int:
        """The highest N of the folders "<base>" (1) and "<base>_N" in parent on disk (0: none)."""
        fd = self._open(parent)
        if fd < 0:
            return 0
        last = 0
        try:
            with os.scandir(fd) as entries:
                for entry in entries:
                    if entry.name == base:
                        last = max(last, 1)
                    elif entry.name.startswith(base + "_") and _DIGITS.fullmatch(entry.name[len(base) + 1:]):
                        last = max(last, int(entry.name[len(base) + 1:]))
        finally:
            os.close(fd)
        return last

        raise OSError(f"more than 10,000 series share the folder name {base!r}")

    def _folder(self, rel: tuple[str, ...]) -> Folder:
        """The picture of a folder, read again from disk if the folder changed since."""
        folder = self.folders.pop(rel, None)  # and put back last: the dict is in order of use
        if folder is None or (not self.dry_run and not folder.disk and self._stamp(rel) != folder.stamp):
            if folder is not None:
                self.forget(folder)
            folder = self._load(rel)
        self.folders[rel] = folder
        return folder

    def _stamp(self, rel: tuple[str, ...]) -> tuple[int, int, int] | None:
        if self.root_fd < 0:
            return None
        try:
            st = os.stat(os.path.join(*rel), dir_fd=self.root_fd, follow_symlinks=False)
        except OSError:
            return None
        return st.st_dev, st.st_ino, st.st_mtime_ns

    def _load(self, rel: tuple[str, ...]) -> Folder:
        """Read a series folder from disk: every name in it, and the header of each file."""
        folder = Folder(rel, None)
        fd = self._open(rel)
        if fd < 0:
            return folder
        try:
            st = os.fstat(fd)
            folder.stamp = (st.st_dev, st.st_ino, st.st_mtime_ns)
            series = set()
            with os.scandir(fd) as entries:
                for entry in entries:
                    folder.taken.add(entry.name)
                    if entry.name.startswith(".") or not entry.name.endswith(self.suffix):
                        continue
                    if not entry.is_file(follow_symlinks=False):
                        continue
                    header = read_prefix(fd, entry.name, self.wanted)
                    known = None if header is None else self._known(header)
                    if known is None:
                        series.add(_FOREIGN)  # a file dumpwatch cannot read says nothing of the series
                        continue
                    folder.add(entry.name, known)
                    series.add((header_text(header.ds, "SeriesInstanceUID") or "").strip(" \0"))
                    self._note_name(folder, entry.name, header.ds, known.echo)
            if folder.files:
                series.discard(_FOREIGN)
                folder.series_uid = series.pop() if len(series) == 1 else _FOREIGN
            elif series:
                folder.series_uid = _FOREIGN
            folder.multi = folder.multi or len(folder.echoes) > 1
        finally:
            os.close(fd)
        return folder

    def _note_name(self, folder: Folder, name: str, ds, echo: int) -> None:
        """Is this file named as the current template names it? Only such a file is ever
        renamed (an echo-1 file gains "_01" when a second echo comes); a file an older
        template or a hand named keeps its name."""
        stem = friendly_name(ds, self.template).stem
        own = name[: -len(self.suffix)]
        if not own.startswith(stem):
            return
        rest = own[len(stem):]
        if echo == 1 and (rest == "" or _DUP.fullmatch(rest)):
            folder.plain.add(name)
            folder.stems[name] = (stem, rest)
        elif rest.startswith(f"_{echo:02d}") and (rest == f"_{echo:02d}" or _DUP.fullmatch(rest[3:])):
            # An echo-1 file with "_01" was renamed because a second echo came (perhaps
            # before a kill stopped that echo from being placed): the series has several.
            folder.multi |= echo == 1

    def _open(self, rel: tuple[str, ...]) -> int:
        """An fd for an existing folder below the root, or -1 if it does not exist."""
        if self.root_fd < 0:
            return -1
        fd = os.dup(self.root_fd)
        try:
            for name in rel:
                child = open_dir(fd, name)
                os.close(fd)
                fd = child
        except FileNotFoundError:
            os.close(fd)
            return -1
        except BaseException:
            os.close(fd)
            raise
        return fd

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
            fd = self._open(rel)
            if fd >= 0:
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)


def _suffixes(first: str = "") -> Iterator[str]:
    """"", then DcmServer's "A" for different content at a taken name, then A2, A3...
    (from `first` on: a file that had a collision suffix keeps it when renamed)."""
    if first == "":
        yield ""
    if first in ("", "A"):
        yield "A"
    for number in range(int(first[1:]) if first[1:].isdigit() else 2, 100_000):
        yield f"A{number}"
