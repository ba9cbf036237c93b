"""Friendly names: a template filled from the header, each value made one safe path component."""

from __future__ import annotations

import functools
import re
import unicodedata
from dataclasses import dataclass

from pydicom.charset import CUSTOMIZABLE_CHARSET_VR, TEXT_VR_DELIMS, convert_encodings, decode_bytes
from pydicom.datadict import dictionary_VR, keyword_dict
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

DEFAULT_TEMPLATE = "<StudyDate>-<PatientName>/<SeriesNumber:03>-<SeriesDescription>/<InstanceNumber:04>"

NAME_MAX = 255  # bytes in one path component on Linux filesystems
FOLDER_ROOM = 8  # kept free in folder names for the "_2" of a second series
FILE_ROOM = 40  # kept free in file names for "_02", "A2" and the extension

# Value representations whose values read as text or numbers; the rest cannot name a folder.
_NAMING_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM",
               "UC", "UI", "UR", "UT", "US", "UL", "SS", "SL", "SV", "UV", "FL", "FD"}


_FIELD = re.compile(r"<([^<>]*)>")
_SPEC = re.compile(r"([A-Za-z][A-Za-z0-9]*)(?::0?([1-9][0-9]?))?")
_LITERAL_OK = re.compile(r"[A-Za-z0-9_+@=,.-]*")


@dataclass(frozen=True)
class Field:
    keyword: str
    width: int = 0  # zero-pad numbers to this many digits


Part = str | Field


@dataclass(frozen=True)
class Template:
    """A parsed naming template: path components made of literal text and <Keyword:width> fields."""

    text: str
    components: tuple[tuple[Part, ...], ...]

    @classmethod
    def parse(cls, text: str) -> Template:
        """Check a template; ValueError names what is wrong with it."""
        text = text.strip()
        if text.startswith("/"):
            raise ValueError("the template is relative to dir_out: it must not start with '/'")
        components = []
        for component in text.split("/"):
            if not component:
                raise ValueError(f"empty folder name in template {text!r}")
            if component.startswith("."):
                raise ValueError(f"{component!r} is not allowed in a template: no name may start with '.'")
            parts: list[Part] = []
            position = 0
            for match in _FIELD.finditer(component):
                parts += _literal(component[position : match.start()])
                spec = _SPEC.fullmatch(match[1].strip())
                if not spec:
                    raise ValueError(f"not a field such as <SeriesNumber:03>: {match[0]!r}")
                keyword, width = spec[1], int(spec[2] or 0)
                if keyword not in keyword_dict:
                    raise ValueError(f"unknown DICOM keyword {keyword!r} in {match[0]!r}")
                vr = dictionary_VR(keyword_dict[keyword])
                if vr not in _NAMING_VRS:
                    raise ValueError(f"{keyword} holds {vr} data, which cannot name a file or folder")
                parts.append(Field(keyword, width))
                position = match.end()
            parts += _literal(component[position:])
            components.append(tuple(parts))
        if len(components) < 2:
            raise ValueError("a template needs at least a series folder and a file name, "
                             "e.g. <SeriesNumber>/<InstanceNumber>")
        return cls(text, tuple(components))

    @property
    def keywords(self) -> set[str]:
        return {p.keyword for c in self.components for p in c if isinstance(p, Field)}


def _literal(text: str) -> list[Part]:
    if not text:
        return []
    if not _LITERAL_OK.fullmatch(text):
        raise ValueError(f"literal text {text!r} may hold only letters, digits and - _ + @ = , .")
    return [text]


@dataclass(frozen=True)
class Name:
    """Where a file goes below dir_out, before echo and collision suffixes are decided."""

    folders: tuple[str, ...]  # the last one is the series folder
    stem: str  # file name without echo suffix and extension
    echo: int | None  # EchoNumbers, when positive


def friendly_name(ds: Dataset, template: Template, reserved: frozenset[str] = frozenset()) -> Name:
    """Fill the template from ds. `reserved` holds top-level names the tree must not use."""
    components = []
    last = len(template.components) - 1
    for index, parts in enumerate(template.components):
        room = FILE_ROOM if index == last else FOLDER_ROOM
        text = "".join(p if isinstance(p, str) else field_text(ds, p) for p in parts)
        text = _limit(text, NAME_MAX - room) or "Unnamed"
        components.append(text)
    if components[0] in reserved:
        components[0] += "_"
    return Name(tuple(components[:-1]), components[-1], echo_number(ds))


def naming_tags(template: Template) -> frozenset[int]:
    """The header elements that sorting a file reads: the template's and the chain's own."""
    keywords = template.keywords | {"SOPInstanceUID", "SeriesInstanceUID", "InstanceNumber", "EchoNumbers"}
    return frozenset(keyword_dict[k] for k in keywords)


_TEXT_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT"}
_CHARSET_VRS = {str(vr) for vr in CUSTOMIZABLE_CHARSET_VR}


def header_text(ds: Dataset, keyword: str) -> str | None:
    """A top-level value as text (several values joined by backslashes); None if absent.

    Text elements still raw from reading are decoded as pydicom decodes them (its character
    set decoder), without building a DataElement: sorting reads a handful of values per file
    and pydicom's full conversion of each was a fifth of the time per file. Anything else
    goes through pydicom.
    """
    tag = keyword_dict[keyword]
    if tag not in ds:
        return None
    # get_item is typed as returning a DataElement, but a value never read is still raw.
    elem: DataElement | RawDataElement = ds.get_item(tag)
    vr = elem.VR or dictionary_VR(tag)
    if isinstance(elem, RawDataElement) and vr in _TEXT_VRS and elem.value is not None:
        data = elem.value
        if vr == "PN":
            encodings = _encodings(ds)
            text = "\\".join("=".join(decode_bytes(group, encodings, {0x5E}) for group in one.split(b"="))
                              for one in data.split(b"\\"))
        elif vr in _CHARSET_VRS:
            text = decode_bytes(data, _encodings(ds), TEXT_VR_DELIMS)
        else:
            text = data.decode("latin-1")
        strip = " \0=" if vr == "PN" else " \0"  # padding and empty name groups, as pydicom strips them
        return "\\".join(v.rstrip(strip) for v in text.split("\\"))
    value = ds[tag].value
    if value is None:
        return ""
    if isinstance(value, (list, MultiValue)):
        return "\\".join(str(v) for v in value)
    return str(value)


def _encodings(ds: Dataset) -> list[str]:
    return convert_encodings(ds.get("SpecificCharacterSet") or "ISO_IR 6")


def field_text(ds: Dataset, field: Field) -> str:
    """One field of the template as a clean path piece, never empty."""
    keyword = field.keyword
    try:
        if keyword == "InstanceNumber":
            number = instance_number(ds)
            text = None if number is None else str(number)
        else:
            text = header_text(ds, keyword)
    except Exception:  # a value that cannot be decoded still names the file
        return f"Bad{keyword}"
    if text is None:
        return f"No{keyword}"
    values = [v.strip(" \0") for v in text.split("\\")]
    if _is_person_name(keyword):
        values = [_readable_group(v) for v in values]
    if not any(values):
        return f"Empty{keyword}"
    text = clean("_".join(_padded(v, field.width) for v in values if v))
    return text or f"Empty{keyword}"


@functools.cache
def _is_person_name(keyword: str) -> bool:
    return dictionary_VR(keyword_dict[keyword]) == "PN"


def _readable_group(name: str) -> str:
    """The first group of a person name (alphabetic, ideographic, phonetic) that holds a name."""
    for group in name.split("="):
        if group.strip("^ "):
            return group
    return ""


def _padded(value: str, width: int) -> str:
    if width:
        number = _as_int(value)
        if number is not None:
            return f"{number:0{width}d}"
    return value


def _as_int(value: object) -> int | None:
    try:
        number = float(value)  # type: ignore[arg-type]  # any value: float() raises for what is no number
    except (TypeError, ValueError):
        return None
    return int(number) if number.is_integer() else None


def instance_number(ds: Dataset) -> int | None:
    """The top-level InstanceNumber; if missing or 0, the first non-zero one anywhere in ds.

    Philips files hold several: one nested in ReferencedPerformedProcedureStepSequence is 0.
    """
    top = _as_int(_first(header_text(ds, "InstanceNumber")))
    if top:
        return top
    for elem in ds.iterall():
        if elem.tag == 0x00200013:
            number = _as_int(elem.value)
            if number:
                return number
    return top


def echo_number(ds: Dataset) -> int | None:
    """EchoNumbers (the first, if several), when it is a positive number."""
    try:
        number = _as_int(_first(header_text(ds, "EchoNumbers")))
    except Exception:
        return None
    return number if number and 0 < number < 10_000 else None  # an echo, not a header's typo


def _first(text: str | None) -> str | None:
    return None if text is None else text.split("\\")[0].strip(" \0")


_TO_DASH = set(" ()[]{}")
_DROP = set("'\"`")
_KEEP = set("-_.+@")
_MAP = {"*": "s", "?": "q"}  # DcmServer's convention: "T2*" is "T2s"
_RUNS = re.compile(r"([-_])[-_]+")
_PLAIN = re.compile(r"[A-Za-z0-9 ._+@-]*")


def clean(value: str, limit: int = NAME_MAX) -> str:
    """One safe path component from any text: no separators, controls or leading dots.

    Letters and digits of any script are kept, so a non-ASCII name stays readable; spaces
    become '-'; other punctuation becomes '_'. May return '' when nothing usable is left.
    """
    if _PLAIN.fullmatch(value):  # the common case: nothing to replace
        return _limit(_RUNS.sub(r"\1", value.replace(" ", "-")), limit)
    out = []
    for char in unicodedata.normalize("NFC", value):
        if char.isalnum() or char in _KEEP:
            out.append(char)
        elif unicodedata.category(char) in ("Mn", "Mc"):  # combining marks of a letter
            out.append(char)
        elif char in _MAP:
            out.append(_MAP[char])
        elif char in _DROP:
            continue
        elif char in _TO_DASH or char.isspace():
            out.append("-")
        else:  # / \ NUL, controls, bidi overrides, ^ and the rest
            out.append("_")
    return _limit(_RUNS.sub(r"\1", "".join(out)), limit)


def _limit(text: str, limit: int) -> str:
    """Trim separators from both ends and cut to `limit` UTF-8 bytes on a character boundary."""
    text = text.strip("-_. ")
    encoded = text.encode("utf-8")
    if len(encoded) > limit:
        text = encoded[:limit].decode("utf-8", "ignore").rstrip("-_. ")
    return text


_SAFE_ASCII = re.compile(r"[A-Za-z0-9_+@=,-][A-Za-z0-9 ._+@=,-]*")


def is_safe_component(name: str) -> bool:
    """A last line of defence, checked before anything is created below dir_out."""
    if len(name) <= NAME_MAX and _SAFE_ASCII.fullmatch(name):
        return True
    return (
        0 < len(name.encode("utf-8", "surrogateescape")) <= NAME_MAX
        and not name.startswith(".")
        and "/" not in name
        and "\\" not in name
        and "\0" not in name
        and all(unicodedata.category(c)[0] != "C" for c in name)
    )
