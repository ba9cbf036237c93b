"""`dumpwatch send`: every DICOM file below a folder to a receiver, with DCMTK's storescu.

storescu on its own proposes a fixed list of SOP classes, each in uncompressed transfer
syntaxes: a compressed file, or a private SOP class such as Siemens' physio log
(1.3.12.2.1107.5.9.1), finds no presentation context and is refused. Here each file's SOP
class and transfer syntax are read from its header, and storescu is given an association
profile that proposes exactly those pairs, one presentation context each. An association
holds 128 presentation contexts at most: more pairs make several storescu runs.

storescu is run with an argv list, never through a shell, and says per file what became of
it (-v); its exit status alone says nothing of files it could not store (-nh goes on).
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID

from dumpwatch.fsops import entries_below
from dumpwatch.text import printable

MAX_CONTEXTS = 128  # presentation contexts in one association: odd IDs 1..255
ARGV_BYTES = 256 * 1024  # file names given to one storescu run, at most (the kernel allows 2 MiB in all)
CONNECT_TIMEOUT = 30  # seconds storescu waits for the receiver to answer a connection
DEFLATED = ("1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.95")  # read no further than the file meta
DICOMDIR_CLASS = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage: an index, not an object to store
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
_HOST = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
# DICOM's string of at most 64 digits and dots. storescu reads the profile as a file of
# `key = value` lines: a value with anything else in it could add lines of its own.


@dataclass(frozen=True)
class Item:
    """One DICOM file to send, as storescu will see it."""

    path: str
    sop_class: str
    syntax: str  # transfer syntax UID
    instance: str

    @property
    def pair(self) -> tuple[str, str]:
        return self.sop_class, self.syntax


@dataclass
class Listing:
    """The files below a folder: those to send, those that cannot be sent, those skipped."""

    items: list[Item] = field(default_factory=list)
    unsendable: list[tuple[str, str]] = field(default_factory=list)  # (path, why): DICOM, but not sendable
    skipped: Counter = field(default_factory=Counter)  # why -> files
    examples: dict[str, str] = field(default_factory=dict)  # why -> the first such file

    def skip(self, path: str, why: str) -> None:
        self.skipped[why] += 1
        self.examples.setdefault(why, path)


@dataclass(frozen=True)
class Receiver:
    host: str
    port: int
    called: str  # the receiver's AE title (-aec)
    calling: str  # ours (-aet)

    def __str__(self) -> str:
        return f"{self.called} at {self.host}:{self.port}"


@dataclass(frozen=True)
class Result:
    item: Item
    sent: bool
    reason: str = ""  # why it was not sent, in storescu's words and ours
    warning: str = ""  # the receiver stored it with a warning status


class SendError(Exception):
    """dumpwatch send cannot run at all (storescu missing, a bad argument)."""


def check_receiver(receiver: Receiver) -> None:
    """Refuse values that storescu would read as something else (an option, a command file)."""
    if not _HOST.fullmatch(receiver.host) or len(receiver.host) > 255:
        raise SendError(f"not a host name or IPv4 address: {receiver.host!r}")
    if not 1 <= receiver.port <= 65535:
        raise SendError(f"a port is 1 to 65535, not {receiver.port}")
    titles = (("the receiver's AE title (--aec)", receiver.called), ("our AE title (--aet)", receiver.calling))
    for what, title in titles:
        if not 1 <= len(title) <= 16 or not all(32 <= ord(c) < 127 and c != "\\" for c in title):
            raise SendError(f"{what} has 1 to 16 plain ASCII characters without backslashes: {title!r}")
        if title.strip() == "" or title[0] in "-@+":
            raise SendError(f"{what} may not be blank nor start with '-', '+' or '@' "
                            f"(storescu would take it for an option or a file of options): {title!r}")


def _uid(value: object) -> str:
    return str(value or "").strip().rstrip("\0").strip()


def read_item(path: str) -> Item | tuple[str, str]:
    """What storescu needs to know of a file: its SOP class and instance, as in its data set
    (storescu sends those), and its transfer syntax. Reads the header only, never the pixel
    data, and for a deflated data set only the file meta information (it could inflate to
    gigabytes). Else ("skip", why) for a file that is not a DICOM file, or ("fail", why) for
    a DICOM file that cannot be sent."""
    try:
        meta = read_file_meta_info(path)
    except InvalidDicomError:
        return "skip", "not a DICOM file (no 'DICM' marker at byte 128)"
    except OSError as exc:
        return "fail", f"cannot read it: {exc.strerror or exc}"
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds for a damaged header
        return "fail", f"unreadable DICOM file meta information: {type(exc).__name__}: {exc}"
    syntax = _uid(meta.get("TransferSyntaxUID"))
    sop_class = _uid(meta.get("MediaStorageSOPClassUID"))
    instance = _uid(meta.get("MediaStorageSOPInstanceUID"))
    if sop_class == DICOMDIR_CLASS:
        return "skip", "a DICOMDIR (an index of the files beside it, not sent)"
    if syntax not in DEFLATED:
        try:
            ds = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"])
        except OSError as exc:
            return "fail", f"cannot read it: {exc.strerror or exc}"
        except Exception as exc:  # noqa: BLE001
            return "fail", f"unreadable DICOM header: {type(exc).__name__}: {exc}"
        sop_class = _uid(ds.get("SOPClassUID")) or sop_class
        instance = _uid(ds.get("SOPInstanceUID")) or instance
    for name, value in (("SOP Class UID", sop_class), ("SOP Instance UID", instance), ("transfer syntax", syntax)):
        if not value:
            return "fail", f"no {name} in its header: storescu cannot send it"
        if len(value) > 64 or not _UID.fullmatch(value):
            return "fail", f"its {name} is not a valid UID: {printable(value)!r}"
    return Item(path, sop_class, syntax, instance)


def list_folder(folder: Path) -> Listing:
    """Every file below folder, in name order; symlinks are not followed."""
    listing = Listing()
    for path in _walk(str(folder), listing) if os.path.isdir(folder) else [str(folder)]:
        try:
            mode = os.lstat(path).st_mode
        except OSError as exc:
            listing.unsendable.append((path, f"cannot read it: {exc.strerror}"))
            continue
        if stat.S_ISLNK(mode):
            listing.skip(path, "a symbolic link (not followed)")
            continue
        if not stat.S_ISREG(mode):
            listing.skip(path, "not a regular file")
            continue
        found = read_item(path)
        if isinstance(found, Item):
            listing.items.append(found)
        elif found[0] == "skip":
            listing.skip(path, found[1])
        else:
            listing.unsendable.append((path, found[1]))
    return listing


def _walk(root: str, listing: Listing) -> Iterator[str]:
    """Every entry below root that is not a folder, in name order; a folder that cannot be
    listed is noted in listing.unsendable (its files are not sent)."""
    return entries_below(root, lambda folder, exc: listing.unsendable.append(
        (folder, f"cannot list this folder: {exc.strerror}")))


def profile_text(pairs: Iterable[tuple[str, str]]) -> str:
    """A storescu association profile (the -xf file): one presentation context for each
    (SOP class, transfer syntax) pair, in a profile named Default."""
    pairs = sorted(set(pairs))
    if len(pairs) > MAX_CONTEXTS:
        raise ValueError(f"{len(pairs)} presentation contexts: one association holds {MAX_CONTEXTS} at most")
    for uid in {u for pair in pairs for u in pair}:
        if len(uid) > 64 or not _UID.fullmatch(uid):
            raise ValueError(f"not a UID: {uid!r}")
    syntaxes = sorted({ts for _, ts in pairs})
    lines = ["[[TransferSyntaxes]]"]
    for number, ts in enumerate(syntaxes):
        lines += [f"[TS{number}]", f"TransferSyntax1 = {ts}"]
    lines += ["[[PresentationContexts]]", "[Contexts]"]
    for number, (sop, ts) in enumerate(pairs, start=1):
        lines.append(f"PresentationContext{number} = {sop}\\TS{syntaxes.index(ts)}")
    lines += ["[[Profiles]]", "[Default]", "PresentationContexts = Contexts"]
    return "\n".join(lines) + "\n"


def write_profile(items: Iterable[Item], path: Path) -> Path:
    """The profile for these files, written to path (for storescu -xf path Default)."""
    path.write_text(profile_text(item.pair for item in items))
    return path


def batches(items: list[Item], contexts: int = MAX_CONTEXTS, argv_bytes: int = ARGV_BYTES) -> list[list[Item]]:
    """The files in groups that one storescu run can send: at most `contexts` distinct
    (SOP class, transfer syntax) pairs, and names of at most argv_bytes in all. Files keep
    their order within a group."""
    pairs = sorted({item.pair for item in items})
    groups: list[list[Item]] = []
    for start in range(0, len(pairs), contexts):
        chosen = set(pairs[start:start + contexts])
        batch: list[Item] = []
        size = 0
        for item in items:
            if item.pair not in chosen:
                continue
            length = len(os.fsencode(item.path)) + 1
            if batch and size + length > argv_bytes:
                groups.append(batch)
                batch, size = [], 0
            batch.append(item)
            size += length
        if batch:
            groups.append(batch)
    return groups


def storescu_argv(profile: Path, receiver: Receiver, paths: list[str], program: str = "storescu") -> list[str]:
    """storescu's argv: verbose (a line per file sent), going on after a refused file (-nh).
    The paths are absolute, so none can be read as an option."""
    assert all(os.path.isabs(p) for p in paths)
    return [program, "-v", "-nh", "-to", str(CONNECT_TIMEOUT), "-xf", str(profile), "Default",
            "-aet", receiver.calling, "-aec", receiver.called, receiver.host, str(receiver.port), *paths]


def _syntax_name(uid: str) -> str:
    name = UID(uid).name
    return uid if name == uid else f"{name} ({uid})"


def _class_name(uid: str) -> str:
    name = UID(uid).name
    return f"private SOP class {uid}" if name == uid else f"{name} ({uid})"


class _Reader:
    """storescu's log (stderr, one `X: text` line each) read as it comes, file by file."""

    def __init__(self, batch: list[Item], receiver: Receiver, report: Callable[[Result], None]):
        self.waiting = {item.path: item for item in batch}  # not yet begun, in order
        self.receiver = receiver
        self.report = report
        self.current: Item | None = None
        self.status = ""  # the store response's status text
        self.errors: list[str] = []  # E: and F: lines of the current file
        self.warnings: list[str] = []
        self.before: list[str] = []  # F: and E: lines before any file: the association failed
        self.notes: list[str] = []  # W: lines before any file: files storescu left out when it checked them
        self.results: list[Result] = []

    def line(self, raw: bytes) -> None:
        text = os.fsdecode(raw.rstrip(b"\r\n"))
        level, _, message = text.partition(": ")
        if level not in ("F", "E", "W", "I", "D", "T") or not _:
            level, message = "", text
        if level == "I" and message.startswith("Sending file: "):
            self._finish()
            name = message[len("Sending file: "):]
            item = self.waiting.pop(name, None)
            if item is None and self.waiting:  # a name with a line break in it: the next one
                item = self.waiting.pop(next(iter(self.waiting)))
            self.current = item
            return
        if self.current is None:
            if level in ("F", "E"):
                self.before.append(message)
            elif level == "W":
                self.notes.append(message)
            return
        if level == "I" and message.startswith("Received Store Response ("):
            self.status = message[len("Received Store Response ("):].rstrip(")")
        elif level == "I" and message == "Releasing Association":
            self._finish()
        elif level in ("F", "E") and not message.startswith("Store Failed, file: "):
            self.errors.append(message)
        elif level == "W":
            self.warnings.append(message)

    def _finish(self) -> None:
        item, self.current = self.current, None
        if item is None:
            return
        status, errors, warnings = self.status, self.errors, self.warnings
        self.status, self.errors, self.warnings = "", [], []
        if status.startswith("Success") and not errors:
            result = Result(item, True)
        elif status.startswith("Warning") and not errors:
            result = Result(item, True, warning=status)
        else:
            result = Result(item, False, self._why(item, status, errors, warnings))
        self.results.append(result)
        self.report(result)

    def _why(self, item: Item, status: str, errors: list[str], warnings: list[str]) -> str:
        said = "; ".join(errors + [w for w in warnings if "unable to convert" in w])
        if any(e.startswith("No presentation context") for e in errors) or "unable to convert" in said:
            return (f"{self.receiver} does not accept {_class_name(item.sop_class)} in "
                    f"{_syntax_name(item.syntax)} (storescu: {said})")
        if status:
            return f"{self.receiver} refused it: {status}" + (f" (storescu: {said})" if said else "")
        return f"storescu: {said}" if said else "storescu did not say that it was stored"

    def end(self, code: int) -> None:
        """storescu exited with code: every file it did not begin failed with the reason."""
        self._finish()
        if not self.waiting:
            return
        if self.before:
            why = f"storescu could not send to {self.receiver}: " + "; ".join(self.before)
            if "Connection refused" in why:
                why += f" (nothing listens on port {self.receiver.port} of {self.receiver.host})"
        else:
            why = f"storescu ended (exit status {code}) before sending it"
        for item in self.waiting.values():
            said = [note for note in self.notes if item.path in note]
            result = Result(item, False, f"storescu left it out: {said[0]}" if said else why)
            self.results.append(result)
            self.report(result)
        self.waiting.clear()


def run_batch(batch: list[Item], receiver: Receiver, work: Path, report: Callable[[Result], None],
              program: str = "storescu") -> list[Result]:
    """One storescu run: one association for the files of batch, with a profile for them."""
    profile = write_profile(batch, work / "profile.cfg")
    argv = storescu_argv(profile, receiver, [item.path for item in batch], program)
    # Nagle's algorithm costs DCMTK 50x over loopback (scripts/storescp.sh).
    env = {**os.environ, "TCP_NODELAY": "1"}
    reader = _Reader(batch, receiver, report)
    try:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, env=env)
    except FileNotFoundError:
        raise SendError(f"{program} is not installed: dumpwatch send runs DCMTK's storescu "
                        "(apt-get install dcmtk)") from None
    assert process.stderr is not None
    with process:
        for raw in process.stderr:
            reader.line(raw)
    reader.end(process.returncode)
    return reader.results


@dataclass
class Sent:
    """What one `dumpwatch send` did."""

    results: list[Result] = field(default_factory=list)
    runs: int = 0  # storescu runs, an association each
    elapsed: float = 0.0

    @property
    def delivered(self) -> list[Result]:
        return [r for r in self.results if r.sent]

    @property
    def failed(self) -> list[Result]:
        return [r for r in self.results if not r.sent]


def send(items: list[Item], receiver: Receiver, report: Callable[[Result], None] = lambda r: None,
         program: str = "storescu") -> Sent:
    """Send items to receiver, as many storescu runs as the presentation context limit asks."""
    check_receiver(receiver)
    outcome = Sent()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dumpwatch-send-") as work:
        for batch in batches(items):
            outcome.results += run_batch(batch, receiver, Path(work), report, program)
            outcome.runs += 1
    outcome.elapsed = time.perf_counter() - started
    return outcome
