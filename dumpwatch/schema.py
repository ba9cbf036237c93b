"""The journal's schema, versioned with PRAGMA user_version, and the migrations between versions.

Version 1 is the journal as dumpwatch wrote it before it was versioned (user_version 0 with
its tables there); version 2 records what completion and completeness need; version 3 the
hook runs and notices that follow a completion; version 4 file sizes, for the disk forecast. A journal opens
at any older version and is migrated in place, each step in one transaction: a kill -9
half-way leaves it at the version before. A journal from a newer dumpwatch is refused.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

from dumpwatch.errors import ConfigError

_V1 = """
CREATE TABLE IF NOT EXISTS outcomes (
    id INTEGER PRIMARY KEY,
    time TEXT NOT NULL,        -- UTC, ISO 8601
    outcome TEXT NOT NULL,     -- sorted, duplicate, quarantined, left, renamed
    done INTEGER NOT NULL,     -- 0 while the move is under way; start-up recovery settles it
    kept INTEGER NOT NULL DEFAULT 0, -- 1 when the source stays where it was (sort-once --copy)
    source TEXT,               -- the path the file had when dumpwatch found it
    name TEXT,                 -- its file name, to look up the cryptic names storescp gives
    sop_uid TEXT,
    series_uid TEXT,
    sha256 TEXT,               -- of the file as received
    out_sha256 TEXT,           -- of the file as placed, when anonymising changed it
    dest TEXT,                 -- where it is now: in the sorted tree or the quarantine
    reason TEXT                -- why it was quarantined or left
);
CREATE INDEX IF NOT EXISTS outcomes_name ON outcomes(name);
CREATE INDEX IF NOT EXISTS outcomes_sop_uid ON outcomes(sop_uid);
CREATE INDEX IF NOT EXISTS outcomes_sha256 ON outcomes(sha256);
CREATE INDEX IF NOT EXISTS outcomes_dest ON outcomes(dest);
CREATE INDEX IF NOT EXISTS outcomes_pending ON outcomes(done) WHERE done = 0;
CREATE INDEX IF NOT EXISTS outcomes_time ON outcomes(time);
CREATE TABLE IF NOT EXISTS rebuilds (  -- the journal was found new beside a tree that held files
    id INTEGER PRIMARY KEY,
    started TEXT NOT NULL,     -- UTC, ISO 8601: the history before is lost
    finished TEXT,             -- NULL while under way (a start stopped half-way goes on with it)
    files INTEGER NOT NULL DEFAULT 0  -- rows rebuilt from the tree
);
"""

# Times in the tables below are seconds since the epoch (UTC), so that idle times are a subtraction.
_V2 = """
ALTER TABLE outcomes ADD COLUMN study_uid TEXT;
ALTER TABLE outcomes ADD COLUMN instance INTEGER;  -- InstanceNumber
ALTER TABLE outcomes ADD COLUMN echo INTEGER;      -- EchoNumbers
ALTER TABLE outcomes ADD COLUMN frames INTEGER;    -- NumberOfFrames (1 for a single-frame image)
ALTER TABLE outcomes ADD COLUMN sender TEXT;       -- the calling AE title (file meta, as storescp wrote it)
ALTER TABLE outcomes ADD COLUMN received REAL;     -- when the file was written into the dump
ALTER TABLE outcomes ADD COLUMN frame_sets INTEGER;     -- an enhanced multi-frame file's frame sets, checked
ALTER TABLE outcomes ADD COLUMN frames_missing INTEGER; -- positions its frame sets lack
ALTER TABLE outcomes ADD COLUMN frames_note TEXT;       -- which, in words
CREATE TABLE studies (
    id INTEGER PRIMARY KEY,
    study_uid TEXT NOT NULL UNIQUE,
    folder TEXT,               -- its folder in the tree (the template's first level)
    study_date TEXT,
    first REAL, last REAL,     -- first and last arrival of its files
    touched REAL,              -- when a file of it was last sorted: its idle time starts here
    state TEXT NOT NULL DEFAULT 'receiving',  -- receiving, complete, reopened
    completed REAL, completions INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX studies_open ON studies(state) WHERE state != 'complete';
CREATE INDEX studies_last ON studies(last);
CREATE TABLE series (
    id INTEGER PRIMARY KEY,
    series_uid TEXT NOT NULL UNIQUE,
    study_id INTEGER REFERENCES studies(id),
    folder TEXT,               -- its folder in the tree, relative to dir_out
    number TEXT, description TEXT, modality TEXT,
    senders TEXT,              -- calling AE titles, in the order they first sent a file of it, between backslashes
    expected INTEGER, expected_from TEXT, per_echo INTEGER NOT NULL DEFAULT 0,
    files INTEGER NOT NULL DEFAULT 0,     -- sorted files
    frames INTEGER NOT NULL DEFAULT 0,
    frame_sets INTEGER NOT NULL DEFAULT 0,      -- of its enhanced multi-frame files, checked
    frames_missing INTEGER NOT NULL DEFAULT 0,  -- positions those frame sets lack
    frames_note TEXT,                           -- which, in words
    resent INTEGER NOT NULL DEFAULT 0,    -- identical re-sends (duplicates): nothing new
    late INTEGER NOT NULL DEFAULT 0,      -- files sorted after it was complete
    numbers TEXT,  -- instance numbers of its sorted files, per echo (0: none), as JSON ranges:
                   -- {"1": {"ranges": [[1, 36]], "repeats": [], "unnumbered": 0}, ...}
    first REAL, last REAL, touched REAL,
    state TEXT NOT NULL DEFAULT 'receiving',
    completed REAL, completions INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX series_open ON series(state) WHERE state != 'complete';
CREATE INDEX series_study ON series(study_id);
CREATE INDEX series_last ON series(last);
CREATE TABLE uncounted (      -- placed files not yet counted into their series (completion.catch_up)
    id INTEGER PRIMARY KEY     -- outcomes(id)
);
CREATE TABLE completions (    -- each time a series or study became complete: what hooks act on
    id INTEGER PRIMARY KEY,
    time REAL NOT NULL,
    kind TEXT NOT NULL,       -- series or study
    series_id INTEGER, study_id INTEGER,
    again INTEGER NOT NULL DEFAULT 0,  -- 1 when it had been complete before (reopened by a late file)
    files INTEGER NOT NULL
);
CREATE INDEX completions_time ON completions(time);
"""

# Version 3: what serve does once a scan is complete: hook runs and notices, queued in the
# transaction that records the completion, so that none is lost or done twice by a kill -9.
_V3 = """
CREATE TABLE hook_runs (
    id INTEGER PRIMARY KEY,
    completion_id INTEGER NOT NULL,  -- completions(id): what it acts on
    hook TEXT NOT NULL,              -- on_series_complete or on_study_complete
    series_id INTEGER, study_id INTEGER,
    state TEXT NOT NULL,             -- waiting, running, ok, failed, skipped, interrupted
    reason TEXT,                     -- why it was skipped or failed, in words
    argv TEXT,                       -- JSON: the arguments it ran with
    queued REAL NOT NULL, started REAL, ended REAL,
    exit INTEGER,                    -- exit status; negative: the signal that ended it
    tries INTEGER NOT NULL DEFAULT 0,     -- runs of it (retries after a failure count)
    restarts INTEGER NOT NULL DEFAULT 0,  -- times a serve that was killed left it unfinished
    pid INTEGER, pid_start INTEGER,  -- its process (a session of its own) and that process's start time
    output TEXT                      -- the last lines it printed
);
CREATE INDEX hook_runs_open ON hook_runs(state) WHERE state IN ('waiting', 'running');
CREATE INDEX hook_runs_series ON hook_runs(series_id);
CREATE INDEX hook_runs_study ON hook_runs(study_id);
CREATE INDEX hook_runs_ended ON hook_runs(ended);
CREATE TABLE notices (
    id INTEGER PRIMARY KEY,
    time REAL NOT NULL,
    event TEXT NOT NULL,             -- study_complete, quarantine, unhealthy, healthy
    channel TEXT NOT NULL,           -- email or webhook
    subject TEXT NOT NULL,           -- one line
    body TEXT NOT NULL,              -- JSON: what the message says
    state TEXT NOT NULL DEFAULT 'waiting',  -- waiting, sent, failed (given up)
    tries INTEGER NOT NULL DEFAULT 0, next_try REAL, sent REAL, error TEXT
);
CREATE INDEX notices_open ON notices(state, next_try) WHERE state = 'waiting';
CREATE TABLE marks (               -- where notices stand: the last quarantined row told of, the last health
    name TEXT PRIMARY KEY,
    value TEXT
);
INSERT INTO marks (name, value) SELECT 'quarantine', COALESCE(MAX(id), 0) FROM outcomes;
"""

# Version 4: what the operators' view needs: each file's size (the tree's arrival rate in bytes,
# for the disk forecast) and counts by outcome without reading every row. The index is partial:
# a query uses it only when it names its whole WHERE (status.Tally's do), so it never draws the
# planner away from the better index of another query that names an outcome.
_V4 = """
ALTER TABLE outcomes ADD COLUMN size INTEGER;  -- bytes of the file as placed (sorted) or as quarantined
CREATE INDEX outcomes_counted ON outcomes(outcome, done) WHERE outcome IN ('sorted', 'duplicate', 'quarantined')
    AND done = 1;
"""

LATEST = 4


def _script(script: str) -> Callable[[sqlite3.Connection], None]:
    def run(db: sqlite3.Connection) -> None:
        # Statement by statement, inside the caller's transaction (executescript would commit it).
        statement = ""
        for line in script.splitlines(keepends=True):
            statement += line
            if sqlite3.complete_statement(statement):
                db.execute(statement)
                statement = ""
        assert not statement.strip(), statement

    return run


# MIGRATIONS[n] takes a journal from version n to n + 1.
MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {
    0: _script(_V1), 1: _script(_V2), 2: _script(_V3), 3: _script(_V4)}


class NewerJournal(ConfigError):
    """The journal was written by a newer dumpwatch."""


def version(db: sqlite3.Connection) -> int:
    return db.execute("PRAGMA user_version").fetchone()[0]


def migrate(db: sqlite3.Connection, path: Path) -> list[int]:
    """Bring the journal to LATEST; returns the versions it went through (none when already there)."""
    steps: list[int] = []
    while True:
        db.execute("BEGIN IMMEDIATE")  # one writer: two processes opening it migrate once
        try:
            current = version(db)
            if current > LATEST:
                raise NewerJournal(f"written by a newer dumpwatch (journal schema {current}; this one knows up to "
                                   f"{LATEST}): upgrade dumpwatch, or point `journal` elsewhere", path)
            if current == LATEST:
                db.execute("COMMIT")
                return steps
            MIGRATIONS[current](db)
            db.execute(f"PRAGMA user_version = {current + 1}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        steps.append(current + 1)
