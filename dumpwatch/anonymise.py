"""Anonymisation: DcmServer's anon_fields, or a Profile of rules applied to every element.

With a profile, every file of a subject is treated alike without stored state: new UIDs,
the subject's pseudonym and its date shift all derive from the site's secret (keys.py).
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import UID_dictionary

from dumpwatch import keys
from dumpwatch.errors import Rejected
from dumpwatch.rules import Profile


def datasets(ds: Dataset) -> Iterator[Dataset]:
    """ds and every item of every sequence in it, however deep."""
    yield ds
    for tag in list(ds.keys()):
        if ds.get_item(tag).VR in ("SQ", "UN", None):  # only these can hold items
            elem = ds[tag]
            if elem.VR == "SQ":
                for item in elem.value:
                    yield from datasets(item)


def empty_fields(ds: Dataset, tags: Iterable[int]) -> bool:
    """DcmServer's anon_fields: empty each listed element wherever it occurs; absent ones
    are skipped. Returns True when anything changed, so that an unchanged file is moved,
    not rewritten."""
    tags = tuple(tags)
    if not tags:
        return False
    changed = False
    for dataset in datasets(ds):
        for tag in tags:
            if tag in dataset:
                elem = dataset[tag]
                if not elem.is_empty:
                    elem.value = [] if elem.VR == "SQ" else elem.empty_value
                    changed = True
    return changed


# -- the profile engine -------------------------------------------------------------------

_DUMMY_TEXT = "ANONYMOUS"
_DUMMIES = {"AE": _DUMMY_TEXT, "AS": "000Y", "CS": _DUMMY_TEXT, "DA": "19000101", "DS": "0",
            "DT": "19000101000000", "IS": "0", "LO": _DUMMY_TEXT, "LT": _DUMMY_TEXT, "PN": _DUMMY_TEXT,
            "SH": _DUMMY_TEXT, "ST": _DUMMY_TEXT, "TM": "000000", "UC": _DUMMY_TEXT, "UR": "urn:anonymous",
            "UT": _DUMMY_TEXT, "US": 0, "SS": 0, "UL": 0, "SL": 0, "FL": 0.0, "FD": 0.0, "SV": 0, "UV": 0,
            "AT": 0}
_TEXT_VRS = {"LO", "LT", "SH", "ST", "UC", "UT", "CS", "AE", "UR"}
# Values whose original must not survive anywhere in the file (the leak check), beside every
# person name, date and UID: IDs and the institution.
_IDENTIFYING = {0x00100020, 0x00101000, 0x00101002, 0x00100021, 0x00080050, 0x00080080, 0x00080081,
                0x00081040, 0x00081010, 0x00181000, 0x00101040, 0x00102154, 0x00380010, 0x00400031,
                0x00402016, 0x00402017, 0x00200010, 0x00321033}
_PATIENT_NAME, _PATIENT_ID = 0x00100010, 0x00100020
_FILE_META_DROPPED = ("SourceApplicationEntityTitle", "SendingApplicationEntityTitle",
                      "ReceivingApplicationEntityTitle", "PrivateInformationCreatorUID", "PrivateInformation")


@dataclass
class Anonymised:
    """What anonymising one header found: the originals the leak check looks for."""

    needles: list[tuple[str, bytes, str]] = field(default_factory=list)  # (element, original, kind)


class Anonymiser:
    """Applies a Profile to headers. One per worker process; holds no per-file state."""

    def __init__(self, profile: Profile, key: bytes, subjects: dict[str, str] | None = None,
                 allow_burned_in: bool = False):
        self.profile, self.key, self.subjects, self.allow_burned_in = profile, key, subjects, allow_burned_in
        names = [layer.name for layer in profile.layers]
        self.shift_dates = "retain-long-modified-dates" in names
        self.full_dates = "retain-long-full-dates" in names and not self.shift_dates

    def apply(self, ds: Dataset) -> Anonymised:
        """Anonymise ds (and its file meta) in place. Raises Rejected for a file it must not pass."""
        if str(ds.get("BurnedInAnnotation", "")).strip().upper() == "YES" and not self.allow_burned_in:
            raise Rejected("BurnedInAnnotation is YES: text may be burned into the pixels "
                           "(anon_burned_in = allow accepts such files)")
        subject = str(ds.get("PatientID", "") or "").strip() or str(ds.get("PatientName", "") or "").strip()
        code = self._pseudonym(ds, subject)
        run = _Run(self, keys.day_shift(self.key, subject), _scrub_words(ds))
        run.dataset(ds)
        ds.PatientName = code
        ds.PatientID = code
        self._audit(ds)
        meta = getattr(ds, "file_meta", None)
        if meta is not None:
            if "SOPInstanceUID" in ds:
                meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            for keyword in _FILE_META_DROPPED:
                if keyword in meta:
                    delattr(meta, keyword)
        return Anonymised(run.needles)

    def _pseudonym(self, ds: Dataset, subject: str) -> str:
        if self.subjects is None:
            return keys.subject_code(self.key, subject)
        for candidate in (str(ds.get("PatientID", "") or "").strip(), str(ds.get("PatientName", "") or "").strip()):
            if candidate and candidate in self.subjects:
                return self.subjects[candidate]
        raise Rejected("subject not in the pseudonym map (anon_subjects): add it, then sort-once the quarantine")

    def _audit(self, ds: Dataset) -> None:
        """PatientIdentityRemoved, the method in words, and the codes of what was fully applied."""
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = [f"dumpwatch: {layer.name}"[:64] for layer in self.profile.layers]
        items = []
        for code, title in self.profile.applied:
            item = Dataset()
            item.CodeValue = code
            item.CodingSchemeDesignator = "DCM"
            item.CodeMeaning = title
            items.append(item)
        if items:
            ds.DeidentificationMethodCodeSequence = Sequence(items)
        elif "DeidentificationMethodCodeSequence" in ds:
            del ds.DeidentificationMethodCodeSequence
        ds.LongitudinalTemporalInformationModified = (
            "MODIFIED" if self.shift_dates else "UNMODIFIED" if self.full_dates else "REMOVED")


def _scrub_words(ds: Dataset) -> list[str]:
    """Identifying words to cut out of text that the profile cleans (C) rather than removes."""
    words: set[str] = set()
    for tag in (_PATIENT_NAME, _PATIENT_ID, 0x00080080, 0x00080090, 0x00081070, 0x00081050, 0x00080050,
                0x00101001, 0x00081010, 0x00101000):
        if tag in ds:
            value = ds[tag].value
            for text in value if isinstance(value, (list, MultiValue)) else [value]:
                words.update(w for w in re.split(r"[\^=\s,]+", str(text or "")) if len(w) >= 3)
    return sorted(words, key=len, reverse=True)


class _Run:
    """One file's pass over its elements."""

    def __init__(self, anonymiser: Anonymiser, days: int, words: list[str]):
        self.a, self.days = anonymiser, days
        self.scrub = re.compile("|".join(map(re.escape, words)), re.IGNORECASE) if words else None
        self.needles: list[tuple[str, bytes, str]] = []

    def dataset(self, ds: Dataset) -> None:
        profile = self.a.profile
        creators: dict[tuple[int, int], str] | None = None
        kept_blocks: set[tuple[int, int]] = set()
        action: str | None
        for tag in list(ds.keys()):
            group, element = tag >> 16, tag & 0xFFFF
            if element == 0:  # a group length: stale once values change, and retired anyway
                del ds[tag]
                continue
            if group % 2:
                if 0x0010 <= element <= 0x00FF:
                    continue  # private creators: kept only where their block keeps something
                if creators is None:
                    creators = _creators(ds)
                block = (group, element >> 8)
                action = profile.private_action(creators.get(block), group, element & 0xFF)
                if action == "C":  # keep only the private elements a layer names: this one is not
                    action = "X"
                if action not in ("X",):
                    kept_blocks.add(block)
            else:
                action = profile.action(tag)
            self.element(ds, tag, action)
        if creators is not None:
            for (group, high), _ in creators.items():
                if (group, high) not in kept_blocks and (group << 16 | high) in ds:
                    del ds[group << 16 | high]

    def element(self, ds: Dataset, tag: int, action: str | None) -> None:
        elem: DataElement | RawDataElement = ds.get_item(tag)  # raw if never read, its VR None if implicit
        vr = elem.VR
        if vr is None or vr == "UN":
            vr = ds[tag].VR
        if action in (None, "K"):
            if vr == "SQ":
                self.items(ds[tag].value)
            return
        if action == "X":
            self.remember(ds, tag, vr)
            del ds[tag]
            return
        elem = ds[tag]
        if vr == "SQ":
            if action == "Z":
                elem.value = []
            else:  # D, C, R (X/Z/U*), U: keep the structure, treat what is inside
                self.items(elem.value)
            return
        if action == "Z":
            self.remember(ds, tag, vr)
            elem.value = elem.empty_value
        elif action == "U" or vr == "UI":
            self.remember(ds, tag, vr)
            elem.value = self.uids(elem.value)
        elif action == "C":
            self.clean(ds, tag, elem, vr)
        else:  # D
            self.remember(ds, tag, vr)
            elem.value = self.dummy(vr)

    def items(self, sequence: Iterable[Dataset]) -> None:
        for item in sequence:
            self.dataset(item)

    def dummy(self, vr: str) -> object:
        if vr in _DUMMIES:
            return _DUMMIES[vr]
        return b"\0\0"  # OB, OW, UN and the other binary VRs

    def uids(self, value: object) -> object:
        if isinstance(value, (list, MultiValue)):
            return [self.uid(str(v)) for v in value]
        return self.uid(str(value or ""))

    def uid(self, uid: str) -> str:
        uid = uid.strip().rstrip("\0")
        if not uid or uid in UID_dictionary or uid.startswith("1.2.840.10008."):
            return uid  # SOP classes, transfer syntaxes and the like are not identifying
        return keys.new_uid(self.a.key, uid)

    def clean(self, ds: Dataset, tag: int, elem, vr: str) -> None:
        """C: keep what is not identifying. Dates move by the subject's whole-day shift (times
        stay), text loses the subject's and staff's names and IDs, other values become dummies."""
        if vr in ("DA", "DT"):
            self.remember(ds, tag, vr)
            elem.value = self.shift(elem.value, vr)
        elif vr == "TM":
            return
        elif vr in _TEXT_VRS and self.scrub is not None:
            value = elem.value
            if isinstance(value, (list, MultiValue)):
                elem.value = [self.scrub.sub("", str(v)) for v in value]
            elif value:
                elem.value = self.scrub.sub("", str(value))
        elif vr in _TEXT_VRS:
            return
        else:
            self.remember(ds, tag, vr)
            elem.value = self.dummy(vr)

    def shift(self, value: object, vr: str) -> object:
        if isinstance(value, (list, MultiValue)):
            return [self.shift(v, vr) for v in value]
        text = str(value or "").strip()
        if not text:
            return text
        try:
            day = datetime.date(int(text[:4]), int(text[4:6]), int(text[6:8]))
        except ValueError:
            return self.dummy(vr)  # a partial or broken date: no value of it survives
        return (day - datetime.timedelta(days=self.days)).strftime("%Y%m%d") + (text[8:] if vr == "DT" else "")

    def remember(self, ds: Dataset, tag: int, vr: str) -> None:
        """Note an original identifying value, for the leak check after writing."""
        if not (vr in ("PN", "DA", "DT", "UI") or tag in _IDENTIFYING):
            return
        value = ds[tag].value
        name = keyword_for_tag(tag) or f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
        kind = {"DA": "date", "DT": "date", "UI": "uid"}.get(vr, "text")
        for one in value if isinstance(value, (list, MultiValue)) else [value]:
            text = str(one or "").strip()
            if kind == "date":
                parts = [text[:8]] if len(text) >= 8 and text[:8].isdigit() else []
            elif kind == "uid":
                parts = [text] if len(text) >= 8 and text not in UID_dictionary else []
            else:  # a name or an ID: worth looking for if it has three letters or digits
                parts = [p.strip() for p in re.split(r"[\^=]", text) if vr == "PN" or p == text]
                parts = [p for p in parts if sum(c.isalnum() for c in p) >= 3 and p.upper() != _DUMMY_TEXT]
            for part in parts:
                self.needles.append((name, part.encode("utf-8", "replace"), kind))


def _creators(ds: Dataset) -> dict[tuple[int, int], str]:
    creators = {}
    for tag in ds.keys():
        group, element = tag >> 16, tag & 0xFFFF
        if group % 2 and 0x0010 <= element <= 0x00FF:
            creators[(group, element)] = str(ds[tag].value or "").strip().upper()
    return creators


# Where a value may start and end, so that "2339" is not found inside another number or UID:
# the bytes that may not stand right before and right after a hit.
_WORD = frozenset(b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_BOUNDS = {
    "text": (_WORD, _WORD),
    "uid": (frozenset(b"0123456789."), frozenset(b"0123456789.")),
    "date": (frozenset(b"0123456789"), frozenset()),  # a date may go on as a DT's time
}


def leak(data: bytes | memoryview, needles: list[tuple[str, bytes, str]]) -> str | None:
    """The name of an element whose original value is still in data (as a whole value, not
    inside another), or None. Text is compared without regard to case.

    Each occurrence is found by bytes.find (a C loop) and only its two neighbours are
    checked: a regular expression with look-arounds over a whole file cost 2 ms a file.
    """
    blob = bytes(data)
    lowered = None
    for name, needle, kind in needles:
        haystack = blob
        if kind == "text":
            if lowered is None:
                lowered = blob.lower()
            haystack, needle = lowered, needle.lower()
        before, after = _BOUNDS[kind]
        start = haystack.find(needle)
        while start >= 0:
            end = start + len(needle)
            alone_before = start == 0 or haystack[start - 1] not in before
            if alone_before and (end == len(haystack) or haystack[end] not in after):
                return name
            start = haystack.find(needle, start + 1)
    return None
