"""What tests import: where the real scanner files are, copies and variants of them, dumpwatch
run in this process or as its own, and a tree read back as {path: sha256}. Fixtures live in
conftest.py; the DCMTK receiver in dcmtk.py."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner
from pydicom import config as pydicom_config
from pydicom import dcmread
from pydicom.datadict import keyword_dict
from pydicom.dataelem import RawDataElement
from pydicom.tag import BaseTag
from pydicom.uid import generate_uid

REPO = Path(__file__).resolve().parents[1]
# The real scanner files: by default the subset the repository carries (tests/data, 76 files;
# its SOURCES.md says whence). DUMPWATCH_TESTDATA names another folder laid out alike, such as
# the full set of 403 files, for longer runs. Tests take their counts and names from its
# expected.json, so that they hold for either.
TESTDATA = Path(os.environ.get("DUMPWATCH_TESTDATA") or REPO / "tests" / "data")
FIELDMAP = "siemens_fieldmap/2_gre_field_magph"



def below(expected: dict, only: str) -> dict:
    """The entries of expected.json for the files in `only` (a folder of the test data, or one file)."""
    return {rel: fields for rel, fields in expected.items() if rel == only or rel.startswith(only + "/")}


def copy_testdata(testdata: Path, target: Path, only: str = "") -> list[Path]:
    """Copy the scanner files (or those below `only`) to target, keeping their relative paths."""
    copied = []
    for path in sorted((testdata / only).rglob("*")):
        if path.is_file() and path.suffix not in (".json", ".md", ".txt"):  # not the documents beside them
            dest = target / path.relative_to(testdata)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest)
            copied.append(dest)
    return copied


def run(*args: str, env: dict | None = None):
    """Run the dumpwatch command in this process, as click runs it."""
    from dumpwatch.cli import cli

    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def run_process(*args: str, env: dict | None = None, cwd: Path | None = None,
                prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run dumpwatch as its own process (for kills and real exit codes), under `prefix` if given
    (prlimit, for a memory limit)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([*prefix, sys.executable, "-m", "dumpwatch", *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=300, preexec_fn=_as_from_a_terminal)


def _as_from_a_terminal() -> None:
    """In the child: Ctrl-C as a terminal gives it. A test run started in the background by a
    shell without job control inherits SIGINT ignored, and a dumpwatch started so rightly
    leaves it ignored: the Ctrl-C tests would then test nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def tree_of(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file below root, hidden state folders excluded."""
    files = {}
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if rel.parts[0].startswith("."):
            continue
        if path.is_file() or path.is_symlink():
            files[str(rel)] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "symlink"
    return files


def make_dicom(path: Path, template: Path, **fields: object) -> Path:
    """Write a DICOM file: a real scanner file with some header fields changed.

    SOPInstanceUID is new unless given; a field set to None is deleted. Values are written
    as given, valid for their VR or not (a scanner's header may hold anything).
    """
    ds = dcmread(template)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    with pydicom_config.disable_value_validation():
        for keyword, value in fields.items():
            if value is None:
                if keyword in ds:
                    delattr(ds, keyword)
            elif keyword in ("EchoNumbers", "InstanceNumber", "SeriesNumber") and isinstance(value, str):
                ds[keyword] = RawDataElement(BaseTag(keyword_dict[keyword]), "IS", len(value),
                                             value.encode(), 0, False, True)
            else:
                setattr(ds, keyword, value)
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=False)
    return path


def assert_series_agree(journal: Path) -> None:
    """Completion's counts are true to the journal's rows: each series holds as many files
    as rows journal it sorted, with the same instance numbers, and none completed twice in
    a row without a late file between (a kill neither loses nor repeats a count)."""
    from dumpwatch.completion import numbers_of

    db = sqlite3.connect(journal)
    try:
        counted = db.execute("SELECT count(*) FROM outcomes WHERE outcome = 'sorted' AND series_uid != ''"
                             " AND instance IS NOT NULL").fetchone()[0]
        assert not counted or db.execute("SELECT count(*) FROM series").fetchone()[0], "no series recorded"
        for series_id, uid, files, completions, late in db.execute(
                "SELECT id, series_uid, files, completions, late FROM series"):
            rows = db.execute("SELECT instance, echo FROM outcomes WHERE series_uid = ? AND outcome = 'sorted'"
                              " AND done = 1 AND id NOT IN (SELECT id FROM uncounted)", (uid,)).fetchall()
            assert files == len(rows), f"series {uid}: {files} files counted, {len(rows)} journalled"
            numbers: dict[int, set[int]] = {}
            for instance, echo in rows:
                if instance is not None:
                    numbers.setdefault(echo or 0, set()).add(instance)
            text = db.execute("SELECT numbers FROM series WHERE id = ?", (series_id,)).fetchone()[0]
            kept = {echo: {n for a, b in group.ranges for n in range(a, b + 1)}
                    for echo, group in numbers_of(text).items() if group.ranges}
            assert kept == numbers, f"series {uid}: numbers {kept} counted, {numbers} journalled"
            assert completions <= 1 + late, f"series {uid} completed {completions} times with {late} late files"
    finally:
        db.close()
