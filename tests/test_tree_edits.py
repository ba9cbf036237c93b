"""The sorted tree belongs to its users: they delete, rename and move files and folders by
hand while serve runs, change the naming template, and re-send from other senders. Each
test is a scenario in which dumpwatch once lost, stranded or misplaced a file."""

from __future__ import annotations

import os
import random
import shutil
import sqlite3
from pathlib import Path

import pytest
from dcmtk import storescu, wait_for
from pydicom import dcmread

from dumpwatch.config import Config, read_config
from dumpwatch.naming import Template
from dumpwatch.sortonce import sort_dir

from helpers import FIELDMAP, below, copy_testdata, make_dicom, tree_of


def fixed_uid(rng: random.Random) -> str:
    """A UID of one fixed length: files that differ only in their UIDs have one size."""
    return "1.2.826.0.1.3680043.8.498." + "".join(rng.choice("123456789") for _ in range(30))


def series_files(folder: Path, template_file: Path, rng: random.Random, count: int = 10, **fields) -> list[Path]:
    """A series of `count` files (instances 1..count), number 1, description 'gre'."""
    series = fixed_uid(rng)
    return [make_dicom(folder / f"MR.{n}", template_file, SeriesInstanceUID=series, SOPInstanceUID=fixed_uid(rng),
                       SeriesNumber=1, SeriesDescription="gre", InstanceNumber=n, **fields)
            for n in range(1, count + 1)]


def contents(tree: Path) -> dict[str, tuple[str, str]]:
    """{path below the tree: (SeriesInstanceUID, SOPInstanceUID)} of every sorted file."""
    found = {}
    for rel in tree_of(tree):
        ds = dcmread(tree / rel, stop_before_pixels=True)
        found[rel] = (str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
    return found


def assert_no_mixed_folders(tree: Path) -> None:
    series: dict[str, set[str]] = {}
    for rel, (series_uid, _) in contents(tree).items():
        series.setdefault(os.path.dirname(rel), set()).add(series_uid)
    mixed = {folder: uids for folder, uids in series.items() if len(uids) > 1}
    assert not mixed, f"folders holding two series: {mixed}"


def uids_of(files: list[Path]) -> set[str]:
    return {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}


def dump_files(site: Path) -> list[str]:
    return [name for name in os.listdir(site.parent / "dump") if name != ".dumpwatch.lock"]


@pytest.mark.dcmtk
def test_a_series_folder_deleted_and_replaced_by_hand_never_swallows_a_resend(receiver, site, template_file,
                                                                            tmp_path):
    """X sorts into 001-gre, Y (same number, name and sizes) into 001-gre_2; by hand,
    `rm -rf 001-gre; mv 001-gre_2 001-gre`; X is re-sent: it is placed again, in a folder
    of its own, and no file of it is taken for a duplicate of Y's."""
    scp, serve = receiver
    rng = random.Random(1)
    x = series_files(tmp_path / "x", template_file, rng)
    y = series_files(tmp_path / "y", template_file, rng)
    subject = site.parent / "sorted" / "20210715-phantom"
    storescu(scp.port, x, tmp_path)
    wait_for(lambda: len(tree_of(site.parent / "sorted")) == 10 and not dump_files(site), 60, "X sorted")
    storescu(scp.port, y, tmp_path)
    wait_for(lambda: len(tree_of(site.parent / "sorted")) == 20 and not dump_files(site), 60, "Y sorted")
    assert sorted(os.listdir(subject)) == ["001-gre", "001-gre_2"]

    shutil.rmtree(subject / "001-gre")
    os.rename(subject / "001-gre_2", subject / "001-gre")
    storescu(scp.port, x, tmp_path)
    wait_for(lambda: not dump_files(site), 60, "X handled again")

    found = contents(site.parent / "sorted")
    assert {sop for _, sop in found.values()} == uids_of(x) | uids_of(y), "an instance of X was lost"
    assert_no_mixed_folders(site.parent / "sorted")
    assert sorted(os.listdir(subject / "001-gre")) == [f"{n:04d}.dcm" for n in range(1, 11)]


@pytest.mark.dcmtk
def test_files_deleted_by_hand_are_placed_again_when_re_sent(receiver, site, template_file, tmp_path):
    """One sorted file and one whole series folder deleted by hand; both series re-sent:
    every file is placed again, none waits in the dump."""
    scp, serve = receiver
    rng = random.Random(2)
    x = series_files(tmp_path / "x", template_file, rng)
    y = series_files(tmp_path / "y", template_file, rng)
    tree = site.parent / "sorted"
    subject = tree / "20210715-phantom"
    storescu(scp.port, x + y, tmp_path)
    wait_for(lambda: len(tree_of(tree)) == 20 and not dump_files(site), 60, "both sorted")
    (subject / "001-gre" / "0004.dcm").unlink()
    shutil.rmtree(subject / "001-gre_2")
    storescu(scp.port, x + y, tmp_path)
    wait_for(lambda: not dump_files(site), 30, "the dump emptied")
    found = contents(tree)
    assert {sop for _, sop in found.values()} == uids_of(x) | uids_of(y)
    assert len(found) == 20
    assert_no_mixed_folders(tree)


@pytest.mark.dcmtk
def test_the_same_study_from_another_sender_is_a_duplicate(receiver, site, testdata, tmp_path):
    """The same images from the scanner and then from a PACS differ only in their file meta
    (SourceApplicationEntityTitle, ImplementationVersionName): one copy in the tree."""
    scp, serve = receiver
    files = sorted(p for p in (testdata / "siemens_fieldmap").rglob("*.dcm"))[:30]
    tree = site.parent / "sorted"
    storescu(scp.port, files, tmp_path, aet="SCANNER")
    wait_for(lambda: len(tree_of(tree)) == len(files) and not dump_files(site), 60, "first send sorted")
    first = tree_of(tree)
    storescu(scp.port, files, tmp_path, aet="PACS")
    wait_for(lambda: not dump_files(site), 60, "second send handled")
    assert tree_of(tree) == first
    db = sqlite3.connect(tree / ".dumpwatch" / "journal.sqlite3")
    try:
        rows = db.execute("SELECT outcome, count(*) FROM outcomes WHERE done = 1 GROUP BY outcome").fetchall()
    finally:
        db.close()
    outcomes = {outcome: count for outcome, count in rows if outcome != "renamed"}  # echo-1 files, when echo 2 came
    assert outcomes == {"sorted": len(files), "duplicate": len(files)}


def test_a_file_whose_meta_alone_differs_is_a_duplicate_in_a_tree_sorted_before(tmp_path, template_file):
    """A tree sorted without dumpwatch's journal (an older release, or by hand): a re-send
    whose group 0002 differs is still recognised, from the files on disk."""
    cfg = Config(dir_out=tmp_path / "out", dir_quarantine=tmp_path / "q")
    original = make_dicom(tmp_path / "one" / "MR.1", template_file, InstanceNumber=1)
    resend = tmp_path / "two" / "MR.1"
    ds = dcmread(original)
    ds.file_meta.SourceApplicationEntityTitle = "PACS"
    ds.file_meta.ImplementationVersionName = "OTHER_PACS_1"
    resend.parent.mkdir()
    ds.save_as(resend, enforce_file_format=False)
    assert resend.read_bytes() != original.read_bytes()
    assert sort_dir(tmp_path / "one", cfg).counts == {"sorted": 1}
    shutil.rmtree(tmp_path / "out" / ".dumpwatch")  # no journal: the disk alone must tell
    before = tree_of(tmp_path / "out")
    assert sort_dir(tmp_path / "two", cfg).counts == {"duplicate": 1}
    assert tree_of(tmp_path / "out") == before


def test_a_different_data_set_under_the_same_uid_is_still_kept_beside(tmp_path, template_file):
    """Identity is the data set: a re-send whose data set differs is no duplicate."""
    cfg = Config(dir_out=tmp_path / "out", dir_quarantine=tmp_path / "q")
    first = make_dicom(tmp_path / "one" / "MR.1", template_file, InstanceNumber=1)
    ds = dcmread(first)
    ds.ImageComments = "changed"
    (tmp_path / "two").mkdir()
    ds.save_as(tmp_path / "two" / "MR.1", enforce_file_format=False)
    sort_dir(tmp_path / "one", cfg)
    assert sort_dir(tmp_path / "two", cfg).counts == {"sorted": 1}
    assert sorted(tree_of(tmp_path / "out")) == ["20210715-phantom/002-gre_field_magph/0001.dcm",
                                                 "20210715-phantom/002-gre_field_magph/0001A.dcm"]


def _names(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def test_a_template_change_never_renames_or_duplicates_sorted_echoes(tmp_path, testdata, expected):
    """The file part switched to <SeriesNumber>_<InstanceNumber:04> and back, re-sending a
    two-echo series each time: 0001_02.dcm (echo 2) is never renamed to an echo-1 name, and
    no file is stored twice."""
    old = Config(dir_out=tmp_path / "out", dir_quarantine=tmp_path / "q")
    new = old.replace(template=Template.parse(
        "<StudyDate>-<PatientName>/<SeriesNumber:03>-<SeriesDescription>/<SeriesNumber>_<InstanceNumber:04>"))
    copy_testdata(testdata, tmp_path / "first", FIELDMAP)
    assert sort_dir(tmp_path / "first", old).exit_code == 0
    folder = tmp_path / "out" / "20210715-phantom" / "002-gre_field_magph"
    before = tree_of(tmp_path / "out")
    files = len(below(expected, FIELDMAP))
    assert "0001_02.dcm" in _names(folder) and len(before) == files
    for number, cfg in enumerate((new, old, new)):
        again = tmp_path / f"again-{number}"
        copy_testdata(testdata, again, FIELDMAP)
        summary = sort_dir(again, cfg)
        assert summary.counts == {"duplicate": files}, (number, summary.counts)
        assert tree_of(tmp_path / "out") == before, number
    # A new instance under the new template is named by it, and renames nothing of the old.
    make_dicom(tmp_path / "late" / "MR.x", testdata / FIELDMAP / "e1_01.dcm", InstanceNumber=99, EchoNumbers=2)
    assert sort_dir(tmp_path / "late", new).counts == {"sorted": 1}
    added = set(tree_of(tmp_path / "out")) - set(before)
    assert added == {"20210715-phantom/002-gre_field_magph/2_0099_02.dcm"}, added
    for name in _names(folder):
        if name != "2_0099_02.dcm":
            ds = dcmread(folder / name, stop_before_pixels=True)
            assert name == f"{int(ds.InstanceNumber):04d}_{int(ds.EchoNumbers):02d}.dcm", name


@pytest.mark.parametrize("cached", [True, False], ids=["same-run", "after-restart"])
def test_a_text_field_ending_in_digits_is_never_read_as_an_echo(tmp_path, template_file, monkeypatch, cached):
    """<SeriesDescription>_<InstanceNumber:04> with SeriesDescription 'fmri_run_02':
    'fmri_run_02_0001' is not echo 1 of 'fmri_run_02'; a re-send adds nothing."""
    from dumpwatch import foldercache

    if not cached:
        monkeypatch.setattr(foldercache, "CACHED_NAMES", 0)
    cfg = Config(dir_out=tmp_path / "out", dir_quarantine=tmp_path / "q",
                 template=Template.parse("<PatientName>/<SeriesNumber:03>/<SeriesDescription>_<InstanceNumber:04>"))
    for n in (1, 2, 3):
        make_dicom(tmp_path / "one" / f"MR.{n}", template_file, InstanceNumber=n, SeriesDescription="fmri_run_02")
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "one", copy)
    assert sort_dir(tmp_path / "one", cfg).counts == {"sorted": 3}
    names = [f"phantom/002/fmri_run_02_{n:04d}.dcm" for n in (1, 2, 3)]
    assert sorted(tree_of(tmp_path / "out")) == names
    assert sort_dir(copy, cfg).counts == {"duplicate": 3}
    make_dicom(tmp_path / "late" / "MR.4", template_file, InstanceNumber=4, SeriesDescription="fmri_run_02")
    assert sort_dir(tmp_path / "late", cfg).counts == {"sorted": 1}
    assert sorted(tree_of(tmp_path / "out")) == [*names, "phantom/002/fmri_run_02_0004.dcm"]


def _block(folder: Path) -> None:
    """A folder, a symlink and a FIFO stand at the names instances 2, 3 and 4 need."""
    (folder / "0002.dcm").mkdir()
    os.symlink("/etc/hostname", folder / "0003.dcm")
    os.mkfifo(folder / "0004.dcm")


def test_something_else_at_a_needed_file_name_takes_the_next_free_name(tmp_path, template_file):
    cfg = Config(dir_out=tmp_path / "out", dir_quarantine=tmp_path / "q")
    make_dicom(tmp_path / "one" / "MR.1", template_file, InstanceNumber=1)
    sort_dir(tmp_path / "one", cfg)
    folder = tmp_path / "out" / "20210715-phantom" / "002-gre_field_magph"
    _block(folder)
    for n in (2, 3, 4):
        make_dicom(tmp_path / "two" / f"MR.{n}", template_file, InstanceNumber=n)
    summary = sort_dir(tmp_path / "two", cfg)
    assert summary.counts == {"sorted": 3}, summary.problems
    assert _names(folder) == ["0001.dcm", "0002.dcm", "0002A.dcm", "0003.dcm", "0003A.dcm", "0004.dcm", "0004A.dcm"]
    assert (folder / "0002.dcm").is_dir() and (folder / "0003.dcm").is_symlink()


@pytest.mark.dcmtk
def test_something_placed_at_a_needed_name_while_serve_runs_never_strands_a_file(receiver, site, template_file,
                                                                                tmp_path):
    scp, serve = receiver
    tree = site.parent / "sorted"
    first = make_dicom(tmp_path / "send" / "MR.1", template_file, InstanceNumber=1)
    storescu(scp.port, [first], tmp_path)
    wait_for(lambda: len(tree_of(tree)) == 1 and not dump_files(site), 30, "the first file sorted")
    folder = tree / "20210715-phantom" / "002-gre_field_magph"
    _block(folder)
    files = [make_dicom(tmp_path / "send" / f"MR.{n}", template_file, InstanceNumber=n) for n in (2, 3, 4)]
    storescu(scp.port, files, tmp_path)
    wait_for(lambda: not dump_files(site), 30, "the dump emptied")
    assert _names(folder) == ["0001.dcm", "0002.dcm", "0002A.dcm", "0003.dcm", "0003A.dcm", "0004.dcm", "0004A.dcm"]


def test_a_series_folder_moved_into_a_sibling_s_name_is_still_its_own(tmp_path, template_file):
    """By hand, `rm -rf 001-gre_2; mv 001-gre 001-gre_2`: a re-send of the series now in
    001-gre_2 finds it there; it is not stored again in the free 001-gre."""
    cfg = Config(dir_out=tmp_path / "out", dir_quarantine=tmp_path / "q")
    rng = random.Random(3)
    x = series_files(tmp_path / "x", template_file, rng, count=3)
    series_files(tmp_path / "y", template_file, rng, count=3)
    x_uids = uids_of(x)
    copy = tmp_path / "x-again"
    shutil.copytree(tmp_path / "x", copy)
    sort_dir(tmp_path / "x", cfg)
    sort_dir(tmp_path / "y", cfg)
    subject = tmp_path / "out" / "20210715-phantom"
    shutil.rmtree(subject / "001-gre_2")
    os.rename(subject / "001-gre", subject / "001-gre_2")
    assert sort_dir(copy, cfg).counts == {"duplicate": 3}
    assert _names(subject) == ["001-gre_2"]
    assert uids_of(list((subject / "001-gre_2").iterdir())) == x_uids


def test_odd_things_a_hand_leaves_in_the_tree_never_stop_sorting(tmp_path, template_file):
    """A symlink and a file at series folder names, a folder named with a non-ASCII digit, a
    file in a series folder whose UID cannot be decoded: the series still sorts."""
    cfg = Config(dir_out=tmp_path / "out", dir_quarantine=tmp_path / "q")
    make_dicom(tmp_path / "one" / "MR.1", template_file, InstanceNumber=1)
    sort_dir(tmp_path / "one", cfg)
    subject = tmp_path / "out" / "20210715-phantom"
    os.symlink("/etc", subject / "002-gre_field_magph_2")
    (subject / "002-gre_field_magph_3").write_text("notes")
    (subject / "002-gre_field_magph_\u00b2").mkdir()
    odd = dcmread(subject / "002-gre_field_magph" / "0001.dcm")
    odd.SOPInstanceUID = "1.2.3"
    odd.file_meta.MediaStorageSOPInstanceUID = "1.2.3"
    odd.save_as(subject / "002-gre_field_magph" / "0099.dcm", enforce_file_format=False)
    data = bytearray((subject / "002-gre_field_magph" / "0099.dcm").read_bytes())
    at = data.index(b"1.2.3\x00")
    data[at - 4: at - 2] = b"US"  # (0008,0018) now claims to be a 6-byte US: not decodable
    (subject / "002-gre_field_magph" / "0099.dcm").write_bytes(bytes(data))
    for n in (2, 3):
        make_dicom(tmp_path / "two" / f"MR.{n}", template_file, InstanceNumber=n)
    make_dicom(tmp_path / "two" / "MR.other", template_file, InstanceNumber=1,
               SeriesInstanceUID="1.2.826.0.1.3680043.8.498.1")
    summary = sort_dir(tmp_path / "two", cfg)
    assert summary.counts == {"sorted": 3}, summary.problems
    assert _names(subject / "002-gre_field_magph")[:3] == ["0001.dcm", "0002.dcm", "0003.dcm"]
    assert _names(subject / "002-gre_field_magph_4") == ["0001.dcm"]


def _meta_changed(original: Path, copy: Path, **data) -> Path:
    """A copy of original as a PACS re-sends it: another file meta (and `data` changed)."""
    ds = dcmread(original)
    ds.file_meta.SourceApplicationEntityTitle = "PACS"
    ds.file_meta.ImplementationVersionName = "OTHER_PACS_1"
    for keyword, value in data.items():
        setattr(ds, keyword, value)
    copy.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(copy, enforce_file_format=False)
    return copy


@pytest.mark.parametrize("differs", [False, True])
def test_one_instance_twice_in_one_dump_is_placed_once_unless_its_data_set_differs(tmp_path, template_file, differs):
    """Both copies are decided in one batch: the second is judged against the first while
    that one is only planned, by the data set each would place."""
    cfg = Config(dir_out=tmp_path / "out", dir_quarantine=tmp_path / "q")
    first = make_dicom(tmp_path / "dump" / "MR.1", template_file, InstanceNumber=1)
    _meta_changed(first, tmp_path / "dump" / "MR.2", **({"ImageComments": "changed"} if differs else {}))
    counts = sort_dir(tmp_path / "dump", cfg).counts
    assert counts == ({"sorted": 2} if differs else {"sorted": 1, "duplicate": 1})
    assert len(tree_of(tmp_path / "out")) == (2 if differs else 1)
    assert not os.listdir(tmp_path / "dump")


def test_a_dry_run_knows_an_anonymised_re_send_for_a_duplicate(tmp_path, template_file):
    """With anonymisation the bytes to place exist only in memory in a dry run: their
    identity is taken there, and the dry run says what the run would do."""
    cfg_file = tmp_path / "dumpwatch.cfg"
    cfg_file.write_text(f"dir_out = {tmp_path / 'out'}\ndir_quarantine = {tmp_path / 'q'}\nanon_profile = basic\n")
    cfg = read_config(cfg_file)
    first = make_dicom(tmp_path / "one" / "MR.1", template_file, InstanceNumber=1)
    _meta_changed(first, tmp_path / "two" / "MR.1")
    _meta_changed(first, tmp_path / "two" / "MR.2", RepetitionTime=1234)  # kept by the profile
    assert sort_dir(tmp_path / "one", cfg).counts == {"sorted": 1}
    dry = sort_dir(tmp_path / "two", cfg, dry_run=True).counts
    assert dry == {"duplicate": 1, "sorted": 1}
    assert sort_dir(tmp_path / "two", cfg).counts == dry
