"""Sorting while hooks run: does a converter busy on complete series slow receiving and sorting?

For each run, two fresh sites (storescp started by scripts/storescp.sh, dumpwatch serve
beside it), in alternating order:

- "no hooks": no hook configured;
- "hooks busy": on_series_complete runs bench/busy.py for each series (hook_workers = 2, one
  per CPU of this machine: the worst case; --workers), which burns a CPU and writes 4 MB
  (--write) every half second for --busy seconds, as a converter would.

Each site first receives 50 series of 4 files (one association) and waits until the 50 have
completed (series_idle = 1) and, with hooks, until two hooks are running. Then storescu sends
the timed corpus (--files, one association) and the bench measures the send time and the
time until the dump is empty again, i.e. until serve has sorted every file; it checks that
hooks were still running at that moment.

    python bench/hooks.py [--files 2000] [--runs 5] [--busy 30] [--sites /dev/shm/dumpwatch-hooks]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the tests' helper modules; tests never import bench/

from serve import WORK, Site, wait  # noqa: E402  (bench/serve.py: a site with storescp and serve)

from corpus import make_corpus  # noqa: E402

SERIES = 50


def journal(site: Site) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{site.sorted / '.dumpwatch' / 'journal.sqlite3'}?mode=ro", uri=True, timeout=30)


def count(site: Site, sql: str) -> int:
    try:
        db = journal(site)
    except sqlite3.Error:
        return 0
    try:
        return db.execute(sql).fetchone()[0]
    except sqlite3.Error:
        return 0
    finally:
        db.close()


def one_run(folder: Path, hooks: bool, busy: float, write: int, workers: int, warmup: list[Path],
            files: list[Path]) -> dict:
    site = Site(folder)
    try:
        with open(site.cfg, "a") as cfg:
            cfg.write("series_idle = 1\nstudy_idle = 600\n")
            if hooks:
                cfg.write(f"on_series_complete = {sys.executable} {HERE / 'busy.py'} {busy} {{output_dir}} {write}\n"
                          f"hook_output_dir = {folder / 'nifti'}/{{subject}}\nhook_workers = {workers}\n"
                          f"hook_when = always\nhook_timeout = {busy + 60}\nhook_retries = 0\n")
        site.start_serve()
        site.send(warmup, settle=False)
        wait(lambda: count(site, "SELECT count(*) FROM series WHERE state = 'complete'") == SERIES, 60, 0.1)
        if hooks:
            wait(lambda: count(site, "SELECT count(*) FROM hook_runs WHERE state = 'running'") == workers, 30, 0.05)
        took = site.send(files)
        started = time.perf_counter() - took
        wait(lambda: site.waiting() == 0, 120)
        sorted_in = time.perf_counter() - started
        running = count(site, "SELECT count(*) FROM hook_runs WHERE state = 'running'")
        if hooks and running < workers:
            raise SystemExit(f"only {running} hooks still ran when the corpus was sorted: raise --busy")
        return {"send": took, "sorted": sorted_in, "running": running}
    finally:
        site.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--busy", type=float, default=30, help="seconds each hook keeps a CPU busy")
    parser.add_argument("--workers", type=int, default=2, help="hook_workers (2: one per CPU here, the worst case)")
    parser.add_argument("--write", type=int, default=4, help="MB each hook writes every half second")
    parser.add_argument("--sites", type=Path, default=WORK / "hooks-sites", help="where the sites are made")
    args = parser.parse_args()
    corpus = WORK / f"corpus-mr-{args.files}"
    if not corpus.is_dir() or len(os.listdir(corpus)) != args.files:
        shutil.rmtree(corpus, ignore_errors=True)
        make_corpus(corpus, args.files)
    warm = WORK / f"corpus-series-{SERIES}"
    if not warm.is_dir() or len(os.listdir(warm)) != SERIES * 4:
        shutil.rmtree(warm, ignore_errors=True)
        make_corpus(warm, SERIES * 4, per_series=4, seed=11)
    files, warmup = sorted(corpus.iterdir()), sorted(warm.iterdir())
    shutil.rmtree(args.sites, ignore_errors=True)
    results: dict[bool, list[dict]] = {False: [], True: []}
    for run in range(args.runs):
        for hooks in ((False, True) if run % 2 == 0 else (True, False)):
            results[hooks].append(one_run(args.sites / f"{'hooks' if hooks else 'none'}-{run}", hooks, args.busy,
                                          args.write, args.workers, warmup, files))
    shutil.rmtree(args.sites)

    print(f"{args.files} files in one association after {SERIES} series completed, {args.runs} runs each, "
          f"alternating; hooks: {args.workers} at once, each busy {args.busy:g} s, writing {2 * args.write} MB/s; "
          f"sites in {args.sites}; "
          f"{os.cpu_count()} CPUs\n")
    print("| measure | no hooks | hooks busy |\n|---|---:|---:|")
    for key, name in (("send", "send time"), ("sorted", "dump empty (all sorted) after the send began")):
        cells = []
        for hooks in (False, True):
            values = [r[key] for r in results[hooks]]
            median = statistics.median(values)
            cells.append(f"{median:.2f} s ({args.files / median:,.0f} files/s; {min(values):.2f}-{max(values):.2f})")
        print(f"| {name}, median (range) | {cells[0]} | {cells[1]} |")
    ratio = statistics.median(results[True][i]["sorted"] / results[False][i]["sorted"] for i in range(args.runs))
    each = ", ".join(f"{results[True][i]['sorted'] / results[False][i]['sorted']:.2f}" for i in range(args.runs))
    print(f"| hooks busy / no hooks, sorted time: median of the runs' ratios (each run) | | {ratio:.2f} ({each}) |")


if __name__ == "__main__":
    main()
