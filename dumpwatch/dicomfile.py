"""Reading one received file: its bytes, its hash, its header, and proof that it is whole.

pydicom reads a truncated file without complaint, so every file is also walked element by
element, by declared lengths, to its end. That walk also picks out the few elements that
name the file, so the usual file needs no full parse: pydicom converts just those values.
Anything the walk does not expect (deflate, a damaged sequence) goes to pydicom's full
reader, whose verdict stands.
"""

from __future__ import annotations

import errno
import hashlib
import io
import mmap
import os
import stat
import struct
import zlib
from dataclasses import dataclass

from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import BaseTag
from pydicom.uid import UID

from dumpwatch.errors import Incomplete, Rejected

IN_MEMORY_MAX = 64 * 1024 * 1024  # larger files are hashed in chunks and walked through mmap
# A deflated data set may inflate 1,000-fold (1.5 MB to 1.5 GiB), and pydicom holds it inflated
# and its elements at once: a worker peaked at 2.1 times the inflated size (read once), 5.2 GB
# for such a bomb when read twice. Beyond this, a file is rejected before pydicom reads it, so
# one deflated file costs a worker about 550 MB at most.
INFLATED_MAX = 256 * 1024 * 1024
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV", b"UV"}
_PIXEL_TAGS = {0x7FE00010, 0x7FE00008, 0x7FE00009}  # PixelData, FloatPixelData, DoubleFloatPixelData
_SPECTROSCOPY_DATA = 0x56000020
_ALWAYS = frozenset({0x00080005, 0x00080016})  # SpecificCharacterSet, SOPClassUID
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
_IMPLICIT_LE, _EXPLICIT_BE, _DEFLATED = "1.2.840.10008.1.2", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"


class NotRegular(Rejected):
    """A symlink, FIFO, socket, device or folder where a file was expected."""


class _Unexpected(Exception):
    """The walk met something only pydicom's full reader should judge."""


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
    # when the tree holds a file of the same instance: see identity_at())

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


def read_dicom(path: str, wanted: frozenset[int] | None = None) -> DicomFile:
    """Read path once and prove it whole. Raises Rejected, Incomplete or OSError.

    With `wanted` (tags), only those header elements are kept, found by the walk; without,
    pydicom parses the whole header (to anonymise it, say).
    """
    fd, st = open_regular(path)
    try:
        if st.st_size <= IN_MEMORY_MAX:
            data: bytes | None = _read_all(fd, st.st_size)
            size = len(data)
            digest = hashlib.sha256(data).hexdigest()
            buffer: bytes | mmap.mmap = data
        else:
            data = None
            with FileAt(fd) as stream:
                digest = hashlib.file_digest(stream, "sha256").hexdigest()
                size = stream.tell()
            buffer = mmap.mmap(fd, 0, access=mmap.ACCESS_READ) if size else b""
        try:
            _check_start(buffer, size)
            found = meta_end(buffer, size)
            body = size - (found[0] if found else 0)
            if wanted is not None:
                try:
                    ds = scan(buffer, size, wanted)
                    return DicomFile(path, fd, st, size, digest, ds, 0, data, False, False, body)
                except _Unexpected:
                    pass
            try:
                _, position, ts = _file_meta(buffer, size)
                encoding: tuple[bool, bool] | None = data_set_encoding(buffer, size, position, ts)
            except _Unexpected:
                if _DEFLATED.encode() in buffer[132 : min(size, 1 << 16)]:  # unbounded in pydicom
                    raise Rejected("a file meta that cannot be read, naming the deflated transfer syntax") from None
                encoding, ts = None, ""  # pydicom's reader judges the file meta
            if ts == _DEFLATED:
                _check_inflated(buffer, size, position)
            stream = io.BytesIO(data) if data is not None else io.BufferedReader(FileAt(fd), 1 << 20)
            with stream:
                ds, tail = _parse_header(stream, size, deflated=ts == _DEFLATED)
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
    chunks = []
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
        if ds.file_meta.get("TransferSyntaxUID", "") == _DEFLATED:
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


# -- identity ------------------------------------------------------------------------------


def meta_end(buffer, size: int) -> tuple[int, str] | None:
    """(where the data set starts, its transfer syntax UID) from the file meta group
    (0002,xxxx), always Explicit VR Little Endian; None if it cannot be read."""
    position, syntax = 132, None
    while position + 8 <= size:
        group, element, vr = struct.unpack_from("<HH2s", buffer, position)
        if group != 0x0002:
            break
        if vr in _LONG_VRS:
            if position + 12 > size:
                return None
            length, value_at = struct.unpack_from("<L", buffer, position + 8)[0], position + 12
        else:
            length, value_at = struct.unpack_from("<H", buffer, position + 6)[0], position + 8
        if length == _UNDEFINED or value_at + length > size:
            return None
        if element == 0x0010:
            syntax = bytes(buffer[value_at : value_at + length]).rstrip(b"\0 ").decode("ascii", "replace")
        position = value_at + length
    if syntax is None:
        return None
    return position, syntax


def data_set_identity(buffer, size: int) -> tuple[str, int]:
    """What makes two files the same instance: the bytes of the data set, in its transfer
    syntax. A PACS that re-sends an image rewrites only its file meta (group 0002: the
    sender's AE title, its implementation version, the group's length), so the file meta
    is left out. Returns (hex digest, bytes of data set); a file whose meta cannot be read
    is identified by all of its bytes."""
    found = meta_end(buffer, size)
    start, syntax = found if found else (0, "")
    digest = hashlib.sha256(syntax.encode("ascii", "replace") + b"\0")
    view = memoryview(buffer)
    for offset in range(start, size, 1 << 24):
        digest.update(view[offset : min(size, offset + (1 << 24))])
    view.release()
    return digest.hexdigest(), size - start


def _open_tree_file(dir_fd: int, name: str) -> tuple[int, os.stat_result] | None:
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


def identity_at(dir_fd: int, name: str, expect: tuple[int, int, int, int] | None = None) -> tuple[str, int] | None:
    """data_set_identity() of a file in a folder (never through a symlink); None if it is
    not a regular file or cannot be read, or (with expect) if its (st_dev, st_ino, st_size,
    st_mtime_ns) are not those. Read, not mapped: a file in the tree that a hand truncates
    meanwhile must give an error here, not a SIGBUS that ends the process."""
    opened = _open_tree_file(dir_fd, name)
    if opened is None:
        return None
    fd, st = opened
    try:
        if expect is not None and (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != expect:
            return None
        head = os.pread(fd, _PREFIX, 0)
        found = meta_end(head, len(head))
        start, syntax = found if found else (0, "")
        digest = hashlib.sha256(syntax.encode("ascii", "replace") + b"\0")
        offset = start
        while chunk := os.pread(fd, 1 << 20, offset):
            digest.update(chunk)
            offset += len(chunk)
        return digest.hexdigest(), offset - start
    except OSError:
        return None
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Placed:
    """Where the bytes of one file can be read to compare its data set with another's: a
    name in a folder, proven by (st_dev, st_ino, st_size, st_mtime_ns) when `expect` is
    given; or, for bytes that exist only in memory (a dry run that rewrites a header), only
    their data_set_identity()."""

    dir_fd: int
    name: str
    expect: tuple[int, int, int, int] | None = None
    identity: str | None = None


def same_data_set(a: Placed, b: Placed) -> bool | None:
    """Do a and b hold the same data set in the same transfer syntax (a re-send: the file
    meta may differ)? None if either cannot be read, or is not the file `expect` names.

    Compared byte by byte, not by digests: reading both from the page cache and comparing
    them costs a fraction of hashing either, and proves more."""
    if a.identity is not None or b.identity is not None:
        known, other = (a, b) if a.identity is not None else (b, a)
        if other.identity is not None:
            return known.identity == other.identity
        found = identity_at(other.dir_fd, other.name, other.expect)
        return None if found is None else found[0] == known.identity
    fds = []
    try:
        for side in (a, b):
            opened = _open_tree_file(side.dir_fd, side.name)
            if opened is None:
                return None
            fds.append(opened[0])
            st = opened[1]
            if side.expect is not None and (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != side.expect:
                return None
        heads = [os.pread(fd, _PREFIX, 0) for fd in fds]
        metas = [meta_end(head, len(head)) or (0, "") for head in heads]
        if metas[0][1] != metas[1][1]:
            return False
        offsets = [meta[0] for meta in metas]
        while True:
            # 64 KiB at a time: a chunk of 1 MiB is mapped afresh for each read and took
            # three times as long.
            chunks = [os.pread(fd, 1 << 16, offset) for fd, offset in zip(fds, offsets, strict=True)]
            if chunks[0] != chunks[1]:
                return False
            if not chunks[0]:
                return True
            offsets = [offset + len(chunks[0]) for offset in offsets]
    except OSError:
        return None
    finally:
        for fd in fds:
            os.close(fd)


@dataclass
class Header:
    """The first elements of a file in the sorted tree, read without walking the rest."""

    st: os.stat_result
    ds: Dataset
    body_size: int  # bytes after the file meta group


_PREFIX = 16 * 1024  # most headers' early elements fit; else more is read


def read_prefix(dir_fd: int, name: str, wanted: frozenset[int]) -> Header | None:
    """The wanted top-level elements of a file, walked only as far as the last of them
    (a series folder's files are read to learn their series, instance and echo: the
    per-frame sequences of an enhanced multi-frame file come later and are never parsed).
    None if it is not a regular DICOM file that can be read."""
    opened = _open_tree_file(dir_fd, name)
    if opened is None:
        return None
    fd, st = opened
    try:
        # Read, not mapped (see identity_at); more of the file when the wanted elements lie
        # further in, and pydicom's reader for what the walk does not expect.
        for length in (_PREFIX, 1 << 20, 1 << 24):
            data = os.pread(fd, length, 0)
            try:
                return _prefix_of(st, data, len(data) >= st.st_size, wanted)
            except Incomplete:
                if len(data) >= st.st_size:
                    return None
            except _Unexpected:
                break
        with FileAt(fd) as raw, io.BufferedReader(raw, 1 << 20) as stream:
            ds = dcmread(stream, stop_before_pixels=True, specific_tags=sorted(wanted | _ALWAYS))
        found = meta_end(os.pread(fd, _PREFIX, 0), min(st.st_size, _PREFIX))
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
        raise _Unexpected()
    start, syntax = found
    if syntax == _DEFLATED:
        raise _Unexpected()  # pydicom's reader inflates it
    implicit, little = data_set_encoding(buffer, size, start, syntax)
    walker = _Walker(buffer, size, implicit, little)
    wanted = wanted | _ALWAYS
    values, _ = walker.walk(start, wanted, stop_after=max(wanted))
    if not whole and not walker.stopped:
        raise Incomplete("the wanted elements may lie beyond the part read")
    ds = Dataset(values)
    ds.set_original_encoding(implicit, little, None)
    return Header(st, ds, st.st_size - start)


# -- the walk ------------------------------------------------------------------------------


def scan(buffer, size: int, wanted: frozenset[int]) -> Dataset:
    """Walk the whole file by declared lengths; return a Dataset of the wanted elements.

    Raises Incomplete if the file is shorter than it declares, Rejected if its data set is
    not encoded as its file meta says, _Unexpected for anything the full reader should look
    at instead.
    """
    meta, position, ts = _file_meta(buffer, size)
    if ts == _DEFLATED:
        raise _Unexpected()
    implicit, little = data_set_encoding(buffer, size, position, ts)
    walker = _Walker(buffer, size, implicit, little)
    found, seen = walker.walk(position, wanted | _ALWAYS)
    if not seen:
        raise Incomplete("no data set after the file meta information")
    ds = Dataset(found)
    ds.file_meta = FileMetaDataset(meta)
    ds.set_original_encoding(implicit, little, None)
    _check_object(ds.file_meta, seen, ds)
    return ds


def _file_meta(buffer, size: int) -> tuple[dict[int, RawDataElement], int, str]:
    """The file meta's elements, where the data set starts, and the transfer syntax named.

    Raises _Unexpected for a file meta the walk cannot follow.
    """
    meta: dict[int, RawDataElement] = {}
    walker = _Walker(buffer, size, implicit=False, little=True)
    position = 132
    while position + 8 <= size and struct.unpack_from("<H", buffer, position)[0] == 0x0002:
        tag, vr, value_at, length = walker.element(position)
        if length == _UNDEFINED or value_at + length > size:
            raise _Unexpected()
        value = bytes(buffer[value_at : value_at + length])
        meta[tag] = RawDataElement(BaseTag(tag), vr.decode("ascii"), length, value, value_at, False, True)
        position = value_at + length
    syntax = meta.get(0x00020010)
    if syntax is None or position >= size:
        raise _Unexpected()
    return meta, position, syntax.value.rstrip(b"\0 ").decode("ascii", "replace")


_ENCODINGS = {(True, True): "Implicit VR Little Endian", (False, True): "Explicit VR Little Endian",
              (False, False): "Explicit VR Big Endian", (True, False): "implicit VR in big endian byte order"}


def data_set_encoding(buffer, size: int, position: int, ts: str) -> tuple[bool, bool]:
    """(implicit VR, little endian) of the data set at position, as its first element shows it.

    A file meta may name the wrong transfer syntax. Explicit or implicit VR shows in the first
    element's VR: pydicom reads such a data set as it is, and so does the walk; but pydicom's
    original_encoding keeps what the meta said. The byte order shows in the first group: a data
    set begins in a low group (0008, most often), and a group above 00FF that is below it read
    the other way round was written in the other byte order. No reader reads that as it is,
    nor a data set deflated or not against what the meta says: Rejected, saying so.
    """
    implicit, little = ts == _IMPLICIT_LE, ts != _EXPLICIT_BE
    if position + 8 > size:  # not one whole element header (a cut, maybe in the meta): the walk says so
        return implicit, little
    explicit = _looks_explicit(buffer, position, size)
    named, other = ("<H", ">H") if little else (">H", "<H")
    group, swapped = struct.unpack_from(named, buffer, position)[0], struct.unpack_from(other, buffer, position)[0]
    if ts == _DEFLATED:
        if min(group, swapped) <= 0xFF and not _inflates(buffer, position, size):
            actual = _ENCODINGS[(not explicit, group <= 0xFF)]
            raise Rejected(_mislabelled(ts, f"not deflated: it is encoded as {actual}"))
        return implicit, little
    if group > 0xFF >= swapped:
        raise Rejected(_mislabelled(ts, f"encoded as {_ENCODINGS[(not explicit, not little)]}"))
    if min(group, swapped) > 0xFF and _inflates(buffer, position, size):
        raise Rejected(_mislabelled(ts, f"deflated ({UID(_DEFLATED).name})"))
    return not explicit, little


def _inflates(buffer, position: int, size: int) -> bool:
    """True if a raw deflate stream starts at position and begins a data set (a low group, a VR)."""
    try:
        start = zlib.decompressobj(-zlib.MAX_WBITS).decompress(buffer[position : min(size, position + 4096)], 6)
    except zlib.error:
        return False
    return len(start) == 6 and struct.unpack_from("<H", start)[0] <= 0xFF and _looks_explicit(start, 0, 6)


def _mislabelled(ts: str, actual: str) -> str:
    name = UID(ts).name
    named = f"{name} ({ts})" if name != ts else ts
    return f"the file meta names transfer syntax {named}, but the data set is {actual}"


def _looks_explicit(buffer, position: int, size: int) -> bool:
    vr = buffer[position + 4 : position + 6]
    return len(vr) == 2 and 65 <= vr[0] <= 90 and 65 <= vr[1] <= 90


def _check_object(file_meta: Dataset, seen: set[int], ds: Dataset) -> None:
    """Image objects need pixel data, spectroscopy objects their data: catches a cut between elements."""
    sop_class = UID(str(file_meta.get("MediaStorageSOPClassUID", "") or ds.get("SOPClassUID", "")))
    name = sop_class.name if sop_class.is_valid else ""
    if "Image Storage" in name and not seen & _PIXEL_TAGS:
        raise Incomplete(f"{name} without pixel data: the file ends before the image")
    if name == "MR Spectroscopy Storage" and _SPECTROSCOPY_DATA not in seen:
        raise Incomplete("MR Spectroscopy Storage without SpectroscopyData: the file ends early")


def check_complete(ds: Dataset, size: int, buffer) -> bool:
    """After pydicom's read: walk on from the last element it parsed to the end of the file.

    Returns True if elements other than the pixel data follow the header.
    """
    if not len(ds):
        raise Incomplete("no data set after the file meta information")
    if ds.file_meta.get("TransferSyntaxUID", "") == _DEFLATED:
        return False  # whole: _check_inflated saw its zlib stream end, before pydicom read it
    implicit, little = ds.original_encoding
    last = ds.get_item(next(reversed(ds.keys())))
    value_at = getattr(last, "value_tell", None)
    if value_at is None:
        value_at = last.file_tell
    header = 8 if implicit or last.VR.encode() not in _LONG_VRS else 12
    walker = _Walker(buffer, size, implicit, little)
    try:
        _, seen = walker.walk(value_at - header, frozenset())
    except _Unexpected:
        raise Rejected("damaged element structure after the header") from None
    _check_object(ds.file_meta, seen | set(ds.keys()), ds)
    return bool(seen - set(ds.keys()) - _PIXEL_TAGS)


class _Walker:
    """Steps over raw elements by their declared lengths, reading values only when asked."""

    def __init__(self, buffer, size: int, implicit: bool, little: bool):
        self.buffer, self.size, self.implicit = buffer, size, implicit
        endian = "<" if little else ">"
        self.little = little
        self.tag_len = struct.Struct(endian + "HHL")
        self.explicit = struct.Struct(endian + "HH2sH")
        self.long = struct.Struct(endian + "L")
        self.stopped = False  # walk() stopped past stop_after, before the end

    def element(self, position: int, implicit: bool | None = None) -> tuple[int, bytes | None, int, int]:
        """(tag, VR or None, value position, length) of the element at position."""
        if position + 8 > self.size:
            raise Incomplete(f"the file ends inside an element header at byte {position} ({self.size} bytes)")
        if self.implicit if implicit is None else implicit:
            group, element, length = self.tag_len.unpack_from(self.buffer, position)
            return group << 16 | element, None, position + 8, length
        group, element, vr, length = self.explicit.unpack_from(self.buffer, position)
        if group == 0xFFFE:  # items and delimiters carry no VR
            group, element, length = self.tag_len.unpack_from(self.buffer, position)
            return group << 16 | element, None, position + 8, length
        if vr in _LONG_VRS:
            if position + 12 > self.size:
                raise Incomplete(f"the file ends inside an element header at byte {position} ({self.size} bytes)")
            return group << 16 | element, vr, position + 12, self.long.unpack_from(self.buffer, position + 8)[0]
        if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
            raise _Unexpected()  # not a VR: the encoding changed under us
        return group << 16 | element, vr, position + 8, length

    def walk(self, position: int, wanted: frozenset[int],
             stop_after: int = 0xFFFFFFFF) -> tuple[dict[int, RawDataElement], set[int]]:
        """Walk top-level elements to the end of the file (or past the tag stop_after):
        (wanted elements, every tag met)."""
        found: dict[int, RawDataElement] = {}
        seen = set()
        buffer, size, implicit, little = self.buffer, self.size, self.implicit, self.little
        while position < size:
            tag, vr, value_at, length = self.element(position)
            if tag > stop_after:
                self.stopped = True
                break
            seen.add(tag)
            if length == _UNDEFINED:
                position = self._skip_items(value_at, tag, implicit or vr == b"UN")
                continue
            end = value_at + length
            if end > size:
                raise Incomplete(
                    f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) declares {length} bytes at byte {value_at}, "
                    f"but the file ends at byte {size}"
                )
            if tag in wanted:
                found[tag] = RawDataElement(BaseTag(tag), vr.decode("ascii") if vr else None, length,
                                            bytes(buffer[value_at:end]), value_at, implicit, little)
            position = end
        return found, seen

    def _skip_items(self, position: int, owner: int, implicit: bool) -> int:
        """Skip the items of an undefined-length sequence or encapsulated pixel data."""
        while True:
            if position + 8 > self.size:
                raise Incomplete(
                    f"element ({owner >> 16:04X},{owner & 0xFFFF:04X}) has no end: "
                    f"the file ends at byte {self.size} before its delimiter"
                )
            group, element, length = self.tag_len.unpack_from(self.buffer, position)
            tag = group << 16 | element
            position += 8
            if tag == _SEQUENCE_END:
                return position
            if tag != _ITEM:
                raise _Unexpected()
            if length == _UNDEFINED:
                position = self._skip_dataset(position, owner, implicit)
            else:
                if position + length > self.size:
                    raise Incomplete(
                        f"an item of ({owner >> 16:04X},{owner & 0xFFFF:04X}) declares {length} bytes at byte "
                        f"{position}, but the file ends at byte {self.size}"
                    )
                position += length

    def _skip_dataset(self, position: int, owner: int, implicit: bool) -> int:
        """Skip an undefined-length item's elements up to its item delimiter."""
        if not implicit and not _looks_explicit(self.buffer, position, self.size):
            implicit = True  # some writers switch to implicit VR inside sequences
        while True:
            if position >= self.size:
                raise Incomplete(
                    f"an item of ({owner >> 16:04X},{owner & 0xFFFF:04X}) has no end: "
                    f"the file ends at byte {self.size}"
                )
            tag, vr, value_at, length = self.element(position, implicit)
            if tag == _ITEM_END:
                return value_at
            if length == _UNDEFINED:
                position = self._skip_items(value_at, tag, implicit or vr == b"UN")
                continue
            if value_at + length > self.size:
                raise Incomplete(
                    f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) declares {length} bytes at byte {value_at}, "
                    f"but the file ends at byte {self.size}"
                )
            position = value_at + length


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
