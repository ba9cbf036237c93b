"""Series and study completion, completeness and provenance, end to end: the real storescp
receives from the real storescu, `dumpwatch serve` sorts, `dumpwatch report` tells."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dcmtk import Serve, Storescp, storescu, wait_for, write_config
from pydicom import dcmread
from pydicom.uid import generate_uid

from helpers import FIELDMAP, make_dicom

pytestmark = pytest.mark.dcmtk

IDLE = {"series_idle": 2, "study_idle": 3}


def series_of(template: Path, folder: Path, count: int, skip: tuple[int, ...] = (), echoes: tuple[int, ...] = (1,),
              **fields: object) -> list[Path]:
    """A series made from a real scanner file: instances 1..count per echo (but `skip`), one
    new SeriesInstanceUID; fields set on every file (a new StudyInstanceUID unless given)."""
    fields = {"SeriesInstanceUID": generate_uid(), "StudyInstanceUID": generate_uid(), **fields}
    files = []
    for echo in echoes:
        for number in range(1, count + 1):
            if number not in skip:
                files.append(make_dicom(folder / f"e{echo}_{number:03}.dcm", template, InstanceNumber=str(number),
                                        EchoNumbers=str(echo), **fields))
    return files


def ge_series(template: Path, folder: Path, count: int, skip: tuple[int, ...] = (), **fields: object) -> list[Path]:
    """A series whose header expects `count` images (GE's ImagesInAcquisition)."""
    return series_of(template, folder, count, skip, Manufacturer="GE MEDICAL SYSTEMS", ImagesInAcquisition=count,
                     **fields)


def report(site: Path, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "dumpwatch", "--config", str(site), "report", "--json", *args],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def series_in(site: Path, series_uid: str) -> dict | None:
    for study in report(site)["studies"]:
        for series in study["series"]:
            if series["series_uid"] == series_uid:
                return series
    return None


def completions(site: Path, kind: str = "series") -> list[tuple]:
    db = sqlite3.connect(site.parent / "sorted" / ".dumpwatch" / "journal.sqlite3")
    try:
        return db.execute("SELECT series_id, study_id, again, files FROM completions WHERE kind = ? ORDER BY id",
                          (kind,)).fetchall()
    finally:
        db.close()


def uid_of(files: list[Path]) -> str:
    return str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)


@pytest.fixture
def site(tmp_path):
    """conftest's site, with idle times of seconds (the receiver fixture starts it)."""
    return write_config(tmp_path / "site", **IDLE)


@pytest.fixture
def running(receiver, site):
    return site, receiver[1]


def port_of(site: Path) -> int:
    return int(next(line.split("=")[1] for line in site.read_text().splitlines() if line.startswith("port")))


def complete(site: Path, uid: str, completions_wanted: int = 1, timeout: float = 60) -> dict:
    def done():
        series = series_in(site, uid)
        return series if series and series["state"] == "complete" and series["completions"] >= completions_wanted \
            else None
    return wait_for(done, timeout, f"series {uid} complete {completions_wanted} time(s)")


def test_two_bursts_within_series_idle_complete_once(running, template_file, tmp_path):
    site, serve = running
    files = ge_series(template_file, tmp_path / "a", 12)
    uid = uid_of(files)
    storescu(port_of(site), files[:6], tmp_path)
    time.sleep(0.5)  # well within series_idle (2 s)
    storescu(port_of(site), files[6:], tmp_path)
    series = complete(site, uid)
    assert series["files"] == 12 and series["verdict"] == "whole" and series["late"] == 0
    time.sleep(IDLE["series_idle"] + 1.5)
    assert len(completions(site)) == 1
    assert series_in(site, uid)["completions"] == 1
    assert serve.output().count("series complete:") == 1
    assert series["senders"] == ["SCANNER"]  # storescu's calling AE title, as storescp recorded it


def test_a_late_file_reopens_a_complete_series_and_it_completes_again(running, template_file, tmp_path):
    site, serve = running
    files = ge_series(template_file, tmp_path / "a", 12, skip=(7,))
    uid = uid_of(files)
    storescu(port_of(site), files, tmp_path)
    series = complete(site, uid)
    assert series["verdict"] == "incomplete"
    assert series["missing"] == {"0": [[7, 7]]} and series["missing_count"] == 1
    assert series["summary"] == "missing 1 (7)"
    text = subprocess.run([sys.executable, "-m", "dumpwatch", "--config", str(site), "report", "--incomplete"],
                          capture_output=True, text=True, check=True).stdout
    assert "missing 1 (7)" in text

    late = ge_series(template_file, tmp_path / "b", 7, SeriesInstanceUID=uid,
                     StudyInstanceUID=str(dcmread(files[0]).StudyInstanceUID))[6]
    storescu(port_of(site), [late], tmp_path)
    wait_for(lambda: series_in(site, uid)["files"] == 12, 30, "the late file")
    reopened = series_in(site, uid)
    assert reopened["state"] == "reopened" and reopened["late"] == 1
    series = complete(site, uid, completions_wanted=2)
    assert series["verdict"] == "whole" and series["missing_count"] == 0 and series["late"] == 1
    assert [c[2] for c in completions(site)] == [0, 1]  # the second completion is marked as again
    assert "series complete again:" in serve.output()


def test_an_identical_resend_does_not_reopen(running, template_file, tmp_path):
    site, _ = running
    files = ge_series(template_file, tmp_path / "a", 4)
    uid = uid_of(files)
    storescu(port_of(site), files, tmp_path)
    complete(site, uid)
    storescu(port_of(site), files, tmp_path)
    wait_for(lambda: series_in(site, uid)["resent"] == 4, 30, "the re-sent files")
    time.sleep(IDLE["series_idle"] + 1.5)
    series = series_in(site, uid)
    assert series["state"] == "complete" and series["completions"] == 1 and series["files"] == 4


def test_kill_between_the_last_file_and_the_completion_completes_once(tmp_path, template_file):
    site = write_config(tmp_path / "site", series_idle=4, study_idle=5)
    scp = Storescp(site)
    serve = Serve(site, session=True)
    try:
        files = ge_series(template_file, tmp_path / "a", 6)
        uid = uid_of(files)
        storescu(port_of(site), files, tmp_path)
        wait_for(lambda: (series_in(site, uid) or {}).get("files") == 6, 30, "the series sorted")
        serve.process.send_signal(signal.SIGKILL)  # inside series_idle: not complete yet
        serve.process.wait(timeout=30)
        serve.log.close()
        assert series_in(site, uid)["state"] == "receiving" and completions(site) == []
        serve = Serve(site, session=True)
        complete(site, uid)
        wait_for(lambda: completions(site, "study"), 30, "the study complete")
        serve.process.send_signal(signal.SIGKILL)  # after the completion: it is not repeated
        serve.process.wait(timeout=30)
        serve.log.close()
        serve = Serve(site, session=True)
        time.sleep(6)
        assert len(completions(site)) == 1 and len(completions(site, "study")) == 1
        assert series_in(site, uid)["completions"] == 1
    finally:
        assert serve.stop() == 0
        scp.stop()


def test_a_gap_in_one_echo_of_a_siemens_field_map(running, testdata, tmp_path):
    """The Siemens field map numbers each echo from 1; its protocol says 36 slices."""
    site, _ = running
    template = testdata / FIELDMAP / "e1_01.dcm"
    files = [f for f in series_of(template, tmp_path / "fmap", 36, echoes=(1, 2)) if f.name != "e2_007.dcm"]
    uid = uid_of(files)
    storescu(port_of(site), files, tmp_path)
    series = complete(site, uid)
    assert series["files"] == 71 and series["expected"] == 36
    assert series["instances"]["per_echo"] is True
    assert series["missing"] == {"2": [[7, 7]]}
    assert series["summary"] == "missing 1 (echo 2: 7)"
    assert series["verdict"] == "incomplete"


def test_enhanced_multi_frame_files_are_checked_frame_set_by_frame_set(running, testdata, tmp_path):
    site, _ = running
    whole = testdata / "enhanced" / "philips" / "IM_0027_fMAP.dcm"
    lacking = tmp_path / "lacking.dcm"
    ds = dcmread(whole)  # the same scan without its 10th frame: 63 frames, one set short of a position
    frames = ds.PerFrameFunctionalGroupsSequence
    size = len(ds.PixelData) // int(ds.NumberOfFrames)
    del frames[9]
    ds.PixelData = ds.PixelData[: 9 * size] + ds.PixelData[10 * size:]
    ds.NumberOfFrames = 63
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(lacking)
    storescu(port_of(site), [whole, lacking], tmp_path)
    first = complete(site, str(dcmread(whole, stop_before_pixels=True).SeriesInstanceUID))
    assert (first["files"], first["frames"], first["frame_sets"], first["verdict"]) == (1, 64, 2, "whole")
    second = complete(site, str(ds.SeriesInstanceUID))
    assert (second["frames"], second["frames_missing"], second["verdict"]) == (63, 1, "incomplete")
    assert "missing 1 frames" in second["summary"] and "positions 10" in second["summary"]


def test_a_sender_outside_allowed_senders_is_quarantined(tmp_path, template_file):
    site = write_config(tmp_path / "site", allowed_senders="SCANNER, MRI2", **IDLE)
    scp = Storescp(site)
    serve = Serve(site)
    try:
        allowed = ge_series(template_file, tmp_path / "a", 2)
        stranger = ge_series(template_file, tmp_path / "b", 2)
        storescu(port_of(site), allowed, tmp_path, aet="MRI2")
        storescu(port_of(site), stranger, tmp_path, aet="LAPTOP")
        quarantine = tmp_path / "site" / "quarantine"
        wait_for(lambda: quarantine.exists() and len(list(quarantine.rglob("*.reason.txt"))) == 2, 30,
                 "both files quarantined")
        reasons = sorted(p.read_text() for p in quarantine.rglob("*.reason.txt"))
        assert all("sender LAPTOP not allowed" in r for r in reasons), reasons
        series = complete(site, uid_of(allowed))
        assert series["senders"] == ["MRI2"] and series["files"] == 2
        assert series_in(site, uid_of(stranger)) is None
    finally:
        assert serve.stop() == 0
        scp.stop()


def test_status_names_the_last_complete_series_and_the_incomplete_ones(running, template_file, tmp_path):
    site, _ = running
    whole = ge_series(template_file, tmp_path / "a", 3, SeriesDescription="t1_whole")
    lacking = ge_series(template_file, tmp_path / "b", 5, skip=(2,), SeriesDescription="t2_lacking", SeriesNumber="9")
    storescu(port_of(site), lacking, tmp_path)
    complete(site, uid_of(lacking))
    storescu(port_of(site), whole, tmp_path)
    complete(site, uid_of(whole))
    out = subprocess.run([sys.executable, "-m", "dumpwatch", "--config", str(site), "status", "--json"],
                         capture_output=True, text=True)
    data = json.loads(out.stdout)["completion"]
    assert data["last_complete"]["folder"].endswith("t1_whole") and data["last_complete"]["verdict"] == "whole"
    assert [i["folder"].rsplit("/", 1)[1] for i in data["incomplete"]] == ["009-t2_lacking"]
    text = subprocess.run([sys.executable, "-m", "dumpwatch", "--config", str(site), "status"],
                          capture_output=True, text=True).stdout
    assert "incomplete   " in text and "missing 1 (2)" in text


def test_sort_once_completes_what_it_sorted_when_it_ends(tmp_path, template_file):
    site = write_config(tmp_path / "site")  # series_idle 60: sort-once does not wait for it
    dump = tmp_path / "old-dump"
    uid = uid_of(ge_series(template_file, dump, 5, skip=(3,)))
    out = subprocess.run([sys.executable, "-m", "dumpwatch", "--config", str(site), "sort-once", str(dump)],
                         capture_output=True, text=True)
    assert "complete          1  series in 1 study, 1 missing images" in out.stdout, out.stdout
    assert "missing 1 (3)" in out.stdout
    series = series_in(site, uid)
    assert series["state"] == "complete" and series["completions"] == 1
    assert len(completions(site, "study")) == 1


def test_report_filters(running, template_file, tmp_path):
    site, _ = running
    one = ge_series(template_file, tmp_path / "a", 2, PatientName="Alpha^One")
    two = ge_series(template_file, tmp_path / "b", 3, skip=(2,), PatientName="Beta^Two")
    storescu(port_of(site), one + two, tmp_path)
    complete(site, uid_of(one))
    complete(site, uid_of(two))
    found = report(site, "--subject", "beta")["studies"]
    assert len(found) == 1 and "Beta" in found[0]["folder"] and found[0]["series"][0]["series_uid"] == uid_of(two)
    assert [len(s["series"]) for s in report(site, "--incomplete")["studies"]] == [1]
    assert report(site, "--since", "1d")["studies"] and not report(site, "--since", "2999-01-01")["studies"]
    bad = subprocess.run([sys.executable, "-m", "dumpwatch", "--config", str(site), "report", "--since", "soon"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--since" in bad.stderr


def test_sort_once_sorts_whatever_the_sender(tmp_path, template_file):
    """allowed_senders is serve's: sort-once sorts what a person hands it (a CD's export
    names no calling AE title)."""
    site = write_config(tmp_path / "site", allowed_senders="PRISMA")
    dump = tmp_path / "export"
    ge_series(template_file, dump, 2)  # their file meta names MRC35131
    out = subprocess.run([sys.executable, "-m", "dumpwatch", "--config", str(site), "sort-once", str(dump)],
                         capture_output=True, text=True)
    assert out.returncode == 0 and "sorted            2" in out.stdout, out.stdout + out.stderr


def test_a_file_a_hung_sender_holds_open_does_not_hold_every_series(tmp_path, template_file):
    """A half-written file that stood still for longer than series_idle, still open in its
    writer (an association that hung): its series is not known, but it would come late
    whatever it is. Other series complete; the file waits, as any open file does."""
    site = write_config(tmp_path / "site", **IDLE)
    dump = tmp_path / "site" / "dump"
    dump.mkdir(parents=True)
    partial = dump / "MR.hung"
    partial.write_bytes(template_file.read_bytes()[:2000])
    old = time.time() - 30
    os.utime(partial, (old, old))
    held = open(partial, "ab")  # this process holds it open, as storescp's child would
    scp = Storescp(site)
    serve = Serve(site)
    try:
        files = ge_series(template_file, tmp_path / "a", 3)
        storescu(port_of(site), files, tmp_path)
        series = complete(site, uid_of(files))
        assert series["files"] == 3 and series["verdict"] == "whole"
        assert partial.exists()  # still waiting in the dump: open in its writer
    finally:
        held.close()
        assert serve.stop() == 0
        scp.stop()
