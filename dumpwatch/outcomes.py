"""What becomes of a file, in types: the worker's answer (Prepared or Failed), and the
Outcome each file ends with, as the journal, the log and sort-once's summary name it."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from dumpwatch.facts import Facts
from dumpwatch.naming import Name

# A log record about one file's outcome, which sort-once's summary also gives (counted by
# reason): sort-once keeps such records off stderr unless -v; serve and log files keep them.
PER_FILE = {"per_file": True}


class Outcome(StrEnum):
    """The journal's words for what happened to a file (its `outcome` column)."""

    SORTED = "sorted"  # placed in the tree
    DUPLICATE = "duplicate"  # the tree holds the same data set already: the source goes
    QUARANTINED = "quarantined"  # rejected: in the quarantine, its reason beside it
    LEFT = "left"  # stays in the dump for a later try (or a person), with the reason
    GONE = "gone"  # vanished from the dump before it was handled: nothing to do
    RENAMED = "renamed"  # a tree file given its echo suffix (journal rows only)


@dataclass
class Prepared:
    """A file read, checked and named, ready to be placed."""

    source: str
    sha256: str  # of the received file
    out_sha256: str  # of the bytes to place (differs when anonymised)
    size: int  # of the bytes to place
    dev: int
    ino: int
    source_size: int  # the source as read: moved only if it is still that file
    mtime_ns: int
    sop_uid: str
    series_uid: str
    name: Name
    body_size: int  # of the data set to place: the bytes after the file meta group
    identity: str | None = None  # of that data set, taken in a dry run (no staged copy to read)
    staged: str | None = None  # a copy written to the staging folder, to place instead of source
    fresh: bool = False  # written moments ago: its writeback was started early
    facts: Facts = field(default_factory=Facts)  # what the journal records for completion


@dataclass
class Failed:
    """A file that will not be placed now: to the QUARANTINED, LEFT for a later try, or GONE."""

    source: str
    action: Outcome
    reason: str
    sha256: str | None = None
    sop_uid: str | None = None
    series_uid: str = ""  # when known: a file left in the dump holds its series open


@dataclass
class Handled:
    """How one file was handled: its outcome, and where it went or why."""

    source: str
    outcome: Outcome
    detail: str
    series_uid: str = ""  # when known: a file left in the dump holds its series open
