"""One series folder as dumpwatch pictures it, and the naming rules decided on that picture.

The rules are data in, data out, so that they can be tested without a disk: which name a
file gets (its echo suffix, then DcmServer's collision suffix), when echo-1 files gain
"_01", which of "<name>", "<name>_2"... a series owns, and what a name on disk says of the
file as the template named it. dumpwatch.foldercache reads the pictures from disk and
dumpwatch.tree carries the decisions out.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from dumpwatch.identity import Placed
from dumpwatch.naming import Name

_DUP = re.compile(r"A[0-9]*")  # DcmServer's collision suffix: "A", "A2", "A3"...
_DIGITS = re.compile(r"[0-9]{1,4}")  # the N of a series folder "<name>_N"
FOREIGN = "?"  # the series of a folder whose files dumpwatch cannot read, or of several: never shared


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

    def drop(self, name: str) -> None:
        """Forget a file that is no longer there (or is read again)."""
        known = self.files.pop(name, None)
        self.taken.discard(name)
        self.plain.discard(name)
        self.stems.pop(name, None)
        if known is not None:
            self.by_uid[known.sop_uid].remove(name)

    def free_name(self, stem: str, suffix: str, first: str = "") -> tuple[str, str]:
        """The first free name from stem, and its collision suffix: none, then "A", "A2"...
        (from `first` on). Free: nothing in the folder holds it, no file, folder, symlink or FIFO."""
        for dup in suffixes(first):
            if stem + dup + suffix not in self.taken:
                return stem + dup + suffix, dup
        raise OSError(f"no free name for {stem!r}")

    def echo_renames(self, echo: int, suffix: str) -> list[tuple[str, str]]:
        """Once a file of this echo makes the series one of several echoes, its echo-1 files
        named without suffix gain "_01" (keeping their collision suffix). Returns the
        renames (old, new), already made in this picture."""
        multi = self.multi or len(self.echoes | {echo}) > 1
        renames = []
        if multi:
            for old in sorted(self.plain):
                stem, dup = self.stems[old]
                new, _ = self.free_name(f"{stem}_01", suffix, dup)
                renames.append((old, new))
                self.rename(old, new)
        self.multi = multi
        return renames

    def new_file(self, name: Name, known: Known, suffix: str) -> str:
        """The name a new file gets here (its echo suffix, then a free name), added to the picture."""
        stem = file_stem(name.stem, name.echo, self.multi)
        file_name, dup = self.free_name(stem, suffix)
        self.add(file_name, known)
        if known.echo == 1 and not self.multi:
            self.plain.add(file_name)
            self.stems[file_name] = (stem, dup)
        return file_name

    def note_name(self, name: str, stem: str, suffix: str, echo: int) -> None:
        """Is this file (read from disk) named as the current template names it, `stem`?
        Only such a file is ever renamed (an echo-1 file gains "_01" when a second echo
        comes); a file an older template or a hand named keeps its name."""
        parsed = read_back(name, stem, suffix, echo)
        if parsed is None:
            return
        echo_part, dup = parsed
        if echo_part == "":
            self.plain.add(name)
            self.stems[name] = (stem, dup)
        else:
            # An echo-1 file with "_01" was renamed because a second echo came (perhaps
            # before a kill stopped that echo from being placed): the series has several.
            self.multi |= echo == 1


def file_stem(stem: str, echo: int | None, multi: bool) -> str:
    """The template's stem with its echo suffix: "_02" and up for later echoes, "_01" for
    echo 1 only in a series of several echoes (a single-echo series' names carry none)."""
    if echo and echo > 1:
        return f"{stem}_{echo:02d}"
    return f"{stem}_01" if multi else stem


def suffixes(first: str = "") -> Iterator[str]:
    """"", then DcmServer's "A" for different content at a taken name, then A2, A3...
    (from `first` on: a file that had a collision suffix keeps it when renamed)."""
    if first == "":
        yield ""
    if first in ("", "A"):
        yield "A"
    for number in range(int(first[1:]) if first[1:].isdigit() else 2, 100_000):
        yield f"A{number}"


def read_back(name: str, stem: str, suffix: str, echo: int) -> tuple[str, str] | None:
    """How a file name on disk splits as the template names a file of this echo: (echo
    suffix, collision suffix), ("", "A2") for instance for an echo-1 file without "_01";
    None if the template would not name it so (an older template or a hand did).

    The stem comes from the file's header, never from the name: "IMG_0001" or
    "fmri_run_02_0001" end in "_<digits>" and are no echo suffix."""
    own = name[: -len(suffix)]
    if not own.startswith(stem):
        return None
    rest = own[len(stem):]
    if echo == 1 and (rest == "" or _DUP.fullmatch(rest)):
        return "", rest
    mark = f"_{echo:02d}"
    if rest.startswith(mark) and (rest == mark or _DUP.fullmatch(rest[len(mark):])):
        return mark, rest[len(mark):]
    return None


def series_owner(series: Iterable[str | None]) -> str | None:
    """The series a folder belongs to, from the SeriesInstanceUID of each DICOM file in it
    (None for a file dumpwatch cannot read, which says nothing of the series when others
    can be read). None: no file, free for a series; FOREIGN: several series, or only
    files it cannot read, never shared."""
    found = set(series)
    readable = found - {None}
    if readable:
        return readable.pop() if len(readable) == 1 else FOREIGN
    return FOREIGN if found else None


def folder_name(base: str, number: int) -> str:
    """The series folder "<base>" (1), "<base>_2", "<base>_3"..."""
    return base if number == 1 else f"{base}_{number}"


def folder_number(name: str, base: str) -> int | None:
    """N if name is the series folder "<base>" (1) or "<base>_N", else None."""
    if name == base:
        return 1
    if name.startswith(base + "_") and _DIGITS.fullmatch(name[len(base) + 1:]):
        return int(name[len(base) + 1:])
    return None


def own_folder(series_uid: str, base: str, last: int, look: Callable[[str], Folder | None]) -> Folder:
    """The folder of this series among "<base>", "<base>_2"...: the first that holds it, else
    the first free one. look(name) pictures a folder (None: blocked, a symlink, a file or a
    folder it may not read: taken, and not ours); last is the highest N on disk.

    Its folder may be any of them: a folder moved by hand into a sibling's name is that
    series' folder. Look at each that exists before taking the first free one, or a series
    would be stored twice."""
    free = None
    for number in range(1, 10_000):
        folder = look(folder_name(base, number))
        if folder is None:
            continue
        if folder.series_uid == series_uid:
            return folder
        if folder.series_uid is None and free is None:
            free = folder
        if free is not None and number >= last:
            return free
    raise OSError(f"more than 10,000 series share the folder name {base!r}")
