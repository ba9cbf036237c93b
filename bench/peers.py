"""dumpwatch beside dicomsort, in one run: speed and what becomes of every file.

Two inputs:
  - the generated corpus of tests/corpus.py (small MR files, unique names, nothing tricky);
  - every file of the test data as it is, read in place: real files from five vendors,
    the Siemens field map whose two echoes share InstanceNumbers, and the folder's non-DICOM
    files (SOURCES.md, expected.json; LICENSES/ in the repository's subset). The full set
    (the folder DUMPWATCH_TESTDATA names) when it is set, else tests/data.

Each tool sorts each input in copy mode (dumpwatch sort-once --copy; dicomsort with
keep_original, through bench/dicomsort_run.py in its own venv, as bench/sort_once.py makes
it), into a fresh output folder, as a whole process timed from outside (start-up included).
Copy mode for both, because the real files must stay where they are. The same layout for
both: <StudyDate>-<PatientName>/<SeriesNumber:03>-<SeriesDescription>/<InstanceNumber:04>.dcm
(dicomsort's SeriesDescription token appends its own "_SeriesNNNN").

Measured for each tool:
  - files/s: input files / seconds of the first pass, median of --runs runs; and "to disk",
    the same with the `sync` after the pass added (dumpwatch syncs before it places a
    file, dicomsort leaves its copies to the kernel's writeback);
  - what became of each input file, known by its SOPInstanceUID and the sha256 of its bytes
    (neither tool changes a file's bytes here): in the tree; quarantined with a reason
    (dumpwatch's quarantine, a .reason.txt beside each file); lost, either overwritten (no
    output holds it, and another input with the same StudyDate, PatientName, SeriesNumber,
    SeriesDescription and InstanceNumber is in the tree) or not placed at all, with no
    reason given; duplicated (extra copies of one SOP instance in the tree); and output
    files that match no input (a torn or changed copy);
  - a re-send: the same inputs sorted a second time into the same output folder; the
    files the second pass added to the tree, or changed there (and removed from it, or
    added to the quarantine, noted below the table when any), and the duplicates then.
A cell "a-b" means the runs differed: the fewest and the most.

Runs alternate the tools' order and `sync` before each pass. The machine may be busy with
other work: single runs are noisy, hence the median.

    python bench/peers.py [--files 2000] [--runs 3] [--no-testdata]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread

HERE = Path(__file__).resolve().parent
WORK = HERE / "out" / "peers"
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))  # the tests' helper modules; tests never import bench/

from sort_once import corpus, dicomsort_python  # noqa: E402

from corpus import TESTDATA, check_testdata  # noqa: E402

STATE_DIR = ".dumpwatch"  # dumpwatch's journal and staging area inside the tree: not sorted files
FIELDMAP = TESTDATA / "siemens_fieldmap" / "2_gre_field_magph"  # two echoes share each InstanceNumber


@dataclass(frozen=True)
class Input:
    path: Path
    sha256: str
    sop: str | None  # None: not a DICOM file
    key: tuple[str, ...] | None  # the fields that name its place in the tree


@dataclass
class Outcome:
    """One pass of one tool, then its re-send."""

    seconds: float
    sync_seconds: float
    resend_seconds: float
    in_tree: int
    quarantined: int
    overwritten: int
    not_placed: int
    duplicated: int
    foreign: int
    resend_added: int
    resend_changed: int
    resend_removed: int
    resend_quarantined: int
    resend_duplicated: int  # extra copies in the tree after the re-send
    stderr_tracebacks: int
    not_dcm: int  # files in the tree whose name does not end in .dcm
    fieldmap: str  # where the first echo pair of FIELDMAP went


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def index(folder: Path) -> list[Input]:
    """Every regular file below folder, with what names it."""
    inputs = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            path = Path(root) / name
            if path.is_symlink() or not path.is_file():
                continue
            sop = key = None
            try:
                ds = dcmread(path, stop_before_pixels=True)
                sop = str(ds.SOPInstanceUID)
                key = tuple(str(ds.get(k, "")) for k in
                            ("StudyDate", "PatientName", "SeriesNumber", "SeriesDescription", "InstanceNumber"))
            except Exception:  # not DICOM, or no SOPInstanceUID: known by its bytes alone
                pass
            inputs.append(Input(path, sha256(path), sop, key))
    return inputs


def snapshot(folder: Path, skip: str | None = None) -> dict[str, str]:
    """relative path -> sha256 of every file below folder (not below folder/skip)."""
    found = {}
    for root, dirs, files in os.walk(folder):
        if Path(root) == folder and skip in dirs:
            dirs.remove(skip)
        for name in files:
            path = Path(root) / name
            found[str(path.relative_to(folder))] = sha256(path)
    return found


def timed(command: list[str], cwd: Path) -> tuple[float, float, str]:
    """Seconds of the command, then of the `sync` after it; and its stderr."""
    subprocess.run(["sync"], check=True)
    env = {k: v for k, v in os.environ.items() if k != "DUMPWATCH_CONFIG"}
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env)
    elapsed = time.perf_counter() - started
    subprocess.run(["sync"], check=True)
    synced = time.perf_counter() - started - elapsed
    if result.returncode not in (0, 3):  # dumpwatch: 3 = some files quarantined
        raise SystemExit(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    return elapsed, synced, result.stderr


def judge(inputs: list[Input], tree: dict[str, str], quarantine: dict[str, str]) -> dict[str, int]:
    """What became of each input, from the tree and the quarantine after one pass."""
    by_sha = {i.sha256: i for i in inputs}
    in_tree = {by_sha[s] for s in tree.values() if s in by_sha}
    reasons = {p.removesuffix(".reason.txt") for p in quarantine if p.endswith(".reason.txt")}
    quarantined = {by_sha[s] for p, s in quarantine.items()
                   if s in by_sha and p in reasons and by_sha[s] not in in_tree}
    placed_keys = {i.key for i in in_tree if i.key is not None}
    lost = [i for i in inputs if i not in in_tree and i not in quarantined]
    overwritten = [i for i in lost if i.key is not None and i.key in placed_keys]
    copies: dict[str, int] = {}
    for s in tree.values():
        if s in by_sha:
            copies[by_sha[s].sop or s] = copies.get(by_sha[s].sop or s, 0) + 1
    return {
        "in_tree": len(in_tree),
        "quarantined": len(quarantined),
        "overwritten": len(overwritten),
        "not_placed": len(lost) - len(overwritten),
        "duplicated": sum(n - 1 for n in copies.values()),
        "foreign": sum(1 for s in tree.values() if s not in by_sha),
    }


def run_tool(command: list[str], source: Path, inputs: list[Input], work: Path) -> Outcome:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    out, quarantine = work / "sorted", work / "quarantine"
    args = [a.replace("{src}", str(source)).replace("{out}", str(out)).replace("{q}", str(quarantine))
            for a in command]
    seconds, sync_seconds, stderr = timed(args, work)
    tree, held = snapshot(out, STATE_DIR), snapshot(quarantine) if quarantine.exists() else {}
    verdict = judge(inputs, tree, held)
    by_sha = {i.sha256: i for i in inputs}
    pair = {by_sha[s].path.name: p for p, s in tree.items() if s in by_sha and by_sha[s].path.parent == FIELDMAP}
    fieldmap = (f"{sum(1 for i in inputs if i.path.parent == FIELDMAP) - len(pair)} of its files not in the tree; "
                f"e1_01.dcm -> {pair.get('e1_01.dcm')}, e2_01.dcm -> {pair.get('e2_01.dcm')}") if pair else ""
    resend_seconds, _, stderr2 = timed(args, work)
    tree2, held2 = snapshot(out, STATE_DIR), snapshot(quarantine) if quarantine.exists() else {}
    outcome = Outcome(
        seconds=seconds, sync_seconds=sync_seconds, resend_seconds=resend_seconds, **verdict,
        resend_added=len(tree2.keys() - tree.keys()),
        resend_changed=sum(1 for p in tree.keys() & tree2.keys() if tree[p] != tree2[p]),
        resend_removed=len(tree.keys() - tree2.keys()),
        resend_duplicated=judge(inputs, tree2, held2)["duplicated"],
        resend_quarantined=len([p for p in held2.keys() - held.keys() if not p.endswith(".reason.txt")]),
        stderr_tracebacks=(stderr + stderr2).count("Traceback"),
        not_dcm=sum(1 for p in tree if not p.endswith(".dcm")),
        fieldmap=fieldmap,
    )
    shutil.rmtree(work)
    return outcome


def spread(values: list[int]) -> str:
    low, high = min(values), max(values)
    return f"{low:,}" if low == high else f"{low:,}-{high:,}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=2000, help="files in the generated corpus")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-testdata", action="store_true", help=f"skip the real files of {TESTDATA}")
    args = parser.parse_args()

    peer = dicomsort_python()
    if peer is None:
        raise SystemExit("dicomsort could not be installed (bench/sort_once.py makes its venv)")
    tools = {
        "dumpwatch sort-once --copy": [sys.executable, "-m", "dumpwatch", "sort-once", "{src}",
                                       "--out", "{out}", "--quarantine", "{q}", "--copy"],
        "dicomsort 3.0.0 (copy)": [str(peer), str(HERE / "dicomsort_run.py"), "{src}", "{out}", "--copy"],
    }
    datasets = {f"generated corpus ({args.files:,} MR files)": corpus(args.files, "mr")}
    if not args.no_testdata:
        datasets[f"real files, {TESTDATA.parent.name}/{TESTDATA.name}"] = check_testdata()
    indexed = {name: index(folder) for name, folder in datasets.items()}

    print(f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, median of {args.runs} runs, copy mode for both")
    for name, inputs in indexed.items():
        dicom = sum(1 for i in inputs if i.sop is not None)
        size = sum(i.path.stat().st_size for i in inputs) / 1e6
        print(f"  {name}: {len(inputs):,} files ({dicom:,} DICOM), {size:.1f} MB, {datasets[name]}")

    results: dict[tuple[str, str], list[Outcome]] = {(d, t): [] for d in datasets for t in tools}
    for run in range(args.runs):
        order = list(tools) if run % 2 == 0 else list(reversed(tools))
        for name, folder in datasets.items():
            for tool in order:
                outcome = run_tool(tools[tool], folder, indexed[name], WORK / "run")
                results[name, tool].append(outcome)
                print(f"  run {run + 1}, {name}, {tool}: {outcome.seconds:.2f} s "
                      f"(+{outcome.sync_seconds:.2f} s sync), re-send {outcome.resend_seconds:.2f} s",
                      file=sys.stderr, flush=True)

    print()
    print("| input | tool | files/s | to disk (with the sync after) | re-send files/s | dumpwatch / dicomsort "
          "| in the tree | quarantined with a reason | lost: overwritten | lost: not placed, no reason "
          "| duplicated | re-send: added / changed in the tree | duplicated after the re-send |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    notes = []
    ours, theirs = tools
    for name, inputs in indexed.items():
        rate = {}
        for tool in tools:
            runs = results[name, tool]
            rate[tool] = statistics.median(len(inputs) / o.seconds for o in runs)
        for tool in tools:
            runs = results[name, tool]
            disk = statistics.median(len(inputs) / (o.seconds + o.sync_seconds) for o in runs)
            resend = statistics.median(len(inputs) / o.resend_seconds for o in runs)
            shown_ratio = f"{rate[ours] / rate[theirs]:.2f}" if tool == ours else ""
            added = spread([o.resend_added for o in runs])
            changed = spread([o.resend_changed for o in runs])
            print(f"| {name} | {tool} | {rate[tool]:,.0f} | {disk:,.0f} | {resend:,.0f} | {shown_ratio} "
                  f"| {spread([o.in_tree for o in runs])} of {len(inputs):,} "
                  f"| {spread([o.quarantined for o in runs])} | {spread([o.overwritten for o in runs])} "
                  f"| {spread([o.not_placed for o in runs])} | {spread([o.duplicated for o in runs])} "
                  f"| {added} / {changed} | {spread([o.resend_duplicated for o in runs])} |")
            for label, values in (("output files matching no input", [o.foreign for o in runs]),
                                  ("files removed from the tree by the re-send", [o.resend_removed for o in runs]),
                                  ("files added to the quarantine by the re-send",
                                   [o.resend_quarantined for o in runs]),
                                  ("tracebacks on stderr", [o.stderr_tracebacks for o in runs]),
                                  ("files in the tree named other than *.dcm", [o.not_dcm for o in runs])):
                if any(values):
                    notes.append(f"- {name}, {tool}: {label}: {spread(values)}")
            for where in sorted({o.fieldmap for o in runs if o.fieldmap}):
                notes.append(f"- {name}, {tool}: {FIELDMAP.relative_to(TESTDATA)}: {where}")
    if notes:
        print()
        print("\n".join(notes))


if __name__ == "__main__":
    main()
