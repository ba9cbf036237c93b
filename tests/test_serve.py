"""`dumpwatch serve` beside the real storescp, fed by the real storescu over loopback."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from campaign import corpus_cache
from dcmtk import Serve, Storescp, data_files, storescu, wait_for, write_config
from pydicom import dcmread
from pydicom.uid import generate_uid

from dumpwatch.config import read_config
from dumpwatch.dicomfile import read_dicom
from dumpwatch.sortonce import sort_dir

from helpers import FIELDMAP, copy_testdata, make_dicom, run_process, tree_of


def reference(testdata: Path, tmp_path: Path, only: str = "", more: tuple[Path, ...] = ()) -> dict[str, str]:
    """{path in the tree: SOPInstanceUID} as sort-once sorts the same files (and `more`)."""
    copy_testdata(testdata, tmp_path / "ref-dump", only)
    for path in more:
        shutil.copyfile(path, tmp_path / "ref-dump" / path.name)
    cfg = read_config(write_config(tmp_path / "ref"))
    sort_dir(tmp_path / "ref-dump", cfg)
    return uids(tmp_path / "ref" / "sorted")


def uids(tree: Path) -> dict[str, str]:
    return {rel: str(dcmread(tree / rel, stop_before_pixels=True).SOPInstanceUID) for rel in tree_of(tree)}


def dump_files(site: Path) -> list[str]:
    return [name for name in os.listdir(site.parent / "dump") if name != ".dumpwatch.lock"]


def settled(site: Path, count: int) -> bool:
    return len(tree_of(site.parent / "sorted")) >= count and not dump_files(site)


def journal(site: Path, sql: str) -> list:
    db = sqlite3.connect(site.parent / "sorted" / ".dumpwatch" / "journal.sqlite3")
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


@pytest.mark.dcmtk
def test_every_real_file_arrives_sorted_as_sort_once_sorts_it(receiver, site, testdata, tmp_path):
    scp, serve = receiver
    files = data_files(testdata)
    storescu(scp.port, files, tmp_path)
    expected = reference(testdata, tmp_path)
    wait_for(lambda: settled(site, len(expected)), 60, "all files sorted")
    assert uids(site.parent / "sorted") == expected
    assert not (site.parent / "quarantine").exists()
    classes = {str(dcmread(site.parent / "sorted" / rel, stop_before_pixels=True).SOPClassUID)
               for rel in tree_of(site.parent / "sorted")}
    assert "1.2.840.10008.5.1.4.1.1.4.2" in classes  # MR spectroscopy
    assert "1.3.12.2.1107.5.9.1" in classes  # Siemens' private CSA non-image (physio)
    assert journal(site, "SELECT count(*) FROM outcomes WHERE done = 0") == [(0,)]


@pytest.mark.dcmtk
def test_four_scanners_at_once(receiver, site, testdata, tmp_path):
    scp, _ = receiver
    series = [FIELDMAP, "philips", "ge", "siemens_fieldmap/3_gre_field_magph"]
    senders = [storescu(scp.port, data_files(testdata / part), tmp_path, wait=False) for part in series]
    for sender in senders:
        out, _ = sender.communicate(timeout=300)
        assert sender.returncode == 0, out
    expected = {}
    for number, part in enumerate(series):
        expected |= reference(testdata, tmp_path / f"ref{number}", part)
    wait_for(lambda: settled(site, len(expected)), 60, "all files sorted")
    assert uids(site.parent / "sorted") == expected  # nothing lost, nothing mixed


@pytest.mark.dcmtk
def test_same_study_sent_twice_changes_nothing(receiver, site, testdata, tmp_path):
    scp, _ = receiver
    files = data_files(testdata / "siemens_fieldmap")
    storescu(scp.port, files, tmp_path)
    wait_for(lambda: settled(site, len(files)), 60, "first send sorted")
    first = tree_of(site.parent / "sorted")
    storescu(scp.port, files, tmp_path)
    # Rows are written as under way (done = 0) before the sources go: count finished ones.
    wait_for(lambda: journal(site, "SELECT count(*) FROM outcomes WHERE outcome = 'duplicate' AND done = 1")
             == [(len(files),)], 60, "second send recognised")
    assert tree_of(site.parent / "sorted") == first
    assert not dump_files(site)


@pytest.mark.dcmtk
def test_watcher_killed_while_files_arrive(site, testdata, tmp_path):
    """SIGKILL the watcher mid-send, start it again: every file sorted exactly once."""
    scp = Storescp(site)
    serve = Serve(site)
    try:
        files = data_files(testdata / "philips")
        sender = storescu(scp.port, files, tmp_path, wait=False)
        wait_for(lambda: len(tree_of(site.parent / "sorted")) >= len(files) // 10, 60, "some files sorted")
        serve.process.kill()
        serve.process.wait()
        serve.log.close()
        time.sleep(0.5)  # files keep arriving with no one watching
        serve = Serve(site)
        out, _ = sender.communicate(timeout=300)
        assert sender.returncode == 0, out
        expected = reference(testdata, tmp_path, "philips")
        wait_for(lambda: settled(site, len(expected)), 60, "all files sorted")
        assert uids(site.parent / "sorted") == expected  # each once: no "A" copies
        assert journal(site, "SELECT count(*) FROM outcomes WHERE done = 0") == [(0,)]
    finally:
        code = serve.stop()
        scp.stop()
    assert code == 0


@pytest.mark.dcmtk
def test_storescp_killed_mid_transfer_of_a_large_file(site, template_file, tmp_path):
    """storescp writes as data arrives (+B): killed, it leaves a truncated file behind,
    with a close event. It must never reach the tree: it waits, then goes to quarantine."""
    big = tmp_path / "big.dcm"
    ds = dcmread(template_file)
    ds.Rows, ds.Columns, ds.NumberOfFrames = 4096, 4096, 5  # 160 MB of pixels
    ds.PixelData = os.urandom(1 << 20) * 160
    ds.SOPInstanceUID = generate_uid()
    ds.save_as(big, enforce_file_format=False)
    scp = Storescp(site)
    serve = Serve(site)
    try:
        sender = storescu(scp.port, [big], tmp_path, wait=False)
        dump = site.parent / "dump"
        wait_for(lambda: any(os.path.getsize(dump / n) > 20_000_000 for n in dump_files(site)), 60,
                 "the transfer to be under way")
        scp.kill(signal.SIGKILL)
        sender.communicate(timeout=60)
        quarantine = site.parent / "quarantine"
        wait_for(lambda: quarantine.exists() and dump_files(site) == [], 30, "the partial file quarantined")
        reason = next(quarantine.glob("*.reason.txt")).read_text().splitlines()[0]
        assert reason.startswith("truncated: element (7FE0,0010) declares 167772160 bytes")
        assert not tree_of(site.parent / "sorted")
        assert not dump_files(site)
    finally:
        code = serve.stop()
        scp.stop()
    assert code == 0


@pytest.mark.dcmtk
def test_a_second_serve_on_the_same_dump_refuses_to_start(receiver, site):
    _, serve = receiver
    second = run_process("--config", str(site), "serve")
    assert second.returncode == 1
    assert f"another dumpwatch serve is watching {site.parent / 'dump'} (pid {serve.process.pid} on " in second.stderr


def test_files_already_in_the_dump_at_start_are_sorted(site, template_file):
    for number in range(1, 4):
        make_dicom(site.parent / "dump" / f"MR.{number}", template_file, InstanceNumber=number)
    serve = Serve(site)
    try:
        wait_for(lambda: settled(site, 3), 30, "the waiting files sorted")
    finally:
        assert serve.stop() == 0


def test_a_sweep_finds_files_no_event_announced(site, template_file, tmp_path):
    """Files moved into the dump make no close event (and inotify can drop events): the
    periodic sweep finds them."""
    cfg = write_config(site.parent, sweep_interval=1)
    serve = Serve(cfg)
    try:
        make_dicom(tmp_path / "elsewhere" / "MR.1", template_file)
        os.rename(tmp_path / "elsewhere" / "MR.1", site.parent / "dump" / "MR.1")
        wait_for(lambda: settled(cfg, 1), 10, "the sweep to find it")
    finally:
        assert serve.stop() == 0


def test_polling_observer_sorts_by_stability(site, template_file):
    """For NFS/SMB dumps, where inotify sees nothing: a file is finished once it is still."""
    cfg = write_config(site.parent, observer="polling", stable_seconds=1)
    serve = Serve(cfg)
    try:
        path = make_dicom(site.parent / "MR.1", template_file)
        data = path.read_bytes()
        target = site.parent / "dump" / "MR.1"
        with open(target, "wb") as growing:  # written slowly, as over a network share
            for start in range(0, len(data), 20_000):
                growing.write(data[start:start + 20_000])
                growing.flush()
                time.sleep(0.3)
                assert not tree_of(site.parent / "sorted"), "sorted before it was finished"
        wait_for(lambda: settled(cfg, 1), 15, "the still file to be sorted")
        assert not (site.parent / "quarantine").exists()
    finally:
        assert serve.stop() == 0


def test_a_dead_worker_is_replaced_and_serve_goes_on(site, template_file):
    """A worker killed while idle (the out-of-memory killer may choose any): serve starts a
    fresh pool and goes on; an exit would only bring a supervisor's restart. (A worker killed
    by a file: tests/test_poison.py.)"""
    serve = Serve(site)
    try:
        children = subprocess.run(["pgrep", "-P", str(serve.process.pid)], capture_output=True,
                                  text=True).stdout.split()
        assert children, "serve has worker processes"
        os.kill(int(children[0]), signal.SIGKILL)
        wait_for(lambda: "a worker process died (killed by signal 9, SIGKILL) with 0 files" in serve.output()
                 or serve.process.poll() is not None, 30, "serve to see the worker die")
        make_dicom(site.parent / "dump" / "MR.1", template_file)
        wait_for(lambda: settled(site, 1) or serve.process.poll() is not None, 30, "a file sorted by the new pool")
        assert serve.process.poll() is None, serve.output()
    finally:
        assert serve.stop() == 0, serve.output()


def test_a_stop_finishes_the_file_in_hand_and_says_where_it_waits_when_slow(site, template_file, monkeypatch):
    """SIGTERM while a worker holds a file: serve sorts it before it exits, however long that
    takes; should the stop take longer than STOP_REPORT seconds, the log shows where each
    thread waits (for whoever must find out why, before a supervisor's SIGKILL)."""
    monkeypatch.setenv("DUMPWATCH_FAILPOINTS", "read~MR.slow=:STOP")  # its worker stops as it reads it
    cfg = write_config(site.parent, fname_log=site.parent / "dumpwatch.log")
    serve = Serve(cfg)
    try:
        make_dicom(site.parent / "dump" / "MR.slow", template_file)

        def stopped_worker() -> int | None:
            for pid in subprocess.run(["pgrep", "-P", str(serve.process.pid)], capture_output=True,
                                      text=True).stdout.split():
                if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T":
                    return int(pid)
            return None

        worker = wait_for(stopped_worker, 30, "the worker to stop on the file")
        serve.process.send_signal(signal.SIGTERM)
        # (the dump is written a line at a time: wait for the line sought, not for the first)
        wait_for(lambda: re.search(r'File ".*/dumpwatch/watcher\.py", line \d+ in run', serve.log_file.read_text()),
                 60, "where serve waits, in its log")
        assert "Timeout (0:00:20)!" in serve.log_file.read_text()
        assert serve.process.poll() is None, serve.output()
        log = serve.log_file.read_text()
        assert "stopping: finishing the files in hand" in log
        assert re.search(r'File ".*/dumpwatch/watcher\.py", line \d+ in run', log), log
        os.kill(worker, signal.SIGCONT)
        assert serve.process.wait(timeout=60) == 0, serve.output()
        assert len(tree_of(site.parent / "sorted")) == 1, serve.output()
        assert not dump_files(site), serve.output()
    finally:
        for pid in subprocess.run(["pgrep", "-P", str(serve.process.pid)], capture_output=True,
                                  text=True).stdout.split():
            os.kill(int(pid), signal.SIGCONT)
        assert serve.stop() == 0, serve.output()


@pytest.mark.dcmtk
def test_status_reports_what_an_operator_needs(site, template_file, testdata, tmp_path):
    def status() -> tuple[int, dict]:
        result = run_process("--config", str(site), "status", "--json")
        return result.returncode, json.loads(result.stdout)

    code, report = status()
    assert code == 1 and not report["healthy"]
    assert report["problems"] == [f"nothing listens on port {report['storescp']['port']}: storescp is not running",
                                  "dumpwatch serve is not running"]
    scp = Storescp(site)
    serve = Serve(site)
    try:
        files = data_files(testdata / FIELDMAP)
        storescu(scp.port, files, tmp_path)
        wait_for(lambda: settled(site, len(files)), 60, "the series sorted")
        code, report = status()
        assert code == 0 and report["healthy"], report
        assert report["watcher"]["pid"] == serve.process.pid
        assert report["sorted"] == {"last_hour": len(files), "last_day": len(files)}
        assert report["last_series"]["subject"] == "20210715-phantom"
        assert report["last_series"]["series"] == "002-gre_field_magph"
        assert report["last_series"]["files"] == len(files)
        text = run_process("--config", str(site), "status")
        assert text.returncode == 0 and text.stdout.strip().endswith("healthy")
        assert f"last series  20210715-phantom/002-gre_field_magph: {len(files)} files" in text.stdout
    finally:
        assert serve.stop() == 0
    # The watcher stopped; a file waits in the dump, received an hour ago; one is quarantined.
    old = make_dicom(site.parent / "dump" / "MR.waiting", template_file)
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    (site.parent / "quarantine").mkdir(exist_ok=True)
    (site.parent / "quarantine" / "MR.bad").write_text("x")
    (site.parent / "quarantine" / "MR.bad.reason.txt").write_text("not a DICOM file (only 1 bytes)\n")
    try:
        code, report = status()
        assert code == 1
        assert report["problems"][0] == "dumpwatch serve is not running"
        waited = re.fullmatch(r"a file has waited (\d+) s in the dump \(alarm at 300 s\)", report["problems"][1])
        assert waited and 3600 <= int(waited[1]) < 3660, report["problems"]  # status itself takes a moment
        assert report["dump"]["waiting"] == 1
        assert report["quarantine"]["files"] == 1
        assert report["quarantine"]["recent"] == [{"file": "MR.bad", "reason": "not a DICOM file (only 1 bytes)"}]
        assert "UNHEALTHY: dumpwatch serve is not running" in run_process("--config", str(site), "status").stdout
    finally:
        scp.stop()


def _status(cfg: Path) -> tuple[int, dict]:
    result = run_process("--config", str(cfg), "status", "--json")
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, json.loads(result.stdout)


@pytest.mark.dcmtk
def test_status_asks_the_port_for_a_dicom_service(site):
    """Something other than storescp holds the port (storescp then dies with FATAL, and every
    storescu fails): listening is not enough, a C-ECHO must be answered."""
    import socket

    port = read_config(site).port
    serve = Serve(site)
    squatter = socket.socket()
    try:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        code, report = _status(site)
        assert code == 1 and not report["healthy"], report
        assert report["storescp"]["listening"] and not report["storescp"]["answers"], report
        [problem] = report["problems"]
        assert problem.startswith(f"port {port} is open, but no DICOM service answers a C-ECHO there as AE title "
                                  "DUMPWATCH (echoscu: "), problem
        squatter.close()
        scp = Storescp(site)
        try:
            code, report = _status(site)
            assert code == 0 and report["storescp"]["answers"], report
        finally:
            scp.stop()
    finally:
        squatter.close()
        assert serve.stop() == 0


@pytest.mark.dcmtk
def test_status_is_unhealthy_when_the_journal_cannot_be_read(site, tmp_path):
    scp = Storescp(site)
    serve = Serve(site)
    try:
        assert _status(site)[0] == 0
        damaged = tmp_path / "damaged.sqlite3"
        damaged.write_bytes(b"not a database " * 100)
        other = site.parent / "other.cfg"  # the same site, its journal read from elsewhere
        other.write_text(site.read_text() + f"journal = {damaged}\n")
        code, report = _status(other)
        assert code == 1, report
        assert report["problems"] == [f"the journal {damaged} cannot be read: file is not a database"], report
    finally:
        assert serve.stop() == 0
        scp.stop()


@pytest.mark.dcmtk
def test_supervisord_runs_restarts_and_stops_both(site, testdata, tmp_path):
    """The repository's supervisord configuration, as `make run` uses it."""
    var = tmp_path / "var"
    var.mkdir()
    env = {**os.environ, "DUMPWATCH_CONFIG": str(site), "DUMPWATCH_VAR": str(var)}
    supervisord = Path(sys.executable).parent / "supervisord"
    repo = Path(__file__).resolve().parents[1]
    process = subprocess.Popen([str(supervisord), "-c", str(repo / "etc" / "supervisord.conf")], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(process.stdout), daemon=True)
    reader.start()
    storescp_pattern = f"--aetitle DUMPWATCH --output-directory {site.parent / 'dump'}"
    try:
        port = int(read_config(site).port)
        serve_pid = wait_for(lambda: _lock_pid(site), 30, "serve to start under supervisord")
        from dumpwatch.status import listening

        wait_for(lambda: listening(port), 30, "storescp to listen")
        files = data_files(testdata / FIELDMAP)
        half = len(files) // 2
        storescu(port, files[:half], tmp_path)
        wait_for(lambda: settled(site, half), 30, "files sorted")
        os.kill(serve_pid, signal.SIGKILL)  # supervisord starts it again
        wait_for(lambda: _lock_pid(site) not in (None, serve_pid), 30, "serve restarted")
        storescu(port, files[half:], tmp_path)
        wait_for(lambda: settled(site, len(files)), 30, "files sorted after the restart")
        assert subprocess.run(["pgrep", "-f", "--", storescp_pattern], capture_output=True).returncode == 0
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    reader.join(timeout=10)
    log = "".join(output)
    assert "stopped: dumpwatch (exit status 0)" in log, log
    assert "stopped: storescp (terminated by SIGTERM)" in log, log
    assert subprocess.run(["pgrep", "-f", "--", storescp_pattern], capture_output=True).returncode == 1, \
        "storescp left running"


def _lock_pid(site: Path, dump: Path | None = None) -> int | None:
    from dumpwatch.dumplock import read_lock

    holder = read_lock(dump or site.parent / "dump")
    return holder.pid if holder else None


def test_the_log_file_is_reopened_after_logrotate_moves_it(site, template_file):
    cfg = write_config(site.parent, fname_log="serve-file.log")
    serve = Serve(cfg)
    try:
        make_dicom(site.parent / "incoming" / "MR.1", template_file)
        os.rename(site.parent / "incoming" / "MR.1", site.parent / "dump" / "MR.1")  # no event: the start sweep
        os.utime(site.parent / "dump" / "MR.1")
        log = site.parent / "serve-file.log"
        wait_for(lambda: log.exists() and "watching" in log.read_text(), 20, "the log file")
        os.rename(log, site.parent / "serve-file.log.1")  # as logrotate does
        make_dicom(site.parent / "MR.2.dcm", template_file, InstanceNumber=2)
        with open(site.parent / "MR.2.dcm", "rb") as source, open(site.parent / "dump" / "MR.2", "wb") as target:
            target.write(source.read())  # closed in the dump: an event
        wait_for(lambda: log.exists() and "sorted " in log.read_text(), 20, "a new log file")
        assert "MR.2" in log.read_text()
    finally:
        assert serve.stop() == 0


def test_sighup_reopens_the_log_file_and_serve_lives_on(site, template_file):
    """Daemons take SIGHUP to reopen their log (logrotate's postrotate `kill -HUP`); it killed
    serve at once. A closed terminal sends it to the whole process group: the workers too."""
    cfg = write_config(site.parent, fname_log="serve-file.log")
    serve = Serve(cfg, session=True)
    try:
        log = site.parent / "serve-file.log"
        wait_for(lambda: log.exists() and "watching" in log.read_text(), 20, "the log file")
        os.rename(log, site.parent / "serve-file.log.1")  # logrotate, then its postrotate
        os.killpg(serve.process.pid, signal.SIGHUP)
        wait_for(lambda: log.exists() and "SIGHUP: reopened the log file" in log.read_text()
                 or serve.process.poll() is not None, 20, "the log reopened")
        assert serve.process.poll() is None, serve.output()
        make_dicom(site.parent / "dump" / "MR.1", template_file)  # closed in the dump: an event
        wait_for(lambda: settled(cfg, 1), 20, "the next file sorted")
        assert "sorted " in log.read_text()
    finally:
        assert serve.stop() == 0, serve.output()


def test_a_journal_deleted_under_serve_is_said_loudly_and_rebuilt_from_the_tree(site, template_file):
    """`rm journal.sqlite3*` while serve ran: serve wrote on into the unlinked file, and the
    next start made a new journal without a word: the history gone, the tree unjournalled.
    serve now exits for the supervisor; the restart says the journal is new while the tree
    holds files, and rebuilds a row per file from the tree."""
    serve = Serve(site)
    dump = site.parent / "dump"
    for number in (1, 2):
        make_dicom(dump / f"MR.{number}", template_file, InstanceNumber=number)
    state = site.parent / "sorted" / ".dumpwatch"
    try:
        wait_for(lambda: settled(site, 2), 30, "the files sorted")
        uids = [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                for p in sorted((site.parent / "sorted").rglob("*.dcm"))]
        for name in ("journal.sqlite3", "journal.sqlite3-wal", "journal.sqlite3-shm"):
            (state / name).unlink(missing_ok=True)
        wait_for(lambda: serve.process.poll() is not None, 30, "serve to exit")
    finally:
        serve.stop()
    assert serve.process.returncode == 1, serve.output()
    assert f"the journal {state / 'journal.sqlite3'} was deleted while serve ran" in serve.output()
    again = Serve(site)  # as the supervisor restarts it
    try:
        wait_for(lambda: "rebuilt 2 journal rows from the tree" in again.output(), 30, "the rebuild")
        assert (f"the journal {state / 'journal.sqlite3'} is new, but the sorted tree {site.parent / 'sorted'} "
                "holds files") in again.output()
        placed = site.parent / "sorted" / "20210715-phantom" / "002-gre_field_magph" / "0001.dcm"
        where = run_process("--config", str(site), "where", uids[0])
        assert where.returncode == 0, where.stdout + where.stderr
        assert f"sorted   -> {placed}  (rebuilt from the tree: the journal had no record of it)" in where.stdout
        rows = journal(site, f"SELECT sha256, series_uid FROM outcomes WHERE dest = '{placed}'")
        assert rows == [(hashlib.sha256(placed.read_bytes()).hexdigest(),
                         str(dcmread(placed, stop_before_pixels=True).SeriesInstanceUID))]
        report = json.loads(run_process("--config", str(site), "status", "--json").stdout)
        assert [p for p in report["problems"] if "journal" in p] == [
            f"the journal was found new while the tree held files, at {report['journal']['rebuilt']['started']}: "
            "its history before then is lost; 2 files were rebuilt from the tree"], report
        make_dicom(dump / "MR.3", template_file, InstanceNumber=3)
        wait_for(lambda: settled(site, 3), 30, "a new file sorted")
        assert journal(site, "SELECT count(*) FROM outcomes WHERE outcome = 'sorted'") == [(3,)]
    finally:
        assert again.stop() == 0, again.output()


def test_serve_names_a_damaged_journal(site):
    path = site.parent / "sorted" / ".dumpwatch" / "journal.sqlite3"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a database " * 100)
    serve = Serve(site, wait=False)
    assert serve.process.wait(timeout=30) == 1
    serve.log.close()
    assert (f"Error: cannot start: the journal {path} cannot be used: file is not a database (move it aside to "
            "keep it: serve then starts a new one, and rebuilds what it can from the tree)") in serve.output()


def test_serve_exits_for_the_supervisor_when_the_dump_is_removed(site):
    serve = Serve(site)
    dump = site.parent / "dump"
    for name in os.listdir(dump):
        os.unlink(dump / name)
    os.rmdir(dump)
    assert serve.process.wait(timeout=30) == 1
    serve.log.close()
    assert "was removed or replaced; starting again makes it anew" in serve.output()
    again = Serve(site)  # as the supervisor restarts it: the dump is made again
    assert dump.is_dir()
    assert again.stop() == 0


PHYSIO = "nonimage/physio_siemens/samplePhysioCMRR.dcm"


def test_a_sweep_never_hands_over_a_file_still_being_written(tmp_path, testdata):
    """A non-image object cut at an element boundary looks whole. While its writer holds it
    open, or has just written to it, the sweeps leave it alone; closed, it is sorted whole."""
    cfg = write_config(tmp_path / "site", sweep_interval=1, stable_seconds=0.5)
    data = (testdata / PHYSIO).read_bytes()
    cut = data.find(b"\xe1\x7f\x10\x10")  # the private (7FE1,1010) element: 368 KB of samples
    assert 0 < cut < len(data)
    dump = tmp_path / "site" / "dump"
    dump.mkdir(parents=True)
    with open(dump / "MR.physio", "wb") as writer:  # storescp, with the sender stalled mid-file
        writer.write(data[:cut])
        writer.flush()
        os.utime(dump / "MR.physio", (time.time() - 600, time.time() - 600))  # still for long
        serve = Serve(cfg)
        time.sleep(3)  # the start sweep and two more have passed
        held = dump_files(cfg) == ["MR.physio"] and not tree_of(tmp_path / "site" / "sorted")
        writer.write(data[cut:])  # the sender goes on
    try:
        assert held, "a file still open for writing was taken from the dump"
        wait_for(lambda: settled(cfg, 1), 20, "the finished file sorted")
        [placed] = (tmp_path / "site" / "sorted").rglob("*.dcm")
        assert placed.read_bytes() == data
    finally:
        assert serve.stop() == 0


def test_sort_once_leaves_a_dump_that_serve_watches_alone(tmp_path, template_file):
    cfg = write_config(tmp_path / "site", dir_dump="incoming/dump")
    serve = Serve(cfg)
    try:
        dump = tmp_path / "site" / "incoming" / "dump"
        result = run_process("--config", str(cfg), "sort-once", str(dump))
        assert result.returncode == 2
        assert f"dumpwatch serve is watching {dump} (pid {serve.process.pid} on " in result.stderr
        make_dicom(tmp_path / "site" / "incoming" / "old" / "MR.1", template_file)  # an old dump beside it
        result = run_process("--config", str(cfg), "sort-once", str(tmp_path / "site" / "incoming"))
        assert result.returncode == 3, result.stdout + result.stderr
        assert f"skipped {dump}: dumpwatch serve is watching it and sorts it itself" in result.stdout
        assert "sorted            1" in result.stdout
        assert not (tmp_path / "site" / "quarantine").exists()  # its lock was not taken for a bad file
        assert _lock_pid(cfg, dump) == serve.process.pid
    finally:
        assert serve.stop() == 0
    # With no serve running, the lock file left behind is no file to sort.
    result = run_process("--config", str(cfg), "sort-once", str(dump))
    assert result.returncode == 0 and "0 files" in result.stdout, result.stdout + result.stderr


def test_a_symlink_planted_as_the_lock_is_never_followed(site, template_file):
    victim = make_dicom(site.parent / "sorted-elsewhere" / "0001.dcm", template_file)
    before = victim.read_bytes()
    (site.parent / "dump").mkdir()
    os.symlink(victim, site.parent / "dump" / ".dumpwatch.lock")
    serve = Serve(site, wait=False)
    assert serve.process.wait(timeout=30) == 1
    serve.log.close()
    assert "is a symlink, not dumpwatch's lock; remove it" in serve.output()
    assert victim.read_bytes() == before


def test_sigterm_to_every_process_mid_batch_finishes_cleanly(site, testdata, tmp_path):
    """systemd's default stop signals the whole unit, workers too: serve must still finish the
    batch in hand and exit 0, and the files not yet sorted wait in the dump."""
    # Generated files besides the real ones: more than serve has at its workers at once (two
    # chunks a worker), so that some are still waiting when the signal comes.
    generated = tuple(sorted(corpus_cache(300).iterdir()))
    inputs = copy_testdata(testdata, tmp_path / "incoming")
    for path in generated:
        inputs.append(tmp_path / "incoming" / path.name)
        shutil.copyfile(path, inputs[-1])
    dump = site.parent / "dump"
    dump.mkdir()
    for number, path in enumerate(inputs):
        os.rename(path, dump / f"MR.{number:04d}")
    serve = Serve(site, session=True)
    wait_for(lambda: tree_of(site.parent / "sorted"), 60, "the first files sorted")
    os.killpg(serve.process.pid, signal.SIGTERM)
    assert serve.process.wait(timeout=60) == 0, serve.output()
    serve.log.close()
    assert "worker process died" not in serve.output()
    waiting = dump_files(site)
    assert waiting, "stopped only after the last file: not mid-batch"
    assert journal(site, "SELECT count(*) FROM outcomes WHERE done = 0") == [(0,)]
    assert len(tree_of(site.parent / "sorted")) + len(waiting) == len(inputs)
    expected = reference(testdata, tmp_path, more=generated)
    serve = Serve(site)
    try:
        wait_for(lambda: settled(site, len(expected)), 60, "the rest sorted after the restart")
        assert uids(site.parent / "sorted") == expected
    finally:
        assert serve.stop() == 0


def test_a_file_that_cannot_be_removed_never_stops_serve(template_file):
    """A dump shared with the sticky bit: serve, as one user, cannot remove another user's
    file. It says so, once in the journal however often it tries, and goes on."""
    if os.getuid() != 0:
        pytest.skip("needs root to act as two users")
    import pwd
    import tempfile

    nobody = pwd.getpwnam("nobody")
    base = Path(tempfile.mkdtemp(prefix="dumpwatch-sticky-"))  # tmp_path is root's alone
    try:
        os.chmod(base, 0o755)
        cfg = write_config(base, sweep_interval=1)
        dump = base / "dump"
        dump.mkdir(mode=0o1777)
        os.chmod(dump, 0o1777)
        for name in ("sorted", "quarantine"):
            (base / name).mkdir()
            os.chown(base / name, nobody.pw_uid, nobody.pw_gid)
        os.chown(base, nobody.pw_uid, nobody.pw_gid)  # serve's log beside its config
        os.chown(cfg, nobody.pw_uid, nobody.pw_gid)
        serve = Serve(cfg, user=nobody.pw_uid, group=nobody.pw_gid)
        try:
            original = make_dicom(base / "MR.1", template_file)
            os.chown(original, nobody.pw_uid, nobody.pw_gid)
            os.rename(original, dump / "MR.1")
            os.utime(dump / "MR.1")
            wait_for(lambda: settled(cfg, 1), 30, "nobody's own file sorted")
            shutil.copyfile(base / "sorted" / "20210715-phantom" / "002-gre_field_magph" / "0001.dcm",
                            dump / "MR.1-again")  # root's, identical: a duplicate it cannot remove
            os.chmod(dump / "MR.1-again", 0o644)
            reason = "cannot be removed from here: Operation not permitted"
            wait_for(lambda: reason in serve.output(), 30, "the problem reported")
            time.sleep(4)  # tried again and again meanwhile
            assert serve.process.poll() is None, serve.output()
            rows = journal(cfg, "SELECT outcome, reason FROM outcomes WHERE name = 'MR.1-again'")
            assert len(rows) == 1 and rows[0][0] == "left" and reason in rows[0][1], rows
            assert "in the tree at " in rows[0][1]
            assert dump_files(cfg) == ["MR.1-again"]
            assert len(tree_of(base / "sorted")) == 1
        finally:
            assert serve.stop() == 0
        again = Serve(cfg, user=nobody.pw_uid, group=nobody.pw_gid)  # a restart is not stopped by it either
        assert again.stop() == 0
    finally:
        shutil.rmtree(base)


def test_a_full_disk_pauses_sorting_and_nothing_is_lost(tmp_path, testdata):
    """The tree's disk fills up while serve runs: it must wait for space, not exit (under a
    supervisor, exits at every start end in giving up), and sort everything once space is back."""
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(small)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        cfg = write_config(tmp_path / "site", dir_out=small / "sorted")
        serve = Serve(cfg)
        try:
            filler = small / "filler"
            with open(filler, "wb") as fill:
                try:
                    while True:
                        fill.write(b"\0" * 65536)
                        fill.flush()
                except OSError:
                    pass
            inputs = copy_testdata(testdata, tmp_path / "incoming", "siemens_fieldmap")
            dump = tmp_path / "site" / "dump"
            for number, path in enumerate(inputs):
                shutil_copy(path, dump / f"MR.{number:04d}")  # closed in the dump: events
            wait_for(lambda: "No space left on device" in serve.output()
                     or "database or disk is full" in serve.output(), 60, "the full disk noticed")
            time.sleep(2)
            assert serve.process.poll() is None, serve.output()
            assert not (tmp_path / "site" / "quarantine").exists()  # a full disk is not bad input
            status = run_process("--config", str(cfg), "status", "--json")
            assert status.returncode == 1, status.stdout  # not healthy: an operator must know
            problems = json.loads(status.stdout)["problems"]
            assert any(p.startswith("sorting is paused: ") and "full" in p for p in problems), problems
            assert dump_files(cfg), "the sources stay in the dump while nothing can be placed"
            for path in (small / "sorted").rglob("*"):  # nothing partial or hidden in the tree
                if path.is_file() and ".dumpwatch" not in path.parts:
                    assert not path.name.startswith("."), path
                    read_dicom(str(path), None).close()  # whole, or it raises
            filler.unlink()  # space again
            wait_for(lambda: len(tree_of(small / "sorted")) == len(inputs) and not dump_files(cfg), 120,
                     "everything sorted once there was space")
            assert uids(small / "sorted") == reference(testdata, tmp_path, "siemens_fieldmap")
            assert journal_at(small / "sorted", "SELECT count(*) FROM outcomes WHERE done = 0") == [(0,)]
        finally:
            assert serve.stop() == 0, serve.output()
    finally:
        subprocess.run(["umount", str(small)], check=True)


@pytest.mark.dcmtk
def test_a_full_staging_disk_pauses_sorting_and_says_so(tmp_path, testdata):
    """The dump is on another disk than the tree, so each file is first copied into the
    staging folder on the tree's disk. That disk fills up (the journal is elsewhere, and can
    be written): sorting pauses, as for a journal that cannot be written, and the lock
    tells `status` why; nothing is quarantined or lost."""
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(small)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        cfg = write_config(tmp_path / "site", dir_out=small / "sorted", journal=tmp_path / "journal.sqlite3")
        scp = Storescp(cfg)
        serve = Serve(cfg)
        try:
            assert _status(cfg)[0] == 0
            filler = small / "filler"
            with open(filler, "wb", buffering=0) as fill:
                try:
                    while True:
                        fill.write(b"\0" * 65536)
                except OSError:
                    pass
            inputs = copy_testdata(testdata, tmp_path / "incoming", FIELDMAP)
            dump = tmp_path / "site" / "dump"
            for number, path in enumerate(inputs):
                shutil_copy(path, dump / f"MR.{number:04d}")  # closed in the dump: events
            staging = small / "sorted" / ".dumpwatch" / "tmp"
            reason = f"disk full (No space left on device in the staging folder {staging})"
            wait_for(lambda: f"sorting paused for 10 s: {reason}" in serve.output()
                     or serve.process.poll() is not None, 60, "the pause")
            code, report = _status(cfg)
            assert code == 1 and report["problems"][0] == f"sorting is paused: {reason}", report
            # (and the full disk itself, past disk_alarm)
            assert report["problems"][1].startswith("the filesystem of the sorted tree is 100% full (alarm at 95%)")
            assert len(report["problems"]) == 2, report
            assert report["watcher"]["paused"] == reason
            assert not (tmp_path / "site" / "quarantine").exists()
            filler.unlink()  # space again
            wait_for(lambda: len(tree_of(small / "sorted")) == len(inputs) and not dump_files(cfg), 120,
                     "everything sorted once there was space")
            assert _status(cfg)[0] == 0
        finally:
            assert serve.stop() == 0, serve.output()
            scp.stop()
    finally:
        subprocess.run(["umount", str(small)], check=True)


def shutil_copy(source: Path, target: Path) -> None:
    with open(source, "rb") as reader, open(target, "wb") as writer:
        writer.write(reader.read())


def journal_at(tree: Path, sql: str) -> list:
    db = sqlite3.connect(tree / ".dumpwatch" / "journal.sqlite3")
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def test_polling_ignores_a_file_server_clock_that_runs_ahead(site, template_file):
    """On NFS a file's times come from the server's clock: stillness is timed by ours alone."""
    cfg = write_config(site.parent, observer="polling", stable_seconds=1)
    future = time.time() + 3600
    path = make_dicom(site.parent / "dump" / "MR.1", template_file)
    os.utime(path, (future, future))
    result = run_process("--config", str(cfg), "status", "--json")
    assert any("dated 3600 s in the future" in p or "dated 3599 s in the future" in p
               for p in json.loads(result.stdout)["problems"]), result.stdout
    serve = Serve(cfg)
    try:
        wait_for(lambda: settled(cfg, 1), 15, "the file sorted despite its date")
    finally:
        assert serve.stop() == 0


@pytest.mark.dcmtk
def test_serve_anonymises_what_it_receives_and_logs_no_original(tmp_path, testdata, expected):
    cfg = write_config(tmp_path / "site", anon_profile="basic, retain-long-modified-dates")
    scp = Storescp(cfg)
    serve = Serve(cfg)
    try:
        files = data_files(testdata / FIELDMAP)
        storescu(scp.port, files, tmp_path)
        wait_for(lambda: settled(cfg, len(files)), 60, "all files sorted")
    finally:
        code = serve.stop()
        scp.stop()
    assert code == 0
    sorted_tree = tmp_path / "site" / "sorted"
    originals = {m["SOPInstanceUID"].encode() for name, m in expected.items() if name.startswith(FIELDMAP + "/")}
    originals |= {m["SeriesInstanceUID"].encode() for name, m in expected.items() if name.startswith(FIELDMAP + "/")}
    log = (tmp_path / "site" / "serve.log").read_bytes()
    journal_bytes = b"".join(p.read_bytes() for p in (sorted_tree / ".dumpwatch").glob("journal.sqlite3*"))
    for rel in tree_of(sorted_tree):
        data = (sorted_tree / rel).read_bytes()
        assert not [o for o in originals if o in data or o in rel.encode()], rel
    assert not [o for o in originals if o in log], "an original UID in serve's log"
    assert not [o for o in originals if o in journal_bytes], "an original UID in the journal"
    assert b"sorted ANON-" in log
