"""Files per second of `dumpwatch sort-once` with an anonymisation profile, beside dicognito.

Each contender works on its own fresh copy of the generated MR corpus (tests/corpus.py), as
a whole process timed from outside, start-up included; the median of several runs is
reported. dumpwatch sorts and anonymises (its output: the sorted tree, each file rewritten,
fsynced, leak-checked, journalled); dicognito (PyPI, in its own venv under bench/out)
anonymises each file into one output folder.

    python bench/anonymise.py [--files 2000] [--runs 5] [--no-peers]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / "out"
PEER = WORK / "venv-dicognito"
sys.path.insert(0, str(HERE))

from sort_once import copy_of, corpus, timed  # noqa: E402

PROFILES = {
    "basic": "basic",
    "research": "basic, retain-long-modified-dates, clean-descriptors, retain-safe-private, site",
}


def dicognito_python() -> Path | None:
    """A venv with dicognito; None if it cannot be made."""
    python = PEER / "bin" / "python"
    if not python.exists():
        try:
            subprocess.run([sys.executable, "-m", "venv", str(PEER)], check=True)
            subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                            "dicognito"], check=True)
        except subprocess.CalledProcessError:
            shutil.rmtree(PEER, ignore_errors=True)
            return None
    return python


def version(python: Path, package: str) -> str:
    return subprocess.run([str(python), "-c", f"from importlib.metadata import version; print(version({package!r}))"],
                          capture_output=True, text=True, check=True).stdout.strip()


def config(name: str, profile: str) -> Path:
    """A configuration with the profile and a fixed key (made once, as a site's is)."""
    path = WORK / f"anon-{name}.cfg"
    path.write_text(f"anon_profile = {profile}\nanon_key = {WORK / 'anon-bench.key'}\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--no-peers", action="store_true", help="skip dicognito")
    args = parser.parse_args()

    WORK.mkdir(exist_ok=True)
    source = corpus(args.files, "mr")
    size = sum(f.stat().st_size for f in source.iterdir()) / args.files / 1000
    python = sys.executable
    sort_once = [python, "-m", "dumpwatch", "sort-once", "{dump}", "--out", "{out}"]
    contenders = [("dumpwatch sort-once, no anonymisation", sort_once)]
    for name, profile in PROFILES.items():
        contenders.append((f"dumpwatch sort-once, anon_profile = {profile}",
                           [python, "-m", "dumpwatch", "--config", str(config(name, profile)), *sort_once[3:]]))
    if not args.no_peers:
        peer = dicognito_python()
        if peer is None:
            print("dicognito could not be installed: left out")
        else:
            label = f"dicognito {version(peer, 'dicognito')} (pydicom {version(peer, 'pydicom')}), -o OUT"
            contenders.append((label, [str(peer), "-m", "dicognito", "--quiet", "-o", "{out}", "{dump}"]))

    print(f"{args.files} files of {size:.0f} KB (mr header), median of {args.runs} runs, "
          f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}\n")
    times: dict[str, list[float]] = {label: [] for label, _ in contenders}
    for _ in range(args.runs):
        for label, command in contenders:
            work = copy_of(source, WORK / "run-anon")
            subprocess.run(["sync"], check=True)
            times[label].append(timed(command, work, args.files))
    print("| anonymiser | seconds | files/s |")
    print("|---|---:|---:|")
    for label, _ in contenders:
        seconds = statistics.median(times[label])
        print(f"| {label} | {seconds:.2f} | {args.files / seconds:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
