"""kill -9 at every step of the chain, then run again: nothing lost, nothing twice, nothing half."""

from __future__ import annotations

import os
import signal
import sqlite3
from pathlib import Path

import pytest

from helpers import FIELDMAP, assert_series_agree, copy_testdata, run_process, tree_of

MODES = {
    "move": ([], ""),  # same filesystem: renamed into place
    "anonymise": ([], "anon_fields\n    0010,0030\n    0008,0080\n"),  # rewritten: staged copy, then source removed
    "copy": (["--copy"], ""),  # --copy: staged copy, source kept
    # The Basic Profile: rewritten, and the journal names files by keyed tokens only, so
    # recovery cannot find a source by its row: the rerun must find it a duplicate.
    "profile": ([], "anon_profile = basic\nanon_key = anon.key\n"),
}
IN_WORKER = {"read", "prepared"}  # points reached in the worker processes, not in sort-once itself
KEY = "0123456789abcdef" * 4  # one key for the reference and the crashed runs: the same output

# (failpoint, which hit kills): every step, early and in the middle of the run. A fraction is
# that share of the inputs (the field map series and two bad files), so that the middle of the
# run stays the middle whatever the size of the test data; batches (journal-begun,
# sources-removed) are about a quarter of the inputs each.
CASES = [
    ("read", 1), ("read", 0.54),
    ("prepared", 1), ("prepared", 0.54),
    ("journal-begun", 1), ("journal-begun", 3),
    ("renamed", 1), ("renamed", 0.27),  # the echo-1 files, renamed when echo 2 arrives
    ("placed", 1), ("placed", 0.5),
    ("unlink-source", 1), ("unlink-source", 0.5),
    ("sources-removed", 1), ("sources-removed", 3),
    ("quarantine-slot", 1), ("quarantine-slot", 2),
    ("quarantine-reserved", 1), ("quarantine-reserved", 2),
    ("quarantined", 1), ("quarantined", 2),
]


def nth(hit: int | float, inputs: dict) -> int:
    """The hit a case kills at: as given, or that share of the inputs."""
    return hit if isinstance(hit, int) else max(2, round(hit * len(inputs)))


def make_inputs(folder: Path, testdata: Path) -> None:
    """The Siemens field map series (its echo-1 files get renamed) and two bad files."""
    copy_testdata(testdata, folder, FIELDMAP)
    data = (testdata / FIELDMAP / "e1_03.dcm").read_bytes()
    cut = folder / "MR.truncated"
    cut.write_bytes(data[:40_000])
    os.utime(cut, (1e9, 1e9))  # long since received: quarantined, not waited for
    (folder / "MR.notdicom").write_bytes(b"x" * 500)


def setup(base: Path, testdata: Path, mode: str) -> tuple[Path, list[str]]:
    extra_args, anon = MODES[mode]
    base.mkdir()
    cfg = base / "dumpwatch.cfg"
    cfg.write_text(f"dir_out = out\ndir_quarantine = quarantine\nworkers = 1\n{anon}")
    key = base / "anon.key"
    key.write_text(KEY + "\n")
    key.chmod(0o600)
    make_inputs(base / "dump", testdata)
    return cfg, ["--config", str(cfg), "sort-once", str(base / "dump"), *extra_args]


def state(base: Path) -> tuple[dict, dict]:
    """The sorted tree, and the quarantine with each reason file's first line (the reason)."""
    quarantine = tree_of(base / "quarantine")
    for rel in quarantine:
        if rel.endswith(".reason.txt"):
            quarantine[rel] = (base / "quarantine" / rel).read_text().splitlines()[0]
    return tree_of(base / "out"), quarantine


@pytest.fixture(scope="module")
def references(tmp_path_factory, testdata) -> dict[str, tuple[dict, dict]]:
    """The tree and quarantine an uninterrupted run gives, per mode."""
    results = {}
    for mode in MODES:
        base = tmp_path_factory.mktemp("reference") / mode
        _, args = setup(base, testdata, mode)
        assert run_process(*args).returncode == 3
        results[mode] = state(base)
    return results


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("point, hit", CASES)
def test_kill_anywhere_then_rerun(tmp_path, testdata, references, mode, point, hit):
    if point == "unlink-source" and mode not in ("anonymise", "profile"):
        pytest.skip("only a rewritten file is placed before its source is removed")
    base = tmp_path / mode
    _, args = setup(base, testdata, mode)
    inputs = tree_of(base / "dump")
    crashed = run_process(*args, env={"DUMPWATCH_FAILPOINTS": f"{point}={nth(hit, inputs)}"})
    if point in IN_WORKER:  # a worker killed: a fresh one tries its files again, the run goes on
        assert crashed.returncode == 3, crashed.stdout + crashed.stderr
        assert "a worker process died (killed by signal 9, SIGKILL)" in crashed.stderr, crashed.stderr
    else:
        assert crashed.returncode == -signal.SIGKILL, "the failpoint was not reached: " + crashed.stdout
    rerun = run_process(*args)
    assert rerun.returncode in (0, 3), rerun.stdout + rerun.stderr  # 3 if bad files were still there
    assert state(base) == references[mode]
    assert_clean(base, inputs if mode == "copy" else {})


def test_kill_between_placing_and_removing_the_source(tmp_path, testdata, references):
    """The rerun finishes the job: no second copy, no loss."""
    base = tmp_path / "anonymise"
    _, args = setup(base, testdata, "anonymise")
    inputs = tree_of(base / "dump")
    crashed = run_process(*args, env={"DUMPWATCH_FAILPOINTS": "unlink-source=1"})
    assert crashed.returncode == -signal.SIGKILL
    placed = tree_of(base / "out")
    assert placed, "a file was placed before the kill"
    assert len(tree_of(base / "dump")) == len(inputs)  # ... and its source is still in the dump
    rerun = run_process(*args)
    assert rerun.returncode == 3
    assert state(base) == references["anonymise"]
    assert not [name for name in tree_of(base / "out") if "A." in name]  # no "0001A.dcm" copies
    assert_clean(base, {})


def assert_clean(base: Path, dump_after: dict) -> None:
    """Dump as expected, no staged or hidden files left, journal settled and true to the tree."""
    assert tree_of(base / "dump") == dump_after
    out = base / "out"
    assert os.listdir(out / ".dumpwatch" / "tmp") == []
    hidden = [p for p in out.rglob(".*") if ".dumpwatch" not in p.parts]
    assert not hidden
    db = sqlite3.connect(out / ".dumpwatch" / "journal.sqlite3")
    try:
        rows = db.execute("SELECT outcome, dest, done FROM outcomes").fetchall()
    finally:
        db.close()
    assert all(done for _, _, done in rows), "moves still under way"
    assert_series_agree(out / ".dumpwatch" / "journal.sqlite3")
    sorted_dests = [dest for outcome, dest, _ in rows if outcome == "sorted"]
    assert sorted(sorted_dests) == sorted(str(out / rel) for rel in tree_of(out))
    quarantined = {dest for outcome, dest, _ in rows if outcome == "quarantined"}  # a rerun may add a row
    files = [rel for rel in tree_of(base / "quarantine") if not rel.endswith(".reason.txt")]
    assert quarantined == {str(base / "quarantine" / rel) for rel in files}
    reasons = [rel for rel in tree_of(base / "quarantine") if rel.endswith(".reason.txt")]
    assert sorted(reasons) == sorted(rel + ".reason.txt" for rel in files)


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("sig", ["INT", "TERM"])
def test_ctrl_c_stops_at_the_end_of_a_batch(tmp_path, testdata, references, sig, workers):
    """A stop signal in the middle of a batch waits for the batch: nothing to recover. With
    worker processes too: the pool's threads may be the ones the signal is given to."""
    base = tmp_path / "move"
    _, args = setup(base, testdata, "move")
    (base / "dumpwatch.cfg").write_text(f"dir_out = out\ndir_quarantine = quarantine\nworkers = {workers}\n")
    inputs = tree_of(base / "dump")
    hit = len(inputs) // 2
    stopped = run_process(*args, env={"DUMPWATCH_FAILPOINTS": f"placed={hit}:{sig}"})
    if sig == "INT":
        assert stopped.returncode == 130, stopped.stdout + stopped.stderr
        assert "stopped early: interrupted; the files not handled are still in place" in stopped.stdout
    else:
        assert stopped.returncode == -signal.SIGTERM
    db = sqlite3.connect(base / "out" / ".dumpwatch" / "journal.sqlite3")
    try:
        assert db.execute("SELECT count(*) FROM outcomes WHERE done = 0").fetchone()[0] == 0
        sorted_rows = db.execute("SELECT count(*) FROM outcomes WHERE outcome = 'sorted'").fetchone()[0]
    finally:
        db.close()
    placed = tree_of(base / "out")
    assert len(placed) == sorted_rows >= hit  # the whole batch the signal came in, not one file less
    assert len(placed) + len(tree_of(base / "dump")) + len(tree_of(base / "quarantine")) // 2 == len(inputs)
    assert run_process(*args).returncode in (0, 3)
    assert state(base) == references["move"]
    assert_clean(base, {})


def test_a_worker_killed_mid_run(tmp_path, testdata, references):
    """A worker process killed (say, by the out-of-memory killer): the chunks at the pool fail
    with it; a fresh pool tries their files again, each alone, and the run ends as an
    uninterrupted one would."""
    base = tmp_path / "move"
    _, args = setup(base, testdata, "move")
    (base / "dumpwatch.cfg").write_text("dir_out = out\ndir_quarantine = quarantine\nworkers = 2\n")
    survived = run_process(*args, env={"DUMPWATCH_FAILPOINTS": f"read={nth(0.27, tree_of(base / 'dump'))}"})
    assert survived.returncode == 3, survived.stdout + survived.stderr
    assert "stopped early" not in survived.stdout
    assert "a worker process died (killed by signal 9, SIGKILL)" in survived.stderr
    assert state(base) == references["move"]
    assert_clean(base, {})
