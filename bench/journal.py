"""How fast the journal answers "what happened to this file" at a million entries.

Fills a journal with N 'sorted' rows (as sort-once writes them: batches of 64, each
written under way and then marked done), then times `dumpwatch where`-style look-ups by
dump name, SOPInstanceUID, sha256 and sorted path.

    python bench/journal.py [--rows 1000000]
"""

from __future__ import annotations

import argparse
import hashlib
import random
import statistics
import tempfile
import time
from pathlib import Path

from dumpwatch.journal import Entry, Journal


def entry(number: int) -> Entry:
    sha = hashlib.sha256(number.to_bytes(8, "little")).hexdigest()
    uid = f"1.2.826.0.1.3680043.8.498.{number * 7919 % 10**12}.{number}"
    dest = f"/srv/dicom/sorted/2026{number % 12 + 1:02d}01-Subject_{number // 4000:04d}/" \
           f"{number // 200 % 20:03d}-ep2d-bold/{number % 200 + 1:04d}.dcm"
    return Entry("sorted", f"/srv/dicom/dump/MR.{uid}", uid, "1.2.3", sha, dest)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dumpwatch-journal-") as folder:
        journal = Journal(Path(folder) / "journal.sqlite3")
        started = time.perf_counter()
        for first in range(0, args.rows, 64):
            batch = [entry(n) for n in range(first, min(first + 64, args.rows))]
            journal.begin(batch)
            journal.finish(batch)
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
                assert len(rows) == 1 and rows[0]["dest"] == sample.dest
            print(f"| {label} | {statistics.median(times) * 1e3:.2f} ms | {max(times) * 1e3:.2f} ms |")
        journal.close()


if __name__ == "__main__":
    main()
