"""Fault campaigns: break dumpwatch on purpose, many times, and count what survives.

Shared by tests/test_campaigns.py (short runs in `make test`) and bench/kill_campaign.py (the long
runs whose figures are in docs/reliability.md). Every campaign ends with check(): each input
is in the sorted tree exactly once, whole (or in the quarantine with its reason), nothing is
left half-written in dir_out, and the journal agrees with the tree.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import generate_uid

from dumpwatch.dicomfile import read_dicom
from dumpwatch.keys import new_uid

from corpus import make_corpus
from helpers import assert_series_agree

REPO = Path(__file__).resolve().parents[1]

FIELDMAP = "siemens_fieldmap/2_gre_field_magph"
KEY = "00112233445566778899aabbccddeeff" * 2


@dataclass
class Inputs:
    """What went into the dump: {name: (sha256, SOPInstanceUID)}, and the names that must
    end in the quarantine."""

    files: dict[str, tuple[str, str]] = field(default_factory=dict)
    bad: set[str] = field(default_factory=set)


def corpus_cache(files: int) -> Path:
    """Generated MR files (tests/corpus.py), made once (in bench/out, where the long campaigns
    find them too) and copied for every round."""
    folder = REPO / "bench" / "out" / f"campaign-corpus-{files}"
    if not folder.is_dir() or len(os.listdir(folder)) != files:
        shutil.rmtree(folder, ignore_errors=True)
        make_corpus(folder, files, "mr", per_series=100)
    return folder


def make_inputs(dump: Path, testdata: Path, files: int, fieldmaps: int, seed: int) -> Inputs:
    """files generated MR files, fieldmaps copies of the Siemens field map series (both
    echoes: the first echo's files are renamed when the second arrives), each copy a
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
    out, quarantine = site / "sorted", site / "quarantine"
    assert_dump_empty(site / "dump")
    placed = tree_sops(out)
    key = bytes.fromhex(KEY)
    wanted = {new_uid(key, sop) if anonymise else sop: sha for sha, sop in inputs.files.values()}
    assert set(placed) == set(wanted), (f"{len(set(wanted) - set(placed))} inputs missing from the tree, "
                                        f"{len(set(placed) - set(wanted))} files that were never sent")
    if not anonymise:
        changed = [sop for sop, sha in placed.items() if wanted[sop] != sha]
        assert not changed, f"{len(changed)} files in the tree differ from what was received"
    kept = quarantined(quarantine)
    assert len(kept) == len(inputs.bad), f"quarantine holds {kept}, expected {sorted(inputs.bad)}"
    assert_journal_agrees(out)


def assert_dump_empty(dump: Path) -> None:
    left = [name for name in os.listdir(dump) if name != ".dumpwatch.lock"] if dump.exists() else []
    assert not left, f"files still in the dump: {left[:5]}"


def tree_sops(out: Path) -> dict[str, str]:
    """{SOPInstanceUID: sha256} of the sorted tree; fails on a hidden, partial or twice-sorted file,
    or a staged copy left behind."""
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
    assert os.listdir(out / ".dumpwatch" / "tmp") == [], "staged copies left behind"
    return placed


def quarantined(quarantine: Path) -> dict[str, str]:
    """{name: first line of its reason} of the quarantine; fails on a file without its reason."""
    if not quarantine.exists():
        return {}
    kept = sorted(p.name for p in quarantine.iterdir() if not p.name.endswith(".reason.txt"))
    reasons = sorted(p.name for p in quarantine.glob("*.reason.txt"))
    assert reasons == sorted(name + ".reason.txt" for name in kept), "a quarantined file without its reason"
    return {name: (quarantine / (name + ".reason.txt")).read_text().splitlines()[0] for name in kept}


def assert_journal_agrees(out: Path) -> None:
    db = sqlite3.connect(out / ".dumpwatch" / "journal.sqlite3")
    try:
        rows = db.execute("SELECT outcome, dest, done FROM outcomes").fetchall()
    finally:
        db.close()
    assert all(done for _, _, done in rows), "journal rows still under way"
    assert_series_agree(out / ".dumpwatch" / "journal.sqlite3")
    sorted_rows = [dest for outcome, dest, _ in rows if outcome == "sorted"]
    assert len(sorted_rows) == len(set(sorted_rows)), "a file journalled as sorted twice"
    on_disk = {str(p) for p in out.rglob("*") if p.is_file() and ".dumpwatch" not in p.relative_to(out).parts}
    assert set(sorted_rows) == on_disk, "the journal and the tree disagree"


# -- crash anywhere ------------------------------------------------------------------------------


# The chain's named crash points (dumpwatch/failpoints.py): how many times each is reached
# per file at most, and whether in a worker process (one of two) or in the main one. A kill
# at the n-th hit, n drawn below that, lands somewhere in the run.
STEPS = {
    "read": (1.0, True),  # the header read
    "prepared": (1.0, True),  # checked, anonymised, named
    "journal-begun": (1 / 64, False),  # once a batch (64 files at most): the journal holds the plans
    "renamed": (0.0, False),  # an echo-1 file renamed _01 (a few dozen in each field map copy)
    "placed": (1.0, False),  # linked or renamed into the tree
    "unlink-source": (1.0, False),  # a rewritten file's source removed
    "sources-removed": (1 / 64, False),  # once a batch: before the journal is told
    "quarantine-slot": (0.0, False),  # a bad file's name in the quarantine chosen (twice a round)
    "quarantine-reserved": (0.0, False),  # its reason written
    "quarantined": (0.0, False),  # moved there
}
TIMER = "at a random moment"


def crash_points(anonymise: bool) -> tuple[str, ...]:
    """The crash points a run reaches: only a rewritten file has a source removed after placing."""
    return tuple(step for step in STEPS if anonymise or step != "unlink-source")


@dataclass
class Kills:
    """How a campaign went: kills, where each landed, and how far each run had got."""

    kills: int = 0
    runs: int = 0
    progress: list[float] = field(default_factory=list)  # share of the inputs out of the dump at each kill
    where: dict[str, int] = field(default_factory=dict)  # kills by crash point, or TIMER
    seconds: float = 0.0

    def add(self, where: str, progress: float) -> None:
        self.kills += 1
        self.progress.append(progress)
        self.where[where] = self.where.get(where, 0) + 1

    def merge(self, other: Kills) -> None:
        self.kills += other.kills
        self.runs += other.runs
        self.progress += other.progress
        self.seconds += other.seconds
        for where, count in other.where.items():
            self.where[where] = self.where.get(where, 0) + count


def _armed(rng: random.Random, remaining: int, steps: tuple[str, ...]) -> tuple[str, str] | None:
    """Half the runs: a crash point and the hit that kills, drawn so that it is likely reached."""
    if not steps or rng.random() < 0.5:
        return None
    step = rng.choice(steps)
    per_file, in_worker = STEPS[step]
    reach = max(8 if step == "renamed" else 2, int(per_file * remaining / (2 if in_worker else 1)))
    return step, f"{step}={rng.randint(1, reach)}"


STARTUP = 0.25  # seconds from a dumpwatch command to its first file, on the 2-core machine


def _moment(rng: random.Random, work: float) -> float:
    """When to kill a run that has `work` seconds of sorting to do: one kill in five during
    start-up (recovery from the kill before), the others spread evenly over the sorting."""
    if rng.random() < 0.2:
        return rng.uniform(0.02, STARTUP)
    return STARTUP + rng.uniform(0, work)


def _dumpwatch(site: Path, *args: str, failpoint: str = "") -> subprocess.Popen:
    """dumpwatch as its own process, its output appended to site/dumpwatch.out."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if failpoint:
        env["DUMPWATCH_FAILPOINTS"] = failpoint
    with open(site / "dumpwatch.out", "ab") as log:
        log.write(f"--- dumpwatch {' '.join(args)} {failpoint}\n".encode())
        return subprocess.Popen([sys.executable, "-m", "dumpwatch", "--config", str(site / "dumpwatch.cfg"), *args],
                                stdout=log, stderr=subprocess.STDOUT, env=env)


def _remaining(dump: Path) -> int:
    try:
        return sum(1 for name in os.listdir(dump) if name != ".dumpwatch.lock")
    except FileNotFoundError:
        return 0


def sort_once_kills(site: Path, inputs: Inputs, rng: random.Random, per_file: float,
                    steps: tuple[str, ...] = ()) -> Kills:
    """Run sort-once over the dump, kill -9 it, again and again, until a run ends by itself.
    A run is killed at a random moment (see _moment: per_file seconds for each file still in
    the dump), or, for half the runs when steps are given, by itself at the n-th hit of one
    of those crash points."""
    total = len(inputs.files) + len(inputs.bad)
    result = Kills()
    started = time.monotonic()
    while True:
        remaining = _remaining(site / "dump")
        armed = _armed(rng, remaining, steps)
        process = _dumpwatch(site, "sort-once", str(site / "dump"), failpoint=armed[1] if armed else "")
        result.runs += 1
        try:
            code = process.wait(timeout=120 if armed else _moment(rng, per_file * remaining))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            result.add(TIMER, 1 - _remaining(site / "dump") / total)
            continue
        if armed and code not in (0, 3):  # killed at its crash point: in itself (-9) or in a worker (1)
            assert code in (-signal.SIGKILL, 1), f"sort-once exited {code} with {armed[1]}"
            result.add(armed[0], 1 - _remaining(site / "dump") / total)
            continue
        assert code in (0, 3), f"sort-once exited {code}"
        if _remaining(site / "dump") == 0:
            break
    result.seconds = time.monotonic() - started
    return result


def serve_kills(site: Path, source: Path, inputs: Inputs, rng: random.Random, budget: float,
                kills: int, steps: tuple[str, ...] = (), paced: bool = False) -> Kills:
    """serve watches the dump while a feeder writes the inputs into it in bursts (each file
    closed in the dump, as storescp does); serve is killed -9 at random moments, at most
    budget seconds apart, or, for half its starts when steps are given, by itself at the n-th
    hit of one of those crash points (or, if it is not reached, by the timer, given four
    times as long); it is started again at once, as a supervisor does.
    If paced, files arrive no faster than the kills come, so that the kills spread over the
    whole arrival. Ends when every input has arrived, serve has been killed at least `kills`
    times, and the dump is empty; then a SIGTERM must stop it with exit 0."""
    dump = site / "dump"
    dump.mkdir(parents=True, exist_ok=True)
    names = sorted(os.listdir(source), key=lambda n: rng.random())
    total = len(names)
    result = Kills()
    started = time.monotonic()
    fed = 0

    def start() -> tuple[subprocess.Popen, tuple[str, str] | None, float]:
        armed = _armed(rng, max(total - fed, 50), steps) if result.kills < kills else None
        result.runs += 1
        process = _dumpwatch(site, "serve", failpoint=armed[1] if armed else "")
        return process, armed, time.monotonic() + rng.uniform(0.2, budget) * (4 if armed else 1)

    process, armed, next_kill = start()
    while True:
        allowed = total * (result.kills + 1) / kills if paced else total
        for _ in range(rng.randint(1, 20)):  # files arrive in bursts
            if fed < min(total, allowed):
                name = names[fed]
                with open(source / name, "rb") as reader, open(dump / name, "wb") as writer:
                    shutil.copyfileobj(reader, writer)  # written and closed in the dump: an event
                if name == "MR.truncated":  # received long ago: quarantined, not waited for
                    os.utime(dump / name, (1e9, 1e9))
                os.unlink(source / name)
                fed += 1
        time.sleep(rng.uniform(0, 0.05))
        code = process.poll()
        if code is not None:  # killed at its crash point: in itself (-9), or a worker (serve exits 1)
            assert armed and code in (-signal.SIGKILL, 1), f"serve exited by itself with {code} ({armed})"
            result.add(armed[0], fed / total)
            process, armed, next_kill = start()
        elif time.monotonic() >= next_kill:
            process.kill()
            process.wait()
            result.add(TIMER, fed / total)
            process, armed, next_kill = start()
        if fed == total and result.kills >= kills and _remaining(dump) == 0:
            if not armed:
                break
            process.kill()  # its crash point not yet reached: the last run must be clean
            process.wait()
            result.add(TIMER, 1.0)
            process, armed, next_kill = start()
        if time.monotonic() - started > 1200:
            raise AssertionError(f"not settled after 1200 s: {_remaining(dump)} files in the dump")
    # A stop before serve is up (Python's start-up, 0.3 s) ends it by the signal's default
    # action, with nothing in hand; a supervisor's stop usually finds it up: as here.
    log = site / "dumpwatch.out"
    deadline = time.monotonic() + 30
    while "watching " not in log.read_text(errors="replace").rsplit("--- dumpwatch", 1)[-1] \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    code = process.wait(timeout=60)
    assert code == 0, f"serve exited {code} on SIGTERM: " + log.read_text(errors="replace")[-3000:]
    result.seconds = time.monotonic() - started
    return result


# -- storescp killed mid-association -----------------------------------------------------------


def storescp_kills(cfg: Path, files: list[Path], rng: random.Random, kills: int, budget: float) -> Kills:
    """A scanner sends the files again and again; storescp (and the children it forked for
    associations) is killed -9 at a random moment of each send and started again, as a
    supervisor does, while serve sorts. The files written when the kill came are left
    truncated in the dump. Then one whole send. Each kill comes within budget seconds of the
    send's start (less, once a send went through sooner). Progress: the moment / budget."""
    from dcmtk import Serve, Storescp, storescu  # the end-to-end helpers: pytest's, and DCMTK's

    work = cfg.parent
    result = Kills()
    started = time.monotonic()
    scp, serve = Storescp(cfg), Serve(cfg)
    try:
        while result.kills < kills:
            sender = storescu(scp.port, files, work, wait=False)
            moment = rng.uniform(0.05, budget)
            time.sleep(moment)
            if sender.poll() is not None:  # the whole send went through before the kill: aim sooner
                budget = max(0.1, moment)
                continue
            scp.kill(signal.SIGKILL)
            sender.communicate(timeout=60)
            result.add(TIMER, moment / budget)
            scp = Storescp(cfg)
            result.runs += 1
        storescu(scp.port, files, work)  # asserts that the whole send went through
        dump = Path(cfg.parent / "dump")
        deadline = time.monotonic() + 120  # truncated files wait incomplete_timeout, then go
        while _remaining(dump) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert serve.stop() == 0, serve.output()[-3000:]
    finally:
        if serve.process.poll() is None:
            serve.process.kill()
        scp.stop()
    result.seconds = time.monotonic() - started
    return result


# -- lost events ---------------------------------------------------------------------------------

QUEUE = Path("/proc/sys/fs/inotify/max_queued_events")
QUEUE_LOCK = Path(tempfile.gettempdir()) / "dumpwatch-tests-inotify-queue.lock"


def can_shrink_queue() -> str:
    """'' if this process may lower the kernel's inotify queue limit, else why not."""
    try:
        limit = QUEUE.read_text()
        QUEUE.write_text(limit)
    except OSError as exc:
        return f"cannot write {QUEUE}: {exc.strerror} (needs root, and /proc/sys writable)"
    return ""


@dataclass
class Flood:
    files: int
    written_in: float  # seconds the flood took to write
    sorted_after: float  # seconds from the last file written to the dump empty
    overflowed: bool  # serve saw the overflow (and swept at once)


def children(pid: int) -> list[int]:
    """The processes whose parent is pid (serve's workers)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def flood(site: Path, source: Path, queue: int | None, hold_until: str = "") -> Flood:
    """Start serve while the kernel's inotify queue limit is `queue` events (the limit applies
    to a watch made while it holds; it is put back as soon as serve watches), then write every
    file of source into the dump as fast as one process can: the queue overflows and events
    are lost. Returns how long the sweep took to sort what the events missed.

    hold_until: serve's worker processes are stopped (SIGSTOP) while the files are written,
    and go on once serve's log says this: on any machine, files arrive faster than serve
    sorts them."""
    dump = site / "dump"
    dump.mkdir(parents=True, exist_ok=True)
    log = site / "dumpwatch.out"
    # The limit is the whole machine's: a second test run on it (another checkout's) must not
    # read the lowered limit as the one to put back, nor start its serve while it holds.
    with open(QUEUE_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        old = QUEUE.read_text()
        if queue is not None:  # else the kernel's limit as it is
            QUEUE.write_text(f"{queue}\n")
        try:
            process = _dumpwatch(site, "serve")
            deadline = time.monotonic() + 30
            while "watching " not in log.read_text(errors="replace") and time.monotonic() < deadline:
                assert process.poll() is None, log.read_text(errors="replace")
                time.sleep(0.02)
        finally:
            if queue is not None:
                QUEUE.write_text(old)
    held = children(process.pid) if hold_until else []
    try:
        assert held or not hold_until, "serve has no worker processes to hold"
        for pid in held:
            os.kill(pid, signal.SIGSTOP)
        try:
            names = sorted(os.listdir(source))
            started = time.monotonic()
            for name in names:
                with open(source / name, "rb") as reader, open(dump / name, "wb") as writer:
                    writer.write(reader.read())
            written = time.monotonic()
            deadline = written + 60
            while hold_until and hold_until not in log.read_text(errors="replace"):
                assert time.monotonic() < deadline, f"serve never said {hold_until!r}"
                time.sleep(0.02)
        finally:
            for pid in held:
                os.kill(pid, signal.SIGCONT)
        while _remaining(dump) and time.monotonic() - written < 300:
            time.sleep(0.01)
        done = time.monotonic()
        assert _remaining(dump) == 0, f"{_remaining(dump)} files still in the dump after 300 s"
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
    assert code == 0, log.read_text(errors="replace")[-3000:]
    return Flood(len(names), written - started, done - written,
                 "sweeping the dump: inotify queue overflow" in log.read_text(errors="replace"))
