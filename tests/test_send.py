"""`dumpwatch send`: a folder of DICOM files to a real storescp over loopback, every file
offered in its own SOP class and transfer syntax, refusals named file by file."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from dcmtk import Storescp, free_port, wait_for, write_config
from pydicom import dcmread
from pydicom.uid import generate_uid

from dumpwatch.send import MAX_CONTEXTS, Item, batches, profile_text
from dumpwatch.status import listening

from helpers import FIELDMAP, copy_testdata, make_dicom, run_process, tree_of

PHYSIO = "1.3.12.2.1107.5.9.1"  # Siemens' private CSA non-image storage
UNCOMPRESSED = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"}


def identity(path: Path) -> tuple[str, str, str]:
    """(SOPInstanceUID, SOPClassUID, transfer syntax) of a file, as storescu sends it."""
    ds = dcmread(path, stop_before_pixels=True)
    return str(ds.SOPInstanceUID), str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)


def received(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != ".dumpwatch.lock"
                  and ".dumpwatch" not in p.relative_to(folder).parts)


@pytest.mark.dcmtk
def test_every_file_of_the_test_data_arrives(receiver, site, testdata, tmp_path):
    """Compressed transfer syntaxes and private SOP classes included: nothing refused that
    storescp accepts. A file that is not DICOM is skipped and counted."""
    _, serve = receiver
    folder = tmp_path / "cd"
    files = copy_testdata(testdata, folder)
    (folder / "README.txt").write_text("the scanner's notes, not a DICOM file\n")
    sent = {identity(path) for path in files}
    assert len(sent) == len(files)
    syntaxes = {ts for _, _, ts in sent}
    assert syntaxes - UNCOMPRESSED, "the test data has compressed files"
    assert PHYSIO in {sop for _, sop, _ in sent}

    result = run_process("send", str(folder), "--config", str(site))  # port and AE title from it
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(files)} of {len(files)} DICOM files sent to DUMPWATCH at 127.0.0.1:" in result.stdout
    assert "skipped        1  not a DICOM file (no 'DICM' marker at byte 128), e.g. README.txt" in result.stdout
    assert "not sent" not in result.stdout

    tree = site.parent / "sorted"
    wait_for(lambda: len(tree_of(tree)) == len(files) and not received(site.parent / "dump")
             or serve.process.poll() is not None, 120, "every file sorted")
    assert {identity(path) for path in received(tree)} == sent  # each instance, as it was encoded
    assert not (site.parent / "quarantine").exists()


def test_a_folder_with_no_dicom_file_sends_nothing_and_says_so(tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "a.txt").write_text("text\n")
    (folder / "link.dcm").symlink_to(folder / "a.txt")
    result = run_process("send", str(folder), "--port", str(free_port()), "--aec", "DUMPWATCH")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "skipped        1  not a DICOM file (no 'DICM' marker at byte 128), e.g. a.txt" in result.stdout
    assert "skipped        1  a symbolic link (not followed), e.g. link.dcm" in result.stdout
    assert f"Error: no DICOM file below {folder}: nothing sent" in result.stderr


@pytest.fixture
def plain_storescp(tmp_path):
    """storescp as it starts with no options: uncompressed transfer syntaxes and the standard
    SOP classes only (no -pm, no +xa), as many a PACS accepts."""
    out = tmp_path / "received"
    out.mkdir()
    port = free_port()
    log = open(tmp_path / "plain-storescp.log", "wb")
    process = subprocess.Popen(["storescp", "--aetitle", "PACS", "--output-directory", str(out), str(port)],
                               stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "TCP_NODELAY": "1"})
    wait_for(lambda: listening(port) or process.poll() is not None, 20, "storescp to listen")
    assert process.poll() is None, (tmp_path / "plain-storescp.log").read_text()
    yield port, out
    process.terminate()
    process.wait(timeout=30)
    log.close()


@pytest.mark.dcmtk
def test_files_the_receiver_refuses_are_named_and_the_exit_status_says_so(plain_storescp, testdata, tmp_path):
    port, out = plain_storescp
    folder = tmp_path / "send"
    folder.mkdir()
    plain = testdata / FIELDMAP / "e1_01.dcm"
    physio = testdata / "nonimage" / "physio_siemens" / "samplePhysioCMRR.dcm"
    jpeg = next(p for p in sorted((testdata / "transfer_syntax").iterdir())
                if identity(p)[2] == "1.2.840.10008.1.2.4.70")  # JPEG lossless
    for source in (plain, physio, jpeg):
        (folder / source.name).write_bytes(source.read_bytes())
    result = run_process("send", str(folder), "--port", str(port), "--aec", "PACS")
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith(f"not sent  {physio.name}: PACS at 127.0.0.1:{port} does not accept private SOP "
                               f"class {PHYSIO} in Explicit VR Little Endian") for line in lines), lines
    assert any(line.startswith(f"not sent  {jpeg.name}: PACS at 127.0.0.1:{port} does not accept MR Image Storage")
               and "JPEG Lossless" in line for line in lines), lines
    assert not any(plain.name in line for line in lines if line.startswith("not sent")), lines
    assert f"1 of 3 DICOM files sent to PACS at 127.0.0.1:{port}" in result.stdout
    assert "  not sent       2  refused by the receiver or by storescu (each named above)" in lines
    [arrived] = received(out)
    assert identity(arrived) == identity(plain)


@pytest.mark.dcmtk
def test_nothing_listening_is_said_once_not_per_file(testdata, tmp_path):
    port = free_port()
    result = run_process("send", str(testdata / FIELDMAP), "--port", str(port), "--aec", "DUMPWATCH")
    assert result.returncode == 1, result.stdout + result.stderr
    count = len(list((testdata / FIELDMAP).iterdir()))
    assert f"0 of {count} DICOM files sent" in result.stdout
    assert (f"  not sent  {count:>6}  storescu could not send to DUMPWATCH at 127.0.0.1:{port}: "
            "Association Request Failed") in result.stdout
    assert f"(nothing listens on port {port} of 127.0.0.1)" in result.stdout
    assert "not sent  e1_01.dcm" not in result.stdout


@pytest.mark.dcmtk
def test_more_pairs_than_one_association_holds_are_sent_in_several(tmp_path, template_file):
    """Each (SOP class, transfer syntax) pair is a presentation context, 128 at most in one
    association: 130 SOP classes take two storescu runs, and every file arrives."""
    folder = tmp_path / "many"
    classes = [generate_uid() for _ in range(MAX_CONTEXTS + 2)]
    for number, sop_class in enumerate(classes):
        path = make_dicom(folder / f"f{number:03}.dcm", template_file, SOPClassUID=sop_class)
        ds = dcmread(path)
        ds.file_meta.MediaStorageSOPClassUID = sop_class
        ds.save_as(path, enforce_file_format=False)
    site = write_config(tmp_path / "site")
    scp = Storescp(site)
    try:
        result = run_process("send", str(folder), "--config", str(site))
    finally:
        scp.stop()
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(classes)} of {len(classes)} DICOM files sent" in result.stdout
    assert "(2 associations)" in result.stdout
    assert sorted(identity(p)[1] for p in received(site.parent / "dump")) == sorted(classes)


def item(number: int, sop: str = "1.2.3", ts: str = "1.2.840.10008.1.2.1", name: str = "") -> Item:
    return Item(name or f"/data/{number:04}.dcm", sop, ts, f"1.2.3.{number}")


def test_batches_keep_each_run_within_the_limits_and_every_file_once():
    items = [item(n, sop=f"1.2.{n % 300}") for n in range(900)]  # 300 pairs
    runs = batches(items, argv_bytes=4096)
    assert sorted(i.path for run in runs for i in run) == sorted(i.path for i in items)
    for run in runs:
        assert len({i.pair for i in run}) <= MAX_CONTEXTS
        assert sum(len(i.path) + 1 for i in run) <= 4096
        assert run == sorted(run, key=items.index)  # in the folder's order
    assert len({frozenset(i.pair for i in run) for run in runs}) >= 3
    with pytest.raises(ValueError, match="128 at most"):
        profile_text(i.pair for i in items)


def test_a_profile_takes_only_uids():
    """storescu reads the profile as `key = value` lines: a value from a header may not add any."""
    with pytest.raises(ValueError, match="not a UID"):
        profile_text([("1.2.3\n[[Profiles]]", "1.2.840.10008.1.2.1")])
    text = profile_text([("1.2.3", "1.2.840.10008.1.2.1"), ("1.2.3", "1.2.840.10008.1.2.4.70")])
    assert "PresentationContext2 = 1.2.3\\TS1" in text
