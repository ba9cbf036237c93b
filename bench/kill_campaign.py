"""The long crash campaign of docs/reliability.md: kill -9 dumpwatch hundreds of times.

sort-once works through rounds of a few thousand files (generated MR files, Siemens field
map copies whose echo-1 files get renamed, a truncated and a non-DICOM file) and is killed
again and again until each round is done; serve is killed again and again while the files
of one such round arrive in its dump. Each run is killed either at a random moment or, for
half the runs, by itself at the n-th hit of one of the chain's crash points
(dumpwatch/failpoints.py: reading, anonymising and naming, journaling, renaming echo-1 files,
placing, removing sources, quarantining). After every round, tests/campaign.py's check():
every input is in the tree exactly once and whole (or quarantined with its reason), nothing
is staged or hidden in dir_out, the dump is empty, and the journal agrees with the tree.
Both with files moved as they are and with the Basic Profile (rewritten files).

    python bench/kill_campaign.py [--files 2000] [--fieldmaps 4] [--kills 55] [--seed 1]

--kills is per campaign; there are five (sort-once and serve, moved and anonymised; and
storescp killed mid-association while serve sorts, then one whole send: every instance
once in the tree, each partial file quarantined as truncated).
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the tests' helper modules; tests never import bench/

from campaign import (  # noqa: E402
    FIELDMAP,
    STEPS,
    TIMER,
    Kills,
    assert_dump_empty,
    assert_journal_agrees,
    check,
    corpus_cache,
    crash_points,
    make_inputs,
    quarantined,
    serve_kills,
    sort_once_kills,
    storescp_kills,
    tree_sops,
    write_config,
)
from pydicom import dcmread  # noqa: E402

from corpus import check_testdata  # noqa: E402

TESTDATA = check_testdata()  # the field map series: 72 files in the full set, 16 in tests/data


def sort_once_campaign(base: Path, args: argparse.Namespace, anonymise: bool, rng: random.Random) -> tuple[Kills, int]:
    result, files, number = Kills(), 0, 0
    while result.kills < args.kills:
        site = base / f"sort-once-{number}"
        write_config(site, anonymise)
        inputs = make_inputs(site / "dump", TESTDATA, args.files, args.fieldmaps, seed=args.seed * 1000 + number)
        result.merge(sort_once_kills(site, inputs, rng, per_file=0.003 if anonymise else 0.0004,
                                     steps=crash_points(anonymise)))
        check(site, inputs, anonymise)
        files += len(inputs.files) + len(inputs.bad)
        shutil.rmtree(site)
        number += 1
        print(f"  round {number}: {result.kills} kills so far", flush=True)
    return result, files


def serve_campaign(base: Path, args: argparse.Namespace, anonymise: bool, rng: random.Random) -> tuple[Kills, int]:
    site = base / "serve"
    write_config(site, anonymise)
    inputs = make_inputs(base / "arriving", TESTDATA, args.files, args.fieldmaps, seed=args.seed * 1000 + 999)
    result = serve_kills(site, base / "arriving", inputs, rng, budget=3.0 if anonymise else 2.0,
                         kills=args.kills, steps=crash_points(anonymise), paced=True)
    check(site, inputs, anonymise)
    shutil.rmtree(site)
    return result, len(inputs.files) + len(inputs.bad)


def storescp_campaign(base: Path, args: argparse.Namespace, rng: random.Random) -> tuple[Kills, int, dict]:
    """storescp killed -9 mid-association again and again while serve sorts; then a whole send."""
    from dcmtk import write_config as site_config

    files = sorted(corpus_cache(args.files).iterdir()) + sorted((TESTDATA / FIELDMAP).iterdir())
    sops = {str(dcmread(f, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID) for f in files}
    cfg = site_config(base / "site")
    result = storescp_kills(cfg, files, rng, kills=args.kills, budget=2.0)
    site = cfg.parent
    assert_dump_empty(site / "dump")
    assert set(tree_sops(site / "sorted")) == sops, "not every instance is in the tree once"
    reasons = quarantined(site / "quarantine")
    assert all(r.startswith(("truncated", "incomplete")) for r in reasons.values()), reasons
    assert_journal_agrees(site / "sorted")
    return result, len(files), reasons


def spread(progress: list[float]) -> str:
    """How far the runs had got when killed: kills per fifth of the inputs done."""
    bins = [0] * 5
    for share in progress:
        bins[min(4, int(share * 5))] += 1
    return " / ".join(str(b) for b in bins)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=2000, help="generated MR files per round")
    parser.add_argument("--fieldmaps", type=int, default=4, help="copies of the field map series per round")
    parser.add_argument("--kills", type=int, default=55, help="kills per campaign, at least")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    rows = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="dumpwatch-campaign-") as scratch:
        for command, campaign in (("sort-once", sort_once_campaign), ("serve", serve_campaign)):
            for anonymise in (False, True):
                mode = "Basic Profile" if anonymise else "moved"
                print(f"{command}, {mode}:", flush=True)
                base = Path(scratch) / f"{command}-{mode.replace(' ', '-')}"
                result, files = campaign(base, args, anonymise, rng)
                shutil.rmtree(base, ignore_errors=True)
                rows.append((command, mode, files, result))
                print(f"  {result.kills} kills in {result.runs} runs, {result.seconds:.0f} s: every check passed",
                      flush=True)
        print("storescp, killed mid-association:", flush=True)
        scp, sent, reasons = storescp_campaign(Path(scratch) / "storescp", args, rng)
        print(f"  {scp.kills} kills, {scp.seconds:.0f} s: every instance once in the tree, "
              f"{len(reasons)} partial files quarantined as truncated", flush=True)
    total = Kills()
    for *_, result in rows:
        total.merge(result)
    print(f"\n{total.kills} kills, {total.runs} runs, {time.monotonic() - started:.0f} s; "
          "after every round: nothing lost, nothing twice, nothing half-written, journal = tree\n")
    print("| campaign | files | runs | kills | of them at a crash point | kills by fifth of the inputs done |")
    print("|---|---:|---:|---:|---:|---|")
    for command, mode, files, result in rows:
        at_points = result.kills - result.where.get(TIMER, 0)
        print(f"| {command}, {mode} | {files:,} | {result.runs} | {result.kills} | {at_points} | "
              f"{spread(result.progress)} |")
    print(f"| storescp killed mid-association, then one whole send | {sent:,} a send | {scp.runs} | {scp.kills} | "
          f"- | {spread(scp.progress)} (of the send's time) |")
    print(f"\nstorescp: {len(reasons)} partial files left by the kills, every one quarantined as truncated; "
          "every instance once in the tree after the whole send.")
    print("\n| where the kill landed | kills |\n|---|---:|")
    for where in (*STEPS, TIMER):
        print(f"| {where} | {total.where.get(where, 0)} |")


if __name__ == "__main__":
    main()
