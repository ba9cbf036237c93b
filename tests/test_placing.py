"""The placing chain (dumpwatch/placing.py) a step at a time: a file that a step refuses
carries that step's verdict to the journal, and the others go on. Real files in tmp_path."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest

from dumpwatch.config import Config
from dumpwatch.outcomes import Outcome, Prepared
from dumpwatch.prepare import prepare
from dumpwatch.sorter import Sorter
from dumpwatch.sortonce import sort_dir

from helpers import make_dicom, tree_of

SERIES = "20210715-phantom/002-gre_field_magph"


def config(tmp_path: Path) -> Config:
    return Config(dir_out=tmp_path / "out", dir_quarantine=tmp_path / "quarantine")


def journal_rows(out: Path) -> list[tuple]:
    db = sqlite3.connect(out / ".dumpwatch" / "journal.sqlite3")
    try:
        return db.execute("SELECT outcome, done, reason FROM outcomes ORDER BY id").fetchall()
    finally:
        db.close()


def test_a_duplicate_of_a_file_that_could_not_be_placed_stays(tmp_path, template_file):
    """Two identical files in one batch: if the first is not placed (move: GONE), the second,
    planned as its duplicate, is kept (release_sources: LEFT)."""
    source = tmp_path / "dump"
    first = make_dicom(source / "a", template_file)
    second = source / "b"
    shutil.copyfile(first, second)
    with Sorter(config(tmp_path)) as sorter:
        results = [prepare(str(p), sorter.job) for p in (first, second)]
        assert all(isinstance(r, Prepared) for r in results)
        first.unlink()  # gone between reading and placing
        outcomes = sorter.handle(results)
    assert [(o.outcome, o.detail) for o in outcomes] == [
        (Outcome.GONE, "vanished while it was being sorted"),
        (Outcome.LEFT, "the identical file it matched is not there any more"),
    ]
    assert second.exists() and not (tmp_path / "out" / "20210715-phantom").exists()
    assert [row[:2] for row in journal_rows(tmp_path / "out")] == [("left", 1)]


def test_a_file_changed_after_it_was_read_is_read_again(tmp_path, template_file):
    source = make_dicom(tmp_path / "dump" / "MR.1", template_file)
    with Sorter(config(tmp_path)) as sorter:
        result = prepare(str(source), sorter.job)
        make_dicom(tmp_path / "other", template_file, InstanceNumber=9)
        os.replace(tmp_path / "other", source)  # storescp overwrote a re-sent instance
        outcomes = sorter.handle([result])
    assert outcomes[0].outcome == Outcome.LEFT and "changed while it was being sorted" in outcomes[0].detail
    assert sort_dir(tmp_path / "dump", config(tmp_path)).exit_code == 0
    assert list(tree_of(tmp_path / "out")) == [f"{SERIES}/0009.dcm"]


def test_a_placed_copy_whose_source_cannot_be_removed_is_sorted_and_said_to_stay(tmp_path, template_file):
    """A staged copy (here: the dump's file has a second link) is placed, but the dump will
    not let its source go (append-only): the file is SORTED, and a LEFT row says why the
    source stays. Once the dump lets go, sorting again finds the twin and removes it."""
    dump = tmp_path / "dump"
    source = make_dicom(dump / "MR.1", template_file)
    os.link(source, tmp_path / "elsewhere")  # a second link: prepare stages a copy
    if subprocess.run(["chattr", "+a", str(dump)], capture_output=True).returncode:
        pytest.skip("cannot make a folder append-only here (chattr +a needs root and ext4 or the like)")
    try:
        with Sorter(config(tmp_path)) as sorter:
            result = prepare(str(source), sorter.job)
            assert isinstance(result, Prepared) and result.staged
            [outcome] = sorter.handle([result])
    finally:
        subprocess.run(["chattr", "-a", str(dump)], check=True)
    assert outcome.outcome == Outcome.SORTED, outcome
    assert list(tree_of(tmp_path / "out")) == [f"{SERIES}/0001.dcm"]
    assert source.exists()
    rows = journal_rows(tmp_path / "out")
    assert [row[:2] for row in rows] == [("sorted", 1), ("left", 1)], rows
    assert rows[1][2].startswith(f"in the tree at {tmp_path / 'out' / SERIES / '0001.dcm'}, but it cannot be removed "
                                 "from here: Operation not permitted"), rows
    assert sort_dir(dump, config(tmp_path)).exit_code == 0
    assert not source.exists() and list(tree_of(tmp_path / "out")) == [f"{SERIES}/0001.dcm"]
