"""A file that costs more than any file may, or that kills the process reading it: quarantined
with its reason, while every other file is sorted and serve goes on, across restarts too."""

from __future__ import annotations

import io
import os
import shutil
import signal
import struct
import zlib
from pathlib import Path

import pytest
from dcmtk import Serve, wait_for, write_config
from pydicom import dcmread
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID, generate_uid

from dumpwatch.config import Config
from dumpwatch.outcomes import Prepared
from dumpwatch.sorter import Sorter
from dumpwatch.workers import Workers

from helpers import FIELDMAP, make_dicom, run_process, tree_of

DEFLATED = "1.2.840.10008.1.2.1.99"
MEMORY_LIMIT = 2 << 30  # address space for dumpwatch and each of its workers (prlimit --as)
BOMB_SIDE = 28378  # Rows = Columns: 28378 x 28378 x 2 bytes of pixel data, 1.5 GiB


def deflate_bomb(path: Path, template: Path, side: int = BOMB_SIDE) -> int:
    """A real MR header with side x side pixels of zeros, the data set deflated as a sender
    may send it (storescp accepts deflate): 1.5 MB on disk. Returns the inflated size."""
    ds = dcmread(template, stop_before_pixels=True)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Rows = ds.Columns = side
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=False)
    data = buffer.getvalue()
    header = data[144 + int.from_bytes(data[140:144], "little"):]
    ds.file_meta.TransferSyntaxUID = UID(DEFLATED)
    meta = io.BytesIO()
    write_file_meta_info(meta, ds.file_meta, enforce_standard=False)
    length = side * side * 2
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    with open(path, "wb") as out:
        out.write(b"\0" * 128 + b"DICM" + meta.getvalue())
        written = out.write(deflater.compress(header + struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, length)))
        zeros = bytes(1 << 24)
        for start in range(0, length, len(zeros)):
            written += out.write(deflater.compress(zeros[: min(len(zeros), length - start)]))
        written += out.write(deflater.flush())
        if written % 2:
            out.write(b"\0")
    return len(header) + 12 + length


@pytest.fixture(scope="module")
def bomb(tmp_path_factory, testdata) -> Path:
    path = tmp_path_factory.mktemp("bomb") / "MR.bomb"
    inflated = deflate_bomb(path, testdata / FIELDMAP / "e1_01.dcm")
    assert path.stat().st_size < 2_000_000 and inflated > 1_500_000_000
    return path


BOMB_REASON = "the deflated data set inflates to more than 256 MiB"  # dicomfile.INFLATED_MAX


def reason_of(quarantine: Path, name: str) -> str:
    return (quarantine / f"{name}.reason.txt").read_text().splitlines()[0]


def normal_files(dump: Path, template: Path, count: int) -> None:
    for number in range(1, count + 1):
        make_dicom(dump / f"MR.{number}", template, InstanceNumber=number)


# -- what one file may cost ------------------------------------------------------------------


def test_sort_once_quarantines_a_deflate_bomb_within_a_memory_limit(tmp_path, bomb, template_file):
    """1.5 MB that inflates to 1.5 GiB: pydicom would hold it several times over (5.2 GB
    seen). Under a 2 GiB limit, the inflated size is checked while inflating, chunk by chunk."""
    dump = tmp_path / "dump"
    normal_files(dump, template_file, 3)
    os.link(bomb, dump / "MR.bomb")
    result = run_process(
        "sort-once", str(dump), "--out", str(tmp_path / "out"), "--quarantine", str(tmp_path / "q"),
        prefix=("prlimit", f"--as={MEMORY_LIMIT}"),
    )
    assert result.returncode == 3, result.stdout + result.stderr
    assert reason_of(tmp_path / "q", "MR.bomb") == BOMB_REASON
    assert len(tree_of(tmp_path / "out")) == 3
    assert os.listdir(dump) == []


@pytest.mark.parametrize("anonymise", [False, True], ids=["plain", "anon_profile"])
def test_serve_quarantines_a_deflate_bomb_within_a_memory_limit(tmp_path, bomb, template_file, anonymise):
    extra = {"anon_profile": "basic"} if anonymise else {}
    cfg = write_config(tmp_path / "site", **extra)
    site = cfg.parent
    serve = Serve(cfg, prefix=("prlimit", f"--as={MEMORY_LIMIT}"))
    try:
        shutil.copyfile(bomb, site / "dump" / "MR.bomb")  # written and closed there, as storescp does
        normal_files(site / "dump", template_file, 3)
        quarantine = site / "quarantine"
        # The reason file is made (empty) before the file moves in, and written by then: wait
        # for the file itself.
        wait_for(lambda: len(tree_of(site / "sorted")) == 3
                 and [p for p in quarantine.glob("*") if not p.name.endswith(".reason.txt")]
                 or serve.process.poll() is not None, 60, "the bomb quarantined, the others sorted")
        assert serve.process.poll() is None, serve.output()
        [reason] = quarantine.glob("*.reason.txt")
        assert reason.read_text().splitlines()[0] == BOMB_REASON
    finally:
        code = serve.stop()
    assert code == 0, serve.output()


# -- a file that kills the process reading it ------------------------------------------------


def poisoned(how: str) -> dict[str, str]:
    """A failpoint (dumpwatch/failpoints.py) that kills each worker process reading a file
    named MR.poison with a real signal, as the out-of-memory killer or a crash in a C library
    would; with "alone", dumpwatch itself too, as it is about to try the file alone."""
    points = {"worker": "read~MR.poison", "segfault": "read~MR.poison=:SEGV",
              "alone": "read~MR.poison,alone~MR.poison"}
    return {"DUMPWATCH_FAILPOINTS": points[how]}


def test_serve_quarantines_a_file_that_kills_its_worker_and_goes_on(tmp_path, template_file, monkeypatch):
    cfg = write_config(tmp_path / "site")
    site = cfg.parent
    monkeypatch.setenv("DUMPWATCH_FAILPOINTS", poisoned("worker")["DUMPWATCH_FAILPOINTS"])
    serve = Serve(cfg)
    try:
        make_dicom(site / "dump" / "MR.poison", template_file, InstanceNumber=99)
        normal_files(site / "dump", template_file, 6)
        quarantine = site / "quarantine"
        wait_for(lambda: (quarantine / "MR.poison").exists() or serve.process.poll() is not None,
                 60, "the poison quarantined")  # its reason is written before it moves in
        assert serve.process.poll() is None, serve.output()
        assert reason_of(quarantine, "MR.poison") == (
            "it stopped the reading process twice (the second time alone: killed by signal 9, SIGKILL)")
        wait_for(lambda: len(tree_of(site / "sorted")) == 6, 30, "the other files sorted")
        make_dicom(site / "dump" / "MR.later", template_file, InstanceNumber=50)  # the fresh workers work
        wait_for(lambda: len(tree_of(site / "sorted")) == 7, 30, "a later file sorted")
        assert serve.process.poll() is None, serve.output()
        assert "a worker process died (killed by signal 9, SIGKILL)" in serve.output()
    finally:
        code = serve.stop()
    assert code == 0, serve.output()
    assert sorted(os.listdir(site / "dump")) == [".dumpwatch.lock"]


def test_a_restarted_serve_does_not_loop_on_a_file_that_stops_it(tmp_path, template_file, monkeypatch):
    """The file kills a worker, and then serve itself while it is tried alone (a supervisor
    restarts serve each time): the try is recorded before it, so the third start quarantines
    it without reading it again, and goes on."""
    cfg = write_config(tmp_path / "site")
    site = cfg.parent
    make_dicom(site / "dump" / "MR.poison", template_file, InstanceNumber=99)
    normal_files(site / "dump", template_file, 4)
    monkeypatch.setenv("DUMPWATCH_FAILPOINTS", poisoned("alone")["DUMPWATCH_FAILPOINTS"])
    for _start in (1, 2):
        serve = Serve(cfg, wait=False)
        assert serve.process.wait(timeout=60) == -signal.SIGKILL, serve.output()
        serve.log.close()
        assert (site / "dump" / "MR.poison").exists()
    serve = Serve(cfg)
    try:
        quarantine = site / "quarantine"
        wait_for(lambda: (quarantine / "MR.poison").exists() or serve.process.poll() is not None,
                 60, "the poison quarantined")  # its reason is written before it moves in
        assert serve.process.poll() is None, serve.output()
        assert reason_of(quarantine, "MR.poison") == "it stopped dumpwatch itself twice while it was read alone"
        wait_for(lambda: len(tree_of(site / "sorted")) == 4, 30, "the other files sorted")
    finally:
        code = serve.stop()
    assert code == 0, serve.output()
    assert not list((site / "sorted" / ".dumpwatch").glob("suspect-*")), "the record is gone with the file"


def test_sort_once_quarantines_a_file_that_crashes_its_worker(tmp_path, template_file):
    dump = tmp_path / "dump"
    make_dicom(dump / "MR.poison", template_file, InstanceNumber=99)
    normal_files(dump, template_file, 5)
    args = ("sort-once", str(dump), "--out", str(tmp_path / "out"), "--quarantine", str(tmp_path / "q"))
    result = run_process(*args, env=poisoned("segfault"))
    assert result.returncode == 3, result.stdout + result.stderr
    assert "stopped early" not in result.stdout
    assert reason_of(tmp_path / "q", "MR.poison") == (
        "it stopped the reading process twice (the second time alone: killed by signal 11, SIGSEGV)")
    assert len(tree_of(tmp_path / "out")) == 5
    assert os.listdir(dump) == []


def test_sort_once_run_again_does_not_loop_on_a_file_that_stops_it(tmp_path, template_file):
    dump = tmp_path / "dump"
    make_dicom(dump / "MR.poison", template_file, InstanceNumber=99)
    normal_files(dump, template_file, 5)
    args = ("sort-once", str(dump), "--out", str(tmp_path / "out"), "--quarantine", str(tmp_path / "q"))
    for _run in (1, 2):
        result = run_process(*args, env=poisoned("alone"))
        assert result.returncode == -signal.SIGKILL, result.stdout + result.stderr
    result = run_process(*args, env=poisoned("alone"))
    assert result.returncode == 3, result.stdout + result.stderr
    assert reason_of(tmp_path / "q", "MR.poison") == "it stopped dumpwatch itself twice while it was read alone"
    assert len(tree_of(tmp_path / "out")) == 5
    assert os.listdir(dump) == []


def test_a_worker_that_dies_idle_is_seen_and_replaced(tmp_path, template_file):
    """No file at the worker, so no future fails: its death is seen by its own exit status
    (through the pool's mp_context, not the executor's private attributes), said as serve
    says it, and the next files are read by a fresh pool."""
    cfg = Config(dir_out=tmp_path / "out", dir_quarantine=tmp_path / "q")
    files = [str(make_dicom(tmp_path / "dump" / f"MR.{n}", template_file, InstanceNumber=n)) for n in (1, 2)]
    with Sorter(cfg) as sorter, Workers(sorter.job, 1, always_pool=True, state=cfg.state_dir) as workers:
        assert not workers.broken
        [worker] = workers.processes
        os.kill(worker.pid, signal.SIGKILL)
        wait_for(lambda: workers.broken, 10, "the dead worker seen")
        assert workers.death() == "killed by signal 9, SIGKILL"
        results = workers.retry_alone(files)
        assert [(type(r), r.source) for r in results] == [(Prepared, path) for path in files]
        assert not workers.broken and worker not in workers.processes
        [again] = workers.run([files])
        assert [type(r) for r in again] == [Prepared, Prepared]
