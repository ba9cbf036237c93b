"""A file that costs more than any file may, or that kills the process reading it: quarantined
with its reason, while every other file is sorted and serve goes on, across restarts too."""

from __future__ import annotations

import io
import os
import shutil
import struct
import zlib
from pathlib import Path

import pytest
from dcmtk import Serve, wait_for, write_config
from pydicom import dcmread
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID, generate_uid

from conftest import FIELDMAP, make_dicom, run_process, tree_of

DEFLATED = "1.2.840.10008.1.2.1.99"
MEMORY_LIMIT = 2 << 30  # address space for dumpwatch and each of its workers (prlimit --as)
BOMB_SIDE = 28378  # Rows = Columns: 28378 x 28378 x 2 bytes of pixel data, 1.5 GiB


def deflate_bomb(path: Path, template: Path, side: int = BOMB_SIDE) -> int:
    """A real MR header with side x side pixels of zeros, the data set deflated as a sender
    may send it (storescp accepts deflate): 1.5 MB on disk. Returns the inflated size."""
    ds = dcmread(template, stop_before_pixels=True)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Rows = ds.Columns = side
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=False)
    data = buffer.getvalue()
    header = data[144 + int.from_bytes(data[140:144], "little"):]
    ds.file_meta.TransferSyntaxUID = UID(DEFLATED)
    meta = io.BytesIO()
    write_file_meta_info(meta, ds.file_meta, enforce_standard=False)
    length = side * side * 2
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    with open(path, "wb") as out:
        out.write(b"\0" * 128 + b"DICM" + meta.getvalue())
        written = out.write(deflater.compress(header + struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, length)))
        zeros = bytes(1 << 24)
        for start in range(0, length, len(zeros)):
            written += out.write(deflater.compress(zeros[: min(len(zeros), length - start)]))
        written += out.write(deflater.flush())
        if written % 2:
            out.write(b"\0")
    return len(header) + 12 + length


@pytest.fixture(scope="module")
def bomb(tmp_path_factory, testdata) -> Path:
    path = tmp_path_factory.mktemp("bomb") / "MR.bomb"
    inflated = deflate_bomb(path, testdata / FIELDMAP / "e1_01.dcm")
    assert path.stat().st_size < 2_000_000 and inflated > 1_500_000_000
    return path


BOMB_REASON = "the deflated data set inflates to more than 256 MiB"  # dicomfile.INFLATED_MAX


def reason_of(quarantine: Path, name: str) -> str:
    return (quarantine / f"{name}.reason.txt").read_text().splitlines()[0]


def normal_files(dump: Path, template: Path, count: int) -> None:
    for number in range(1, count + 1):
        make_dicom(dump / f"MR.{number}", template, InstanceNumber=number)


# -- what one file may cost ------------------------------------------------------------------


def test_sort_once_quarantines_a_deflate_bomb_within_a_memory_limit(tmp_path, bomb, template_file):
    """1.5 MB that inflates to 1.5 GiB: pydicom would hold it several times over (5.2 GB
    seen). Under a 2 GiB limit, the inflated size is checked while inflating, chunk by chunk."""
    dump = tmp_path / "dump"
    normal_files(dump, template_file, 3)
    os.link(bomb, dump / "MR.bomb")
    result = run_process(
        "sort-once", str(dump), "--out", str(tmp_path / "out"), "--quarantine", str(tmp_path / "q"),
        prefix=("prlimit", f"--as={MEMORY_LIMIT}"),
    )
    assert result.returncode == 3, result.stdout + result.stderr
    assert reason_of(tmp_path / "q", "MR.bomb") == BOMB_REASON
    assert len(tree_of(tmp_path / "out")) == 3
    assert os.listdir(dump) == []


@pytest.mark.parametrize("anonymise", [False, True], ids=["plain", "anon_profile"])
def test_serve_quarantines_a_deflate_bomb_within_a_memory_limit(tmp_path, bomb, template_file, anonymise):
    extra = {"anon_profile": "basic"} if anonymise else {}
    cfg = write_config(tmp_path / "site", **extra)
    site = cfg.parent
    serve = Serve(cfg, prefix=("prlimit", f"--as={MEMORY_LIMIT}"))
    try:
        shutil.copyfile(bomb, site / "dump" / "MR.bomb")  # written and closed there, as storescp does
        normal_files(site / "dump", template_file, 3)
        quarantine = site / "quarantine"
        wait_for(lambda: len(tree_of(site / "sorted")) == 3 and list(quarantine.glob("*.reason.txt"))
                 or serve.process.poll() is not None, 60, "the bomb quarantined, the others sorted")
        assert serve.process.poll() is None, serve.output()
        [reason] = quarantine.glob("*.reason.txt")
        assert reason.read_text().splitlines()[0] == BOMB_REASON
    finally:
        code = serve.stop()
    assert code == 0, serve.output()
