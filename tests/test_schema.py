"""The journal's schema versions: a journal written by an earlier dumpwatch opens and is
migrated in place, keeping every row; a migration cut short leaves the version before."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from dcmtk import write_config

from dumpwatch import schema
from dumpwatch.config import read_config
from dumpwatch.journal import Journal
from dumpwatch.sortonce import sort_dir

from helpers import REPO, copy_testdata

RELEASED = REPO / "tests" / "journals" / "release-2e887ec.sqlite3"
V1_COLUMNS = "id, time, outcome, done, kept, source, name, sop_uid, series_uid, sha256, out_sha256, dest, reason"


def rows(path: Path, sql: str) -> list[tuple]:
    db = sqlite3.connect(path)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


@pytest.fixture
def released(tmp_path) -> Path:
    path = tmp_path / "journal.sqlite3"
    shutil.copyfile(RELEASED, path)
    return path


def test_a_journal_from_the_release_before_is_migrated_in_place(released):
    before = rows(released, f"SELECT {V1_COLUMNS} FROM outcomes ORDER BY id")
    assert rows(released, "PRAGMA user_version") == [(0,)] and len(before) == 66
    journal = Journal(released)
    try:
        assert journal.migrated == [1, 2, 3, 4]
        assert len(journal.find("junk.txt")) == 1  # the old rows answer as before
    finally:
        journal.close()
    assert rows(released, "PRAGMA user_version") == [(schema.LATEST,)]
    assert rows(released, f"SELECT {V1_COLUMNS} FROM outcomes ORDER BY id") == before
    assert rows(released, "SELECT count(*) FROM outcomes WHERE instance IS NOT NULL OR size IS NOT NULL") == [(0,)]
    # Files quarantined before the upgrade were told of by the old way (status, the log): the
    # first quarantine notice starts after them.
    assert rows(released, "SELECT CAST(value AS INTEGER) FROM marks WHERE name = 'quarantine'") == \
        rows(released, "SELECT MAX(id) FROM outcomes") == [(66,)]
    again = Journal(released)
    try:
        assert again.migrated == []
    finally:
        again.close()


def test_sorting_into_a_migrated_journal_records_series(released, tmp_path, testdata):
    site = write_config(tmp_path / "site", journal=str(released))
    copy_testdata(testdata, tmp_path / "dump", "ge")
    summary = sort_dir(tmp_path / "dump", read_config(site))
    assert summary.counts["sorted"] == 6 and len(summary.completions) == 4  # 2 series, 2 studies
    assert rows(released, "SELECT count(*) FROM outcomes") == [(72,)]
    sizes = dict(rows(released, "SELECT dest, size FROM outcomes WHERE size IS NOT NULL"))
    assert len(sizes) == 6 and all(os.path.getsize(dest) == size for dest, size in sizes.items())
    out = subprocess.run([sys.executable, "-m", "dumpwatch", "--config", str(site), "report"], capture_output=True,
                         text=True)
    assert out.returncode == 0 and "006-B0map" in out.stdout and "missing 28 (3-16, 19-32)" in out.stdout


def test_report_and_status_on_a_journal_not_migrated_yet(released, tmp_path):
    site = write_config(tmp_path / "site", journal=str(released))
    out = subprocess.run([sys.executable, "-m", "dumpwatch", "--config", str(site), "report"], capture_output=True,
                         text=True)
    assert out.returncode == 1 and "from an older dumpwatch (schema 0)" in out.stderr
    status = subprocess.run([sys.executable, "-m", "dumpwatch", "--config", str(site), "status"],
                            capture_output=True, text=True)
    assert "cannot be read" not in status.stdout and "completed    " not in status.stdout
    assert rows(released, "PRAGMA user_version") == [(0,)]  # looking changes nothing


def test_a_journal_from_a_newer_dumpwatch_is_refused(released):
    db = sqlite3.connect(released)
    db.execute(f"PRAGMA user_version = {schema.LATEST + 1}")
    db.close()
    with pytest.raises(schema.NewerJournal, match=f"newer dumpwatch \\(journal schema {schema.LATEST + 1}"):
        Journal(released)


KILLED = """
import os, signal, sys
from pathlib import Path
from dumpwatch import schema
from dumpwatch.journal import Journal
real = schema.MIGRATIONS[1]
def killed(db):
    real(db)  # every ALTER and CREATE of version 2 done, not yet committed
    os.kill(os.getpid(), signal.SIGKILL)
schema.MIGRATIONS[1] = killed
Journal(Path(sys.argv[1]))
"""


def test_a_kill_during_a_migration_leaves_the_version_before(released):
    done = subprocess.run([sys.executable, "-c", KILLED, str(released)], cwd=REPO)
    assert done.returncode == -9
    assert rows(released, "PRAGMA user_version") == [(1,)]
    assert rows(released, "SELECT name FROM sqlite_master WHERE name IN ('series', 'studies')") == []
    journal = Journal(released)
    try:
        assert journal.migrated == [2, 3, 4]
    finally:
        journal.close()
    assert rows(released, "SELECT count(*) FROM outcomes") == [(66,)]


def test_a_new_journal_starts_at_the_latest_version(tmp_path):
    journal = Journal(tmp_path / "new.sqlite3")
    try:
        assert journal.migrated == [1, 2, 3, 4]
    finally:
        journal.close()
    assert rows(tmp_path / "new.sqlite3", "PRAGMA user_version") == [(schema.LATEST,)]
