"""Where the time of one file goes: the worker's steps, one process, no placing.

    python bench/per_file.py [--files 1000] [--header mr|siemens]
    python bench/per_file.py --folder tests/data/philips/2001_fcMRI_Field_Mapping
    python bench/per_file.py --fsync     # what fsync costs on this disk
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

# the tests' helper modules; tests never import bench/
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from pydicom import dcmread  # noqa: E402

from dumpwatch.anonymise import Anonymiser  # noqa: E402
from dumpwatch.dicomfile import read_dicom  # noqa: E402
from dumpwatch.naming import DEFAULT_TEMPLATE, Template, friendly_name, naming_tags  # noqa: E402
from dumpwatch.prepare import Job, prepare  # noqa: E402
from dumpwatch.rules import RULES_DIR, load_profile  # noqa: E402
from dumpwatch.workers import quiet_pydicom  # noqa: E402

from corpus import make_corpus  # noqa: E402


def per_file(label: str, paths: list[Path], step) -> None:
    step(paths[0])  # warm up
    started = time.perf_counter()
    for path in paths:
        step(path)
    print(f"| {label} | {(time.perf_counter() - started) / len(paths) * 1e6:,.0f} |")


def steps(files: int, header: str, existing: Path | None) -> None:
    quiet_pydicom()
    folder = Path(tempfile.mkdtemp(prefix="dumpwatch-bench-"))
    try:
        if existing:
            paths = sorted(p for p in existing.rglob("*") if p.is_file())
            files, header = len(paths), str(existing)
        else:
            paths = make_corpus(folder, files, header)
        template = Template.parse(DEFAULT_TEMPLATE)
        wanted = naming_tags(template)
        common = dict(template=template, reserved=frozenset(), anon_fields=(), file_mode=0o664, gid=None,
                      staging=None, out_device=-1, copy=False, dry_run=True, incomplete_timeout=60.0)
        job = Job(wanted=wanted, anonymiser=None, **common)
        full_job = Job(wanted=None, anonymiser=None, **common)
        basic = Anonymiser(load_profile(["basic"], RULES_DIR, RULES_DIR), bytes(32))
        anon_job = Job(wanted=None, anonymiser=basic, **common)
        print(f"{files} files, {header} header, µs per file\n\n| step | µs |\n|---|---:|")
        per_file("read the file", paths, lambda p: p.read_bytes())
        per_file("read + sha256", paths, lambda p: hashlib.sha256(p.read_bytes()).hexdigest())
        per_file("read + pydicom header read (stop_before_pixels)", paths,
                 lambda p: dcmread(io.BytesIO(p.read_bytes()), stop_before_pixels=True))
        per_file("read_dicom: read, sha256, walk, keep naming elements", paths,
                 lambda p: read_dicom(str(p), wanted).close())
        per_file("read_dicom: read, sha256, pydicom header, walk the rest", paths,
                 lambda p: read_dicom(str(p), None).close())

        def name(p: Path) -> None:
            dicom = read_dicom(str(p), wanted)
            friendly_name(dicom.ds, template)
            dicom.close()

        per_file("read_dicom + friendly_name", paths, name)
        per_file("prepare (the whole worker step)", paths, lambda p: prepare(str(p), job))
        per_file("prepare, pydicom header (as when anonymising)", paths, lambda p: prepare(str(p), full_job))
        per_file("prepare with the Basic Profile: read, anonymise, encode, leak check, name", paths,
                 lambda p: prepare(str(p), anon_job))
    finally:
        shutil.rmtree(folder)


def fsync_costs(count: int = 200) -> None:
    folder = Path(tempfile.mkdtemp(prefix="dumpwatch-fsync-", dir=Path.cwd()))
    data = os.urandom(130_000)
    try:
        print("| step | µs per file |\n|---|---:|")

        def timed(label: str, action) -> None:
            started = time.perf_counter()
            for number in range(count):
                action(number)
            print(f"| {label} | {(time.perf_counter() - started) / count * 1e6:,.0f} |")

        def write(number: int, sync: bool, prefix: str) -> None:
            fd = os.open(folder / f"{prefix}{number}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.write(fd, data)
            if sync:
                os.fsync(fd)
            os.close(fd)

        timed("write 130 KB, no fsync", lambda n: write(n, False, "a"))
        timed("write 130 KB + fsync", lambda n: write(n, True, "b"))
        os.sync()

        def datasync(number: int, read: bool) -> None:
            fd = os.open(folder / f"a{number}", os.O_RDONLY)
            if read:
                os.read(fd, 200_000)
            os.fdatasync(fd)
            os.close(fd)

        timed("fdatasync of a file already written back", lambda n: datasync(n, False))
        for number in range(count):  # make the next read update the access time
            os.utime(folder / f"a{number}", (0, time.time()))
        os.sync()
        timed("fdatasync after a read that updates the access time", lambda n: datasync(n, True))
        directory = os.open(folder, os.O_RDONLY)
        timed("fsync of a folder", lambda n: os.fsync(directory))
        os.close(directory)
    finally:
        shutil.rmtree(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--header", choices=["mr", "siemens"], default="mr")
    parser.add_argument("--fsync", action="store_true")
    parser.add_argument("--folder", type=Path, help="time these files instead of a generated corpus")
    args = parser.parse_args()
    if args.fsync:
        fsync_costs()
    else:
        steps(args.files, args.header, args.folder)


if __name__ == "__main__":
    main()
