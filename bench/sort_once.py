"""Files per second of `dumpwatch sort-once`, beside the minimal loop and dicomsort.

Each contender sorts a fresh copy of the same generated corpus, as a whole process (start-up
included), timed from outside; the median of several runs is reported. The copies are
written back (sync) and left to age past the kernel's writeback window before the timed
runs, as an old dump would be. The "just copied" row runs at once on a fresh copy, whose
data is still in memory: dumpwatch's sync before each batch's renames (syncfs) then has
the data to write.

    python bench/sort_once.py [--files 2000] [--header mr|siemens] [--runs 5] [--no-peers]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / "out"
PEERS = WORK / "venv-dicomsort"
sys.path.insert(0, str(HERE.parent / "tests"))  # the tests' helper modules; tests never import bench/

from dumpwatch.prepare import WRITEBACK_SECONDS  # noqa: E402

from corpus import make_corpus  # noqa: E402


def corpus(files: int, header: str) -> Path:
    folder = WORK / f"corpus-{header}-{files}-v2"  # v2: InstitutionName of its own (tests/corpus.py)
    if not folder.is_dir() or len(os.listdir(folder)) != files:
        shutil.rmtree(folder, ignore_errors=True)
        make_corpus(folder, files, header)
    old = time.time() - 3600
    for name in os.listdir(folder):
        os.utime(folder / name, (old, old))
    return folder


def dicomsort_python() -> Path | None:
    """A venv with dicomsort 3.0.0 and the pydicom 2 it needs; None if it cannot be made."""
    python = PEERS / "bin" / "python"
    if not python.exists():
        try:
            subprocess.run([sys.executable, "-m", "venv", str(PEERS)], check=True)
            subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                            "pydicom>=2.4,<3", "configobj"], check=True)
            subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                            "--no-deps", "dicomsort==3.0.0"], check=True)
        except subprocess.CalledProcessError:
            shutil.rmtree(PEERS, ignore_errors=True)
            return None
    return python


def copy_of(source: Path, folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    shutil.copytree(source, folder / "dump", copy_function=shutil.copy2)
    return folder


def timed(command: list[str], work: Path, expected: int) -> float:
    """Seconds for one run of command on the copy in work."""
    args = [a.replace("{dump}", str(work / "dump")).replace("{out}", str(work / "sorted")) for a in command]
    started = time.perf_counter()
    result = subprocess.run(args, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{result.stdout}{result.stderr}")
    sorted_files = sum(len(files) for _, _, files in os.walk(work / "sorted"))
    if sorted_files < expected:
        raise SystemExit(f"{args[0]} sorted {sorted_files} of {expected} files")
    shutil.rmtree(work)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--header", choices=["mr", "siemens"], default="mr")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--no-peers", action="store_true", help="skip dicomsort")
    args = parser.parse_args()

    source = corpus(args.files, args.header)
    size = sum(f.stat().st_size for f in source.iterdir()) / args.files / 1000
    python = sys.executable
    dumpwatch = [python, "-m", "dumpwatch", "sort-once", "{dump}", "--out", "{out}"]
    minimal = [python, str(HERE / "minimal_loop.py"), "{dump}", "{out}"]
    contenders = [
        ("minimal loop (1 process: read header, rename)", minimal, False),
        ("dumpwatch sort-once", dumpwatch, False),
        ("dumpwatch sort-once --copy", dumpwatch + ["--copy"], False),
        ("dumpwatch sort-once, files just copied in (data still in memory)", dumpwatch, True),
    ]
    if not args.no_peers:
        peer = dicomsort_python()
        if peer is None:
            print("dicomsort could not be installed: left out")
        else:
            run = [str(peer), str(HERE / "dicomsort_run.py"), "{dump}", "{out}"]
            contenders.append(("dicomsort 3.0.0 (move)", run, False))
            contenders.append(("dicomsort 3.0.0 (copy)", run + ["--copy"], False))

    print(f"{args.files} files of {size:.0f} KB ({args.header} header), median of {args.runs} runs, "
          f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}\n")
    aged = [c for c in contenders if not c[2]]
    times: dict[str, list[float]] = {label: [] for label, _, _ in contenders}
    for _ in range(args.runs):
        copies = [copy_of(source, WORK / f"run-{n}") for n in range(len(aged))]
        subprocess.run(["sync"], check=True)
        time.sleep(WRITEBACK_SECONDS + 1)  # past the writeback window, as an old dump is
        for (label, command, _), work in zip(aged, copies, strict=True):
            times[label].append(timed(command, work, args.files))
        for label, command, _ in contenders:
            if label not in {a[0] for a in aged}:
                work = copy_of(source, WORK / "run-fresh")
                subprocess.run(["sync"], check=True)
                times[label].append(timed(command, work, args.files))
    print("| sorter | seconds | files/s |")
    print("|---|---:|---:|")
    for label, _, _ in contenders:
        seconds = statistics.median(times[label])
        print(f"| {label} | {seconds:.2f} | {args.files / seconds:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
