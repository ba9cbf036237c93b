"""Load: a large backfill's memory, and eight scanners sending at once for minutes.

backfill: `dumpwatch sort-once` over 10,000 and 100,000 small generated MR files (about
9 KB each, tests/corpus.py --header small). The peak resident memory (VmHWM) of the main
process and of each worker is read from /proc while it runs; the goal is under 100 MB, and
not growing with the count.

senders: storescp (scripts/storescp.sh) and `dumpwatch serve`, with 8 storescu processes
sending at once over loopback, each its own set of files, again and again for --minutes
(every pass after the first is an identical re-send, recognised as such). At the end every
instance must be in the tree exactly once, nothing left in the dump, nothing quarantined;
printed: files received per second, the largest backlog of files waiting in the dump, the
seconds from the last file received to the dump empty, serve's memory (serve and its
workers, resident) after the first minute and at the end. serve runs at nice 19: storescp
comes first, and with eight senders taking both cores, serve catches up afterwards.

    python bench/load.py [--counts 10000,100000] [--senders 8] [--per-sender 2500] [--minutes 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the tests' helper modules; tests never import bench/

from campaign import assert_dump_empty, assert_journal_agrees, quarantined, tree_sops  # noqa: E402

from corpus import make_corpus  # noqa: E402

WORK = HERE / "out"


def small_corpus(files: int) -> Path:
    folder = WORK / f"corpus-small-{files}"
    if not folder.is_dir() or len(os.listdir(folder)) != files:
        shutil.rmtree(folder, ignore_errors=True)
        print(f"generating {files:,} small files...", flush=True)
        make_corpus(folder, files, "small")
    return folder


def _status(pid: int, key: str, table: str = "status") -> int:
    """A /proc/<pid>/status (or smaps_rollup) value in kB (0 once the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/{table}").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _family(pid: int) -> list[int]:
    """pid and its descendants."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                todo += [int(c) for c in Path(f"/proc/{current}/task/{task}/children").read_text().split()]
        except OSError:
            pass
    return found


class Peaks:
    """Samples the peak resident memory (VmHWM) of a process and its descendants, and the
    peak of their proportional set sizes added up (Pss: pages the forked workers share with
    their parent are counted once, not in each)."""

    def __init__(self, pid: int):
        self.pid = pid
        self.main = 0
        self.children: dict[int, int] = {}
        self.pss = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(0.2):
            family = _family(self.pid)
            self.pss = max(self.pss, sum(_status(pid, "Pss", "smaps_rollup") for pid in family))
            for pid in family:
                peak = _status(pid, "VmHWM")
                if pid == self.pid:
                    self.main = max(self.main, peak)
                elif peak:
                    self.children[pid] = max(self.children.get(pid, 0), peak)

    def current(self) -> int:
        """Resident memory now, of the process and its descendants, in kB."""
        return sum(_status(pid, "VmRSS") for pid in _family(self.pid))

    def finish(self) -> None:
        self.stop.set()
        self.thread.join()


def backfill(count: int) -> None:
    corpus = small_corpus(count)
    with tempfile.TemporaryDirectory(prefix="dumpwatch-load-", dir=WORK) as scratch:
        dump = Path(scratch) / "dump"
        shutil.copytree(corpus, dump)
        out = Path(scratch) / "sorted"
        started = time.monotonic()
        process = subprocess.Popen([sys.executable, "-m", "dumpwatch", "sort-once", str(dump), "--out", str(out),
                                    "--quarantine", str(Path(scratch) / "quarantine")],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        peaks = Peaks(process.pid)
        output, _ = process.communicate()
        peaks.finish()
        seconds = time.monotonic() - started
        assert process.returncode == 0, output[-2000:]
        placed = sum(len(names) for root, _, names in os.walk(out) if ".dumpwatch" not in root)
        assert placed == count, f"{placed} files in the tree, {count} sent"
        worker = max(peaks.children.values(), default=0)
        print(f"| {count:,} | {seconds:.0f} s | {count / seconds:,.0f} | {peaks.main / 1024:.0f} MB | "
              f"{worker / 1024:.0f} MB ({len(peaks.children)} processes) | "
              f"{peaks.pss / 1024:.0f} MB |", flush=True)


def senders(count: int, per_sender: int, minutes: float) -> None:
    from dcmtk import Serve, Storescp, storescu, storescu_config, write_config

    corpus = small_corpus(count * per_sender)
    files = sorted(corpus.iterdir())
    shares = [files[number::count] for number in range(count)]
    with tempfile.TemporaryDirectory(prefix="dumpwatch-senders-", dir=WORK) as scratch:
        cfg = write_config(Path(scratch) / "site")
        profiles = [storescu_config(share, Path(scratch) / f"profile-{n}.cfg") for n, share in enumerate(shares)]
        scp, serve = Storescp(cfg), Serve(cfg)
        dump = Path(scratch) / "site" / "dump"
        backlog = [0]
        peaks = Peaks(serve.process.pid)
        sent = [0] * count
        failures: list[str] = []
        deadline = time.monotonic() + minutes * 60
        memory: dict[str, int] = {}

        def sender(number: int) -> None:
            while time.monotonic() < deadline:
                process = storescu(scp.port, shares[number], Path(scratch), wait=False, profile=profiles[number])
                output, _ = process.communicate()
                if process.returncode:
                    failures.append(output[-500:])
                    return
                sent[number] += len(shares[number])

        started = time.monotonic()
        threads = [threading.Thread(target=sender, args=(n,)) for n in range(count)]
        for thread in threads:
            thread.start()
        first = time.monotonic() + min(60, minutes * 30)
        while any(thread.is_alive() for thread in threads):
            time.sleep(2)
            backlog[0] = max(backlog[0], len(os.listdir(dump)) - 1)
            if "first" not in memory and time.monotonic() >= first:
                memory["first"] = peaks.current()
        received = time.monotonic() - started
        limit = time.monotonic() + 1800
        while any(name != ".dumpwatch.lock" for name in os.listdir(dump)) and time.monotonic() < limit:
            time.sleep(0.5)
        settled = time.monotonic() - started - received
        memory["end"] = peaks.current()
        peaks.finish()
        code = serve.stop()
        scp.stop()
        assert not failures, failures[0]
        assert code == 0
        site = Path(scratch) / "site"
        assert_dump_empty(site / "dump")
        assert len(tree_sops(site / "sorted")) == len(files), "not every instance is in the tree once"
        assert not quarantined(site / "quarantine")
        assert_journal_agrees(site / "sorted")
        total = sum(sent)
        print(f"| {count} | {received / 60:.1f} min | {total:,} ({total - len(files):,} re-sent) | "
              f"{total / received:,.0f} | {backlog[0]:,} | {settled:.0f} s | {memory['first'] / 1024:.0f} MB | "
              f"{memory['end'] / 1024:.0f} MB | {peaks.main / 1024:.0f} MB |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", default="10000,100000", help="backfill sizes, in files")
    parser.add_argument("--senders", type=int, default=8)
    parser.add_argument("--per-sender", type=int, default=2500)
    parser.add_argument("--minutes", type=float, default=2)
    parser.add_argument("--only", choices=["backfill", "senders"])
    args = parser.parse_args()
    WORK.mkdir(exist_ok=True)
    if args.only != "senders":
        print("| files | sort-once took | files/s | peak RSS, main | peak RSS, largest worker | peak PSS, all added |")
        print("|---:|---:|---:|---:|---:|---:|")
        for count in (int(c) for c in args.counts.split(",")):
            backfill(count)
    if args.only != "backfill":
        print("\n| senders | for | files received | files/s received | largest backlog in the dump | "
              "last file to dump empty | serve RSS at 1 min | at the end | serve main's peak |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        senders(args.senders, args.per_sender, args.minutes)


if __name__ == "__main__":
    main()
