"""dumpwatch serve beside storescp: how soon a received file is sorted, and whether the
sorter keeps up with a scanner sending as fast as it can.

For each run, a fresh site (dump, sorted tree, quarantine) and a fresh storescp started by
scripts/storescp.sh; storescu sends the generated corpus over loopback in one association.

- "storescp alone": no sorter; the time storescu takes.
- "with serve": dumpwatch serve running; the time storescu takes, and how long after the
  last file was closed the dump was empty again.
- Latency per file: from storescp's last write (the file's mtime, kept through the
  rename) to its arrival in the tree (the ctime the rename gives it).
- "paced": files sent one association each, 50 a second, as a slower scanner would.

    python bench/serve.py [--files 2000] [--runs 5] [--sites /dev/shm/dumpwatch-bench]

--sites puts dump and tree elsewhere: on tmpfs the comparison shows the CPU that serve
takes from storescp, without this virtual disk's swings (the same send took 0.85 s to
1.8 s here, depending on what the disk was doing).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORK = HERE / "out"
sys.path.insert(0, str(HERE.parent / "tests"))  # the tests' helper modules; tests never import bench/

from dumpwatch.dumplock import read_lock  # noqa: E402
from dumpwatch.status import listening  # noqa: E402

from corpus import make_corpus  # noqa: E402


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait(predicate, timeout: float = 60, step: float = 0.001) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit("timed out")
        time.sleep(step)


class Site:
    def __init__(self, folder: Path):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        self.folder, self.port = folder, free_port()
        self.cfg = folder / "dumpwatch.cfg"
        self.cfg.write_text(f"port = {self.port}\ndir_dump = dump\ndir_out = sorted\ndir_quarantine = quarantine\n")
        self.dump, self.sorted = folder / "dump", folder / "sorted"
        env = {**os.environ, "DUMPWATCH": str(Path(sys.executable).parent / "dumpwatch")}
        self.storescp = subprocess.Popen([str(REPO / "scripts" / "storescp.sh"), str(self.cfg)], env=env,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        wait(lambda: listening(self.port), 20, 0.05)
        self.serve = None

    def start_serve(self) -> None:
        self.serve = subprocess.Popen([sys.executable, "-m", "dumpwatch", "--config", str(self.cfg), "serve"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        wait(lambda: (read_lock(self.dump) or None) is not None, 30, 0.05)

    def send(self, files: list[Path], settle: bool = True) -> float:
        if settle:  # start each timed send on a quiet disk, not during the last run's writeback
            os.sync()
            time.sleep(2)
        started = time.perf_counter()
        subprocess.run(["storescu", "-aec", "DUMPWATCH", "127.0.0.1", str(self.port), *map(str, files)],
                       env={**os.environ, "TCP_NODELAY": "1"}, check=True, stdout=subprocess.DEVNULL)
        return time.perf_counter() - started

    def waiting(self) -> int:
        return sum(1 for name in os.listdir(self.dump) if name != ".dumpwatch.lock")

    def close(self) -> None:
        if self.serve is not None:
            self.serve.send_signal(signal.SIGTERM)
            self.serve.wait(timeout=60)
        os.killpg(self.storescp.pid, signal.SIGTERM)
        self.storescp.wait(timeout=30)
        # The site stays until the end: deleting 266 MB makes this disk discard (TRIM) for
        # seconds, which slowed the next run by up to 2x.


def sorted_times(tree: Path) -> list[tuple[int, int]]:
    """(mtime, ctime) in ns of every sorted file."""
    times = []
    for folder, _, files in os.walk(tree):
        if ".dumpwatch" in folder:
            continue
        for name in files:
            st = os.stat(os.path.join(folder, name))
            times.append((st.st_mtime_ns, st.st_ctime_ns))
    return times


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--sites", type=Path, default=WORK / "serve-sites", help="where the sites are made")
    args = parser.parse_args()
    corpus = WORK / f"corpus-mr-{args.files}"
    if not corpus.is_dir() or len(os.listdir(corpus)) != args.files:
        shutil.rmtree(corpus, ignore_errors=True)
        make_corpus(corpus, args.files)
    files = sorted(corpus.iterdir())
    sites = args.sites
    shutil.rmtree(sites, ignore_errors=True)
    alone, with_serve, ratios, drained, latencies = [], [], [], [], []
    for run in range(args.runs):
        site = Site(sites / f"alone-{run}")
        try:
            alone.append(site.send(files))
            if site.waiting() != args.files:
                raise SystemExit(f"storescp stored {site.waiting()} of {args.files} files")
        finally:
            site.close()
        site = Site(sites / f"serve-{run}")
        try:
            site.start_serve()
            with_serve.append(site.send(files))
            ratios.append(with_serve[-1] / alone[-1])
            wait(lambda s=site: s.waiting() == 0, 60)
            times = sorted_times(site.sorted)
            if len(times) != args.files:
                raise SystemExit(f"{len(times)} of {args.files} files sorted")
            drained.append((max(c for _, c in times) - max(m for m, _ in times)) / 1e9)
            latencies += [(c - m) / 1e6 for m, c in times]
        finally:
            site.close()
    paced = []
    site = Site(sites / "paced")
    try:
        site.start_serve()
        for path in files[:200]:
            started = time.monotonic()
            site.send([path], settle=False)
            time.sleep(max(0.0, 0.02 - (time.monotonic() - started)))
        wait(lambda s=site: s.waiting() == 0, 60)
        paced = [(c - m) / 1e6 for m, c in sorted_times(site.sorted)]
    finally:
        site.close()
    shutil.rmtree(sites)

    size = sum(p.stat().st_size for p in files) / len(files) / 1000
    print(f"{args.files} files of {size:.0f} KB, one association, {args.runs} runs, sites in {sites}; "
          f"{os.cpu_count()} CPUs\n")
    send_alone, send_with = statistics.median(alone), statistics.median(with_serve)
    print("| measure | value |\n|---|---:|")
    print(f"| storescp alone: send time, median | {send_alone:.2f} s ({args.files / send_alone:,.0f} files/s) |")
    print(f"| with serve: send time, median | {send_with:.2f} s ({args.files / send_with:,.0f} files/s) |")
    print(f"| with serve / alone, median of the runs' ratios (each run) | {statistics.median(ratios):.2f} "
          f"({', '.join(f'{r:.2f}' for r in ratios)}) |")
    print(f"| dump empty after the last file closed (median, worst) | {statistics.median(drained):.3f} s, "
          f"{max(drained):.3f} s |")
    print(f"| latency, close to sorted, p50 / p99 / max ({len(latencies):,} files) | "
          f"{percentile(latencies, 0.5):.1f} / {percentile(latencies, 0.99):.1f} / {max(latencies):.1f} ms |")
    print(f"| paced, 50 files/s: latency p50 / p99 / max ({len(paced)} files) | "
          f"{percentile(paced, 0.5):.1f} / {percentile(paced, 0.99):.1f} / {max(paced):.1f} ms |")


if __name__ == "__main__":
    main()
