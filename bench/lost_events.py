"""Lost events: flood the dump until the kernel's inotify queue overflows, and time the sweep.

serve is started while /proc/sys/fs/inotify/max_queued_events is lowered (the limit is put
back as soon as serve watches; it applies to watches made while it holds), then one process
writes a generated corpus into the dump as fast as it can. When the queue overflows the
kernel drops events for good; serve sees watchdog's overflow warning and sweeps the dump at
once. Printed: how long the flood took to write, whether the queue overflowed, and the
seconds from the last file written to the dump empty (every file sorted). Needs root.

    python bench/lost_events.py [--files 5000] [--queues 16,1024,16384] [--runs 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the tests' helper modules; tests never import bench/

from campaign import (  # noqa: E402
    assert_dump_empty,
    assert_journal_agrees,
    can_shrink_queue,
    corpus_cache,
    flood,
    tree_sops,
    write_config,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=5000)
    parser.add_argument("--queues", default="16,1024,16384", help="inotify queue limits to try, in events")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    if why := can_shrink_queue():
        sys.exit(why)
    corpus = corpus_cache(args.files)
    print(f"{args.files:,} files ({sum(p.stat().st_size for p in corpus.iterdir()) / 1e6:.0f} MB), "
          f"default sweep_interval 60 s, stable_seconds 2 s; median of {args.runs} runs\n")
    print("| inotify queue (events) | overflowed | flood written in | files/s written | "
          "last file to dump empty | every file sorted once |")
    print("|---:|---|---:|---:|---:|---|")
    for queue in (int(q) for q in args.queues.split(",")):
        results = []
        for _ in range(args.runs):
            with tempfile.TemporaryDirectory(prefix="dumpwatch-flood-") as scratch:
                source, site = Path(scratch) / "arriving", Path(scratch) / "site"
                shutil.copytree(corpus, source)
                write_config(site, anonymise=False)
                results.append(flood(site, source, queue))
                assert_dump_empty(site / "dump")
                assert len(tree_sops(site / "sorted")) == args.files
                assert_journal_agrees(site / "sorted")
        written = statistics.median(r.written_in for r in results)
        after = statistics.median(r.sorted_after for r in results)
        overflowed = sum(r.overflowed for r in results)
        print(f"| {queue:,} | {overflowed} of {len(results)} | {written:.2f} s | {args.files / written:,.0f} | "
              f"{after:.2f} s | yes |", flush=True)


if __name__ == "__main__":
    main()
