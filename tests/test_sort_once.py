"""`dumpwatch sort-once` on real scanner files: the tree it makes, and every rule of the chain."""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import sqlite3
import stat
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import pytest
from campaign import assert_journal_agrees  # no move under way; each sorted file's row, once
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from dumpwatch.config import Config
from dumpwatch.outcomes import Handled, Outcome
from dumpwatch.sortonce import Summary, sort_dir

from helpers import FIELDMAP, below, copy_testdata, make_dicom, run, run_process, tree_of

# The subject folder each part of the test data belongs in: <StudyDate>-<PatientName>.
SUBJECTS = {
    "enhanced/philips": "20180526-ROGERS_20180526",
    "enhanced/siemens_xa10": "20181022-IRC-Slice-Timing",
    "enhanced/siemens_xa30_fieldmap": "20220711-XAtest_sub-July11",
    "ge/01_Ax_DWI_TENSOR_R2": "20200929-dicom",
    "ge/6_CV_Neuro": "19700101-ANON2339",
    "nonimage/mrs_siemens": "20260605-CR_test04",
    "nonimage/physio_siemens/samplePhysioCMRR.dcm": "20191028-EmptyPatientName",
    "nonimage/physio_siemens/samplePhysioCMRR_ecg.dcm": "20210423-EmptyPatientName",
    "nonimage/raw_philips": "20210902-d2n_Philips_3T_R571",
    "nonimage/sr_phoenix_siemens": "20220711-XAtest_sub-July11",
    "philips": "20210902-d2n_Philips_3T_R571",
    "siemens_fieldmap": "20210715-phantom",
    "transfer_syntax": "20140310-stc_test",
}


def subject_of(rel: str) -> str:
    matches = [key for key in SUBJECTS if rel == key or rel.startswith(key + "/")]
    return SUBJECTS[max(matches, key=len)]


def golden_tree(expected: dict, only: str = "") -> dict[str, str]:
    """{path below dir_out: sha256} that sorting these files must give, from expected.json."""
    folders: dict[str, set[int]] = defaultdict(set)
    placed = []
    for rel, fields in expected.items():
        if not rel.startswith(only):
            continue
        description = fields["SeriesDescription"].replace(" ", "-") or "EmptySeriesDescription"
        folder = f"{subject_of(rel)}/{fields['SeriesNumber']:03d}-{description}"
        echo = fields["EchoNumbers"] or 1
        folders[folder].add(echo)
        placed.append((folder, fields["InstanceNumber"], echo, fields["sha256"]))
    tree = {}
    for folder, instance, echo, sha in placed:
        suffix = f"_{echo:02d}" if echo > 1 or len(folders[folder]) > 1 else ""
        tree[f"{folder}/{instance:04d}{suffix}.dcm"] = sha
    return tree


def journal_rows(out: Path) -> list[sqlite3.Row]:
    db = sqlite3.connect(out / ".dumpwatch" / "journal.sqlite3")
    db.row_factory = sqlite3.Row
    try:
        return db.execute("SELECT * FROM outcomes ORDER BY id").fetchall()
    finally:
        db.close()


def config(tmp_path: Path, **changes) -> Config:
    return Config(dir_out=tmp_path / "out", dir_quarantine=tmp_path / "quarantine", **changes)


def test_every_real_file_sorts_to_its_place(dump, out, tmp_path, expected):
    result = run("sort-once", str(dump), "--out", str(out), "--quarantine", str(tmp_path / "q"))
    assert result.exit_code == 0, result.output
    assert tree_of(out) == golden_tree(expected)
    assert not [p for p in dump.rglob("*") if p.is_file()], "files left in the dump"
    assert not (tmp_path / "q").exists()
    assert_journal_agrees(out)
    assert result.output.splitlines()[0].startswith(f"{len(expected)} files in ")
    assert f"  sorted      {len(expected):>7}  into " in result.output


def test_fieldmap_echoes_and_philips_numbers(dump, out, tmp_path, expected):
    sort_dir(dump, config(tmp_path))
    magnitude = sorted(os.listdir(out / "20210715-phantom" / "002-gre_field_magph"))
    assert magnitude[:4] == ["0001_01.dcm", "0001_02.dcm", "0002_01.dcm", "0002_02.dcm"]
    assert len(magnitude) == len(below(expected, FIELDMAP))
    phase = sorted(os.listdir(out / "20210715-phantom" / "003-gre_field_magph"))
    assert phase[0] == "0001_02.dcm" and len(phase) == len(below(expected, "siemens_fieldmap/3_gre_field_magph"))
    # Named by the top-level InstanceNumber, never by the 0 nested before it.
    philips = sorted(os.listdir(out / "20210902-d2n_Philips_3T_R571" / "2001-fcMRI-Field-Mapping"))
    numbers = sorted(fields["InstanceNumber"] for fields in below(expected, "philips").values())
    assert [name[:4] for name in philips] == [f"{n:04d}" for n in numbers] and 0 not in numbers
    for name in ("0001_01.dcm", "0001_02.dcm"):
        ds = dcmread(out / "20210715-phantom" / "002-gre_field_magph" / name, stop_before_pixels=True)
        assert (int(ds.InstanceNumber), int(ds.EchoNumbers)) == (1, int(name[5:7]))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_shuffled_arrival_gives_the_same_tree(tmp_path, testdata, expected, seed):
    """Files arriving in any order and in any batches end in the same tree."""
    pool = tmp_path / "pool"
    files = copy_testdata(testdata, pool, "siemens_fieldmap") + copy_testdata(testdata, pool, "philips")
    rng = random.Random(seed)
    rng.shuffle(files)
    cfg = config(tmp_path)
    while files:
        take = rng.randint(1, 40)
        batch, files = files[:take], files[take:]
        arrival = tmp_path / f"arrival-{len(files)}"
        for path in batch:
            arrival.mkdir(exist_ok=True)
            shutil.move(path, arrival / f"MR.{rng.getrandbits(64):x}")
        summary = sort_dir(arrival, cfg)
        assert summary.exit_code == 0
    golden = golden_tree(expected, "siemens_fieldmap")
    golden.update(golden_tree(expected, "philips"))
    assert tree_of(tmp_path / "out") == golden
    assert_journal_agrees(tmp_path / "out")


def test_identical_resend_is_recognised_and_adds_nothing(dump, out, tmp_path, testdata, expected):
    sort_dir(dump, config(tmp_path))
    before = tree_of(out)
    again = tmp_path / "again"
    copy_testdata(testdata, again)
    summary = sort_dir(again, config(tmp_path))
    assert summary.counts["duplicate"] == len(expected) and summary.exit_code == 0
    assert tree_of(out) == before
    assert not [p for p in again.rglob("*") if p.is_file()]  # re-sent copies removed from the dump
    assert_journal_agrees(out)


def test_changed_resend_is_kept_beside_never_over(tmp_path, template_file):
    cfg = config(tmp_path)
    uid = generate_uid()
    first = make_dicom(tmp_path / "d1" / "a", template_file, SOPInstanceUID=uid, ImageComments="first")
    original = first.read_bytes()
    sort_dir(first.parent, cfg)
    for number, comment in enumerate(["second", "third"]):
        make_dicom(tmp_path / f"d{number + 2}" / "a", template_file, SOPInstanceUID=uid, ImageComments=comment)
        assert sort_dir(tmp_path / f"d{number + 2}", cfg).counts["sorted"] == 1
    folder = tmp_path / "out" / "20210715-phantom" / "002-gre_field_magph"
    assert sorted(os.listdir(folder)) == ["0001.dcm", "0001A.dcm", "0001A2.dcm"]
    assert (folder / "0001.dcm").read_bytes() == original
    assert dcmread(folder / "0001A2.dcm").ImageComments == "third"


def test_a_second_series_never_mixes_into_an_existing_folder(tmp_path, template_file):
    """Same subject, series number and description, another SeriesInstanceUID: its own folder."""
    cfg = config(tmp_path)
    sessions = [generate_uid() for _ in range(3)]
    for number, series in enumerate(sessions):
        for instance in (1, 2):
            make_dicom(tmp_path / f"s{number}" / f"{instance}", template_file,
                       SeriesInstanceUID=series, InstanceNumber=instance)
    for number in range(3):
        sort_dir(tmp_path / f"s{number}", cfg)
    # A late file of the second session finds its own folder again.
    make_dicom(tmp_path / "late" / "x", template_file, SeriesInstanceUID=sessions[1], InstanceNumber=3)
    sort_dir(tmp_path / "late", cfg)
    subject = tmp_path / "out" / "20210715-phantom"
    assert sorted(os.listdir(subject)) == ["002-gre_field_magph", "002-gre_field_magph_2", "002-gre_field_magph_3"]
    for folder, series in zip(sorted(os.listdir(subject)), sessions, strict=True):
        uids = {dcmread(p, stop_before_pixels=True).SeriesInstanceUID for p in (subject / folder).iterdir()}
        assert uids == {series}
    assert sorted(os.listdir(subject / "002-gre_field_magph_2")) == ["0001.dcm", "0002.dcm", "0003.dcm"]


def test_running_twice_with_copy_adds_nothing_and_keeps_sources(dump, out, tmp_path, expected):
    before = tree_of(dump)
    assert sort_dir(dump, config(tmp_path), copy=True).exit_code == 0
    assert tree_of(dump) == before
    first = tree_of(out)
    assert first == golden_tree(expected)
    summary = sort_dir(dump, config(tmp_path), copy=True)
    assert summary.counts["duplicate"] == len(expected)
    assert tree_of(out) == first and tree_of(dump) == before
    for rel in first:  # copies, not hard links to the archive
        assert os.stat(out / rel).st_nlink == 1


def test_dry_run_changes_nothing(dump, out, tmp_path, expected):
    before = tree_of(dump)
    result = run("sort-once", str(dump), "--out", str(out), "--dry-run")
    assert result.exit_code == 0, result.output
    assert tree_of(dump) == before
    assert not out.exists() and not (tmp_path / "quarantine").exists()
    lines = result.output.splitlines()
    assert ("sorted      siemens_fieldmap/2_gre_field_magph/e2_01.dcm"
            " -> 20210715-phantom/002-gre_field_magph/0001_02.dcm") in lines
    assert f"{len(expected)} files in" in result.output and "dry run, nothing changed" in result.output


@pytest.mark.parametrize("out", ["/proc/dumpwatch-test", "/sys/dumpwatch-test", "a-file/below"])
def test_a_dry_run_says_when_the_tree_could_not_be_written(dump, tmp_path, out):
    """A dry run changes nothing, but checks that a real run could make the tree: "403 into
    /proc/x" was no answer. Even root cannot make a folder in /proc or /sys."""
    (tmp_path / "a-file").write_text("not a folder\n")
    target = out if out.startswith("/") else str(tmp_path / out)
    result = run("sort-once", str(dump), "--out", target, "--quarantine", str(tmp_path / "q"), "--dry-run")
    assert result.exit_code == 1, result.output
    said = f"Error: the sorted tree {target} cannot be made: "
    if out.startswith("/"):  # the kernel's reason: ENOENT in /proc, EPERM in /sys for root
        assert re.fullmatch(re.escape(said) + rf"[^\n]+ \(in /{out.split('/')[1]}\)\n", result.output)
    else:
        assert result.output == f"{said}{tmp_path / 'a-file'} is not a folder\n"
    assert sorted(os.listdir(tmp_path)) == ["a-file", "dump"]


def test_a_dry_run_into_a_tree_it_may_write_makes_no_trace(dump, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    before = os.listdir(out)
    result = run("sort-once", str(dump), "--out", str(out), "--dry-run")
    assert result.exit_code == 0, result.output
    assert os.listdir(out) == before == []


def test_a_tree_no_one_may_write_in_is_one_line_per_reason_not_per_file(testdata):
    """sort-once as a user who may not write in the tree: every file is left in place for the
    same reason. That is said once, with the count, not as an ERROR line per file; and the
    summary points where the reasons are (files left in place have no .reason.txt)."""
    if os.getuid() != 0:
        pytest.skip("needs root to run sort-once as another user")
    import pwd

    nobody = pwd.getpwnam("nobody")
    base = Path(tempfile.mkdtemp(prefix="dumpwatch-unwritable-"))  # tmp_path is root's alone
    try:
        os.chmod(base, 0o755)
        dump, out = base / "dump", base / "sorted"
        files = copy_testdata(testdata, dump, FIELDMAP.split("/")[0])
        template = testdata / FIELDMAP / "e1_01.dcm"
        files += [make_dicom(dump / "more" / f"MR.{n}.dcm", template, InstanceNumber=100 + n) for n in range(10)]
        assert len(files) > 20  # more than the summary names one by one
        out.mkdir(mode=0o755)  # root's
        (out / ".dumpwatch").mkdir()
        (base / "quarantine").mkdir()
        for path in (base / "quarantine", out / ".dumpwatch", dump, *dump.rglob("*")):
            os.chown(path, nobody.pw_uid, nobody.pw_gid)
        result = subprocess.run([sys.executable, "-m", "dumpwatch", "sort-once", str(dump), "--out", str(out),
                                 "--quarantine", str(base / "quarantine")],
                                capture_output=True, text=True, user=nobody.pw_uid, group=nobody.pw_gid,
                                extra_groups=[], cwd=base,
                                env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
        assert result.returncode == 3, result.stdout + result.stderr
        assert result.stderr == ""  # no ERROR line per file
        reason = f"cannot place it: Permission denied (user nobody may not write in {out})"
        said = [line for line in result.stdout.splitlines() if reason in line]
        assert len(said) == 1, result.stdout
        assert re.fullmatch(rf"    left \({len(files)} files, e\.g\. {re.escape(str(dump))}/\S+\.dcm\): "
                            + re.escape(reason), said[0]), said
        assert f"  {'left':<12}{len(files):>7}  in place, to try again" in result.stdout.splitlines()
        assert ".reason.txt" not in result.stdout
        assert sorted(map(str, dump.rglob("*.dcm"))) == sorted(map(str, files))  # all still in place
    finally:
        shutil.rmtree(base)


def test_the_summary_counts_reasons_and_points_where_the_others_are(tmp_path):
    summary = Summary()
    summary.add([Handled("/dump/busy0", Outcome.LEFT, "busy")])
    summary.add([Handled(f"/dump/q{n}", Outcome.QUARANTINED, f"reason {n % 25}") for n in range(50)])
    summary.add([Handled(f"/dump/busy{n}", Outcome.LEFT, "busy") for n in range(1, 30)])
    lines = summary.render(config(tmp_path), dry_run=False).splitlines()
    assert "    left (30 files, e.g. /dump/busy0): busy" in lines
    assert "    quarantined (2 files, e.g. /dump/q0): reason 0" in lines
    assert len([line for line in lines if line.startswith("    quarantined (2 files")]) == 19  # 20 reasons in all
    assert lines[-1] == (f"    ... and 12 more files with other reasons: the .reason.txt beside each quarantined "
                         f"file in {tmp_path / 'quarantine'}")
    summary.add([Handled(f"/dump/other{n}", Outcome.LEFT, f"other {n}") for n in range(3)])
    lines = summary.render(config(tmp_path), dry_run=False).splitlines()
    assert lines[-1].startswith("    ... and 15 more files with other reasons: the .reason.txt")
    assert lines[-1].endswith(" or `dumpwatch where NAME` for each file left in place")
    single = Summary()
    single.add([Handled("/dump/MR.1", Outcome.QUARANTINED, "not a DICOM file")])
    assert single.render(config(tmp_path), dry_run=False).splitlines()[-1] == (
        "    quarantined: /dump/MR.1: not a DICOM file")


def test_symlinks_are_never_followed(tmp_path, template_file):
    outside = tmp_path / "outside"
    target = make_dicom(outside / "precious.dcm", template_file)
    make_dicom(outside / "folder" / "other.dcm", template_file)
    content = target.read_bytes()
    source = tmp_path / "dump"
    source.mkdir()
    (source / "link-to-file").symlink_to(target)
    (source / "link-to-folder").symlink_to(outside / "folder")
    make_dicom(source / "real.dcm", template_file)
    result = run("sort-once", str(source), "--out", str(tmp_path / "out"))
    assert result.exit_code == 3, result.output
    assert target.read_bytes() == content and (outside / "folder" / "other.dcm").exists()
    assert list(tree_of(tmp_path / "out")) == ["20210715-phantom/002-gre_field_magph/0001.dcm"]
    quarantined = tmp_path / "quarantine"
    assert (quarantined / "link-to-file").is_symlink()  # the link itself, moved aside
    assert (quarantined / "link-to-file.reason.txt").read_text().startswith("a symbolic link: not followed\n")
    # A link to a folder is an entry of the dump too: moved aside, never walked.
    assert (quarantined / "link-to-folder").is_symlink()
    assert (quarantined / "link-to-folder.reason.txt").read_text().startswith("a symbolic link: not followed\n")
    # With --copy the archive is left as it is: the link stays, unread.
    (source / "link-2").symlink_to(target)
    result = run("sort-once", str(source), "--out", str(tmp_path / "out2"), "--copy")
    assert (source / "link-2").is_symlink() and target.read_bytes() == content
    assert "left: " in result.output and "a symbolic link: not followed" in result.output


def test_bad_files_are_quarantined_with_a_reason(tmp_path, testdata, template_file):
    source = tmp_path / "dump"
    good = make_dicom(source / "good", template_file)
    data = (testdata / FIELDMAP / "e1_02.dcm").read_bytes()
    (source / "truncated").write_bytes(data[: len(data) // 2])
    old = os.path.getmtime(good) - 3600
    os.utime(source / "truncated", (old, old))  # received an hour ago: no longer arriving
    (source / "notes.txt").write_text("scan notes, not DICOM\n" * 20)
    make_dicom(source / "no-uid", template_file, SOPInstanceUID=None)
    result = run("sort-once", str(source), "--out", str(tmp_path / "out"))
    assert result.exit_code == 3, result.output
    q = tmp_path / "quarantine"
    reasons = {p.name[: -len(".reason.txt")]: p.read_text().splitlines()[0] for p in q.glob("*.reason.txt")}
    assert reasons == {
        "truncated": f"truncated: element (0029,1020) declares 82200 bytes at byte 13532, "
                     f"but the file ends at byte {len(data) // 2}",
        "notes.txt": "not a DICOM file (no 'DICM' marker at byte 128)",
        "no-uid": "no SOPInstanceUID (0008,0018)",
    }
    for name in reasons:
        assert (q / name).is_file()
    assert (q / "truncated").read_bytes() == data[: len(data) // 2]
    assert "  quarantined       3" in result.output
    assert "quarantined: " + str(source / "notes.txt") + ": not a DICOM file" in result.output
    assert list(tree_of(tmp_path / "out")) == ["20210715-phantom/002-gre_field_magph/0001.dcm"]


def test_a_file_still_arriving_is_left_not_quarantined(tmp_path, testdata):
    source = tmp_path / "dump"
    source.mkdir()
    data = (testdata / FIELDMAP / "e1_02.dcm").read_bytes()
    (source / "MR.arriving").write_bytes(data[:5000])
    summary = sort_dir(source, config(tmp_path))
    assert summary.counts["left"] == 1 and summary.exit_code == 3
    assert summary.problems[0].detail.startswith("incomplete, may still be arriving: ")
    assert (source / "MR.arriving").exists() and not (tmp_path / "quarantine").exists()


def test_hostile_header_values_stay_inside_dir_out(tmp_path, template_file):
    source = tmp_path / "dump"
    hostile = ["../../../../etc/cron.d/x", "/", "/etc/passwd", "a\0b", "x" * 300, "..", ".", "-rf",
               "$(reboot)", "\\..\\..\\", "é" * 200]
    for number, value in enumerate(hostile):
        make_dicom(source / f"f{number}", template_file, PatientName=value, SeriesDescription=value,
                   StudyDate=value[:8] if value.isascii() else "20240101", InstanceNumber=number + 1)
    before = set(os.listdir(tmp_path))
    result = run("sort-once", str(source), "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert set(os.listdir(tmp_path)) == before | {"out"}
    files = list(tree_of(tmp_path / "out"))
    assert len(files) == len(hostile)
    for rel in files:
        parts = Path(rel).parts
        assert len(parts) == 3
        for part in parts:
            assert part not in (".", "..") and not part.startswith((".", "-"))
            assert len(part.encode()) <= 255 and "\0" not in part
    assert not (Path("/etc/cron.d/x")).exists()


def test_legacy_anon_fields_empty_every_occurrence_before_naming(tmp_path, template_file, testdata):
    nested = Dataset()
    nested.PatientName = "Nested^Secret"
    nested.ReferencedSOPInstanceUID = generate_uid()
    source = tmp_path / "dump"
    marked = make_dicom(source / "named", template_file, PatientName="Secret^Name", PatientBirthDate="19800101",
                        ReferencedImageSequence=Sequence([nested]))
    untouched = make_dicom(source / "already-anonymous", template_file, PatientName="", PatientBirthDate="",
                           InstanceNumber=2)
    inode = os.stat(untouched).st_ino
    pixels = dcmread(marked).PixelData
    cfg_file = tmp_path / "DcmServer.cfg"
    cfg_file.write_text(f"dir_dump = {source}\ndir_out = {tmp_path / 'out'}\nfname_log =\n"
                        "anon_fields\n    0010,0010\n    0010,0030\n")
    result = run("--config", str(cfg_file), "sort-once", str(source))
    assert result.exit_code == 0, result.output
    folder = tmp_path / "out" / "20210715-EmptyPatientName" / "002-gre_field_magph"
    assert sorted(os.listdir(folder)) == ["0001.dcm", "0002.dcm"]
    ds = dcmread(folder / "0001.dcm")
    assert ds.PatientName == "" and ds.PatientBirthDate == ""
    assert ds.ReferencedImageSequence[0].PatientName == ""
    assert ds.PixelData == pixels
    assert b"Secret" not in (folder / "0001.dcm").read_bytes()
    assert os.stat(folder / "0002.dcm").st_ino == inode  # nothing to empty: moved, not rewritten


def test_sorted_files_and_folders_get_the_configured_mode(tmp_path, template_file):
    make_dicom(tmp_path / "dump" / "a", template_file)
    sort_dir(tmp_path / "dump", config(tmp_path, file_mode=0o640, dir_mode=0o2750, group=os.getgid()))
    placed = tmp_path / "out" / "20210715-phantom" / "002-gre_field_magph" / "0001.dcm"
    assert stat.S_IMODE(os.stat(placed).st_mode) == 0o640
    assert stat.S_IMODE(os.stat(placed.parent).st_mode) == 0o2750
    assert stat.S_IMODE(os.stat(placed.parent.parent).st_mode) == 0o2750
    assert os.stat(placed).st_gid == os.getgid()


def test_dump_on_another_filesystem(tmp_path, testdata, expected):
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on a filesystem other than tmp_path")
    source = Path(os.environ.get("TMPDIR_SHM", shm)) / f"dumpwatch-test-{os.getpid()}"
    try:
        copy_testdata(testdata, source, "siemens_fieldmap")
        assert sort_dir(source, config(tmp_path)).exit_code == 0
        assert tree_of(tmp_path / "out") == golden_tree(expected, "siemens_fieldmap")
        assert not [p for p in source.rglob("*") if p.is_file()]
        assert_journal_agrees(tmp_path / "out")
    finally:
        shutil.rmtree(source, ignore_errors=True)


@pytest.mark.parametrize(
    "args, code, message",
    [
        ([], 2, "Missing argument 'FOLDER'"),
        (["/no/such/folder", "--out", "/tmp/x"], 2, "does not exist"),
        (["{dump}"], 2, "no sorted tree: give --out DIR"),
        (["{dump}", "--out", "{dump}/sorted"], 0, ""),
        (["{dump}/siemens_fieldmap", "--out", "{dump}"], 2, "is inside the sorted tree"),
    ],
)
def test_exit_codes(dump, tmp_path, monkeypatch, args, code, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DUMPWATCH_CONFIG", raising=False)
    result = run_process("sort-once", *[a.format(dump=dump) for a in args])
    assert result.returncode == code, result.stdout + result.stderr
    assert message in result.stdout + result.stderr


def test_a_bad_configuration_exits_1(tmp_path, dump):
    cfg = tmp_path / "bad.cfg"
    cfg.write_text("dir_out = out\nsort_order = name\n")
    result = run_process("--config", str(cfg), "sort-once", str(dump))
    assert result.returncode == 1
    assert f"Error: {cfg}:2: sort_order: unknown key" in result.stderr


def test_where_answers_what_happened_to_a_file(dump, out, tmp_path):
    sort_dir(dump, config(tmp_path))
    result = run("where", "e2_07.dcm", "--out", str(out))
    assert result.exit_code == 0
    assert "sorted  " + str(dump / FIELDMAP / "e2_07.dcm") in result.output
    assert str(out / "20210715-phantom" / "002-gre_field_magph" / "0007_02.dcm") in result.output
    sha = hashlib.sha256((out / "20210715-phantom" / "002-gre_field_magph" / "0007_02.dcm").read_bytes()).hexdigest()
    assert run("where", sha, "--out", str(out)).output == result.output
    assert run("where", "MR.nothing", "--out", str(out)).exit_code == 1


def test_a_deleted_journal_is_rebuilt_from_the_tree_and_a_cut_short_rebuild_goes_on(tmp_path, template_file):
    """The journal deleted between runs: the next run (sort-once here, serve alike) says so
    and rebuilds a row per file of the tree. Stopped half-way, the rebuild goes on at the
    next start: each file ends with one row."""
    from dumpwatch.journal import Entry, Journal

    source = tmp_path / "dump"
    for number in (1, 2, 3):
        make_dicom(source / f"MR.{number}", template_file, InstanceNumber=number)
    out = tmp_path / "out"
    assert run("sort-once", str(source), "--out", str(out)).exit_code == 0
    path = out / ".dumpwatch" / "journal.sqlite3"
    for name in ("journal.sqlite3", "journal.sqlite3-wal", "journal.sqlite3-shm"):
        (out / ".dumpwatch" / name).unlink(missing_ok=True)
    first = out / "20210715-phantom" / "002-gre_field_magph" / "0001.dcm"
    journal = Journal(path)  # a start that began to rebuild, and was stopped after one file
    journal.begin_rebuild()
    journal.record([Entry("sorted", dest=str(first), reason="rebuilt from the tree: the journal had no record of it")])
    journal.close()
    (tmp_path / "empty").mkdir()
    result = run_process("sort-once", str(tmp_path / "empty"), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert f"going on with rebuilding the journal {path} from the tree {out}" in result.stderr
    assert "rebuilt 2 journal rows from the tree" in result.stderr
    db = sqlite3.connect(path)
    try:
        rows = db.execute("SELECT dest, outcome, reason FROM outcomes ORDER BY dest").fetchall()
        assert [row[0] for row in rows] == [str(p) for p in sorted(out.rglob("*.dcm"))]
        assert {row[1:] for row in rows} == {("sorted", "rebuilt from the tree: the journal had no record of it")}
        assert db.execute("SELECT files, finished IS NOT NULL FROM rebuilds").fetchall() == [(2, 1)]
    finally:
        db.close()
    second = first.with_name("0002.dcm")
    where = run("where", str(dcmread(second, stop_before_pixels=True).SOPInstanceUID), "--out", str(out))
    assert where.exit_code == 0 and str(second) in where.output


def test_where_on_a_damaged_journal_says_so_in_one_line(tmp_path):
    path = tmp_path / "out" / ".dumpwatch" / "journal.sqlite3"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a database " * 100)
    result = run_process("where", "MR.1", "--out", str(tmp_path / "out"))
    assert result.returncode == 1
    assert result.stderr == f"Error: the journal {path} cannot be read: file is not a database\n"


def test_where_a_path_in_the_tree_finds_that_file_only(tmp_path, template_file):
    """A tree path's base name (0001.dcm) is also the dump name of unrelated files sorted from
    a CD export: a path in the tree is looked up by its place alone."""
    source = tmp_path / "dump"
    make_dicom(source / "cd" / "0001.dcm", template_file, InstanceNumber=5)  # sorted as 0005.dcm
    make_dicom(source / "MR.x", template_file, InstanceNumber=1)  # sorted as 0001.dcm
    out = tmp_path / "out"
    assert run("sort-once", str(source), "--out", str(out)).exit_code == 0
    series = out / "20210715-phantom" / "002-gre_field_magph"
    result = run("where", str(series / "0001.dcm"), "--out", str(out))
    assert result.exit_code == 0
    assert [line.split("  ")[1:3] for line in result.output.splitlines()] == [
        ["sorted", f"{source / 'MR.x'} -> {series / '0001.dcm'}"]], result.output
    by_name = run("where", "0001.dcm", "--out", str(out))  # a bare name is a dump name
    assert f"{source / 'cd' / '0001.dcm'} -> {series / '0005.dcm'}" in by_name.output


def test_a_dicomdir_is_quarantined_as_a_dicomdir(tmp_path, template_file):
    """A CD's DICOMDIR has no SOPInstanceUID: say what it is, not what it lacks."""
    from pydicom.fileset import FileSet

    medium = FileSet()
    medium.add(dcmread(template_file))
    medium.write(tmp_path / "cd")
    result = run("sort-once", str(tmp_path / "cd"), "--out", str(tmp_path / "out"))
    assert result.exit_code == 3, result.output
    reason = (tmp_path / "quarantine" / "DICOMDIR.reason.txt").read_text().splitlines()[0]
    assert reason == ("a DICOMDIR (MediaStorageSOPClassUID 1.2.840.10008.1.3.10): the directory index of a DICOM "
                      "medium, not an image")
    assert list(tree_of(tmp_path / "out")) == ["20210715-phantom/002-gre_field_magph/0001.dcm"]


def test_file_names_that_are_not_utf8(tmp_path, template_file):
    """storescp names files from UIDs, but an old dump may hold any bytes in a name."""
    source = tmp_path / "dump"
    source.mkdir()
    good = os.fsencode(source) + b"/MR.\xff\xfe.dcm"
    shutil.copyfile(make_dicom(tmp_path / "t.dcm", template_file), good)
    with open(os.fsencode(source) + b"/notes\xe9.txt", "wb") as bad:
        bad.write(b"not DICOM " * 50)
    result = run_process("sort-once", str(source), "--out", str(tmp_path / "out"))
    assert result.returncode == 3, result.stdout + result.stderr
    assert list(tree_of(tmp_path / "out")) == ["20210715-phantom/002-gre_field_magph/0001.dcm"]
    assert sorted(os.listdir(tmp_path / "quarantine")) == ["notes\\xe9.txt", "notes\\xe9.txt.reason.txt"]
    assert "quarantined: " + str(source) + "/notes\\xe9.txt: not a DICOM file" in result.stdout
    where = run_process("where", "MR.\\xff\\xfe.dcm", "--out", str(tmp_path / "out"))
    assert "sorted  " + str(source) + "/MR.\\xff\\xfe.dcm -> " in where.stdout


def test_sorting_the_quarantine_deletes_nothing(tmp_path, template_file):
    """'sort-once quarantine' retries the rejects: what now sorts leaves, the rest stays."""
    source = tmp_path / "dump"
    make_dicom(source / "no-uid", template_file, SOPInstanceUID=None)
    (source / "notes.txt").write_text("scan notes " * 20)
    assert run("sort-once", str(source), "--out", str(tmp_path / "out")).exit_code == 3
    quarantine = tmp_path / "quarantine"
    # A file quarantined earlier for a reason since mended (here: put there by hand).
    make_dicom(quarantine / "MR.mended", template_file)
    (quarantine / "MR.mended.reason.txt").write_text("cannot place it: Permission denied\n")
    before = tree_of(quarantine)
    for _ in range(2):
        result = run("sort-once", str(quarantine), "--out", str(tmp_path / "out"))
        assert result.exit_code == 3, result.output
    after = tree_of(quarantine)
    assert sorted(after) == ["no-uid", "no-uid.reason.txt", "notes.txt", "notes.txt.reason.txt"]
    assert {k: before[k] for k in after} == after  # the rejects and their reasons, untouched
    assert list(tree_of(tmp_path / "out")) == ["20210715-phantom/002-gre_field_magph/0001.dcm"]
    assert "(stays in the quarantine)" in result.output


def test_the_tree_reached_by_another_path_is_never_sorted_into_itself(tmp_path, template_file):
    real = tmp_path / "real"
    make_dicom(real / "incoming" / "a.dcm", template_file)
    (tmp_path / "link").symlink_to(real)
    out = real / "incoming" / "sorted"
    result = run("sort-once", str(tmp_path / "link" / "incoming"), "--out", str(out))
    assert result.exit_code == 0, result.output
    first = tree_of(out)
    assert list(first) == ["20210715-phantom/002-gre_field_magph/0001.dcm"]
    # Again, now that the tree is inside the folder, and reached through the link.
    result = run("sort-once", str(tmp_path / "link" / "incoming"), "--out", str(out))
    assert result.exit_code == 0 and "0 files in" in result.output
    assert tree_of(out) == first
    result = run("sort-once", str(tmp_path / "link" / "incoming" / "sorted"), "--out", str(out))
    assert result.exit_code == 2 and "is inside the sorted tree" in result.output
    assert tree_of(out) == first


def test_anonymising_a_deflated_file_keeps_its_pixels(tmp_path, template_file):
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    source = tmp_path / "dump"
    ds = dcmread(template_file)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    source.mkdir()
    ds.save_as(source / "deflated.dcm", enforce_file_format=True)
    cfg = config(tmp_path, anon_fields=(0x00100010,))
    assert sort_dir(source, cfg).exit_code == 0
    placed = tmp_path / "out" / "20210715-EmptyPatientName" / "002-gre_field_magph" / "0001.dcm"
    out = dcmread(placed)
    assert out.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    assert out.PatientName == "" and out.PixelData == ds.PixelData
    assert not (source / "deflated.dcm").exists()


def test_files_no_reader_expects_are_quarantined_not_a_crash(tmp_path, template_file):
    """Sequences nested 600 deep; a deflated data set that is not zlib at all."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    source = tmp_path / "dump"
    make_dicom(source / "good.dcm", template_file)
    head = (source / "good.dcm").read_bytes()
    meta_end = 132 + 12 + int.from_bytes(head[140:144], "little")
    item, end = b"\xfe\xff\x00\xe0\xff\xff\xff\xff", b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
    sequence, close = b"\x08\x00\x15\x11SQ\x00\x00\xff\xff\xff\xff", b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    deep = (sequence + item) * 600 + (end + close) * 600
    (source / "deep.dcm").write_bytes(head[:meta_end] + deep)
    ds = dcmread(template_file)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(tmp_path / "d.dcm", enforce_file_format=True)
    data = (tmp_path / "d.dcm").read_bytes()
    meta_end = 132 + 12 + int.from_bytes(data[140:144], "little")
    (source / "bad-zlib.dcm").write_bytes(data[:meta_end] + b"this is not a zlib stream" * 100)
    for number in range(2):  # and again: no crash loop
        result = run_process("sort-once", str(source), "--out", str(tmp_path / "out"))
        assert result.returncode == (3 if number == 0 else 0), result.stdout + result.stderr
    assert list(tree_of(tmp_path / "out")) == ["20210715-phantom/002-gre_field_magph/0001.dcm"]
    reasons = {p.name: p.read_text().splitlines()[0] for p in (tmp_path / "quarantine").glob("*.reason.txt")}
    assert reasons["deep.dcm.reason.txt"].startswith(("unreadable file: RecursionError", "unreadable DICOM header"))
    assert reasons["bad-zlib.dcm.reason.txt"].startswith("unreadable DICOM header")


def test_hostile_numbers_and_long_dump_names(tmp_path, template_file):
    source = tmp_path / "dump"
    for number, (echo, instance) in enumerate([("1e250", "9" * 300), ("-5", "-3"), ("abc", "x"), ("2", "1e3")]):
        make_dicom(source / f"f{number}", template_file, EchoNumbers=echo, InstanceNumber=instance)
    long_name = "MR." + "1.2.840.10008" * 20  # 263 bytes: too long for name + ".reason.txt"
    (source / long_name[:250]).write_text("not DICOM " * 30)
    result = run("sort-once", str(source), "--out", str(tmp_path / "out"))
    assert result.exit_code == 3, result.output
    names = sorted(Path(rel).name for rel in tree_of(tmp_path / "out"))
    assert len(names) == 4 and all(len(n.encode()) <= 255 for n in names)
    assert "1000_02.dcm" in names  # "1e3" is a number; echo 2 is an echo
    quarantined = list((tmp_path / "quarantine").iterdir())
    assert len(quarantined) == 2 and all(len(p.name.encode()) <= 255 for p in quarantined)


def _mount_bind(source: Path, target: Path) -> bool:
    target.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "--bind", str(source), str(target)], capture_output=True).returncode == 0


def test_dump_and_tree_on_two_bind_mounts_of_one_filesystem(tmp_path, template_file):
    """Docker volumes: one device number, yet rename between them fails (EXDEV)."""
    disk = tmp_path / "disk"
    make_dicom(disk / "dump" / "MR.1", template_file)
    (disk / "sorted").mkdir()
    if not _mount_bind(disk / "dump", tmp_path / "mnt-dump"):
        pytest.skip("cannot bind-mount here (needs root)")
    try:
        if not _mount_bind(disk / "sorted", tmp_path / "mnt-sorted"):
            pytest.skip("cannot bind-mount here (needs root)")
        try:
            assert os.stat(tmp_path / "mnt-dump").st_dev == os.stat(tmp_path / "mnt-sorted").st_dev
            result = run("sort-once", str(tmp_path / "mnt-dump"), "--out", str(tmp_path / "mnt-sorted"),
                         "--quarantine", str(tmp_path / "q"))
            assert result.exit_code == 0, result.output
            assert list(tree_of(disk / "sorted")) == ["20210715-phantom/002-gre_field_magph/0001.dcm"]
            assert not (disk / "dump" / "MR.1").exists()
            assert os.listdir(disk / "sorted" / ".dumpwatch" / "tmp") == []
        finally:
            subprocess.run(["umount", str(tmp_path / "mnt-sorted")], check=True)
    finally:
        subprocess.run(["umount", str(tmp_path / "mnt-dump")], check=True)


def test_a_group_member_sorts_into_a_tree_another_user_made(tmp_path, template_file):
    """Sites share the tree in a group (umask 002): a second user must be able to sort into it."""
    if os.getuid() != 0:
        pytest.skip("needs root to act as two users")
    import grp
    import pwd

    nobody = pwd.getpwnam("nobody")
    group = grp.getgrgid(nobody.pw_gid)
    base = Path(tempfile.mkdtemp(prefix="dumpwatch-shared-"))  # tmp_path is root's alone
    try:
        os.chmod(base, 0o755)
        out = base / "sorted"
        cfg = base / "dumpwatch.cfg"
        cfg.write_text(f"dir_out = sorted\ndir_quarantine = quarantine\ngroup = {group.gr_name}\n")
        make_dicom(base / "dump-root" / "MR.1", template_file)
        assert run_process("--config", str(cfg), "sort-once", str(base / "dump-root")).returncode == 0
        state = out / ".dumpwatch"
        assert stat.S_IMODE(os.stat(state).st_mode) == 0o2770 and os.stat(state).st_gid == group.gr_gid
        for name in ("journal.sqlite3", "tree.lock"):
            assert stat.S_IMODE(os.stat(state / name).st_mode) == 0o660, name
        theirs = base / "dump-nobody"
        make_dicom(theirs / "MR.2", template_file, InstanceNumber=2)
        for path in (theirs, theirs / "MR.2", base / "quarantine"):
            if path.exists():
                os.chown(path, nobody.pw_uid, nobody.pw_gid)

        def become_nobody() -> None:
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)

        result = subprocess.run([sys.executable, "-m", "dumpwatch", "--config", str(cfg), "sort-once", str(theirs)],
                                capture_output=True, text=True, preexec_fn=become_nobody, cwd=base,
                                env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
        assert result.returncode == 0, result.stdout + result.stderr
        assert sorted(tree_of(out)) == ["20210715-phantom/002-gre_field_magph/0001.dcm",
                                        "20210715-phantom/002-gre_field_magph/0002.dcm"]
    finally:
        shutil.rmtree(base)


def test_a_full_disk_loses_nothing_and_the_rerun_finishes(tmp_path, testdata, expected):
    """dir_out on a small filesystem that fills up mid-run; then space is freed."""
    out = tmp_path / "small"
    out.mkdir()
    room = sum(f["size"] for f in below(expected, "siemens_fieldmap").values()) // 2  # half the files fit
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={room // 1024}k", "tmpfs", str(out)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        source, quarantine = tmp_path / "dump", tmp_path / "q"
        copy_testdata(testdata, source, "siemens_fieldmap")
        inputs = tree_of(source)
        result = run_process("sort-once", str(source), "--out", str(out / "sorted"), "--quarantine", str(quarantine))
        assert result.returncode in (1, 3), result.stdout + result.stderr
        assert "Traceback" not in result.stderr
        placed, waiting = tree_of(out / "sorted"), tree_of(source)
        # How far it got depends on how many copies the workers had staged when space ran out.
        assert waiting, "the disk filled up before the end"
        assert not quarantine.exists() or not os.listdir(quarantine)  # a full disk is not bad input
        assert sorted(set(placed.values()) | set(waiting.values())) == sorted(set(inputs.values()))
        assert len(placed) + len(waiting) == len(inputs)  # each file in exactly one place
        assert set(placed.values()) <= set(inputs.values()), "a partial file in the tree"
        golden = golden_tree(expected, "siemens_fieldmap")
        subprocess.run(["mount", "-o", "remount,size=64m", str(out)], check=True)  # space freed
        result = run_process("sort-once", str(source), "--out", str(out / "sorted"), "--quarantine", str(quarantine))
        assert result.returncode == 0, result.stdout + result.stderr
        assert tree_of(out / "sorted") == golden and tree_of(source) == {}
        assert_journal_agrees(out / "sorted")
    finally:
        subprocess.run(["umount", str(out)], check=True)


def test_a_tree_too_large_to_keep_in_memory_sorts_the_same(tmp_path, testdata, expected, monkeypatch):
    """Past CACHED_NAMES, the folders used longest ago are forgotten and read again from disk.
    With a limit of one name, every batch reads its folders again: echo renames, series
    folders and identical re-sends must come out exactly as with everything kept."""
    from dumpwatch import foldercache

    for name in ("kept", "forgotten"):
        copy_testdata(testdata, tmp_path / f"dump-{name}", "siemens_fieldmap")
        copy_testdata(testdata, tmp_path / f"dump-{name}" / "again", "siemens_fieldmap")  # a re-send
    kept = sort_dir(tmp_path / "dump-kept", Config(dir_out=tmp_path / "kept", dir_quarantine=tmp_path / "q"))
    monkeypatch.setattr(foldercache, "CACHED_NAMES", 1)
    loads = []
    load = foldercache.FolderCache._load
    monkeypatch.setattr(foldercache.FolderCache, "_load", lambda self, rel: loads.append(rel) or load(self, rel))
    forgotten = sort_dir(tmp_path / "dump-forgotten",
                         Config(dir_out=tmp_path / "forgotten", dir_quarantine=tmp_path / "q"))
    files = len(below(expected, "siemens_fieldmap"))
    assert kept.counts == forgotten.counts and forgotten.counts["duplicate"] == files, forgotten.counts
    assert tree_of(tmp_path / "forgotten") == tree_of(tmp_path / "kept")
    assert len(tree_of(tmp_path / "kept")) == files
    assert len(loads) >= 2 * len(set(loads)), "the folders were not forgotten and read again"


@pytest.mark.parametrize("cached", [50_000, 0], ids=["restart", "forgotten-mid-run"])
def test_a_template_whose_file_name_ends_in_underscore_digits_is_read_back_right(
        tmp_path, template_file, monkeypatch, cached):
    """IMG_0001.dcm is not 'IMG' with echo 0001: read back from disk (after a restart, or
    when the tree forgot the folder mid-run), the series stays single-echo and a re-send is
    recognised."""
    from dumpwatch import foldercache
    from dumpwatch.naming import Template

    monkeypatch.setattr(foldercache, "CACHED_NAMES", cached)
    cfg = Config(dir_out=tmp_path / "out", dir_quarantine=tmp_path / "q",
                 template=Template.parse("<PatientName>/<SeriesNumber:03>/IMG_<InstanceNumber:04>"))
    first = [make_dicom(tmp_path / "one" / f"MR.{n}", template_file, InstanceNumber=n) for n in (1, 2, 3)]
    shutil.copyfile(first[0], tmp_path / "resend")
    assert sort_dir(tmp_path / "one", cfg).exit_code == 0
    make_dicom(tmp_path / "two" / "MR.4", template_file, InstanceNumber=4)
    shutil.move(tmp_path / "resend", tmp_path / "two" / "MR.1-again")
    summary = sort_dir(tmp_path / "two", cfg)
    assert summary.counts == {"sorted": 1, "duplicate": 1}, summary.counts
    assert sorted(tree_of(tmp_path / "out")) == [f"phantom/002/IMG_{n:04d}.dcm" for n in (1, 2, 3, 4)]
