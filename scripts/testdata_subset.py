#!/usr/bin/env python3
"""Make tests/data, the real scanner files the tests need, from the full test data; or check
a folder of test data against its expected.json.

The full set (403 files, 33 MB; SOURCES.md there says where each comes from) is too large to
keep in the repository. The subset keeps every vendor and kind of file the tests rely on, with
fewer instances of each series, byte for byte as upstream wrote them. Its expected.json is the
full set's, cut down to the files kept: the values are pydicom's reading of each file, made
once by the full set's indexer; only the summary fields are worked out again here.

    python3 scripts/testdata_subset.py [FULL_SET] [TARGET]    # default ../shared/testdata, tests/data
    python3 scripts/testdata_subset.py --check [FOLDER]       # default tests/data

Only the standard library: it runs before any venv exists.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FULL_SET = Path(os.environ.get("DUMPWATCH_TESTDATA") or ROOT.parent / "shared" / "testdata")
SUBSET = ROOT / "tests" / "data"
LIMIT = 10_000_000  # bytes, for the whole of tests/data (du -sb)

# Folder -> the InstanceNumbers kept (every echo of each), or None for every file.
KEEP: dict[str, tuple[int, ...] | None] = {
    # Both echoes share each InstanceNumber: the clash the echo suffix resolves.
    "siemens_fieldmap/2_gre_field_magph": tuple(range(1, 9)),
    "siemens_fieldmap/3_gre_field_magph": tuple(range(1, 5)),  # the phase map, echo 2 alone
    # Magnitude images (both echoes) and phase maps; a nested InstanceNumber 0 in each.
    "philips/2001_fcMRI_Field_Mapping": (*range(1, 25), *range(107, 113)),
    "ge/01_Ax_DWI_TENSOR_R2": (1, 2),  # the (0043,1080) value pydicom warns about
    "ge/6_CV_Neuro": (1, 2, 17, 18),  # field map and magnitude images
    "enhanced/philips": None,  # 64 frames, 66 InstanceNumber elements
    "enhanced/siemens_xa10": (1, 2),
    "enhanced/siemens_xa30_fieldmap/8_gre_field_mapping": (1,),
    "nonimage/mrs_siemens/30_svs_se": (1, 2),
    "nonimage/mrs_siemens/31_svs_se": None,
    "nonimage/sr_phoenix_siemens/99_Phoenix_Document": (1, 2),
    "nonimage/physio_siemens": None,  # Siemens' private SOP class
    "nonimage/raw_philips": None,
    "transfer_syntax": None,  # every transfer syntax, from both encoders
}
# Files of kept folders left out, and why.
DROP = {
    "nonimage/raw_philips/104165610_ExamCard_Raw.dcm": "4.2 MB alone",
    "nonimage/physio_siemens/samplePhysioCMRR_ecg.dcm": "a second physio log; the first has the same SOP class",
}
NOT_SCANNER_FILES = ("expected.json", "SOURCES.md", "LICENSES/")  # the documents beside the files


def kept(rel: str, fields: dict) -> bool:
    folder = rel.rsplit("/", 1)[0]
    if rel in DROP or folder not in KEEP:
        return False
    numbers = KEEP[folder]
    return numbers is None or fields["InstanceNumber"] in numbers


def duplicate_keys(files: dict[str, dict]) -> list[dict]:
    """The groups of files that share (PatientID, SeriesNumber, SeriesDescription, InstanceNumber)."""
    groups: dict[tuple, list[str]] = defaultdict(list)
    for rel, fields in files.items():
        groups[(fields["PatientID"], fields["SeriesNumber"], fields["SeriesDescription"],
                fields["InstanceNumber"])].append(rel)
    return [{"PatientID": key[0], "SeriesNumber": key[1], "SeriesDescription": key[2], "InstanceNumber": key[3],
             "files": sorted(rels)} for key, rels in groups.items() if len(rels) > 1]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check(folder: Path) -> list[str]:
    """What is wrong with the test data in folder: each file of expected.json there and
    unchanged, no scanner file that it does not list, its summary fields true."""
    try:
        index = json.loads((folder / "expected.json").read_text())
    except (OSError, ValueError) as exc:
        return [f"{folder / 'expected.json'} cannot be read: {exc}"]
    files = index["files"]
    problems = []
    for rel, fields in files.items():
        path = folder / rel
        if not path.is_file():
            problems.append(f"{rel}: listed in expected.json, missing")
        elif path.stat().st_size != fields["size"] or sha256(path) != fields["sha256"]:
            problems.append(f"{rel}: not the file expected.json describes (size or sha256)")
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and rel not in files and not rel.startswith(NOT_SCANNER_FILES):
            problems.append(f"{rel}: not listed in expected.json")
    if index["file_count"] != len(files):
        problems.append(f"file_count is {index['file_count']}, but expected.json lists {len(files)} files")
    if index["total_bytes"] != sum(f["size"] for f in files.values()):
        problems.append("total_bytes is not the sum of the files' sizes")
    if index["duplicate_keys"] != duplicate_keys(files):
        problems.append("duplicate_keys does not list the files that share a naive name")
    return problems


def make(full: Path, target: Path) -> None:
    problems = check(full)
    if problems:
        sys.exit(f"the full set in {full} is not as its expected.json says:\n  " + "\n  ".join(problems))
    index = json.loads((full / "expected.json").read_text())
    files = {rel: fields for rel, fields in index["files"].items() if kept(rel, fields)}
    for folder, numbers in KEEP.items():
        found = {f["InstanceNumber"] for rel, f in files.items() if rel.rsplit("/", 1)[0] == folder}
        if not found or (numbers is not None and found != set(numbers)):
            sys.exit(f"{full / folder}: not the files this script expects (InstanceNumbers {sorted(found)})")
    if (target / "expected.json").is_file():  # a subset made before: its files go, in case fewer are kept now
        for rel in json.loads((target / "expected.json").read_text())["files"]:
            (target / rel).unlink(missing_ok=True)
    for rel in files:
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(full / rel, target / rel)
    subset = {
        "generator": index["generator"],
        "pydicom_version": index["pydicom_version"],
        "file_count": len(files),
        "total_bytes": sum(f["size"] for f in files.values()),
        "files": files,
        "duplicate_keys": duplicate_keys(files),
        "subset_of": {"made_by": "scripts/testdata_subset.py", "file_count": index["file_count"],
                      "total_bytes": index["total_bytes"]},
    }
    (target / "expected.json").write_text(json.dumps(subset, indent=1) + "\n")
    print(f"{len(files)} of {index['file_count']} files, {subset['total_bytes']:,} bytes, into {target}")
    total = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
    if total > LIMIT:
        sys.exit(f"{target} holds {total:,} bytes, more than the {LIMIT:,} the repository allows for it")


def main(argv: list[str]) -> int:
    if argv[:1] == ["--check"]:
        folder = Path(argv[1]) if len(argv) > 1 else SUBSET
        problems = check(folder)
        for problem in problems:
            print(f"{folder}: {problem}", file=sys.stderr)
        if not problems:
            print(f"{folder}: every file as expected.json says")
        return 1 if problems else 0
    full = Path(argv[0]) if argv else FULL_SET
    if not (full / "expected.json").is_file():
        sys.exit(f"no full set of test data in {full} (give its folder, or set DUMPWATCH_TESTDATA)")
    make(full, Path(argv[1]) if len(argv) > 1 else SUBSET)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
