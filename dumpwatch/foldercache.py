"""What dumpwatch knows of the sorted tree's series folders: read from disk, kept while true.

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

import os

from pydicom.datadict import keyword_dict

from dumpwatch.dicomfile import Header, read_prefix
from dumpwatch.folder import Folder, Known, folder_number, own_folder, series_owner
from dumpwatch.fsops import TreeBlocked, open_dir
from dumpwatch.identity import Placed, same_data_set
from dumpwatch.naming import Template, echo_number, friendly_name, header_text

# File names of sorted series kept in memory at most (with what their headers said, about
# 1 KB each: 20 MB); beyond, the folders used longest ago are read again from disk when needed.
CACHED_NAMES = 20_000


class FolderCache:
    """Pictures of the series folders below root_fd (which the caller owns and closes), and
    which folder each series was given (its claim), in order of use."""

    def __init__(self, root_fd: int, suffix: str, template: Template, dry_run: bool):
        self.root_fd, self.suffix, self.template, self.dry_run = root_fd, suffix, template, dry_run
        # What is read of each file in a series folder: enough to name it as the template does.
        keywords = {k for part in template.components[-1] if not isinstance(part, str) for k in [part.keyword]}
        keywords |= {"SOPInstanceUID", "SeriesInstanceUID", "InstanceNumber", "EchoNumbers"}
        self.wanted = frozenset(keyword_dict[k] for k in keywords)
        self.folders: dict[tuple[str, ...], Folder] = {}
        self.claims: dict[tuple[tuple[str, ...], str], Folder] = {}

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

    def trim(self) -> None:
        """Beyond CACHED_NAMES file names, forget the folders used longest ago, so that memory
        does not grow with the tree. A forgotten folder is read again from disk when a file
        comes for it."""
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

    def series_folder(self, folders: tuple[str, ...], series_uid: str) -> Folder:
        """The folder of this series: the template's, or "<name>_2", "_3"... if that holds another series."""
        key = (folders, series_uid)
        claimed = self.claims.get(key)
        if claimed is not None:
            folder = self.folder(claimed.rel)  # as it is on disk now
            if folder.series_uid == series_uid:
                self.claims[key] = folder
                return folder
            self.claims.pop(key, None)  # emptied, removed or replaced by hand since: look again
        parent, base = folders[:-1], folders[-1]
        folder = own_folder(series_uid, base, self._last_number(parent, base),
                            lambda name: self._readable((*parent, name)))
        folder.series_uid = series_uid
        self.claims[key] = folder
        return folder

    def _readable(self, rel: tuple[str, ...]) -> Folder | None:
        try:
            return self.folder(rel)
        except (TreeBlocked, PermissionError):
            return None  # a symlink, a file or a folder it may not read: taken, and not ours

    def _last_number(self, parent: tuple[str, ...], base: str) -> int:
        """The highest N of the folders "<base>" (1) and "<base>_N" in parent on disk (0: none)."""
        fd = open_below(self.root_fd, parent)
        if fd < 0:
            return 0
        last = 0
        try:
            with os.scandir(fd) as entries:
                for entry in entries:
                    last = max(last, folder_number(entry.name, base) or 0)
        finally:
            os.close(fd)
        return last

    def folder(self, rel: tuple[str, ...]) -> Folder:
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
        fd = open_below(self.root_fd, rel)
        if fd < 0:
            return Folder(rel, None)
        try:
            return read_folder(fd, rel, self.suffix, self.wanted, self.template)
        finally:
            os.close(fd)

    def twin(self, folder: Folder, sop_uid: str, source: Placed, body_size: int,
             dev: int, ino: int) -> tuple[str, str, Known] | None:
        """(name, "inode") if a file of this instance in the folder is the source itself,
        (name, "bytes") if one holds the same data set now, else None."""
        names = folder.by_uid.get(sop_uid)
        if not names:
            return None
        fd = open_below(self.root_fd, folder.rel)
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
                    folder.drop(name)
                    continue
                if (st.st_dev, st.st_ino) == (dev, ino):
                    return name, "inode", known
                if (st.st_ino, st.st_size, st.st_ctime_ns) != (known.ino, known.size, known.ctime_ns):
                    found = self._reread(folder, fd, name)  # changed since it was read
                    if found is None or found.sop_uid != sop_uid:
                        continue
                    known = found
                if known.body_size != body_size:
                    continue
                there = Placed(fd, folder.disk.get(name, name), (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
                if same_data_set(there, source):
                    return name, "bytes", known
        finally:
            if fd >= 0:
                os.close(fd)
        return None

    def _reread(self, folder: Folder, fd: int, name: str) -> Known | None:
        folder.drop(name)
        folder.taken.add(name)
        header = read_prefix(fd, folder.disk.get(name, name), self.wanted)
        if header is None:
            return None
        known = known_of(header)
        if known is not None:
            folder.add(name, known)
        return known


def read_folder(fd: int, rel: tuple[str, ...], suffix: str, wanted: frozenset[int], template: Template) -> Folder:
    """The picture of the series folder open at fd: every name in it, and the header of each file."""
    folder = Folder(rel, None)
    st = os.fstat(fd)
    folder.stamp = (st.st_dev, st.st_ino, st.st_mtime_ns)
    series: list[str | None] = []
    with os.scandir(fd) as entries:
        for entry in entries:
            folder.taken.add(entry.name)
            if entry.name.startswith(".") or not entry.name.endswith(suffix):
                continue
            if not entry.is_file(follow_symlinks=False):
                continue
            header = read_prefix(fd, entry.name, wanted)
            known = None if header is None else known_of(header)
            if header is None or known is None:
                series.append(None)  # a file dumpwatch cannot read says nothing of the series
                continue
            folder.add(entry.name, known)
            series.append((header_text(header.ds, "SeriesInstanceUID") or "").strip(" \0"))
            folder.note_name(entry.name, friendly_name(header.ds, template).stem, suffix, known.echo)
    folder.series_uid = series_owner(series)
    folder.multi = folder.multi or len(folder.echoes) > 1
    return folder


def known_of(header: Header) -> Known | None:
    """What a file's header says of it; None if it names no instance."""
    try:
        sop_uid = (header_text(header.ds, "SOPInstanceUID") or "").strip(" \0")
        if not sop_uid:
            return None
        st = header.st
        return Known(st.st_ino, st.st_ctime_ns, st.st_size, sop_uid, echo_number(header.ds) or 1, header.body_size)
    except Exception:  # a value a hand wrote that cannot be decoded: the file says nothing
        return None


def open_below(root_fd: int, rel: tuple[str, ...]) -> int:
    """An fd for an existing folder below root_fd, or -1 if it does not exist (or root_fd is -1)."""
    if root_fd < 0:
        return -1
    fd = os.dup(root_fd)
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
