"""Generate a benchmark corpus of MR files, the kind of dump a scanner leaves.

Two headers to build from:
  - "mr": pydicom's bundled MR example (73 elements), grown to a 256x256 image: about 130 KB
    a file, the corpus the project's first figures use;
  - "siemens": a real Siemens Prisma field map header from the test data (132 elements
    with large CSA headers), for a heavier read;
  - "small": the "mr" header with a 64x64 image, about 9 KB a file: for counts of 100,000.

Files are named as storescp names them (MR.<SOPInstanceUID>), spread over subjects and
series, with every UID fresh and every InstanceNumber set.

    python tests/corpus.py DIR --files 2000 [--header mr|siemens]

It lives with the tests, whose campaigns (campaign.py) make their corpora with it; the
benchmarks in bench/ import it from here, as they import campaign.py and dcmtk.py: bench/
depends on tests/, never the reverse.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path

from pydicom import dcmread, examples
from pydicom.uid import generate_uid

REPO = Path(__file__).resolve().parents[1]
SUBSET = REPO / "tests" / "data"  # the 76 files the repository carries
# The real scanner files benchmarks read: the folder DUMPWATCH_TESTDATA names (the full set
# of 403 files the figures in docs/ come from, tests/data/SOURCES.md), else the subset, as
# the tests read them (conftest.py).
TESTDATA = Path(os.environ.get("DUMPWATCH_TESTDATA") or SUBSET)
SIEMENS = TESTDATA / "siemens_fieldmap" / "2_gre_field_magph" / "e1_01.dcm"


def check_testdata() -> Path:
    """TESTDATA; says on stderr when it is the subset (counts and figures then differ from
    docs/), and stops when it holds no test data."""
    if not (TESTDATA / "expected.json").is_file():
        sys.exit(f"no test data in {TESTDATA} (no expected.json there): set DUMPWATCH_TESTDATA to its folder")
    if TESTDATA.resolve() == SUBSET.resolve():
        print(f"note: this runs on the repository's subset of the test data, {SUBSET}: fewer files, "
              "other figures than docs/. For those, set DUMPWATCH_TESTDATA to the full set's folder.",
              file=sys.stderr)
    return TESTDATA


def template(kind: str):
    if kind == "mr":
        ds = examples.mr
        # The example names its institution "TOSHIBA", and its Manufacturer "TOSHIBA_MEC":
        # dumpwatch's leak check rightly finds the institution's name there and quarantines
        # every file. A hospital's own name, as real headers have.
        ds.InstitutionName = "Example University Hospital"
        ds.Rows = ds.Columns = 256
        ds.PixelData = bytes(256 * 256 * 2)
        return ds
    if kind == "small":
        ds = template("mr")
        ds.Rows = ds.Columns = 64
        ds.PixelData = bytes(64 * 64 * 2)
        return ds
    return dcmread(SIEMENS)


def make_corpus(folder: Path, files: int, kind: str = "mr", per_series: int = 200, seed: int = 7) -> list[Path]:
    """Write `files` MR files into folder; returns their paths."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    ds = template(kind)
    pixels = bytearray(len(ds.PixelData))
    paths = []
    series_count = max(1, files // per_series)
    for number in range(files):
        series, instance = divmod(number, per_series)
        if instance == 0:
            subject = series * 3 // series_count
            ds.PatientName = f"Subject^{subject:03d}"
            ds.PatientID = f"sub-{subject:03d}"
            ds.StudyDate = f"2026{1 + subject % 12:02d}{1 + series % 28:02d}"
            ds.StudyInstanceUID = generate_uid()
            ds.SeriesInstanceUID = generate_uid()
            ds.SeriesNumber = series + 1
            ds.SeriesDescription = rng.choice(["t1 mprage sag", "ep2d bold rest", "gre field map", "dwi 64dir"])
        ds.InstanceNumber = instance + 1
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        pixels[:16] = rng.randbytes(16)  # every file different
        ds.PixelData = bytes(pixels)
        path = folder / f"MR.{ds.SOPInstanceUID}"
        ds.save_as(path, enforce_file_format=False)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--header", choices=["mr", "siemens", "small"], default="mr")
    args = parser.parse_args()
    paths = make_corpus(args.folder, args.files, args.header)
    size = sum(p.stat().st_size for p in paths)
    print(f"{len(paths)} files, {size / len(paths) / 1000:.0f} KB each, in {args.folder}")


if __name__ == "__main__":
    main()
