"""The status page and /metrics on a journal of 1,000,000 rows: how long each takes to make.

    .venv/bin/python bench/web.py [--rows 1000000] [--runs 30] [--folder /tmp/dumpwatch-bench-web]

A year of a busy site, written straight into a journal of today's schema: ROWS outcome rows
(sorted, with 0.5% duplicates and 0.1% quarantined), one study per ~2,000 files over 365
days, series of 200 files (one in ten missing an image), a completion and a hook run for
each, and 200 files in the quarantine with their reasons. storescp (DCMTK) listens, so that
each report asks it for a C-ECHO as `status` does.

Measured, each RUNS times: the report the page and /metrics share, made afresh (the server
makes one at most every web.CACHE seconds; here, every time), the first one (which counts
every row by outcome) and later ones (which count only the rows since); the page's HTML from
it; and whole answers over HTTP from a running server with its cache turned off. Prints the median
and the slowest, in milliseconds.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dumpwatch import page, web  # noqa: E402
from dumpwatch.config import read_config  # noqa: E402
from dumpwatch.journal import Journal  # noqa: E402
from dumpwatch.status import Tally, listening  # noqa: E402

PER_SERIES = 200
SERIES_PER_STUDY = 10
DAY = 86400


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def iso(moment: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(moment)) + ".000Z"


def build(folder: Path, rows: int) -> Path:
    """The site: its configuration, a journal of `rows` outcome rows, a quarantine."""
    if folder.exists():
        shutil.rmtree(folder)
    (folder / "dump").mkdir(parents=True)
    quarantine = folder / "quarantine"
    quarantine.mkdir()
    cfg = folder / "dumpwatch.cfg"
    cfg.write_text(f"port = {free_port()}\nweb_port = {free_port()}\ndir_dump = dump\ndir_out = sorted\n"
                   "dir_quarantine = quarantine\n")
    path = folder / "sorted" / ".dumpwatch" / "journal.sqlite3"
    Journal(path).close()  # today's schema, migrated
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode = WAL")
    rng = random.Random(14)
    now = time.time()
    series_count = max(1, -(-rows // (PER_SERIES - 0.1)))  # one in ten series misses an image
    series_count = int(series_count) + 1
    outcomes, series, studies, completions, runs = [], [], [], [], []
    row_id = 0
    for number in range(series_count):
        study_number = number // SERIES_PER_STUDY
        # Oldest first; the newest study ends about now.
        start = now - 365 * DAY * (1 - study_number / max(1, series_count // SERIES_PER_STUDY)) - 3600
        first = start + (number % SERIES_PER_STUDY) * 300
        if number % SERIES_PER_STUDY == 0:
            subject = f"{time.strftime('%Y%m%d', time.localtime(start))}-SUBJ{study_number:05}"
            studies.append((study_number + 1, f"2.25.{study_number}", subject, subject[:8], start, start + 3600,
                            start + 3600, "complete", start + 4200, 1))
        folder_name = f"{subject}/{number % SERIES_PER_STUDY + 1:03}-bold_run{number % 7}"
        gap = number % 10 == 3
        numbers = {"0": {"ranges": [[1, 99], [101, PER_SERIES]] if gap else [[1, PER_SERIES]], "repeats": [],
                         "unnumbered": 0}}
        files = PER_SERIES - gap
        series.append((number + 1, f"2.25.{study_number}.{number}", study_number + 1, folder_name,
                       str(number % SERIES_PER_STUDY + 1), f"bold_run{number % 7}", "MR", "\\SCANNER\\",
                       PER_SERIES, "ImagesInAcquisition", files, files, json.dumps(numbers), first, first + 240,
                       first + 240, "complete", first + 300, 1))
        completions.append((number + 1, first + 300, "series", number + 1, study_number + 1, files))
        runs.append((number + 1, number + 1, "on_series_complete", number + 1, study_number + 1,
                     "failed" if number % 50 == 7 else "ok", "exit status 1" if number % 50 == 7 else None,
                     first + 300, first + 301, first + 330, 1 if number % 50 == 7 else 0, 1))
        for instance in range(1, PER_SERIES + 1):
            if gap and instance == 100:
                continue
            row_id += 1
            moment = first + instance * 1.2
            roll = rng.random()
            outcome = "duplicate" if roll < 0.005 else "quarantined" if roll < 0.006 else "sorted"
            dest = (str(quarantine / f"MR.{row_id}") if outcome == "quarantined" else
                    str(folder / "sorted" / folder_name / f"{instance:04}.dcm"))
            if row_id > rows:
                break
            outcomes.append((row_id, iso(moment), outcome, 1, f"/dump/MR.{row_id}", f"MR.{row_id}",
                             f"2.25.{row_id}", f"2.25.{study_number}.{number}", f"{row_id:064x}", dest,
                             "not a DICOM file (no 'DICM' marker at byte 128)" if outcome == "quarantined" else None,
                             f"2.25.{study_number}", instance, 1, "SCANNER", moment, 350_000))
    db.execute("BEGIN")
    db.executemany("INSERT INTO outcomes (id, time, outcome, done, source, name, sop_uid, series_uid, sha256, dest,"
                   " reason, study_uid, instance, frames, sender, received, size)"
                   " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", outcomes[:rows])
    db.executemany("INSERT INTO studies (id, study_uid, folder, study_date, first, last, touched, state, completed,"
                   " completions) VALUES (?,?,?,?,?,?,?,?,?,?)", studies)
    db.executemany("INSERT INTO series (id, series_uid, study_id, folder, number, description, modality, senders,"
                   " expected, expected_from, files, frames, numbers, first, last, touched, state, completed,"
                   " completions) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", series)
    db.executemany("INSERT INTO completions (id, time, kind, series_id, study_id, files) VALUES (?,?,?,?,?,?)",
                   completions)
    db.executemany("INSERT INTO hook_runs (id, completion_id, hook, series_id, study_id, state, reason, queued,"
                   " started, ended, exit, tries) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", runs)
    db.execute("COMMIT")
    db.close()
    for number in range(200):
        name = quarantine / f"MR.1.2.3.{number}"
        name.write_bytes(b"x" * 100)
        name.with_name(name.name + ".reason.txt").write_text(
            "truncated: the file ends inside the header (100 bytes)\n" if number % 3 else
            "sender UNKNOWN not allowed (allowed_senders)\n")
    return cfg


def timed(function, runs: int) -> list[float]:
    took = []
    for _ in range(runs):
        started = time.perf_counter()
        function()
        took.append((time.perf_counter() - started) * 1000)
    return took


def shown(name: str, took: list[float]) -> None:
    print(f"  {name:<44} median {statistics.median(took):7.1f} ms, slowest {max(took):7.1f} ms "
          f"({len(took)} runs)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--folder", type=Path, default=Path("/tmp/dumpwatch-bench-web"))
    args = parser.parse_args()
    started = time.monotonic()
    cfg_path = build(args.folder, args.rows)
    journal = args.folder / "sorted" / ".dumpwatch" / "journal.sqlite3"
    db = sqlite3.connect(journal)
    counts = db.execute("SELECT (SELECT count(*) FROM outcomes), (SELECT count(*) FROM series),"
                        " (SELECT count(*) FROM studies)").fetchone()
    db.close()
    print(f"journal: {counts[0]:,} outcome rows, {counts[1]:,} series, {counts[2]:,} studies, "
          f"{journal.stat().st_size / 1e6:,.0f} MB (built in {time.monotonic() - started:.0f} s)")
    cfg = read_config(cfg_path)
    storescp = subprocess.Popen(["storescp", "-aet", cfg.aetitle, str(cfg.port)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env={**os.environ, "TCP_NODELAY": "1"})  # as storescp.sh
    try:
        while not listening(cfg.port):
            time.sleep(0.05)
        view = web.make_view(cfg)
        html = page.render(view)
        print(f"page: {len(view['studies'])} studies, {sum(len(s['series']) for s in view['studies'])} series, "
              f"{len(view['quarantined'])} quarantined files, {len(html.encode()):,} bytes; storescp answers: "
              f"{view['status']['storescp']['answers']}")
        print(f"on {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, SQLite {sqlite3.sqlite_version}:")
        shown("report, the first (all rows counted)", timed(lambda: web.make_view(cfg), 3))
        tally = Tally()
        web.make_view(cfg, tally)
        shown("report, later ones (rows since counted)", timed(lambda: web.make_view(cfg, tally), args.runs))
        shown("page HTML from a report", timed(lambda: page.render(view), args.runs))
        web.CACHE = 0.0  # every answer makes its report afresh
        server = web.serve_web(cfg)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            for path in ("/", "/metrics"):
                url = f"http://127.0.0.1:{cfg.web_port}{path}"
                shown(f"GET {path} over HTTP, no cache", timed(lambda url=url: urllib.request.urlopen(url).read(),
                                                               args.runs))
        finally:
            server.shutdown()
            server.server_close()
    finally:
        storescp.terminate()
        storescp.wait()


if __name__ == "__main__":
    main()
