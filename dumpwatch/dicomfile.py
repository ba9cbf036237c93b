"""Reading one received file: its bytes, its hash, its header, and proof that it is whole;
and the first elements of a file in the sorted tree.

pydicom reads a truncated file without complaint, so every file is also walked element by
element, by declared lengths, to its end (elements.py). That walk also picks out the few
elements that name the file, so the usual file needs no full parse: pydicom converts just
those values. Anything the walk does not expect (deflate, a damaged sequence) goes to
pydicom's full reader, whose verdict stands.
"""

from __future__ import annotations

import errno
import hashlib
import io
import mmap
import os
import stat
import zlib
from dataclasses import dataclass

from pydicom import dcmread
from pydicom.dataset import Dataset

from dumpwatch.elements import (
    ALWAYS,
    DEFLATED,
    Unexpected,
    Walker,
    as_elements,
    check_complete,
    data_set_encoding,
    meta_end,
    read_file_meta,
    scan,
)
from dumpwatch.errors import Incomplete, Rejected

IN_MEMORY_MAX = 64 * 1024 * 1024  # larger files are hashed in chunks and walked through mmap
# A deflated data set may inflate 1,000-fold (1.5 MB to 1.5 GiB), and pydicom holds it inflated
# and its elements at once: a worker peaked at 2.1 times the inflated size (read once), 5.2 GB
# for such a bomb when read twice. Beyond this, a file is rejected before pydicom reads it, so
# one deflated file costs a worker about 550 MB at most.
INFLATED_MAX = 256 * 1024 * 1024


class NotRegular(Rejected):
    """A symlink, FIFO, socket, device or folder where a file was expected."""


@dataclass
class DicomFile:
    """A received file, read once: checked whole, its header (or the part asked for) parsed."""

    path: str
    fd: int  # open for reading until close()
    st: os.stat_result
    size: int
    sha256: str
    ds: Dataset  # header elements, never the pixel data
    tail: int  # where the full header read stopped (the pixel data element), 0 after a walk
    data: bytes | None  # the whole file when it is small enough to hold in memory
    complete_header: bool  # ds holds every header element (else only those asked for)
    trailing: bool = False  # elements follow the pixel data (a digital signature, padding)
    body_size: int = 0  # bytes after the file meta group (its data-set identity is taken only
    # when the tree holds a file of the same instance: see identity.identity_at())

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def full_header(self) -> Dataset:
        """The whole header, parsed by pydicom (read again if only a part was asked for)."""
        if not self.complete_header:
            with self._stream() as stream:
                self.ds, self.tail = _parse_header(stream, self.size)
            self.complete_header = True
        return self.ds

    def whole(self) -> Dataset:
        """Every element, pixel data included: for a rewrite that cannot copy the tail as is."""
        if self.tail < self.size:
            with self._stream() as stream:
                self.ds = dcmread(stream)
            self.tail = self.size
            self.complete_header = True
        return self.ds

    def _stream(self) -> io.IOBase:
        if self.data is not None:
            return io.BytesIO(self.data)
        return io.BufferedReader(FileAt(self.fd), 1 << 20)


class FileAt(io.RawIOBase):
    """A read-only stream over an open descriptor that keeps its own position.

    It reads with pread, which never moves the descriptor's offset: a stream made with
    open(os.dup(fd)) shares that offset with every other one, so each read began where the
    last reader (the hash, say) had stopped, at the end of the file. Closing it leaves the
    descriptor open: its owner closes that.
    """

    def __init__(self, fd: int):
        super().__init__()
        self.fd = fd
        self.name = fd  # as open(fd) names its stream; pydicom asks
        self.position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        done = os.preadv(self.fd, [buffer], self.position)
        self.position += done
        return done

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_CUR:
            offset += self.position
        elif whence == os.SEEK_END:
            offset += os.fstat(self.fd).st_size
        if offset < 0:
            raise OSError(errno.EINVAL, "negative seek position")
        self.position = offset
        return offset

    def tell(self) -> int:
        return self.position


def open_regular(path: str) -> tuple[int, os.stat_result]:
    """Open a file for reading without following a symlink or blocking on a FIFO."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        try:
            fd = os.open(path, flags | os.O_NOATIME)  # reading must not write an access time
        except PermissionError:  # O_NOATIME is for the file's owner only
            fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise NotRegular("a symbolic link: not followed") from None
        if exc.errno == errno.ENXIO:  # a socket
            raise NotRegular("a socket, not a file") from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise NotRegular(f"{_kind(st.st_mode)}, not a file")
    return fd, st


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def open_tree_file(dir_fd: int, name: str) -> tuple[int, os.stat_result] | None:
    """A regular file in a folder of the tree, opened for reading (never through a symlink,
    never blocking on a FIFO): (fd, its stat), or None."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size < 132:
        os.close(fd)
        return None
    return fd, st


def read_dicom(path: str, wanted: frozenset[int] | None = None) -> DicomFile:
    """Read path once and prove it whole. Raises Rejected, Incomplete or OSError.

    With `wanted` (tags), only those header elements are kept, found by the walk; without,
    pydicom parses the whole header (to anonymise it, say).
    """
    fd, st = open_regular(path)
    try:
        data: bytes | None
        if st.st_size <= IN_MEMORY_MAX:
            data = _read_all(fd, st.st_size)
            size = len(data)
            digest = hashlib.sha256(data).hexdigest()
            buffer: bytes | mmap.mmap = data
        else:
            data = None
            with FileAt(fd) as file:
                digest = hashlib.file_digest(file, "sha256").hexdigest()
                size = file.tell()
            buffer = mmap.mmap(fd, 0, access=mmap.ACCESS_READ) if size else b""
        try:
            _check_start(buffer, size)
            found = meta_end(buffer, size)
            body = size - (found[0] if found else 0)
            if wanted is not None:
                try:
                    ds = scan(buffer, size, wanted)
                    return DicomFile(path, fd, st, size, digest, ds, 0, data, False, False, body)
                except Unexpected:
                    pass
            try:
                _, position, ts = read_file_meta(buffer, size)
                encoding: tuple[bool, bool] | None = data_set_encoding(buffer, size, position, ts)
            except Unexpected:
                if DEFLATED.encode() in buffer[132 : min(size, 1 << 16)]:  # unbounded in pydicom
                    raise Rejected("a file meta that cannot be read, naming the deflated transfer syntax") from None
                encoding, ts = None, ""  # pydicom's reader judges the file meta
            if ts == DEFLATED:
                _check_inflated(buffer, size, position)
            stream = io.BytesIO(data) if data is not None else io.BufferedReader(FileAt(fd), 1 << 20)
            with stream:
                ds, tail = _parse_header(stream, size, deflated=ts == DEFLATED)
            if encoding is not None:  # as the data set is, not as its file meta says
                ds.set_original_encoding(*encoding, ds.original_character_set)
            trailing = check_complete(ds, size, buffer)
            return DicomFile(path, fd, st, size, digest, ds, tail, data, True, trailing, body)
        finally:
            if isinstance(buffer, mmap.mmap):
                buffer.close()
    except BaseException:
        os.close(fd)
        raise


def _read_all(fd: int, size: int) -> bytes:
    """The whole file; read in one call when its size is right (one more byte shows growth)."""
    chunks: list[bytes] = []
    while chunk := os.read(fd, max(size + 1, 1 << 16) if not chunks else 1 << 20):
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _check_start(buffer, size: int) -> None:
    if size == 0:
        raise Incomplete("empty file (0 bytes)")
    if size < 132:
        if buffer[:size].count(0) == size:  # storescp starts every file with 128 zero bytes
            raise Incomplete(f"only {size} bytes: too short for a DICOM file")
        raise Rejected(f"not a DICOM file (only {size} bytes)")
    if buffer[128:132] != b"DICM":
        raise Rejected("not a DICOM file (no 'DICM' marker at byte 128)")


def _parse_header(stream: io.IOBase, size: int, deflated: bool = False) -> tuple[Dataset, int]:
    try:
        # Deflate compresses the whole data set: no byte offset separates header and pixel
        # data, so read all of it (a rewrite writes all of it), and once: pydicom inflates all
        # of it for each read.
        if deflated:
            return dcmread(stream), size
        ds = dcmread(stream, stop_before_pixels=True)
        if ds.file_meta.get("TransferSyntaxUID", "") == DEFLATED:
            stream.seek(0)
            return dcmread(stream), size
    except Exception as exc:  # pydicom raises many kinds for a damaged header
        damaged_zlib = isinstance(exc, zlib.error) and "truncated" not in str(exc)
        if stream.tell() >= size - 8 and not damaged_zlib:
            raise Incomplete(f"the file ends inside the header ({size} bytes)") from None
        raise Rejected(f"unreadable DICOM header: {_one_line(exc)}") from None
    return ds, stream.tell()


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:200]


@dataclass
class Header:
    """The first elements of a file in the sorted tree, read without walking the rest."""

    st: os.stat_result
    ds: Dataset
    body_size: int  # bytes after the file meta group


PREFIX = 16 * 1024  # most headers' early elements fit; else more is read


def read_prefix(dir_fd: int, name: str, wanted: frozenset[int]) -> Header | None:
    """The wanted top-level elements of a file, walked only as far as the last of them
    (a series folder's files are read to learn their series, instance and echo: the
    per-frame sequences of an enhanced multi-frame file come later and are never parsed).
    None if it is not a regular DICOM file that can be read."""
    opened = open_tree_file(dir_fd, name)
    if opened is None:
        return None
    fd, st = opened
    try:
        # Read, not mapped (see identity.identity_at); more of the file when the wanted elements lie
        # further in, and pydicom's reader for what the walk does not expect.
        for length in (PREFIX, 1 << 20, 1 << 24):
            data = os.pread(fd, length, 0)
            try:
                return _prefix_of(st, data, len(data) >= st.st_size, wanted)
            except Incomplete:
                if len(data) >= st.st_size:
                    return None
            except Unexpected:
                break
        with FileAt(fd) as raw, io.BufferedReader(raw, 1 << 20) as stream:
            ds = dcmread(stream, stop_before_pixels=True, specific_tags=sorted(wanted | ALWAYS))
        found = meta_end(os.pread(fd, PREFIX, 0), min(st.st_size, PREFIX))
        return Header(st, ds, st.st_size - (found[0] if found else 0))
    except Exception:  # a file in the tree that cannot be read is nobody's series, no one's twin
        return None
    finally:
        os.close(fd)


def _prefix_of(st: os.stat_result, buffer, whole: bool, wanted: frozenset[int]) -> Header | None:
    size = len(buffer)
    if buffer[128:132] != b"DICM":
        return None
    found = meta_end(buffer, size)
    if found is None:
        raise Unexpected()
    start, syntax = found
    if syntax == DEFLATED:
        raise Unexpected()  # pydicom's reader inflates it
    implicit, little = data_set_encoding(buffer, size, start, syntax)
    walker = Walker(buffer, size, implicit, little)
    wanted = wanted | ALWAYS
    values, _ = walker.walk(start, wanted, stop_after=max(wanted))
    if not whole and not walker.stopped:
        raise Incomplete("the wanted elements may lie beyond the part read")
    ds = Dataset(as_elements(values))
    ds.set_original_encoding(implicit, little, None)
    return Header(st, ds, st.st_size - start)


def _check_inflated(buffer, size: int, position: int) -> None:
    """A deflated data set is whole when its zlib stream reaches its end, and may not inflate
    beyond INFLATED_MAX. Checked before pydicom reads it (pydicom inflates all of it in memory),
    in chunks whose output is bounded too: a chunk of a deflate bomb inflates 1,000-fold."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    inflated = 0
    pending = b""
    while not inflater.eof:
        if not pending:
            if position >= size:
                raise Incomplete(f"the deflated data set is cut short ({size} bytes)")
            pending = buffer[position : position + (1 << 20)]
            position += len(pending)
        try:
            inflated += len(inflater.decompress(pending, 1 << 20))
        except zlib.error as exc:
            raise Rejected(f"unreadable DICOM header: {_one_line(exc)}") from None
        pending = inflater.unconsumed_tail
        if inflated > INFLATED_MAX:
            raise Rejected(f"the deflated data set inflates to more than {INFLATED_MAX >> 20} MiB")
