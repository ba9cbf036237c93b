"""Walking a DICOM file's raw elements by their declared lengths, reading values only when asked.

pydicom reads a truncated file without complaint, so every file is also walked element by
element, by declared lengths, to its end. That walk also picks out the few elements that
name the file, so the usual file needs no full parse: pydicom converts just those values.
Anything the walk does not expect (deflate, a damaged sequence) raises Unexpected, and goes
to pydicom's full reader, whose verdict stands.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import MutableMapping
from typing import cast

from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import BaseTag
from pydicom.uid import UID

from dumpwatch.errors import Incomplete, Rejected

_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV", b"UV"}
_PIXEL_TAGS = {0x7FE00010, 0x7FE00008, 0x7FE00009}  # PixelData, FloatPixelData, DoubleFloatPixelData
_SPECTROSCOPY_DATA = 0x56000020
ALWAYS = frozenset({0x00080005, 0x00080016})  # SpecificCharacterSet, SOPClassUID
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
_IMPLICIT_LE, _EXPLICIT_BE, DEFLATED = "1.2.840.10008.1.2", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"


def as_elements(found: dict[int, RawDataElement]) -> MutableMapping[BaseTag, DataElement | RawDataElement]:
    """The walk's elements as Dataset() is typed to take them. Dataset keeps the very dict;
    its int keys find the same elements as BaseTag keys do (a BaseTag is an int)."""
    return cast(MutableMapping[BaseTag, DataElement | RawDataElement], found)


class Unexpected(Exception):
    """The walk met something only pydicom's full reader should judge."""


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


def scan(buffer, size: int, wanted: frozenset[int]) -> Dataset:
    """Walk the whole file by declared lengths; return a Dataset of the wanted elements.

    Raises Incomplete if the file is shorter than it declares, Rejected if its data set is
    not encoded as its file meta says, Unexpected for anything the full reader should look
    at instead.
    """
    meta, position, ts = read_file_meta(buffer, size)
    if ts == DEFLATED:
        raise Unexpected()
    implicit, little = data_set_encoding(buffer, size, position, ts)
    walker = Walker(buffer, size, implicit, little)
    found, seen = walker.walk(position, wanted | ALWAYS)
    if not seen:
        raise Incomplete("no data set after the file meta information")
    ds = Dataset(as_elements(found))
    ds.file_meta = FileMetaDataset(as_elements(meta))
    ds.set_original_encoding(implicit, little, None)
    _check_object(ds.file_meta, seen, ds)
    return ds


def read_file_meta(buffer, size: int) -> tuple[dict[int, RawDataElement], int, str]:
    """The file meta's elements, where the data set starts, and the transfer syntax named.

    Raises Unexpected for a file meta the walk cannot follow.
    """
    meta: dict[int, RawDataElement] = {}
    walker = Walker(buffer, size, implicit=False, little=True)
    position = 132
    while position + 8 <= size and struct.unpack_from("<H", buffer, position)[0] == 0x0002:
        tag, vr, value_at, length = walker.element(position)
        assert vr is not None  # group 0002 is explicit VR, and not an item's group (FFFE)
        if length == _UNDEFINED or value_at + length > size:
            raise Unexpected()
        value = bytes(buffer[value_at : value_at + length])
        meta[tag] = RawDataElement(BaseTag(tag), vr.decode("ascii"), length, value, value_at, False, True)
        position = value_at + length
    syntax = meta.get(0x00020010)
    if syntax is None or position >= size:
        raise Unexpected()
    assert syntax.value is not None  # made from bytes above
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
    if ts == DEFLATED:
        if min(group, swapped) <= 0xFF and not _inflates(buffer, position, size):
            actual = _ENCODINGS[(not explicit, group <= 0xFF)]
            raise Rejected(_mislabelled(ts, f"not deflated: it is encoded as {actual}"))
        return implicit, little
    if group > 0xFF >= swapped:
        raise Rejected(_mislabelled(ts, f"encoded as {_ENCODINGS[(not explicit, not little)]}"))
    if min(group, swapped) > 0xFF and _inflates(buffer, position, size):
        raise Rejected(_mislabelled(ts, f"deflated ({UID(DEFLATED).name})"))
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
    if ds.file_meta.get("TransferSyntaxUID", "") == DEFLATED:
        return False  # whole: _check_inflated saw its zlib stream end, before pydicom read it
    implicit, little = ds.original_encoding
    assert implicit is not None and little is not None  # pydicom's reader sets both
    # keys() is typed as a set, but is the Dataset's dict's keys, which reverse in insertion order.
    last = ds.get_item(next(reversed(ds.keys())))  # type: ignore[call-overload]
    value_at = getattr(last, "value_tell", None)
    if value_at is None:
        value_at = last.file_tell
    header = 8 if implicit or last.VR.encode() not in _LONG_VRS else 12
    walker = Walker(buffer, size, implicit, little)
    try:
        _, seen = walker.walk(value_at - header, frozenset())
    except Unexpected:
        raise Rejected("damaged element structure after the header") from None
    _check_object(ds.file_meta, seen | set(ds.keys()), ds)
    return bool(seen - set(ds.keys()) - _PIXEL_TAGS)


class Walker:
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
            raise Unexpected()  # not a VR: the encoding changed under us
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
                if tag in wanted:  # a sequence, kept with its delimiter, as pydicom reads one
                    found[tag] = RawDataElement(BaseTag(tag), vr.decode("ascii") if vr else None, length,
                                                bytes(buffer[value_at:position]), value_at, implicit, little)
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
                raise Unexpected()
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
