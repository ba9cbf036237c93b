"""Reading files that are unusual but readable: very large ones, and ones whose file meta
names the wrong transfer syntax. Each is sorted as any other file, or quarantined with a
reason that says what is wrong with it."""

from __future__ import annotations

import io
import os
import shutil
import struct
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID, generate_uid

from dumpwatch.config import read_config
from dumpwatch.dicomfile import IN_MEMORY_MAX
from dumpwatch.outcomes import Handled
from dumpwatch.sortonce import sort_dir

from helpers import tree_of

ENHANCED = "enhanced/philips/IM_0027_fMAP.dcm"  # 64 frames of 64 x 64, 16 bits
ANONYMISE = {
    "plain": "",
    "anon_fields": "anon_fields\n    0010,0010\n    0008,0080\n",
    "anon_profile": "anon_profile = basic\n",
}


def site_config(base: Path, mode: str) -> Path:
    path = base / "dumpwatch.cfg"
    path.write_text(f"dir_out = {base / 'out'}\ndir_quarantine = {base / 'q'}\nincomplete_timeout = 0\n"
                    f"workers = 2\n{ANONYMISE[mode]}")
    return path


def big_enhanced(path: Path, template: Path, side: int, marker: bytes, **fields: object) -> int:
    """A real enhanced multi-frame file enlarged to frames of side x side (Rows, Columns and
    the PixelData length agree); returns the PixelData length. Its pixels are zeros (a sparse
    file: no disk used) but for `marker` at the very end, to tell the copies apart."""
    ds = dcmread(template, stop_before_pixels=True)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Rows = ds.Columns = side
    for keyword, value in fields.items():
        if value is None:
            del ds[keyword]
        else:
            setattr(ds, keyword, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=False)
    length = side * side * int(ds.NumberOfFrames) * ds.BitsAllocated // 8
    with open(path, "r+b") as stream:
        stream.seek(0, os.SEEK_END)
        stream.write(struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, length))
        stream.truncate(stream.tell() + length)
        stream.seek(-len(marker), os.SEEK_END)
        stream.write(marker)
    return length


@pytest.mark.parametrize("mode", ANONYMISE)
def test_files_over_64_mib_are_read_whole_with_or_without_anonymising(tmp_path, testdata, mode):
    """A file larger than IN_MEMORY_MAX is hashed and read through its descriptor. Each
    reader must start where it means to, whatever another read before it left behind: the
    full header (anonymising, or a file without a top-level InstanceNumber) is read after
    the hash, and the pixel data after the header."""
    dump = tmp_path / "dump"
    files = {  # name: (frame side, fields)
        "MR.70MB": (740, {}),
        "MR.400MB": (1768, {}),
        "MR.70MB-no-number": (740, {"InstanceNumber": None}),
    }
    lengths = {}
    try:
        for name, (side, fields) in files.items():
            lengths[name] = big_enhanced(dump / name, testdata / ENHANCED, side, f"<{name}>".encode(), **fields)
            assert os.path.getsize(dump / name) > IN_MEMORY_MAX
        cfg = read_config(site_config(tmp_path, mode))
        outcomes: list[Handled] = []
        summary = sort_dir(dump, cfg, on_outcome=outcomes.append)
        assert summary.counts["sorted"] == 3, [(o.source, o.outcome, o.detail) for o in outcomes]
        assert not (tmp_path / "q").exists()
        assert os.listdir(dump) == []
        for outcome in outcomes:
            name = Path(outcome.source).name
            placed = Path(outcome.detail)
            ds = dcmread(placed, stop_before_pixels=True)
            with open(placed, "rb") as stream:  # its own pixel data ends the file, whole
                stream.seek(-lengths[name] - 12, os.SEEK_END)
                assert stream.read(12) == struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, lengths[name]), name
                stream.seek(-len(name) - 2, os.SEEK_END)
                assert stream.read() == f"<{name}>".encode()
            if mode == "plain":
                assert "InstanceNumber" not in ds if "no-number" in name else ds.InstanceNumber == 1
            else:
                assert "PatientName" not in ds or ds.PatientName != "ROGERS_20180526"
        assert len(tree_of(tmp_path / "out")) == 3
    finally:  # 540 MB of pixel data: not kept for pytest's last three runs
        for folder in ("dump", "out", "q"):
            shutil.rmtree(tmp_path / folder, ignore_errors=True)


# -- a file meta that names the wrong transfer syntax ----------------------------------------

EXPLICIT_LE, IMPLICIT_LE, EXPLICIT_BE = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.2"
JPEG_LOSSLESS, DEFLATED = "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.1.99"
SIEMENS, IMPLICIT_FILE, BIG_ENDIAN_FILE = ("siemens_fieldmap/2_gre_field_magph/e1_01.dcm", "transfer_syntax/2.dcm",
                                           "transfer_syntax/3.dcm")
NAMES = {EXPLICIT_LE: "Explicit VR Little Endian", IMPLICIT_LE: "Implicit VR Little Endian",
         EXPLICIT_BE: "Explicit VR Big Endian", DEFLATED: "Deflated Explicit VR Little Endian"}

# name: (real file, the transfer syntax its file meta is made to name, what happens)
# Only the VR (explicit or implicit) mislabelled: pydicom tells by the first element and reads
# it as it is, so it is sorted. A wrong byte order, or deflate where the meta says none or the
# other way round, no reader can undo: the quarantine says what the data set is.
MISLABELLED = {
    "MR.explicit-meta-implicit-data": (IMPLICIT_FILE, EXPLICIT_LE, "sorted"),
    "MR.implicit-meta-explicit-data": (SIEMENS, IMPLICIT_LE, "sorted"),
    "MR.jpeg-meta-implicit-data": (IMPLICIT_FILE, JPEG_LOSSLESS, "sorted"),
    "MR.big-endian-meta-little-endian-data": (SIEMENS, EXPLICIT_BE, "encoded as Explicit VR Little Endian"),
    "MR.little-endian-meta-big-endian-data": (BIG_ENDIAN_FILE, EXPLICIT_LE, "encoded as Explicit VR Big Endian"),
    "MR.implicit-meta-big-endian-data": (BIG_ENDIAN_FILE, IMPLICIT_LE, "encoded as Explicit VR Big Endian"),
    "MR.big-endian-meta-implicit-data": (IMPLICIT_FILE, EXPLICIT_BE, "encoded as Implicit VR Little Endian"),
    "MR.deflated-meta-plain-data": (SIEMENS, DEFLATED, "not deflated: it is encoded as Explicit VR Little Endian"),
    "MR.plain-meta-deflated-data": (SIEMENS, EXPLICIT_LE, "deflated (Deflated Explicit VR Little Endian)"),
}


def mislabelled(path: Path, source: Path, syntax: str, number: int) -> None:
    """source with a new SOPInstanceUID and InstanceNumber, written in its own encoding (or,
    if its meta is made to name another one, deflated); then its file meta is made to name
    `syntax`, the data set's bytes left as they are."""
    ds = dcmread(source)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.InstanceNumber = number
    if "deflated-data" in path.name:
        ds.file_meta.TransferSyntaxUID = UID(DEFLATED)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=False)
    data = buffer.getvalue()
    data_set = data[144 + int.from_bytes(data[140:144], "little"):]
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    meta = io.BytesIO()
    write_file_meta_info(meta, ds.file_meta, enforce_standard=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * 128 + b"DICM" + meta.getvalue() + data_set)


@pytest.mark.parametrize("mode", ANONYMISE)
def test_a_file_meta_naming_the_wrong_transfer_syntax(tmp_path, testdata, mode):
    dump = tmp_path / "dump"
    sources = {}
    for number, (name, (rel, syntax, _)) in enumerate(MISLABELLED.items(), start=10):
        mislabelled(dump / name, testdata / rel, syntax, number)
        sources[name] = dcmread(testdata / rel)
    cfg = read_config(site_config(tmp_path, mode))
    outcomes: list[Handled] = []
    summary = sort_dir(dump, cfg, on_outcome=outcomes.append)
    assert not summary.stopped
    assert os.listdir(dump) == []
    by_name = {Path(o.source).name: o for o in outcomes}
    reasons = [p.read_text().splitlines()[0] for p in (tmp_path / "q").glob("*.reason.txt")]
    for name, (_rel, syntax, expected) in MISLABELLED.items():
        outcome = by_name[name]
        if expected == "sorted":
            assert outcome.outcome == "sorted", (name, outcome.detail)
            placed = dcmread(outcome.detail)  # the whole file, pixel data and all
            assert placed.PixelData == sources[name].PixelData, name  # the header fits the pixel data's encoding
            assert placed.file_meta.TransferSyntaxUID == syntax  # as it came
            if mode != "plain":
                assert "PatientName" not in placed or placed.PatientName != sources[name].PatientName
        else:
            assert outcome.outcome == "quarantined", (name, outcome.outcome, outcome.detail)
            reason = f"the file meta names transfer syntax {NAMES[syntax]} ({syntax}), but the data set is {expected}"
            assert outcome.detail == reason, name
            assert reason in reasons, name  # beside the file (named by a token when anonymising)
