"""What the journal records of each file for completion and completeness: its study, its
place in the series (instance, echo, frames), who sent it, and how many images its header
says the series should have. Read by the workers from the header they already read."""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass

from pydicom.datadict import keyword_dict
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag

from dumpwatch.naming import header_text

log = logging.getLogger(__name__)

# The private elements read for an expected count, each with the private creator its block must have.
SIEMENS_CSA_SERIES = 0x00291020  # the CSA series header, holding the protocol (MrPhoenixProtocol)
SIEMENS_CREATOR = (0x00290010, b"SIEMENS CSA HEADER")

_KEYWORDS = ("StudyInstanceUID", "InstanceNumber", "EchoNumbers", "NumberOfFrames", "Modality", "SeriesNumber",
             "SeriesDescription", "StudyDate", "ImagesInAcquisition", "ImageType", "Manufacturer")
_FRAME_KEYWORDS = ("DimensionIndexSequence", "PerFrameFunctionalGroupsSequence")
FACT_TAGS = frozenset({keyword_dict[k] for k in _KEYWORDS + _FRAME_KEYWORDS} | {SIEMENS_CSA_SERIES, SIEMENS_CREATOR[0]})
IN_STACK_POSITION = 0x00209057  # InStackPositionNumber: a frame's slice within its stack
FRAMES_NOTE = 300
FRAMES_CHECKED = 1_000  # frames per file at most whose frame sets are checked (pydicom reads ~1,500 a second)

_PROTOCOL_VALUE = rb"\s*=\s*(0x[0-9a-fA-F]+|[0-9]+)"


@dataclass
class Facts:
    """One file's facts. Text values are as the header has them, stripped; numbers None when absent."""

    study_uid: str = ""
    instance: int | None = None
    echo: int | None = None
    frames: int = 1  # NumberOfFrames: more than 1 in an enhanced multi-frame file
    modality: str = ""
    sender: str = ""  # the calling AE title, as storescp wrote it in the file meta
    series_number: str = ""
    description: str = ""
    study_date: str = ""
    expected: int | None = None  # images the header says the series has (per echo when per_echo)
    expected_from: str = ""  # which header value says so
    per_echo: bool = False
    received: float = 0.0  # when the file was written into the dump (its mtime, seconds)
    frame_sets: int = 0  # an enhanced multi-frame file: its frame sets (stacks, times, echoes), if checked
    frames_missing: int = 0  # positions missing from its frame sets
    frames_note: str = ""  # which, in words (FRAMES_NOTE characters at most)
    folder: str = ""  # its series folder in the tree, relative to dir_out (set when placed)


EXPECTED_LIMIT = 100_000  # images in one series at most, for an expected count to be believed
NUMBER_LIMIT = 2**31  # beyond, a header's number is nonsense (IS allows 12 digits): not counted


def _number(text: str | None) -> int | None:
    try:
        number = int(float((text or "").split("\\")[0]))
    except (ValueError, OverflowError):
        return None
    return number if -NUMBER_LIMIT < number < NUMBER_LIMIT else None


def sender_of(ds: Dataset) -> str:
    """The calling AE title storescp recorded in the file meta (SourceApplicationEntityTitle)."""
    meta = getattr(ds, "file_meta", None)
    elem = None if meta is None else meta._dict.get(_SOURCE_AE)
    if elem is None:
        return ""
    value = elem.value
    if isinstance(value, bytes):
        return value.decode("latin-1").strip(" \0")
    return str(value or "").strip(" \0")


# Values of these representations are plain ASCII: read from the raw bytes, without pydicom's
# conversion (header_text's general path cost a tenth of a millisecond a file for these).
_ASCII_VRS = {"IS", "DS", "CS", "UI", "DA"}
_TAGS = {k: BaseTag(keyword_dict[k]) for k in _KEYWORDS}
_CHARSET = BaseTag(0x00080005)  # SpecificCharacterSet
_SOURCE_AE = BaseTag(0x00020016)  # SourceApplicationEntityTitle, in the file meta


def _text(ds: Dataset, keyword: str, plain: bool) -> str:
    """plain: the data set names no character set, so text is ASCII (read as latin-1)."""
    elem = ds._dict.get(_TAGS[keyword])  # raw, as the walk left it: no conversion
    if elem is None:
        return ""
    if isinstance(elem, RawDataElement) and isinstance(elem.value, bytes) and (plain or elem.VR in _ASCII_VRS):
        return elem.value.decode("latin-1").strip(" \0")
    return (header_text(ds, keyword) or "").strip(" \0")


def facts_of(ds: Dataset, received: float) -> Facts:
    """The facts of a file whose header has been read (FACT_TAGS at least). Never raises:
    a value it cannot read is left out (the file is sorted all the same)."""
    plain = _CHARSET not in ds._dict
    text = {}
    for keyword in _KEYWORDS:
        try:
            text[keyword] = _text(ds, keyword, plain)
        except Exception:  # a value pydicom cannot convert: not this module's to judge
            text[keyword] = ""
    facts = Facts(study_uid=text["StudyInstanceUID"], instance=_number(text["InstanceNumber"]),
                  echo=_number(text["EchoNumbers"]), frames=max(1, _number(text["NumberOfFrames"]) or 1),
                  modality=text["Modality"][:16], sender=sender_of(ds), series_number=text["SeriesNumber"][:32],
                  description=text["SeriesDescription"][:128], study_date=text["StudyDate"][:16], received=received)
    if not 0 < received < time.time() + 86400:
        facts.received = time.time()  # a clock far off, or a filesystem's nonsense: now is closer
    try:
        _expect(ds, text, facts)
    except Exception as exc:  # a count is a hint: a header it cannot be read from sorts all the same
        log.debug("no expected count: %r", exc)
        facts.expected, facts.expected_from, facts.per_echo = None, "", False
        facts.frame_sets = facts.frames_missing = 0
        facts.frames_note = ""
    return facts


def _expect(ds: Dataset, text: dict[str, str], facts: Facts) -> None:
    """The expected count, from the first header value that tells it (see README,
    "Completion and completeness"): GE's ImagesInAcquisition; a Siemens 2D protocol's slices
    and repetitions; an enhanced multi-frame file, whole in itself."""
    image_type = text["ImageType"].upper().split("\\")
    if facts.frames > 1:  # one file holds the frames: its frame sets say whether it is whole
        _frame_sets(ds, facts)
        return
    images = _number(text["ImagesInAcquisition"])
    if text["Manufacturer"].upper().startswith("GE") and images and 0 < images <= EXPECTED_LIMIT:
        facts.expected, facts.expected_from = images, "ImagesInAcquisition"
        return
    if text["Manufacturer"].upper().startswith("SIEMENS"):
        protocol = _siemens_protocol(ds)
        if protocol is None or not all(0 <= v <= EXPECTED_LIMIT for v in protocol.values()):
            return
        repetitions = protocol.get(b"lRepetitions", 0) + 1
        if "MOSAIC" in image_type:  # one mosaic file per volume
            facts.expected, facts.expected_from = repetitions, "Siemens protocol: lRepetitions + 1 volumes"
        elif protocol.get(b"sKSpace.ucDimension") == 2 and protocol.get(b"sSliceArray.lSize", 0) > 0:
            facts.expected = protocol[b"sSliceArray.lSize"] * repetitions
            facts.expected_from = "Siemens protocol: sSliceArray.lSize x (lRepetitions + 1) per echo"
            facts.per_echo = True


def _siemens_protocol(ds: Dataset) -> dict[bytes, int] | None:
    """The counts of a Siemens protocol (the ASCCONV text in the CSA series header), as
    dcm2niix reads them; None when the file has none."""
    creator = ds.get_item(SIEMENS_CREATOR[0]) if SIEMENS_CREATOR[0] in ds else None
    if creator is None or SIEMENS_CSA_SERIES not in ds:
        return None
    if not isinstance(creator.value, (bytes, str)):
        return None
    name = creator.value if isinstance(creator.value, bytes) else creator.value.encode("latin-1", "replace")
    if name.strip(b" \0") != SIEMENS_CREATOR[1]:
        return None
    raw = ds.get_item(SIEMENS_CSA_SERIES).value
    if not isinstance(raw, bytes):
        return None
    start = raw.find(b"### ASCCONV BEGIN")
    if start < 0:
        return None
    end = raw.find(b"### ASCCONV END", start)
    block = raw[start:end if end > 0 else len(raw)]
    found: dict[bytes, int] = {}
    for key in (b"lRepetitions", b"sKSpace.ucDimension", b"sSliceArray.lSize"):
        match = re.search(rb"(?m)^" + re.escape(key) + _PROTOCOL_VALUE, block)
        if match:
            value = match.group(1)
            found[key] = int(value, 16) if value.lower().startswith(b"0x") else int(value, 10)
    return found


def _frame_sets(ds: Dataset, facts: Facts) -> None:
    """An enhanced multi-frame file's frame sets: frames that share every dimension index but
    the in-stack position (a stack at one time, echo or image type). Each set should hold the
    positions 1..N, N the highest position in any set; the ones it lacks are missing."""
    if facts.frames > FRAMES_CHECKED or "PerFrameFunctionalGroupsSequence" not in ds:
        return
    try:
        pointers = [int(item.DimensionIndexPointer) for item in ds.get("DimensionIndexSequence") or []]
        position = pointers.index(IN_STACK_POSITION) if IN_STACK_POSITION in pointers else None
        sets: dict[tuple, set[int]] = {}
        key: tuple
        for frame in ds.PerFrameFunctionalGroupsSequence:
            content = frame.get("FrameContentSequence")
            if not content:
                return
            content = content[0]
            values = [int(v) for v in (content.get("DimensionIndexValues") or [])]
            if position is not None and position < len(values):
                key, number = tuple(values[:position] + values[position + 1:]), values[position]
            elif content.get("InStackPositionNumber") is not None:
                key = (str(content.get("StackID", "")), content.get("TemporalPositionIndex"))
                number = int(content.InStackPositionNumber)
            else:
                return  # nothing says where a frame belongs
            sets.setdefault(key, set()).add(number)
    except Exception:  # a per-frame sequence unlike the standard's (or unreadable): frames counted, not checked
        return
    top = max((max(numbers) for numbers in sets.values()), default=0)
    if not 0 < top <= FRAMES_CHECKED:
        return
    facts.frame_sets = len(sets)
    lacking: list[str] = []
    for index, numbers in enumerate(sets.values(), 1):
        missing = sorted(set(range(1, top + 1)) - numbers)
        facts.frames_missing += len(missing)
        if missing and len(lacking) < 3:
            lacking.append(f"frame set {index} of instance {facts.instance}: positions "
                           + ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else ""))
    facts.frames_note = "; ".join(lacking)[:FRAMES_NOTE]
