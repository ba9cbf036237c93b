"""The sorted tree: which folder a series owns, which name a file gets, and placing it there."""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread

from dumpwatch import failpoints
from dumpwatch.fsops import TreeBlocked, make_dirs, make_folder, move_noreplace, open_dir, set_owner_mode
from dumpwatch.naming import Name, is_safe_component

log = logging.getLogger(__name__)

# A sorted file name: stem, optional echo suffix "_NN", optional collision suffix "A", "A2", ...
# (read with the template's own stem pattern first: Tree._parse)
_NAME = re.compile(r"(?P<stem>.+?)(?:_(?P<echo>\d{2,}))?(?P<dup>A\d*)?")
_FOREIGN = "?"  # the series of a folder whose files dumpwatch cannot read: never shared


@dataclass
class Folder:
    """What is known of one series folder (from disk, then kept up to date in memory)."""

    rel: tuple[str, ...]
    series_uid: str | None  # None while the folder is new or empty
    names: set[str] = field(default_factory=set)  # sorted files in it
    plain: set[str] = field(default_factory=set)  # those without an echo suffix
    echoes: set[int] = field(default_factory=set)
    multi: bool = False  # more than one echo: echo-1 files carry "_01"
    hashes: dict[str, str] = field(default_factory=dict)  # sha256 of files whose content is known
    disk: dict[str, str] = field(default_factory=dict)  # name -> name on disk, while a rename is pending


@dataclass
class Decision:
    outcome: str  # "sorted" or "duplicate"
    folder: Folder
    name: str
    renames: list[tuple[str, str]]  # echo-1 files to rename first, within the folder
    already: bool = False  # the source is this very file already (an interrupted move)

    @property
    def rel(self) -> tuple[str, ...]:
        return (*self.folder.rel, self.name)


# File names of sorted series kept in memory at most (with their hashes, about 250 bytes
# each: 12 MB); beyond, the folders used longest ago are read again from disk when needed.
CACHED_NAMES = 50_000


class Tree:
    """Decides names under a lock shared by every dumpwatch process writing the same tree."""

    def __init__(self, root: Path, extension: str, dir_mode: int, gid: int | None,
                 lock_path: Path | None = None, dry_run: bool = False, stem_pattern: str = ".+?"):
        """stem_pattern: Template.file_stem_pattern(), to read names back from disk."""
        self.root = root
        self._name = re.compile(rf"(?P<stem>{stem_pattern})(?:_(?P<echo>\d{{2,}}))?(?P<dup>A\d*)?")
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

    def _parse(self, stem: str) -> re.Match:
        """A sorted file's name (without extension): its stem, echo and collision suffixes,
        read as the template makes them; a name the template cannot have made (a template
        changed since, say), as any name."""
        match = self._name.fullmatch(stem) or _NAME.fullmatch(stem)
        assert match is not None  # _NAME matches any non-empty name
        return match

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
        disk when a file comes for it (and its files' hashes when a re-send needs them)."""
        if self.dry_run:  # nothing was placed: memory is all there is
            return
        total = sum(len(folder.names) for folder in self.folders.values())
        if total <= CACHED_NAMES:
            return
        dropped = set()
        for rel, folder in list(self.folders.items())[:-1]:  # least recently used first; never the last
            if total <= CACHED_NAMES // 2:
                break
            if not folder.disk:
                total -= len(folder.names)
                dropped.add(id(self.folders.pop(rel)))
        self.claims = {key: folder for key, folder in self.claims.items() if id(folder) not in dropped}

    def forget(self, folder: Folder | None = None) -> None:
        """Drop cached knowledge (all of it, or one folder's) after a surprise."""
        if folder is None:
            self.folders.clear()
            self.claims.clear()
            return
        self.folders.pop(folder.rel, None)
        for key in [k for k, v in self.claims.items() if v is folder]:
            del self.claims[key]

    # -- deciding ------------------------------------------------------------------------

    def decide(self, name: Name, series_uid: str, sha256: str, size: int, dev: int, ino: int) -> Decision:
        """Where a file goes: its series folder, echo suffix, and a free name or its duplicate.

        Updates the in-memory picture as if the decision were carried out; if it is not,
        call forget(decision.folder).
        """
        folder = self._series_folder(name.folders, series_uid)
        echo = name.echo or 1
        multi = folder.multi or len(folder.echoes | {echo}) > 1
        renames = []
        if multi:  # the series has more than one echo: its echo-1 files carry "_01"
            for old in sorted(folder.plain):
                match = self._parse(old[: -len(self.suffix)])
                new = self._free(folder, f"{match['stem']}_01{match['dup'] or ''}")
                renames.append((old, new))
                self._rename_in_memory(folder, old, new)
        stem = name.stem
        if name.echo and name.echo > 1:
            stem += f"_{name.echo:02d}"
        elif multi:
            stem += "_01"
        for candidate in _candidates(stem):
            file_name = candidate + self.suffix
            if file_name not in folder.names:
                break
            same = self._same_file(folder, file_name, sha256, size, dev, ino)
            if same:
                return Decision("sorted" if same == "inode" else "duplicate", folder, file_name, renames,
                                already=same == "inode")
        folder.names.add(file_name)
        folder.hashes[file_name] = sha256
        folder.echoes.add(echo)
        folder.multi = multi or len(folder.echoes) > 1
        if not (name.echo and name.echo > 1) and not multi:
            folder.plain.add(file_name)
        return Decision("sorted", folder, file_name, renames)

    def _free(self, folder: Folder, stem: str) -> str:
        for candidate in _candidates(stem):
            if candidate + self.suffix not in folder.names:
                return candidate + self.suffix
        raise AssertionError("unreachable")

    def _rename_in_memory(self, folder: Folder, old: str, new: str) -> None:
        folder.names.discard(old)
        folder.plain.discard(old)
        folder.names.add(new)
        folder.disk[new] = folder.disk.pop(old, old)
        if old in folder.hashes:
            folder.hashes[new] = folder.hashes.pop(old)

    def _series_folder(self, folders: tuple[str, ...], series_uid: str) -> Folder:
        """The folder of this series: the template's, or "<name>_2", "_3"... if that holds another series."""
        key = (folders, series_uid)
        if key in self.claims:
            folder = self.claims[key]
            self.folders[folder.rel] = self.folders.pop(folder.rel, folder)  # used now: kept longest
            return folder
        parent, base = folders[:-1], folders[-1]
        for number in range(1, 10_000):
            rel = (*parent, base if number == 1 else f"{base}_{number}")
            folder = self._folder(rel)
            if folder.series_uid is None or folder.series_uid == series_uid:
                folder.series_uid = series_uid
                self.claims[key] = folder
                return folder
        raise OSError(f"more than 10,000 series share the folder name {base!r}")

    def _folder(self, rel: tuple[str, ...]) -> Folder:
        folder = self.folders.pop(rel, None)  # and put back last: the dict is in order of use
        if folder is None:
            folder = self._load(rel)
        self.folders[rel] = folder
        return folder

    def _load(self, rel: tuple[str, ...]) -> Folder:
        """Read a series folder from disk: its file names, echoes and series."""
        folder = Folder(rel, None)
        fd = self._open(rel)
        if fd < 0:
            return folder
        try:
            with os.scandir(fd) as entries:
                for entry in entries:
                    if entry.name.startswith(".") or not entry.name.endswith(self.suffix):
                        continue
                    if not entry.is_file(follow_symlinks=False):
                        continue
                    folder.names.add(entry.name)
                    match = self._parse(entry.name[: -len(self.suffix)])
                    if match and match["echo"]:
                        folder.echoes.add(int(match["echo"]))
                        # An "_01" file was renamed because a second echo came (perhaps before
                        # a kill stopped that echo from being placed): the series has several.
                        folder.multi |= int(match["echo"]) == 1
                    else:
                        folder.plain.add(entry.name)
                        folder.echoes.add(1)
            if folder.names:
                folder.series_uid = self._series_in(fd, sorted(folder.names))
        finally:
            os.close(fd)
        return folder

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

    def _series_in(self, fd: int, names: list[str]) -> str:
        for name in names:
            try:
                handle = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except OSError:
                continue
            try:
                with open(handle, "rb") as stream:
                    ds = dcmread(stream, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
                return str(ds.get("SeriesInstanceUID", ""))
            except Exception:  # nosec B112  # an unreadable file says nothing of the series; the next may
                continue
        return _FOREIGN

    def _same_file(self, folder: Folder, name: str, sha256: str, size: int, dev: int, ino: int) -> str:
        """"inode" if name is the source itself, "bytes" if it holds the same bytes, else ""."""
        fd = self._open(folder.rel)
        try:
            if fd >= 0:
                try:
                    st = os.stat(folder.disk.get(name, name), dir_fd=fd, follow_symlinks=False)
                except FileNotFoundError:
                    st = None
                if st is not None and (st.st_dev, st.st_ino) == (dev, ino):
                    return "inode"
                if st is not None and st.st_size != size:
                    return ""
            known = folder.hashes.get(name)
            if known is None and fd >= 0:
                known = _hash_at(fd, folder.disk.get(name, name))
                if known:
                    folder.hashes[name] = known
            return "bytes" if known == sha256 else ""
        finally:
            if fd >= 0:
                os.close(fd)

    # -- placing -------------------------------------------------------------------------

    def apply(self, decision: Decision, source: tuple[int, str]) -> list[tuple[str, ...]]:
        """Carry out a decision: make folders, rename echo-1 files, move source into place.

        source is (dir fd, name) of the file to move: the received file itself, or a staged
        copy. Returns the folders it created, below the root.
        """
        for name in decision.rel:
            if not is_safe_component(name):
                raise TreeBlocked(f"refusing the unsafe name {name!r}")
        if decision.outcome == "duplicate" and not decision.renames:
            return []  # nothing to place
        fd, created = make_dirs(self.root_fd, decision.folder.rel, self.dir_mode, self.gid)
        try:
            while decision.renames:  # each one done is dropped: a retry does not redo it
                old, new = decision.renames[0]
                move_noreplace(fd, decision.folder.disk.pop(new, old), fd, new, self.device)
                decision.renames.pop(0)
                failpoints.hit("renamed")
                log.info("renamed %s -> %s: the series has several echoes", self.path((*decision.folder.rel, old)), new)
            if decision.outcome == "sorted" and not decision.already:
                move_noreplace(source[0], source[1], fd, decision.name, self.device)
        finally:
            os.close(fd)
        return created

    def sync(self, folders: set[tuple[str, ...]]) -> None:
        """fsync these folders (and so the names placed in them) before sources are removed."""
        for rel in sorted(folders, key=len, reverse=True):
            fd = self._open(rel)
            if fd >= 0:
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)


def _candidates(stem: str) -> Iterator[str]:
    """stem, then DcmServer's "A" for different content at a taken name, then A2, A3..."""
    yield stem
    yield stem + "A"
    for number in range(2, 100_000):
        yield f"{stem}A{number}"


def _hash_at(dir_fd: int, name: str) -> str | None:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return None
    with open(fd, "rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()

