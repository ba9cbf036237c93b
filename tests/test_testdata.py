"""The real scanner files the tests read: what expected.json says they are, and, in the subset
the repository carries, every kind of file the tests rely on."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from dcmtk import data_files

from helpers import FIELDMAP, REPO, below, copy_testdata

SCRIPT = REPO / "scripts" / "testdata_subset.py"
SUBSET = REPO / "tests" / "data"


def check(folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--check", str(folder)], capture_output=True, text=True)


def test_the_test_data_is_what_expected_json_says(testdata, tmp_path):
    result = check(testdata)
    assert result.returncode == 0, result.stderr
    # The check finds each fault: a changed file, a missing one, one not listed, a summary
    # that no longer agrees.
    copy = tmp_path / "data"
    shutil.copytree(testdata, copy)
    with open(copy / FIELDMAP / "e1_01.dcm", "r+b") as changed:
        changed.seek(-1, 2)
        changed.write(b"\x01" if changed.read(1) != b"\x01" else b"\x02")
    (copy / FIELDMAP / "e2_01.dcm").unlink()
    (copy / "transfer_syntax" / "10.dcm").write_bytes((copy / "transfer_syntax" / "1.dcm").read_bytes())
    index = json.loads((copy / "expected.json").read_text())
    index["duplicate_keys"] = index["duplicate_keys"][1:]
    (copy / "expected.json").write_text(json.dumps(index, indent=1) + "\n")
    result = check(copy)
    assert result.returncode == 1
    assert sorted(line.split(": ", 1)[1] for line in result.stderr.splitlines()) == [
        "duplicate_keys does not list the files that share a naive name",
        f"{FIELDMAP}/e1_01.dcm: not the file expected.json describes (size or sha256)",
        f"{FIELDMAP}/e2_01.dcm: listed in expected.json, missing",
        "transfer_syntax/10.dcm: not listed in expected.json",
    ]


def test_the_tests_take_exactly_the_files_expected_json_lists(testdata, expected, tmp_path):
    """copy_testdata (sort-once's inputs) and data_files (storescu's) leave the documents
    beside the files out, and nothing else."""
    copied = copy_testdata(testdata, tmp_path / "all")
    assert sorted(p.relative_to(tmp_path / "all").as_posix() for p in copied) == sorted(expected)
    assert sorted(p.relative_to(testdata).as_posix() for p in data_files(testdata)) == sorted(expected)


def test_the_subset_keeps_every_kind_the_tests_rely_on():
    """tests/data, whatever DUMPWATCH_TESTDATA names: at most 10 MB, one file of each kind at
    least, the licence of each upstream it names."""
    files = json.loads((SUBSET / "expected.json").read_text())["files"]
    size = sum(p.stat().st_size for p in SUBSET.rglob("*") if p.is_file())
    assert size <= 10_000_000, f"tests/data holds {size:,} bytes"
    # Both echoes of each Siemens instance, as one naive name: what the echo suffix is for.
    fieldmap = below(files, FIELDMAP)
    assert {f["EchoNumbers"] for f in fieldmap.values()} == {1, 2}
    assert len({f["InstanceNumber"] for f in fieldmap.values()}) == len(fieldmap) // 2
    # Philips: a nested InstanceNumber 0 before the top-level one, magnitude and phase, both echoes.
    philips = below(files, "philips").values()
    assert all(f["instance_number_elements"][0]["value"] == 0 and f["InstanceNumber"] > 0 for f in philips)
    assert {f["ImageType"][2] for f in philips} == {"M_FFE", "PHASE MAP"}
    assert {f["EchoNumbers"] for f in philips} == {1, 2}
    assert {rel.split("/")[0] for rel in files} == {
        "siemens_fieldmap", "philips", "ge", "enhanced", "nonimage", "transfer_syntax"}
    assert {f["Manufacturer"].split()[0] for f in files.values()} >= {"SIEMENS", "Philips", "GE"}
    assert {f["SOPClassUID"] for f in files.values()} == {
        "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
        "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR Image Storage
        "1.2.840.10008.5.1.4.1.1.4.2",  # MR Spectroscopy Storage
        "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR Storage
        "1.2.840.10008.5.1.4.1.1.66",  # Raw Data Storage
        "1.3.12.2.1107.5.9.1",  # Siemens' private CSA Non-Image Storage (physio)
    }
    assert {f["TransferSyntaxUID"] for f in files.values()} == {
        "1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.5",
        "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90"}
    assert len(below(files, "transfer_syntax")) == 9  # both encoders of JPEG Lossless and JPEG-LS
    sources = (SUBSET / "SOURCES.md").read_text()
    for licence in sorted((SUBSET / "LICENSES").iterdir()):
        upstream = ("cbinyu/" if licence.stem == "bidsphysio" else "neurolabusc/") + licence.stem
        assert f"`LICENSES/{licence.name}`" in sources and upstream in sources, licence.name
    assert len(list((SUBSET / "LICENSES").iterdir())) == 8
