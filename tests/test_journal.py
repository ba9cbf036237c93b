"""The journal answers by index, keeps its rows private, and does not grow with repeats."""

from __future__ import annotations

import sqlite3

from dumpwatch.journal import FIND_SQL, Entry, Journal


def test_every_lookup_uses_an_index(tmp_path):
    """At a million entries a full scan takes seconds; an index look-up takes microseconds
    (bench/journal.py). So no branch of find() may scan the table."""
    journal = Journal(tmp_path / "journal.sqlite3")
    try:
        plan = journal.db.execute(
            "EXPLAIN QUERY PLAN " + FIND_SQL,
            dict.fromkeys(["name", "term", "lower", "absolute", "limit", "token", "uid"], "x"),
        ).fetchall()
        details = [row["detail"] for row in plan]
        assert not [d for d in details if d.startswith("SCAN outcomes")], details
        for index in ("outcomes_name", "outcomes_sop_uid", "outcomes_sha256", "outcomes_dest"):
            assert any(index in d for d in details), (index, details)
        assert "SCAN" not in " ".join(r["detail"] for r in journal.db.execute(
            "EXPLAIN QUERY PLAN SELECT * FROM outcomes WHERE done = 0"))
    finally:
        journal.close()


def test_find_by_name_uid_hash_and_path(tmp_path):
    journal = Journal(tmp_path / "journal.sqlite3")
    try:
        first = Entry("sorted", "/dump/MR.1.2.3", "1.2.3", "1.2", "ab" * 32, "/out/a/001/0001.dcm")
        second = Entry("duplicate", "/dump/MR.1.2.3", "1.2.3", "1.2", "ab" * 32, "/out/a/001/0001.dcm")
        other = Entry("quarantined", "/dump/MR.9", None, None, "cd" * 32, "/q/MR.9", "not a DICOM file")
        journal.begin([first])
        journal.finish([first])
        journal.record([second, other])
        for term in ("MR.1.2.3", "/dump/MR.1.2.3", "1.2.3", "AB" * 32, "/out/a/001/0001.dcm"):
            assert [r["outcome"] for r in journal.find(term)] == ["sorted", "duplicate"], term
        assert journal.find("MR.9")[0]["reason"] == "not a DICOM file"
        assert journal.find("nothing") == []
        assert journal.pending() == []
    finally:
        journal.close()


def test_the_journal_is_not_world_readable(tmp_path):
    journal = Journal(tmp_path / "journal.sqlite3")
    journal.record([Entry("left", "/dump/MR.1", reason="disk full")])
    files = sorted(tmp_path.iterdir())
    assert [f.name for f in files] == ["journal.sqlite3", "journal.sqlite3-shm", "journal.sqlite3-wal"]
    for file in files:
        assert file.stat().st_mode & 0o007 == 0, file
    journal.close()


def test_a_file_left_again_for_the_same_reason_keeps_one_row(tmp_path):
    """serve tries a file it cannot read every minute: a row each time would grow forever."""
    journal = Journal(tmp_path / "journal.sqlite3")
    try:
        for _ in range(3):
            journal.record([Entry("left", "/dump/MR.1", reason="Permission denied")])
        begun = Entry("sorted", "/dump/MR.1", dest="/out/a/0001.dcm")
        journal.begin([begun])
        begun.reason = "Permission denied"
        journal.finish([], [begun])  # its move failed for the same reason
        journal.record([Entry("left", "/dump/MR.1", reason="disk full (No space left on device)"),
                        Entry("left", "/dump/MR.2", reason="Permission denied")])
        rows = [(r["source"], r["reason"]) for r in journal.db.execute("SELECT * FROM outcomes ORDER BY id")]
        assert rows == [("/dump/MR.1", "Permission denied"), ("/dump/MR.1", "disk full (No space left on device)"),
                        ("/dump/MR.2", "Permission denied")]
    finally:
        journal.close()


def test_a_sort_once_holds_serves_completions_while_it_lives(tmp_path):
    from dumpwatch.journal import Journal

    serve, sort_once = Journal(tmp_path / "journal.sqlite3"), Journal(tmp_path / "journal.sqlite3")
    try:
        assert not serve.completions_held()
        sort_once.hold_completions()
        assert serve.completions_held()
    finally:
        sort_once.close()
    try:
        assert not serve.completions_held()
    finally:
        serve.close()


def test_counting_many_files_a_part_at_a_time_counts_each_once(tmp_path, testdata, monkeypatch):
    from dcmtk import write_config

    from dumpwatch import completion
    from dumpwatch.config import read_config
    from dumpwatch.sortonce import sort_dir

    from helpers import assert_series_agree, copy_testdata

    monkeypatch.setattr(completion, "CATCH_UP", 7)  # 59 files: nine parts, one transaction
    copy_testdata(testdata, tmp_path / "dump", "siemens_fieldmap")
    copy_testdata(testdata, tmp_path / "dump" / "more", "philips")
    site = write_config(tmp_path / "site")
    summary = sort_dir(tmp_path / "dump", read_config(site))
    assert summary.counts["sorted"] == 50 and len(summary.completions) == 5  # 3 series, 2 studies
    journal = tmp_path / "site" / "sorted" / ".dumpwatch" / "journal.sqlite3"
    assert_series_agree(journal)
    db = sqlite3.connect(journal)
    try:
        assert db.execute("SELECT SUM(files) FROM series").fetchone()[0] == 50
        assert db.execute("SELECT count(*) FROM uncounted").fetchone()[0] == 0
    finally:
        db.close()
