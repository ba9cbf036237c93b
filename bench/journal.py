"""How fast the journal answers "what happened to this file" and "is my scan whole" at a
million entries.

Fills a journal with N 'sorted' rows (as sort-once writes them: batches of 64, each
written under way and then marked done), each with the facts completion counts (series of
200 files, studies of 20 series; every 50th series lacks an instance), then times
`dumpwatch where`-style look-ups by dump name, SOPInstanceUID, sha256 and sorted path, and
`dumpwatch report` over the whole journal, in-process and as a whole command.

    python bench/journal.py [--rows 1000000] [--no-facts]
"""

from __future__ import annotations

import argparse
import hashlib
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dumpwatch.facts import Facts
from dumpwatch.journal import Entry, Journal
from dumpwatch.report import gather, open_journal, render

SERIES = 200  # files in a series
STUDY = 20  # series in a study


def facts(number: int) -> Facts:
    series, instance = divmod(number, SERIES)
    return Facts(study_uid=f"1.2.826.0.1.3680043.8.498.1.{series // STUDY}", instance=instance + 1, echo=None,
                 modality="MR", sender="MRC35131", series_number=str(series % STUDY + 1), description="ep2d_bold",
                 study_date="20261201", received=time.time(),
                 folder=f"2026{number % 12 + 1:02d}01-Subject_{series // STUDY:04d}/{series % STUDY:03d}-ep2d-bold")


def entry(number: int, with_facts: bool = False) -> Entry:
    sha = hashlib.sha256(number.to_bytes(8, "little")).hexdigest()
    uid = f"1.2.826.0.1.3680043.8.498.{number * 7919 % 10**12}.{number}"
    dest = f"/srv/dicom/sorted/2026{number % 12 + 1:02d}01-Subject_{number // 4000:04d}/" \
           f"{number // 200 % 20:03d}-ep2d-bold/{number % 200 + 1:04d}.dcm"
    series = number // SERIES
    if not with_facts:
        return Entry("sorted", f"/srv/dicom/dump/MR.{uid}", uid, "1.2.3", sha, dest)
    return Entry("sorted", f"/srv/dicom/dump/MR.{uid}", uid, f"1.2.826.0.1.3680043.8.498.2.{series}", sha, dest,
                 facts=facts(number))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--no-facts", action="store_true", help="rows as dumpwatch wrote them before completion")
    args = parser.parse_args()
    with_facts = not args.no_facts
    with tempfile.TemporaryDirectory(prefix="dumpwatch-journal-") as folder:
        journal = Journal(Path(folder) / "journal.sqlite3")
        started = time.perf_counter()
        for first in range(0, args.rows, 64):
            batch = [entry(n, with_facts) for n in range(first, min(first + 64, args.rows))
                     if not (with_facts and n // SERIES % 50 == 49 and n % SERIES == 6)]  # one lacks instance 7
            journal.begin(batch)
            journal.finish(batch)
            if first % (64 * 100) == 0:
                journal.count()  # as serve counts once a second
        filled = time.perf_counter() - started
        size = (Path(folder) / "journal.sqlite3").stat().st_size
        print(f"{args.rows:,} rows written in {filled:.0f} s ({args.rows / filled:,.0f} rows/s, "
              f"two commits per batch of 64); journal {size / 1e6:.0f} MB\n")
        rng = random.Random(1)
        samples = [entry(rng.randrange(args.rows)) for _ in range(200)]
        print("| look-up by | median | slowest of 200 |\n|---|---:|---:|")
        for label, term in (("dump name", lambda e: e.source.rsplit("/", 1)[1]),
                            ("SOPInstanceUID", lambda e: e.sop_uid),
                            ("sha256", lambda e: e.sha256),
                            ("sorted path", lambda e: e.dest)):
            times = []
            for sample in samples:
                started = time.perf_counter()
                rows = journal.find(term(sample))
                times.append(time.perf_counter() - started)
                assert len(rows) <= 1
            print(f"| {label} | {statistics.median(times) * 1e3:.2f} ms | {max(times) * 1e3:.2f} ms |")
        journal.complete(0, 0, set())
        journal.close()
        if with_facts:
            report(Path(folder), args.rows)


def report(folder: Path, rows: int) -> None:
    """`dumpwatch report` over the whole journal (every study), and with --incomplete."""
    path = folder / "journal.sqlite3"
    cfg = folder / "dumpwatch.cfg"
    cfg.write_text(f"journal = {path}\n")
    print(f"\n| report over {rows:,} rows | median of 5 | slowest |\n|---|---:|---:|")
    for label, options in (("all studies, in-process (gather + render)", None), ("all studies, whole command", []),
                           ("--incomplete, whole command", ["--incomplete"]), ("--json, whole command", ["--json"]),
                           ("--since 1d, whole command", ["--since", "1d"])):
        times = []
        for _ in range(5):
            started = time.perf_counter()
            if options is None:
                db = open_journal(path)
                studies = gather(db)
                text = render(studies)
                db.close()
                assert "missing 1 (7)" in text, text[:2000]
            else:
                subprocess.run([sys.executable, "-m", "dumpwatch", "--config", str(cfg), "report", *options],
                               check=True, stdout=subprocess.DEVNULL)
            times.append(time.perf_counter() - started)
        print(f"| {label} | {statistics.median(times):.2f} s | {max(times):.2f} s |")


if __name__ == "__main__":
    main()
