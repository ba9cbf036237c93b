"""Fault campaigns: break dumpwatch on purpose, many times, and count what survives.

Shared by tests/test_campaigns.py (short runs in `make test`) and bench/campaign.py (the long
runs whose figures are in docs/reliability.md). Every campaign ends with check(): each input
is in the sorted tree exactly once, whole (or in the quarantine with its reason), nothing is
left half-written in dir_out, and the journal agrees with the tree.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import generate_uid

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from dumpwatch.dicomfile import read_dicom  # noqa: E402
from dumpwatch.keys import new_uid  # noqa: E402

from corpus import make_corpus  # noqa: E402

FIELDMAP = "siemens_fieldmap/2_gre_field_magph"
KEY = "00112233445566778899aabbccddeeff" * 2


@dataclass
class Inputs:
    """What went into the dump: {name: (sha256, SOPInstanceUID)}, and the names that must
    end in the quarantine."""

    files: dict[str, tuple[str, str]] = field(default_factory=dict)
    bad: set[str] = field(default_factory=set)


def corpus_cache(files: int) -> Path:
    """Generated MR files (bench/corpus.py), made once and copied for every round."""
    folder = REPO / "bench" / "out" / f"campaign-corpus-{files}"
    if not folder.is_dir() or len(os.listdir(folder)) != files:
        shutil.rmtree(folder, ignore_errors=True)
        make_corpus(folder, files, "mr", per_series=100)
    return folder


def make_inputs(dump: Path, testdata: Path, files: int, fieldmaps: int, seed: int) -> Inputs:
    """files generated MR files, fieldmaps copies of the Siemens field map series (72 files,
    two echoes: the first echo's files are renamed when the second arrives), each copy a
    study of its own, and two bad files: one truncated long ago, one not DICOM at all."""
    dump.mkdir(parents=True, exist_ok=True)
    inputs = Inputs()
    if files:
        for path in sorted(corpus_cache(files).iterdir()):
            shutil.copyfile(path, dump / path.name)
    rng = random.Random(seed)
    originals = sorted((testdata / FIELDMAP).iterdir())
    for copy in range(fieldmaps):
        study, series, patient = generate_uid(), generate_uid(), f"fmap-{seed}-{copy}"
        for path in originals:
            ds = dcmread(path)
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.PatientID = study, series, patient
            ds.PatientName = f"Field^Map{seed}x{copy}"
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.save_as(dump / f"MR.{ds.SOPInstanceUID}", enforce_file_format=False)
    names = sorted(os.listdir(dump))
    rng.shuffle(names)  # arrival order as a scanner's does not follow names
    for name in names:
        data = (dump / name).read_bytes()
        sop = str(dcmread(dump / name, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)
        inputs.files[name] = (hashlib.sha256(data).hexdigest(), sop)
    cut = dump / "MR.truncated"
    cut.write_bytes((testdata / FIELDMAP / "e1_03.dcm").read_bytes()[:40_000])
    os.utime(cut, (1e9, 1e9))  # long since received: quarantined, not waited for
    (dump / "MR.notdicom").write_bytes(b"not a DICOM file\n" * 30)
    inputs.bad = {"MR.truncated", "MR.notdicom"}
    return inputs


def write_config(site: Path, anonymise: bool, **extra: object) -> Path:
    site.mkdir(parents=True, exist_ok=True)
    lines = {"dir_dump": "dump", "dir_out": "sorted", "dir_quarantine": "quarantine", "workers": 2,
             "incomplete_timeout": 2, **extra}
    if anonymise:
        key = site / "anon.key"
        key.write_text(KEY + "\n")
        key.chmod(0o600)
        lines |= {"anon_profile": "basic", "anon_key": "anon.key"}
    path = site / "dumpwatch.cfg"
    path.write_text("".join(f"{k} = {v}\n" for k, v in lines.items()))
    return path


def check(site: Path, inputs: Inputs, anonymise: bool) -> None:
    """Every input exactly once in the tree, whole; the bad ones in the quarantine with their
    reasons; the dump empty; nothing staged or hidden in the tree; the journal true to it."""
    out, quarantine, dump = site / "sorted", site / "quarantine", site / "dump"
    left = [name for name in os.listdir(dump) if name != ".dumpwatch.lock"] if dump.exists() else []
    assert not left, f"files still in the dump: {left[:5]}"
    placed: dict[str, str] = {}
    for path in out.rglob("*"):
        if ".dumpwatch" in path.relative_to(out).parts:
            continue
        rel = str(path.relative_to(out))
        assert not path.name.startswith("."), f"a hidden file in the tree: {rel}"
        if path.is_file():
            dicom = read_dicom(str(path), None)  # whole, or it raises
            sop = str(dicom.ds.SOPInstanceUID)
            dicom.close()
            assert sop not in placed, f"{sop} twice in the tree: {placed[sop]} and {rel}"
            placed[sop] = hashlib.sha256(path.read_bytes()).hexdigest()
    key = bytes.fromhex(KEY)
    wanted = {new_uid(key, sop) if anonymise else sop: sha for sha, sop in inputs.files.values()}
    assert set(placed) == set(wanted), (f"{len(set(wanted) - set(placed))} inputs missing from the tree, "
                                        f"{len(set(placed) - set(wanted))} files that were never sent")
    if not anonymise:
        changed = [sop for sop, sha in placed.items() if wanted[sop] != sha]
        assert not changed, f"{len(changed)} files in the tree differ from what was received"
    assert os.listdir(out / ".dumpwatch" / "tmp") == [], "staged copies left behind"
    reasons = sorted(p.name for p in quarantine.glob("*.reason.txt")) if quarantine.exists() else []
    kept = sorted(p.name for p in quarantine.iterdir() if not p.name.endswith(".reason.txt")) \
        if quarantine.exists() else []
    assert len(kept) == len(inputs.bad), f"quarantine holds {kept}, expected {sorted(inputs.bad)}"
    assert reasons == sorted(name + ".reason.txt" for name in kept)
    db = sqlite3.connect(out / ".dumpwatch" / "journal.sqlite3")
    try:
        rows = db.execute("SELECT outcome, dest, done FROM outcomes").fetchall()
    finally:
        db.close()
    assert all(done for _, _, done in rows), "journal rows still under way"
    sorted_rows = [dest for outcome, dest, _ in rows if outcome == "sorted"]
    assert len(sorted_rows) == len(set(sorted_rows)), "a file journalled as sorted twice"
    on_disk = {str(p) for p in out.rglob("*") if p.is_file() and ".dumpwatch" not in p.relative_to(out).parts}
    assert set(sorted_rows) == on_disk, "the journal and the tree disagree"


# -- crash anywhere ------------------------------------------------------------------------------


@dataclass
class Kills:
    """How a campaign went: kills, and how far each run had got when it was killed."""

    kills: int = 0
    runs: int = 0
    progress: list[float] = field(default_factory=list)  # share of the inputs out of the dump at each kill
    seconds: float = 0.0


def _dumpwatch(site: Path, *args: str) -> subprocess.Popen:
    """dumpwatch as its own process, its output appended to site/dumpwatch.out."""
    with open(site / "dumpwatch.out", "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "dumpwatch", "--config", str(site / "dumpwatch.cfg"), *args],
                                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(REPO)})


def _remaining(dump: Path) -> int:
    try:
        return sum(1 for name in os.listdir(dump) if name != ".dumpwatch.lock")
    except FileNotFoundError:
        return 0


def sort_once_kills(site: Path, inputs: Inputs, rng: random.Random, per_file: float) -> Kills:
    """Run sort-once over the dump, kill -9 at a random moment, again and again, until a run
    ends by itself. Each kill comes at a moment drawn evenly from the time the run would
    take: start-up (0.3 s) plus per_file seconds for each file still in the dump."""
    total = len(inputs.files) + len(inputs.bad)
    result = Kills()
    started = time.monotonic()
    while True:
        process = _dumpwatch(site, "sort-once", str(site / "dump"))
        result.runs += 1
        try:
            code = process.wait(timeout=rng.uniform(0.02, 0.3 + per_file * _remaining(site / "dump")))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            result.kills += 1
            result.progress.append(1 - _remaining(site / "dump") / total)
            continue
        assert code in (0, 3), f"sort-once exited {code}"
        if _remaining(site / "dump") == 0:
            break
    result.seconds = time.monotonic() - started
    return result


def serve_kills(site: Path, source: Path, inputs: Inputs, rng: random.Random, budget: float,
                kills: int) -> Kills:
    """serve watches the dump while a feeder writes the inputs into it in bursts (each file
    closed in the dump, as storescp does); serve is killed -9 at random moments, at most
    budget seconds apart, and started again at once, as a supervisor does. Ends when every
    input has arrived, serve has been killed at least `kills` times, and the dump is empty."""
    dump = site / "dump"
    dump.mkdir(parents=True, exist_ok=True)
    names = sorted(os.listdir(source), key=lambda n: rng.random())
    total = len(names)
    result = Kills()
    started = time.monotonic()
    fed = 0
    process = _dumpwatch(site, "serve")
    result.runs += 1
    next_kill = time.monotonic() + rng.uniform(0.2, budget)
    while True:
        for _ in range(rng.randint(1, 20)):  # files arrive in bursts
            if fed < total:
                name = names[fed]
                with open(source / name, "rb") as reader, open(dump / name, "wb") as writer:
                    shutil.copyfileobj(reader, writer)  # written and closed in the dump: an event
                if name == "MR.truncated":  # received long ago: quarantined, not waited for
                    os.utime(dump / name, (1e9, 1e9))
                os.unlink(source / name)
                fed += 1
        time.sleep(rng.uniform(0, 0.05))
        if process.poll() is not None:
            raise AssertionError(f"serve exited by itself with {process.returncode}")
        if time.monotonic() >= next_kill:
            process.kill()
            process.wait()
            result.kills += 1
            result.progress.append(fed / total)
            process = _dumpwatch(site, "serve")
            result.runs += 1
            next_kill = time.monotonic() + rng.uniform(0.2, budget)
        if fed == total and result.kills >= kills and _remaining(dump) == 0:
            break
        if time.monotonic() - started > 600:
            raise AssertionError(f"not settled after 600 s: {_remaining(dump)} files in the dump")
    # A stop before serve is up (Python's start-up, 0.3 s) ends it by the signal's default
    # action, with nothing in hand; a supervisor's stop usually finds it up: as here.
    log = site / "dumpwatch.out"
    deadline = time.monotonic() + 30
    while log.read_text(errors="replace").count("watching ") < result.runs and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    code = process.wait(timeout=60)
    assert code == 0, f"serve exited {code} on SIGTERM: " + (site / "dumpwatch.out").read_text()[-3000:]
    result.seconds = time.monotonic() - started
    return result
