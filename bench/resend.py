"""A re-send against a first sort: files per second when every file is already in the tree.

A scanner (or a user) often sends a series again. Each file of a re-send is an identical
duplicate of a sorted file: dumpwatch must find that file, compare it, journal the duplicate
and remove the received copy. This bench sorts a set of files into an empty tree, then the
very same set again into that tree, and reports files/s for both:

- sort-once: the set copied into a dump (and synced), `dumpwatch sort-once DUMP --out OUT`
  timed as a whole process from outside, start-up included (the "empty dump" row is that
  start-up alone); then the set copied in again and sorted again: a re-send.
- serve: storescp (scripts/storescp.sh) and `dumpwatch serve` on a fresh site, storescu
  sending the set over 127.0.0.1 in one association; timed from the send's start to the
  dump empty. Then the same send again, to the same serve (whose tree cache still holds the
  folders it just filled), and once more after serve was restarted (the cache empty, as
  after a reboot or once the cache let the folders go: each folder is read from disk).

After each run: every file in the tree once, the dump empty, and the re-send journalled as
one `duplicate` row per file (and per file again for serve's second re-send).

Two sets:
- enhanced: the enhanced multi-frame files of the test data's enhanced/ (8 files in the full
  set: Siemens XA30 and XA10, Philips; 4 in tests/data), --copies copies, each a patient of
  its own with new UIDs;
- classic MR: the generated corpus of bench/sort_once.py (tests/corpus.py, "mr" header,
  133 KB files, 200 a series).

    python bench/resend.py [--runs 5] [--copies 25] [--files 2000] [--no-serve] [--only enhanced|classic]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORK = HERE / "out"
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "tests"))  # the tests' helper modules; tests never import bench/

from pydicom import dcmread  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402
from sort_once import corpus  # noqa: E402

from corpus import TESTDATA, check_testdata  # noqa: E402


def enhanced_set(copies: int) -> Path:
    """copies of the enhanced multi-frame files, each a patient of its own, every UID new."""
    folder = WORK / f"resend-enhanced-{copies}"
    originals = sorted(p for p in (TESTDATA / "enhanced").rglob("*.dcm"))
    if folder.is_dir() and len(os.listdir(folder)) == copies * len(originals):
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for copy in range(copies):
        studies: dict[str, str] = {}
        series: dict[str, str] = {}
        for path in originals:
            ds = dcmread(path)
            ds.StudyInstanceUID = studies.setdefault(ds.StudyInstanceUID, generate_uid())
            ds.SeriesInstanceUID = series.setdefault(ds.SeriesInstanceUID, generate_uid())
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.PatientName = f"Enhanced^Copy{copy:03d}"
            ds.PatientID = f"enh-{copy:03d}"
            ds.save_as(folder / f"MR.{ds.SOPInstanceUID}", enforce_file_format=False)
    return folder


def journal_counts(out: Path) -> dict[str, int]:
    db = sqlite3.connect(out / ".dumpwatch" / "journal.sqlite3")
    try:
        return dict(db.execute("SELECT outcome, COUNT(*) FROM outcomes GROUP BY outcome").fetchall())
    finally:
        db.close()


def tree_count(out: Path) -> int:
    return sum(len(files) for folder, _, files in os.walk(out) if ".dumpwatch" not in Path(folder).parts)


def waiting(dump: Path) -> int:
    return sum(1 for name in os.listdir(dump) if name != ".dumpwatch.lock")


def copy_in(source: Path, dump: Path) -> None:
    dump.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        shutil.copy2(path, dump / path.name)
    subprocess.run(["sync"], check=True)


def sort_once(dump: Path, out: Path) -> float:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "dumpwatch", "sort-once", str(dump), "--out", str(out)],
                            capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"sort-once failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    return elapsed


def sort_once_pair(source: Path, work: Path) -> tuple[float, float]:
    """(first sort, re-send) seconds for the files of source."""
    shutil.rmtree(work, ignore_errors=True)
    count = len(os.listdir(source))
    dump, out = work / "dump", work / "sorted"
    copy_in(source, dump)
    first = sort_once(dump, out)
    copy_in(source, dump)
    again = sort_once(dump, out)
    journal = journal_counts(out)
    if waiting(dump) or tree_count(out) != count or journal.get("duplicate") != count:
        raise SystemExit(f"{source.name}: after the re-send {waiting(dump)} files in the dump, {tree_count(out)} "
                         f"of {count} in the tree, journal {journal}")
    shutil.rmtree(work)
    return first, again


SERVE_SENDS = ("serve", "serve re-send", "serve re-send, restarted")


def serve_sends(source: Path, work: Path) -> dict[str, tuple[float, float]]:
    """{send: (seconds from the send's start to the dump empty, of them storescu's own)} for the
    first send, a re-send to the same serve (its tree cache warm from the first), and a re-send
    after serve was restarted (as after a reboot, or once the cache let the folders go)."""
    from dcmtk import Serve, Storescp, storescu, storescu_config, write_config

    shutil.rmtree(work, ignore_errors=True)
    files = sorted(source.iterdir())
    cfg = write_config(work)
    profile = storescu_config(files, work / "storescu.cfg")
    scp, serve = Storescp(cfg), Serve(cfg)
    dump, out = work / "dump", work / "sorted"
    times = {}
    try:
        for send in SERVE_SENDS:
            if send.endswith("restarted"):
                assert serve.stop() == 0, serve.output()[-2000:]
                serve = Serve(cfg)
            os.sync()
            started = time.perf_counter()
            storescu(scp.port, files, work, profile=profile)
            sent = time.perf_counter()
            deadline = sent + 300
            while waiting(dump) and time.perf_counter() < deadline:
                time.sleep(0.005)
            times[send] = (time.perf_counter() - started, sent - started)
        code = serve.stop()
    finally:
        if serve.process.poll() is None:
            serve.process.kill()
        scp.stop()
    journal = journal_counts(out)
    if code != 0 or waiting(dump) or tree_count(out) != len(files) or journal.get("duplicate") != 2 * len(files):
        raise SystemExit(f"serve: exit {code}, {waiting(dump)} files in the dump, {tree_count(out)} of "
                         f"{len(files)} in the tree, journal {journal}")
    shutil.rmtree(work)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--copies", type=int, default=25, help="copies of the enhanced files")
    parser.add_argument("--files", type=int, default=2000, help="classic MR files")
    parser.add_argument("--no-serve", action="store_true", help="sort-once only")
    parser.add_argument("--only", choices=["enhanced", "classic"])
    args = parser.parse_args()
    if args.only != "classic":
        check_testdata()
    sets = {"enhanced": enhanced_set(args.copies), "classic": corpus(args.files, "mr")}
    if args.only:
        sets = {args.only: sets[args.only]}
    labels = {"enhanced": "enhanced multi-frame", "classic": "classic MR"}
    print(f"median of {args.runs} runs, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
    for name, source in sets.items():
        files = sorted(source.iterdir())
        size = sum(f.stat().st_size for f in files) / len(files) / 1000
        print(f"  {labels[name]}: {len(files)} files of {size:.0f} KB on average ({source.name})")
    print(flush=True)
    empty = []
    results: dict[str, dict[str, list[float]]] = {name: {} for name in sets}
    for run in range(args.runs):
        (WORK / "resend-empty").mkdir(parents=True, exist_ok=True)
        empty.append(sort_once(WORK / "resend-empty", WORK / "resend-empty-out"))
        shutil.rmtree(WORK / "resend-empty-out")
        for name, source in sets.items():
            first, again = sort_once_pair(source, WORK / f"resend-{name}")
            results[name].setdefault("sort-once", []).append(first)
            results[name].setdefault("sort-once re-send", []).append(again)
            line = f"run {run + 1}, {name}: sort-once {first:.2f} s, re-send {again:.2f} s"
            if not args.no_serve:
                for send, (seconds, storescu_seconds) in serve_sends(source, WORK / f"resend-serve-{name}").items():
                    results[name].setdefault(send, []).append(seconds)
                    results[name].setdefault(send + ": storescu", []).append(storescu_seconds)
                    line += f"; {send} {seconds:.2f} s (storescu {storescu_seconds:.2f} s)"
            print(line, flush=True)
    print(f"\nsort-once of an empty dump (start-up alone): {statistics.median(empty):.2f} s\n")
    print("| files | sorted by | first sort: s | files/s | re-send: s | files/s | re-send / first (time) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    rows = [("sort-once", "sort-once", "sort-once re-send")]
    if not args.no_serve:
        rows += [("serve", "serve (storescu, to dump empty)", "serve re-send"),
                 ("serve", "serve restarted before the re-send", "serve re-send, restarted")]
    for name, source in sets.items():
        count = len(os.listdir(source))
        for key, label, again_key in rows:
            first = statistics.median(results[name][key])
            again = statistics.median(results[name][again_key])
            print(f"| {labels[name]}, {count} | {label} | {first:.2f} | {count / first:,.0f} | {again:.2f} | "
                  f"{count / again:,.0f} | {again / first:.1f}x |")
    if not args.no_serve:
        print("\nserve rows, median seconds: storescu's own send within them; after it, to the dump empty")
        for name in sets:
            parts = []
            for send in SERVE_SENDS:
                totals, sends = results[name][send], results[name][send + ": storescu"]
                after = statistics.median(t - s for t, s in zip(totals, sends, strict=True))
                parts.append(f"{send} {statistics.median(sends):.2f} s, {after:.2f} s")
            print(f"  {labels[name]}: " + "; ".join(parts))

if __name__ == "__main__":
    main()
