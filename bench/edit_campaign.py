"""The tree edited by hand while serve sorts: does every instance sent survive the users' edits?

The sorted tree belongs to its users: they delete files and series folders, and rename and
move folders, while serve runs. This campaign runs the real receiver (storescp started by
scripts/storescp.sh, `dumpwatch serve`, storescu sending over 127.0.0.1 on free ports, as
tests/dcmtk.py does) under a steady send, while a second process edits the tree at random:

- delete-file: removes one sorted file;
- delete-series: removes a whole series folder (rm -rf);
- rename-to-deleted: `rm -rf 001-gre; mv 001-gre_2 001-gre` (a series folder renamed to
  the name of a sibling of its name just deleted; or to that name if it is already free);
- move-into-name: `rm -rf B; mv A B` for two series folders A, B of one study folder.

The sender sends whole series, one association each: new ones, and re-sends of series sent
before, often of series edited since their last send. Series are built from a real Siemens
file (of the test data); several share SeriesNumber and SeriesDescription but differ in
SeriesInstanceUID (so `_2` and `_3` folders occur), and the files of a series name have one
size (UIDs of fixed length) but one in five, a few bytes longer, as a repeated scan's.

The editor reads every file it removes before removing it, and records its SOPInstanceUID,
data-set identity (sha256 of the bytes after the file meta) and sha256, its path, and the
moment after it was gone. After the send stops, the editor stops, and the dump is empty (or
--settle seconds pass), serve and storescp are stopped and the check counts:

- lost: instances sent (by SOPInstanceUID; and by data-set identity) that are neither in
  the tree, nor in the quarantine, nor still in the dump, nor removed by the editor after
  their last send was handled (the later of the last send's start and the journal's last
  sorted/duplicate row for the instance);
- stuck: files still in the dump;
- mixed: series folders holding files of two SeriesInstanceUIDs;
- stored twice: an instance in the tree more than once (every send of an instance here is
  identical); "in one folder" is always a fault; in two folders it also follows from the
  edits (a series moved into another's name, or a folder name freed below the one its
  series holds, is not looked for there);
- false duplicates: journal `duplicate` rows whose file does not hold the same content at
  check time, and was not removed (or moved away) by the editor after the row.

Exits 1 when any of lost, stuck or mixed is not zero.

    python bench/edit_campaign.py [--rounds 60] [--seconds 60] [--seed 1] [--keep DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import multiprocessing
import os
import random
import shutil
import sqlite3
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "tests"))  # the tests' helper modules; tests never import bench/

from campaign import quarantined  # noqa: E402
from dcmtk import Serve, Storescp, storescu, storescu_config, write_config  # noqa: E402
from pydicom import dcmread  # noqa: E402

from corpus import SIEMENS as TEMPLATE  # noqa: E402  # a real Siemens file, in the full set and tests/data alike

UID_ROOT = "1.2.826.0.1.3680043.8.498."  # pydicom's root; + 30 digits: every UID 56 characters
SLOTS = [(1, "gre"), (2, "t1 mprage"), (3, "ep2d bold")]
STATE = ".dumpwatch"
KINDS = ("delete-file", "delete-series", "rename-to-deleted", "move-into-name")


# -- the series sent --------------------------------------------------------------------------


@dataclass
class Series:
    uid: str
    folder: str  # "<PatientName> <SeriesNumber>-<SeriesDescription>", for the report
    files: list[Path]
    sops: list[str]
    identities: list[str]


def fixed_uid(rng: random.Random) -> str:
    return UID_ROOT + str(rng.randrange(10**29, 10**30))


def identity(data: bytes) -> str:
    """sha256 of the data set: the bytes after the file meta (storescp writes a meta of its own)."""
    if data[128:132] == b"DICM" and data[132:136] == b"\x02\x00\x00\x00":  # (0002,0000) UL
        data = data[144 + int.from_bytes(data[140:144], "little"):]
    return hashlib.sha256(data).hexdigest()


def read_uids(data: bytes) -> tuple[str, str]:
    """(SOPInstanceUID, SeriesInstanceUID) of a file's bytes; ("", "") if unreadable."""
    try:
        ds = dcmread(io.BytesIO(data), stop_before_pixels=True,
                     specific_tags=["SOPInstanceUID", "SeriesInstanceUID"])
        return str(ds.get("SOPInstanceUID", "")), str(ds.get("SeriesInstanceUID", ""))
    except Exception:
        return "", ""


def make_pool(folder: Path, rng: random.Random, patients: int, per_slot: int, per_series: int) -> list[Series]:
    """patients x len(SLOTS) x per_slot series of per_series files each, from a real Siemens file."""
    template = dcmread(TEMPLATE)
    template.EchoNumbers = 1
    pixels = bytearray(template.PixelData)
    pool = []
    for patient in range(patients):
        study = fixed_uid(rng)
        for number, description in SLOTS:
            for copy in range(per_slot):
                ds = template
                ds.PatientName = f"Edit^P{patient}"
                ds.PatientID = f"edit-{patient}"
                ds.StudyInstanceUID = study
                ds.SeriesInstanceUID = fixed_uid(rng)
                ds.SeriesNumber = number
                ds.SeriesDescription = description
                series = Series(ds.SeriesInstanceUID, f"{ds.PatientName} {number:03d}-{description}", [], [], [])
                target = folder / f"p{patient}-s{number}-{copy}"
                target.mkdir(parents=True)
                for instance in range(1, per_series + 1):
                    ds.InstanceNumber = instance
                    ds.SOPInstanceUID = fixed_uid(rng)
                    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
                    pixels[:16] = rng.randbytes(16)  # every instance its own content
                    # Similar sizes: most files of a series name have the same size, one in
                    # five a few bytes more (a comment), as a repeated scan's files differ.
                    if rng.random() < 0.2:
                        ds.ImageComments = "repeat" * rng.randint(1, 3)
                    elif "ImageComments" in ds:
                        del ds.ImageComments
                    ds.PixelData = bytes(pixels)
                    path = target / f"MR.{ds.SOPInstanceUID}.dcm"
                    ds.save_as(path, enforce_file_format=False)
                    series.files.append(path)
                    series.sops.append(ds.SOPInstanceUID)
                    series.identities.append(identity(path.read_bytes()))
                pool.append(series)
    return pool


# -- the editor: a second process, editing the tree by hand ------------------------------------


def _folders(out: Path) -> dict[str, list[str]]:
    """{study folder: [series folders]} of the tree as it is now."""
    found = {}
    try:
        studies = [e.name for e in os.scandir(out) if e.is_dir(follow_symlinks=False) and not e.name.startswith(".")]
    except FileNotFoundError:
        return {}
    for study in studies:
        try:
            found[study] = sorted(e.name for e in os.scandir(out / study)
                                  if e.is_dir(follow_symlinks=False) and not e.name.startswith("."))
        except FileNotFoundError:
            pass
    return found


def _remove_file(out: Path, rel: str) -> dict | None:
    """Read a sorted file, then remove it; what it held, and the moment after it was gone."""
    path = out / rel
    try:
        data = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        return None
    sop, series = read_uids(data)
    try:
        os.unlink(path)
    except FileNotFoundError:
        return None
    return {"path": rel, "sop": sop, "series": series, "identity": identity(data),
            "sha256": hashlib.sha256(data).hexdigest(), "t": time.time()}


def _remove_folder(out: Path, rel: str) -> list[dict]:
    """rm -rf, one file at a time, each read before it goes; again if serve put a file in meanwhile."""
    removed = []
    for _ in range(20):
        try:
            names = sorted(os.listdir(out / rel))
        except FileNotFoundError:
            return removed
        for name in names:
            if (out / rel / name).is_dir():
                removed += _remove_folder(out, f"{rel}/{name}")
            else:
                entry = _remove_file(out, f"{rel}/{name}")
                if entry:
                    removed.append(entry)
        try:
            os.rmdir(out / rel)
            return removed
        except FileNotFoundError:
            return removed
        except OSError:  # not empty: a file was placed meanwhile
            continue
    return removed


def _series_of(out: Path, rel: str) -> str:
    try:
        for name in sorted(os.listdir(out / rel)):
            _, series = read_uids((out / rel / name).read_bytes()[:20_000])
            if series:
                return series
    except OSError:
        pass
    return ""


def _rename(out: Path, src: str, dst: str) -> float | None:
    """mv src dst, if dst is free (never replacing a folder serve made meanwhile); the moment after."""
    from dumpwatch.fsops import move_noreplace

    try:
        move_noreplace(-100, str(out / src), -100, str(out / dst), os.stat(out).st_dev)
    except OSError:
        return None
    return time.time()


def _base(name: str) -> tuple[str, int]:
    head, _, tail = name.rpartition("_")
    return (head, int(tail)) if head and tail.isdigit() and int(tail) >= 2 else (name, 1)


def edit_once(out: Path, rng: random.Random) -> dict:
    """One edit at random; the record of what it did ({"kind": "skipped"} if nothing fitted)."""
    tree = _folders(out)
    series_folders = [(study, name) for study, names in tree.items() for name in names]
    if not series_folders:
        return {"kind": "skipped", "why": "the tree is empty"}
    kind = rng.choices(KINDS, weights=(35, 15, 30, 20))[0]
    record: dict = {"kind": kind, "removed": [], "t0": time.time()}
    if kind == "delete-file":
        study, name = rng.choice(series_folders)
        files = sorted(os.listdir(out / study / name)) if (out / study / name).is_dir() else []
        entry = _remove_file(out, f"{study}/{name}/{rng.choice(files)}") if files else None
        if entry is None:
            return {"kind": "skipped", "why": "no file to delete"}
        record["removed"] = [entry]
    elif kind == "delete-series":
        study, name = rng.choice(series_folders)
        record["folder"] = f"{study}/{name}"
        record["removed"] = _remove_folder(out, record["folder"])
    elif kind == "rename-to-deleted":
        suffixed = [(study, name) for study, name in series_folders if _base(name)[1] > 1]
        if not suffixed:
            return {"kind": "skipped", "why": "no _2 folder"}
        study, name = rng.choice(suffixed)
        base = _base(name)[0]
        if base in tree[study]:
            record["folder"] = f"{study}/{base}"
            record["removed"] = _remove_folder(out, record["folder"])
        record["series"] = [_series_of(out, f"{study}/{name}")]
        moved = _rename(out, f"{study}/{name}", f"{study}/{base}")
        record["renamed"] = [f"{study}/{name}", f"{study}/{base}", moved] if moved else None
    else:  # move-into-name
        studies = [study for study, names in tree.items() if len(names) >= 2]
        if not studies:
            return {"kind": "skipped", "why": "no study with two series folders"}
        study = rng.choice(studies)
        source, target = rng.sample(tree[study], 2)
        record["folder"] = f"{study}/{target}"
        record["removed"] = _remove_folder(out, record["folder"])
        record["series"] = [_series_of(out, f"{study}/{source}")]
        moved = _rename(out, f"{study}/{source}", f"{study}/{target}")
        record["renamed"] = [f"{study}/{source}", f"{study}/{target}", moved] if moved else None
    record["series"] = sorted({*record.get("series", []), *(e["series"] for e in record["removed"])} - {""})
    return record


def editor(out: str, log: str, seed: int, pause: float, stop) -> None:
    """The editing process: one edit at random every 0..2*pause seconds, until stop is set."""
    rng = random.Random(seed)
    with open(log, "a") as records:
        while not stop.wait(rng.uniform(0, 2 * pause)):
            try:
                record = edit_once(Path(out), rng)
            except Exception as exc:  # a folder gone under it, say: say so, go on
                record = {"kind": "skipped", "why": f"{type(exc).__name__}: {exc}"}
            records.write(json.dumps(record) + "\n")
            records.flush()


def read_edits(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


# -- the sender --------------------------------------------------------------------------------


@dataclass
class Sends:
    log: list[dict] = field(default_factory=list)  # {"series", "start", "end", "kind", "code"}
    files: int = 0


def send(port: int, pool: list[Series], work: Path, edits_log: Path, rng: random.Random, rounds: int,
         seconds: float, pause: float) -> Sends:
    """Whole series, one storescu association each: new ones, and re-sends (most of them of
    series edited since their last send), until rounds sends or seconds have gone by."""
    profile = storescu_config([pool[0].files[0]], work / "storescu.cfg")  # one SOP class, one syntax
    unsent = list(range(len(pool)))
    rng.shuffle(unsent)
    sent: set[int] = set()
    by_uid = {s.uid: n for n, s in enumerate(pool)}
    edited: set[int] = set()
    seen_edits = 0
    result = Sends()
    started = time.monotonic()
    for _ in range(rounds):
        if time.monotonic() - started > seconds:
            break
        edits = read_edits(edits_log)
        for record in edits[seen_edits:]:
            edited.update(by_uid[uid] for uid in record.get("series", []) if uid in by_uid)
        seen_edits = len(edits)
        if unsent and (not sent or rng.random() < 0.35):
            number, kind = unsent.pop(), "new"
        elif edited & sent and rng.random() < 0.7:
            number, kind = rng.choice(sorted(edited & sent)), "re-send, edited since"
        else:
            number, kind = rng.choice(sorted(sent)), "re-send"
        series = pool[number]
        begin = time.time()
        process = storescu(port, series.files, work, wait=False, profile=profile)
        output, _ = process.communicate(timeout=120)
        result.log.append({"series": number, "start": begin, "end": time.time(), "kind": kind,
                           "code": process.returncode, "output": output[-500:] if process.returncode else ""})
        result.files += len(series.files)
        sent.add(number)
        edited.discard(number)
        time.sleep(rng.uniform(0, 2 * pause))
    return result


# -- the check ---------------------------------------------------------------------------------


def epoch(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()


@dataclass
class TreeFile:
    rel: str
    sop: str
    series: str
    identity: str
    sha256: str


def scan(folder: Path, skip_state: bool = True) -> list[TreeFile]:
    files = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if skip_state and rel.parts[0] == STATE or not path.is_file() or path.name == ".dumpwatch.lock":
            continue
        data = path.read_bytes()
        sop, series = read_uids(data)
        files.append(TreeFile(str(rel), sop, series, identity(data), hashlib.sha256(data).hexdigest()))
    return files


@dataclass
class Report:
    edits: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    renames_refused: int = 0
    sends: Counter = field(default_factory=Counter)
    sends_failed: int = 0
    files_sent: int = 0
    instances_sent: int = 0
    in_tree: int = 0
    deleted_after_send: int = 0
    quarantined: int = 0
    lost: list[str] = field(default_factory=list)  # SOPInstanceUIDs
    lost_identity: int = 0
    stuck: list[TreeFile] = field(default_factory=list)
    mixed: dict[str, dict[str, int]] = field(default_factory=dict)  # folder -> {series: files}
    twice: dict[str, list[str]] = field(default_factory=dict)  # SOP -> paths
    twice_one_folder: int = 0
    journal: Counter = field(default_factory=Counter)
    false_duplicates: list[tuple[str, str]] = field(default_factory=list)  # (dest, why)
    details: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return bool(self.lost or self.lost_identity or self.stuck or self.mixed)


def check(site: Path, pool: list[Series], sends: Sends, edits: list[dict]) -> Report:
    out, dump = site / "sorted", site / "dump"
    report = Report(files_sent=sends.files)
    for record in edits:
        if record["kind"] == "skipped":
            report.skipped[record["why"]] += 1
            continue
        report.edits[record["kind"]] += 1
        if record["kind"] in ("rename-to-deleted", "move-into-name") and not record.get("renamed"):
            report.renames_refused += 1
    for entry in sends.log:
        report.sends[entry["kind"]] += 1
        report.sends_failed += entry["code"] != 0

    # what each instance is, and when its last send began
    sop_series: dict[str, int] = {}
    sop_identity: dict[str, str] = {}
    last_send: dict[str, float] = {}
    for entry in sends.log:
        series = pool[entry["series"]]
        for sop, ident in zip(series.sops, series.identities, strict=True):
            sop_series[sop], sop_identity[sop] = entry["series"], ident
            last_send[sop] = entry["start"]
    report.instances_sent = len(last_send)

    db = sqlite3.connect(out / STATE / "journal.sqlite3")
    rows = db.execute("SELECT outcome, time, sop_uid, sha256, dest, reason, done FROM outcomes ORDER BY id").fetchall()
    db.close()
    handled: dict[str, float] = {}
    last_row: dict[str, tuple] = {}
    last_left: dict[str, str] = {}
    for outcome, stamp, sop, _, _, reason, done in rows:
        report.journal[outcome] += 1
        if sop:
            last_row[sop] = (outcome, stamp)
            if outcome == "left":
                last_left[sop] = reason
        if outcome in ("sorted", "duplicate") and done and sop:
            handled[sop] = max(handled.get(sop, 0.0), epoch(stamp))

    removed_at: dict[str, list[float]] = defaultdict(list)
    removed_identity_at: dict[str, list[float]] = defaultdict(list)
    for record in edits:
        for entry in record.get("removed", []):
            removed_at[entry["sop"]].append(entry["t"])
            removed_identity_at[entry["identity"]].append(entry["t"])

    tree = scan(out)
    in_quarantine = scan(site / "quarantine") if (site / "quarantine").exists() else []
    quarantined(site / "quarantine")  # every quarantined file has its reason
    report.quarantined = len(in_quarantine)
    report.stuck = scan(dump) if dump.exists() else []
    present = {f.sop for f in [*tree, *in_quarantine, *report.stuck]}
    present_identity = {f.identity for f in [*tree, *in_quarantine, *report.stuck]}
    report.in_tree = len({f.sop for f in tree})

    for sop in sorted(last_send):
        since = max(last_send[sop], handled.get(sop, 0.0))
        if sop not in present:
            if any(t >= since for t in removed_at.get(sop, [])):
                report.deleted_after_send += 1
            else:
                report.lost.append(sop)
        ident = sop_identity[sop]
        if ident not in present_identity and not any(t >= since for t in removed_identity_at.get(ident, [])):
            report.lost_identity += 1
    for sop in report.lost[:8]:
        series = pool[sop_series[sop]]
        outcome, stamp = last_row.get(sop, ("no journal row", ""))
        removed = removed_at.get(sop)
        report.details.append(
            f"lost: {series.folder} instance {series.sops.index(sop) + 1} (series ...{series.uid[-6:]}): "
            f"last journal row '{outcome}' at {stamp[11:23]}, last send began "
            f"{time.strftime('%H:%M:%S', time.gmtime(last_send[sop]))}.{int(last_send[sop] * 1000) % 1000:03d}"
            + (f", removed by the editor at {', '.join(time.strftime('%H:%M:%S', time.gmtime(t)) for t in removed)}"
               if removed else ", never removed by the editor"))

    by_folder: dict[str, Counter] = defaultdict(Counter)
    by_sop: dict[str, list[str]] = defaultdict(list)
    for f in tree:
        by_folder[str(Path(f.rel).parent)][f.series] += 1
        by_sop[f.sop].append(f.rel)
    report.mixed = {folder: dict(series) for folder, series in by_folder.items() if len(series) > 1}
    report.twice = {sop: paths for sop, paths in by_sop.items() if len(paths) > 1}
    report.twice_one_folder = sum(len({str(Path(p).parent) for p in paths}) < len(paths)
                                  for paths in report.twice.values())
    reasons = Counter(last_left[f.sop] for f in report.stuck if f.sop in last_left)
    for reason, count in reasons.most_common(3):
        report.details.append(f"stuck: {count} files, left by serve with: {reason}")
    unknown = [f.rel for f in tree if f.sop not in last_send]
    if unknown:
        report.details.append(f"{len(unknown)} files in the tree that were never sent: {unknown[:3]}")

    # journal duplicate rows: the file they name holds that content now, or the editor
    # removed it (or moved its folder, then removed it) after the row
    events = sorted(
        [(e["t"], "removed", e["path"], e["sha256"]) for r in edits for e in r.get("removed", [])]
        + [(r["renamed"][2], "renamed", r["renamed"][0], r["renamed"][1]) for r in edits if r.get("renamed")])
    now = {f.rel: f.sha256 for f in tree}
    for outcome, stamp, _, sha, dest, _, done in rows:
        if outcome != "duplicate" or not done:
            continue
        path, moment, ok = str(Path(dest).relative_to(out)), epoch(stamp), False
        for t, kind, a, b in events:
            if t < moment:
                continue
            if kind == "renamed" and (path == a or path.startswith(a + "/")):
                path = b + path[len(a):]
            elif kind == "removed" and path == a:
                ok = b == sha
                if not ok:
                    report.false_duplicates.append((str(Path(dest).relative_to(out)),
                                                    "its file held other content when the editor removed it"))
                break
        else:
            ok = now.get(path) == sha
            if not ok:
                why = "holds other content" if path in now else "is not there, and the editor did not remove it"
                report.false_duplicates.append((str(Path(dest).relative_to(out)), why))
    return report


def print_report(report: Report, seconds: float) -> None:
    edits = sum(report.edits.values())
    print(f"\nedits: {edits} ({', '.join(f'{k} {report.edits[k]}' for k in KINDS)}); "
          f"{sum(report.skipped.values())} skipped (nothing fitted), {report.renames_refused} renames refused "
          "(the name was taken again)")
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(report.sends.items()))
    print(f"sends: {sum(report.sends.values())} series ({kinds}), "
          f"{report.files_sent} files, {report.instances_sent} instances; {report.sends_failed} storescu failures")
    print(f"journal rows: {', '.join(f'{k} {v}' for k, v in sorted(report.journal.items()))}")
    print(f"at the end: {report.in_tree} instances in the tree, {report.deleted_after_send} removed by the editor "
          f"after their last send, {report.quarantined} quarantined\n")
    print("| measure | count |\n|---|---:|")
    print(f"| files sent | {report.files_sent} |")
    print(f"| lost (by SOPInstanceUID) | {len(report.lost)} |")
    print(f"| lost (by data-set identity) | {report.lost_identity} |")
    print(f"| stuck in the dump: files (instances) | {len(report.stuck)} ({len({f.sop for f in report.stuck})}) |")
    print(f"| mixed series folders | {len(report.mixed)} |")
    print(f"| stored twice (of them in one folder) | {len(report.twice)} ({report.twice_one_folder}) |")
    print(f"| false duplicates in the journal | {len(report.false_duplicates)} |")
    print()
    for line in report.details:
        print(line)
    for folder, series in list(report.mixed.items())[:5]:
        print(f"mixed: {folder}: " + ", ".join(f"{n} files of series ...{uid[-6:]}" for uid, n in series.items()))
    if report.stuck:
        print(f"stuck: {len(report.stuck)} files in the dump, of {len({f.series for f in report.stuck})} series")
    for paths in list(report.twice.values())[:3]:
        print(f"twice: {' and '.join(paths)}")
    for dest, why in report.false_duplicates[:5]:
        print(f"false duplicate: {dest} {why}")
    verdict = "FAILED: something lost, stuck or mixed" if report.failed else "passed"
    print(f"\n{seconds:.0f} s; {verdict}")


def _dump_empty(dump: Path) -> bool:
    return not any(name != ".dumpwatch.lock" for name in os.listdir(dump))


def _settle(dump: Path, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not _dump_empty(dump) and time.monotonic() < deadline:
        time.sleep(0.1)


class Site:
    """storescp and serve on a fresh site (tests/dcmtk.py's helpers), stopped on leaving."""

    def __init__(self, folder: Path):
        self.folder, self.out, self.dump = folder, folder / "sorted", folder / "dump"
        self.edits_log = folder / "edits.jsonl"
        self.cfg = write_config(folder)

    def __enter__(self) -> Site:
        self.scp = Storescp(self.cfg)
        self.serve = Serve(self.cfg)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self.serve.process.poll() is None:
                code = self.serve.stop()
                if code != 0:
                    print(f"serve exited {code}:\n{self.serve.output()[-2000:]}")
        finally:
            if self.serve.process.poll() is None:
                self.serve.process.kill()
            self.scp.stop()


def campaign(args: argparse.Namespace, base: Path, pool: list[Series], rng: random.Random) -> Report:
    """The random campaign: a steady send, the editor process beside it."""
    site = Site(base / "site")
    with site:
        context = multiprocessing.get_context("fork")
        stop = context.Event()
        edit = context.Process(target=editor, args=(str(site.out), str(site.edits_log), args.seed * 7919 + 1,
                                                    args.edit_pause, stop))
        edit.start()
        try:
            sends = send(site.scp.port, pool, site.folder, site.edits_log, rng, args.rounds, args.seconds,
                         args.send_pause)
        finally:
            stop.set()
            edit.join(timeout=60)
            if edit.is_alive():
                edit.kill()
        print(f"sent for {sends.log[-1]['end'] - sends.log[0]['start']:.0f} s; waiting for the dump to empty",
              flush=True)
        _settle(site.dump, args.settle)
    failed = [s for s in sends.log if s["code"]]
    if failed:
        print(f"storescu failed {len(failed)} times; the first: {failed[0]['output']}")
    return check(site.folder, pool, sends, read_edits(site.edits_log))


def known(name: str, base: Path, pool: list[Series], per_slot: int, settle: float) -> Report:
    """The two known faults, scripted (the random campaign's check must find them):

    swap: series X sorts into 001-gre, Y (same number, name and sizes) into 001-gre_2; by
    hand `rm -rf 001-gre; mv 001-gre_2 001-gre`; X is sent again.
    delete: series A and B sorted; one file of A and the whole folder of B removed by hand;
    both sent again."""
    site = Site(base / name)
    sends = Sends()
    edits: list[dict] = []

    def send_series(*numbers: int) -> None:
        for number in numbers:
            begin = time.time()
            process = storescu(site.scp.port, pool[number].files, site.folder, wait=False)
            output, _ = process.communicate(timeout=120)
            sends.log.append({"series": number, "start": begin, "end": time.time(), "kind": "scripted",
                              "code": process.returncode, "output": output[-500:]})
            sends.files += len(pool[number].files)
            _settle(site.dump, 10)

    def folder_of(number: int) -> str:
        for study, names in _folders(site.out).items():
            for folder in names:
                if _series_of(site.out, f"{study}/{folder}") == pool[number].uid:
                    return f"{study}/{folder}"
        raise AssertionError(f"series {number} is not in the tree")

    with site:
        if name == "swap":
            x, y = 0, 1  # the same study, SeriesNumber and SeriesDescription
            send_series(x, y)
            gone, kept = folder_of(x), folder_of(y)
            removed = _remove_folder(site.out, gone)
            moved = _rename(site.out, kept, gone)
            edits.append({"kind": "rename-to-deleted", "folder": gone, "removed": removed,
                          "renamed": [kept, gone, moved], "series": [pool[x].uid, pool[y].uid]})
            print(f"  {name}: X in {gone}, Y in {kept}; rm -rf {Path(gone).name}; mv {Path(kept).name} "
                  f"{Path(gone).name}; X sent again", flush=True)
            send_series(x)
        else:
            a, b = 0, per_slot  # two series of one study, of different series names
            send_series(a, b)
            folder_a, folder_b = folder_of(a), folder_of(b)
            first = sorted(os.listdir(site.out / folder_a))[4]
            edits.append({"kind": "delete-file", "removed": [_remove_file(site.out, f"{folder_a}/{first}")]})
            edits.append({"kind": "delete-series", "folder": folder_b, "removed": _remove_folder(site.out, folder_b)})
            print(f"  {name}: rm {folder_a}/{first}; rm -rf {folder_b}; both series sent again", flush=True)
            send_series(a, b)
        _settle(site.dump, settle)
    return check(site.folder, pool, sends, edits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=60, help="series sends at most")
    parser.add_argument("--seconds", type=float, default=60, help="sending time at most")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--patients", type=int, default=2, help="study folders")
    parser.add_argument("--per-slot", type=int, default=3,
                        help="series sharing each SeriesNumber + SeriesDescription (3 slots a study)")
    parser.add_argument("--per-series", type=int, default=10, help="files a series")
    parser.add_argument("--send-pause", type=float, default=0.2, help="mean seconds between sends")
    parser.add_argument("--edit-pause", type=float, default=0.3, help="mean seconds between edits")
    parser.add_argument("--settle", type=float, default=30, help="seconds to wait for the dump to empty at the end")
    parser.add_argument("--keep", type=Path, help="make the site here and keep it (default: a temporary folder)")
    parser.add_argument("--known", action="store_true",
                        help="instead: the two known faults, scripted (swap, delete), to check the check")
    args = parser.parse_args()
    started = time.monotonic()
    print(f"edit campaign: seed {args.seed}, {args.patients} studies x {len(SLOTS)} series names x "
          f"{args.per_slot} series of {args.per_series} files; at most {args.rounds} sends, {args.seconds:.0f} s",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="dumpwatch-edit-") as scratch:
        base = Path(scratch)
        if args.keep:
            shutil.rmtree(args.keep, ignore_errors=True)
            args.keep.mkdir(parents=True)
            base = args.keep
        rng = random.Random(args.seed)
        pool = make_pool(base / "pool", rng, args.patients, args.per_slot, args.per_series)
        if args.known:
            failed = False
            for name in ("swap", "delete"):
                report = known(name, base, pool, args.per_slot, min(args.settle, 15))
                print_report(report, time.monotonic() - started)
                failed |= report.failed
            sys.exit(1 if failed else 0)
        report = campaign(args, base, pool, rng)
    print_report(report, time.monotonic() - started)
    sys.exit(1 if report.failed else 0)


if __name__ == "__main__":
    main()
