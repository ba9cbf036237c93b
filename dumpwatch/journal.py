"""The journal: one SQLite row per outcome, written ahead of each move so a kill -9 loses none."""

from __future__ import annotations

import fcntl
import os
import sqlite3
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from dumpwatch import completion, schema
from dumpwatch.facts import Facts
from dumpwatch.keys import name_token, new_uid, path_token
from dumpwatch.outcomes import Outcome
from dumpwatch.state import UnsafeState, fd_path
from dumpwatch.text import now, printable


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _text(text: str | None) -> str | None:
    return None if text is None else printable(text)


_COUNTED = (Outcome.SORTED, Outcome.DUPLICATE)  # the outcomes counted into a series


def _facts(entry: Entry) -> tuple:
    """(study_uid, instance, echo, frames, sender, received, frame_sets, frames_missing,
    frames_note) as the journal stores them."""
    f = entry.facts
    if f is None:
        return (None,) * 9
    return (f.study_uid or None, f.instance, f.echo, f.frames, printable(f.sender) or None, f.received,
            f.frame_sets or None, f.frames_missing if f.frame_sets else None, printable(f.frames_note) or None)


FIND_SQL = (
    "SELECT * FROM outcomes WHERE id IN ("
    " SELECT id FROM outcomes WHERE name = :name"
    " UNION SELECT id FROM outcomes WHERE name = :token"
    " UNION SELECT id FROM outcomes WHERE sop_uid = :term"
    " UNION SELECT id FROM outcomes WHERE sop_uid = :uid"
    " UNION SELECT id FROM outcomes WHERE sha256 = :lower"
    " UNION SELECT id FROM outcomes WHERE dest = :term"
    " UNION SELECT id FROM outcomes WHERE dest = :absolute"
    ") ORDER BY id LIMIT :limit"
)


@dataclass
class Entry:
    outcome: str
    source: str | None = None
    sop_uid: str | None = None
    series_uid: str | None = None
    sha256: str | None = None
    dest: str | None = None
    reason: str | None = None
    kept: bool = False
    out_sha256: str | None = None
    id: int | None = None  # set once written
    time: str | None = None  # when it happened, if not now (a row rebuilt from the tree)
    facts: Facts | None = None  # what completion counts: study, instance, echo, sender (placed files)
    size: int | None = None  # bytes of the file where it goes (the disk forecast's arrival rate)


class Journal:
    """Append-mostly SQLite log. Survives kill -9 (WAL); answers look-ups by index."""

    def __init__(self, path: Path, mode: int = 0o660, key: bytes | None = None, dir_fd: int | None = None):
        """key: the anonymisation secret, when anonymising: the journal then names received
        files by keyed tokens (keys.path_token, keys.name_token), never by their own names,
        which hold original UIDs or patients' names; `where` finds them with the same key.
        dir_fd: the state folder holding path (state.StateFolder), proven dumpwatch's own:
        the journal is then made through it, and SQLite's file checked to be that one."""
        self.key = key
        if dir_fd is None:
            path.parent.mkdir(parents=True, exist_ok=True)
        # The journal names patients' files: never world-readable. SQLite gives its -wal and
        # -shm files the database file's mode, so the file is made first, with that mode.
        # O_NOFOLLOW: a symlink planted here (the state folder is the group's) must not get
        # that mode: pointed at the anonymisation key, it would make the key group-readable.
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        fd = os.open(path if dir_fd is None else path.name, flags, mode & 0o660, dir_fd=dir_fd)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise UnsafeState(f"{path} is not a file, so not dumpwatch's journal; remove it")
            if st.st_uid == os.geteuid():
                os.fchmod(fd, mode & 0o660)  # whatever the umask: the group writes it too
        finally:
            os.close(fd)
        self.identity = st.st_dev, st.st_ino  # the file SQLite writes to, whatever its name comes to hold
        self.counted: set[int] = set()  # ids of the series this process counted files into
        self.holder = -1  # fd of the journal's folder, flocked by hold_completions
        self.noted: dict[str, tuple] = {}  # what this process last wrote of each series (completion.note)
        self.path = path
        # What serve does once a series or study is complete (actions.queue): called in the
        # transaction that records the completions, with (db, completions, moment).
        self.after_completion: Callable[[sqlite3.Connection, list[completion.Completion], float], None] | None = None
        if dir_fd is None:
            self.uri = f"file:{quote(str(path))}?mode=rw"
        else:
            # SQLite opens by path. This one reaches the proven folder whatever its name now;
            # mode=rw: SQLite never creates a file, only opens the one made above.
            self.uri = f"file:{quote(fd_path(dir_fd, path.parent))}/{quote(path.name)}?mode=rw"
        self.db = self.connect() if dir_fd is not None else sqlite3.connect(
            path, isolation_level=None, timeout=60, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        try:
            # WAL with synchronous=NORMAL: a commit survives a crash of dumpwatch (kill -9) and a
            # clean reboot, and costs no fsync. After a power cut the last moment of outcomes may
            # be missing from the journal; the files themselves are safe (fsynced before they got
            # their names). With FULL, two fsyncs per batch slowed storescp beside us by a fifth.
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.migrated = schema.migrate(self.db, path)
        except (sqlite3.Error, schema.NewerJournal):
            self.db.close()  # a damaged file: the caller says so
            raise
        if dir_fd is not None:
            self._check_opened(path, dir_fd, st)

    def connect(self) -> sqlite3.Connection:
        """Another connection to this journal, for a thread of its own (actions.Actions)."""
        db = sqlite3.connect(self.uri, uri=True, isolation_level=None, timeout=60, check_same_thread=False)
        db.row_factory = sqlite3.Row
        return db

    def _check_opened(self, path: Path, dir_fd: int, made: os.stat_result) -> None:
        """SQLite turns the path into the folder's name once, and opens its -wal and -shm
        files by that name later: after it has, that name must still be the proven folder,
        holding the file made through it (else the folder was swapped meanwhile)."""
        opened = self.db.execute("PRAGMA database_list").fetchone()["file"]
        try:
            folder = os.stat(os.path.dirname(opened), follow_symlinks=False)
            file = os.stat(opened, follow_symlinks=False)
            agree = (_identity(folder) == _identity(os.fstat(dir_fd)) and stat.S_ISDIR(folder.st_mode)
                     and _identity(file) == _identity(made))
        except OSError:
            agree = False
        if not agree:
            self.db.close()
            raise UnsafeState(f"{path.parent} was replaced while dumpwatch opened its journal; "
                              "see what is there now before starting again")

    def close(self) -> None:
        self.db.close()
        if self.holder >= 0:
            os.close(self.holder)
            self.holder = -1

    def lost(self) -> str:
        """"was deleted" or "was replaced" if the journal's name no longer leads to the file
        this journal writes to (SQLite writes on into an unlinked file without a word); else ""."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return "was deleted"
        except OSError:
            return ""  # cannot tell: the next write says what is wrong
        return "" if (st.st_dev, st.st_ino) == self.identity else "was replaced"

    def empty(self) -> bool:
        return self.db.execute("SELECT 1 FROM outcomes LIMIT 1").fetchone() is None

    def rebuild_under_way(self) -> int | None:
        """The id of a rebuild from the tree that a stop cut short, if any."""
        row = self.db.execute("SELECT id FROM rebuilds WHERE finished IS NULL ORDER BY id DESC LIMIT 1").fetchone()
        return None if row is None else row[0]

    def begin_rebuild(self) -> int:
        with self._transaction() as db:
            return db.execute("INSERT INTO rebuilds (started) VALUES (?)", (now(),)).lastrowid

    def finish_rebuild(self, rebuild: int, files: int) -> None:
        with self._transaction() as db:
            db.execute("UPDATE rebuilds SET finished = ?, files = files + ? WHERE id = ?", (now(), files, rebuild))

    def has_dest(self, dest: str) -> bool:
        return self.db.execute("SELECT 1 FROM outcomes WHERE dest = ? LIMIT 1", (_text(dest),)).fetchone() is not None

    def begin(self, entries: Iterable[Entry]) -> None:
        """Write entries as under way (done = 0), before the files move."""
        self._insert(entries, done=0)

    def record(self, entries: Iterable[Entry]) -> None:
        """Write entries that need no move (left files), or whose move is over."""
        self._insert(entries, done=1)

    def _insert(self, entries: Iterable[Entry], done: int) -> None:
        entries = list(entries)
        if not entries:
            return
        stamp = now()
        with self._transaction() as db:
            # Inside BEGIN IMMEDIATE no one else writes, and SQLite numbers new rows max(id) + 1
            # onwards: the ids are known without a round trip per row.
            first = db.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM outcomes").fetchone()[0]
            db.executemany(
                "INSERT INTO outcomes (id, time, outcome, done, kept, source, name, sop_uid, series_uid,"
                " sha256, out_sha256, dest, reason, study_uid, instance, echo, frames, sender, received, frame_sets,"
                " frames_missing, frames_note, size) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                [(first + number, e.time or stamp, e.outcome, done, int(e.kept), *self._source(e), e.sop_uid,
                  e.series_uid, e.sha256, e.out_sha256, _text(e.dest), _text(e.reason), *_facts(e), e.size)
                 for number, e in enumerate(entries)],
            )
            for number, entry in enumerate(entries):
                entry.id = first + number
            self._drop_repeats(db, [e for e in entries if e.outcome == Outcome.LEFT])
            counted = [e for e in entries if e.facts is not None and e.series_uid]
            completion.note(db, [(e.series_uid or "", e.facts) for e in counted if e.facts is not None], self.noted)
            if done:
                completion.placed(db, [e.id for e in counted if e.outcome in _COUNTED and e.id is not None])

    def finish(self, done: Iterable[Entry], undone: Iterable[Entry] = ()) -> None:
        """Mark moves as over. Entries in `undone` did not happen: their rows become 'left'."""
        done, undone = list(done), list(undone)
        if not done and not undone:
            return
        stamp = now()
        with self._transaction() as db:
            db.executemany("UPDATE outcomes SET done = 1, time = ? WHERE id = ?", [(stamp, e.id) for e in done])
            # Rows that named a renamed file's old place now name the new one.
            db.executemany(
                "UPDATE outcomes SET dest = ? WHERE dest = ? AND id != ?",
                [(_text(e.dest), _text(e.source), e.id) for e in done if e.outcome == "renamed"],
            )
            db.executemany(
                "UPDATE outcomes SET done = 1, time = ?, outcome = 'left', dest = NULL, reason = ? WHERE id = ?",
                [(stamp, _text(e.reason), e.id) for e in undone],
            )
            self._drop_repeats(db, undone)
            completion.placed(db, [e.id for e in done if e.outcome in _COUNTED and e.id is not None])

    def hold_completions(self) -> None:
        """While this process lives (sort-once), serve completes nothing: sort-once's files
        still to come are files serve cannot see. A shared flock on the journal's folder,
        which a kill -9 releases. Never on the journal file itself: closing any descriptor of
        it would drop the POSIX locks SQLite holds on it in this process."""
        if self.holder < 0:
            self.holder = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            fcntl.flock(self.holder, fcntl.LOCK_SH)

    def completions_held(self) -> bool:
        """Whether a sort-once holds completions (hold_completions) on this journal now."""
        try:
            fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return False  # the journal's folder is gone: health says so
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    def count(self) -> None:
        """Count the files placed since the last count into their series (completion.catch_up)."""
        if completion.waiting(self.db):
            with self._transaction() as db:
                self.counted |= completion.catch_up(db, time.time())

    def complete(self, series_idle: float, study_idle: float, held: set[str] | None) -> list[completion.Completion]:
        """Count what was placed, then mark complete the series and studies idle long enough
        (completion.complete): held None holds them all."""
        moment = time.time()
        waiting = completion.waiting(self.db)
        if not waiting and (held is None or not completion.due(self.db, moment, series_idle, study_idle)):
            return []  # nothing to write: no write transaction
        with self._transaction() as db:
            self.counted |= completion.catch_up(db, moment)
            done = completion.complete(db, moment, series_idle, study_idle, held)
            if done and self.after_completion is not None:
                self.after_completion(db, done, moment)
            return done

    def complete_counted(self, series_idle: float, study_idle: float,
                         held: set[str] | None = None) -> list[completion.Completion]:
        """Mark complete at once every series this process counted files into, and their
        studies once all their series are (sort-once, as it ends); the others as their idle
        times say (those of a sort-once that was killed, say)."""
        with self._transaction() as db:
            moment = time.time()
            self.counted |= completion.catch_up(db, moment)
            done = completion.complete(db, moment, series_idle, study_idle, held or set(), only=self.counted)
            if done and self.after_completion is not None:
                self.after_completion(db, done, moment)
            return done

    def _source(self, entry: Entry) -> tuple[str | None, str | None]:
        """(source, name) as the journal stores them."""
        if not entry.source:
            return None, None
        if self.key is not None and entry.outcome != "renamed":  # a rename's source is in the tree
            return path_token(self.key, entry.source), name_token(self.key, os.path.basename(entry.source))
        return _text(entry.source), _text(os.path.basename(entry.source))

    def _drop_repeats(self, db: sqlite3.Connection, left: list[Entry]) -> None:
        """A file left in place for the same reason as last time keeps one row, the newest: a
        file that cannot be read is tried every minute, and a row each time would grow without end."""
        rows = []
        for entry in left:
            if entry.source and entry.id is not None:
                source, name = self._source(entry)
                rows.append((name, source, _text(entry.reason), entry.id))
        db.executemany(
            "DELETE FROM outcomes WHERE name = ? AND source = ? AND outcome = 'left' AND done = 1"
            " AND reason IS ? AND id < ?", rows)

    def forget(self, ids: Iterable[int | None]) -> None:
        """Drop rows of moves that never started (found by recovery); None: a row never written."""
        with self._transaction() as db:
            db.executemany("DELETE FROM outcomes WHERE id = ? AND done = 0", [(i,) for i in ids if i is not None])

    def pending(self) -> list[sqlite3.Row]:
        return self.db.execute("SELECT * FROM outcomes WHERE done = 0 ORDER BY id").fetchall()

    def find(self, term: str, limit: int = 200, tree: Path | None = None) -> list[sqlite3.Row]:
        """Rows about a file: by its dump name or path, SOPInstanceUID, sha256 or sorted path.
        With the anonymisation key, also by its original name or SOPInstanceUID. A path in
        the sorted tree (below `tree`) is looked up by its place alone: its base name (0001.dcm)
        is also the dump name of unrelated files (a CD's export)."""
        term = printable(term)
        name = os.path.basename(term.rstrip("/"))
        absolute = os.path.abspath(term)
        values = {"name": name, "term": term, "lower": term.lower(), "absolute": absolute,
                  "limit": limit, "token": name, "uid": term}
        if self.key is not None:
            values["token"] = name_token(self.key, name)
            values["uid"] = new_uid(self.key, term)
        root = os.path.abspath(tree) if tree is not None else None
        if root is not None and absolute.startswith(root.rstrip("/") + "/"):
            values["name"] = values["token"] = None  # name = NULL matches no row
        return self.db.execute(FIND_SQL, values).fetchall()

    def _transaction(self):
        return transaction(self.db)


class transaction:  # noqa: N801  (used as a function: `with transaction(db) as db:`)
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on an exception, on a connection in autocommit mode."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, kind, value, traceback) -> None:
        self.db.execute("COMMIT" if kind is None else "ROLLBACK")
